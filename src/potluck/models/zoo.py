"""Model factories by name.

``cnn`` and ``mlp2nn`` are the "CNN" (1,663,370 parameters) and "2NN" (199,210 parameters)
of McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data" (AISTATS), for 28x28 inputs.

Example:
    >>> m = build_model("cnn", input_shape=(1, 28, 28), num_classes=10)
    >>> sum(p.numel() for p in m.parameters())
    1663370
"""

from __future__ import annotations

from collections.abc import Callable
from math import prod

from torch import nn

Factory = Callable[[tuple[int, ...], int], nn.Module]


def logreg(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Multinomial logistic regression: one linear layer on the flattened input."""
    return nn.Sequential(nn.Flatten(), nn.Linear(prod(input_shape), num_classes))


def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: int = 64) -> nn.Module:
    """One hidden layer MLP (e.g. 64-64-10 on scikit-learn digits)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(prod(input_shape), hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def mlp2nn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """McMahan et al. 2017 "2NN": two hidden layers of 200 units with ReLU."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(prod(input_shape), 200),
        nn.ReLU(),
        nn.Linear(200, 200),
        nn.ReLU(),
        nn.Linear(200, num_classes),
    )


def _conv_stack(channels: int, widths: tuple[int, int]) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, widths[0], 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(widths[0], widths[1], 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
    )


def _image_shape(input_shape: tuple[int, ...], model: str) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(
            f"model {model!r} needs image inputs shaped (channels, height, width), "
            f"got input_shape={input_shape}"
        )
    c, h, w = input_shape
    return c, h, w


def cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """McMahan et al. 2017 "CNN": 5x5 conv 32, pool, 5x5 conv 64, pool, fc 512, fc out."""
    c, h, w = _image_shape(input_shape, "cnn")
    flat = 64 * (h // 4) * (w // 4)
    return nn.Sequential(
        _conv_stack(c, (32, 64)),
        nn.Linear(flat, 512),
        nn.ReLU(),
        nn.Linear(512, num_classes),
    )


def small_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A quick CNN (28,874 parameters on 28x28x1): conv 8, conv 16, fc 32, fc out."""
    c, h, w = _image_shape(input_shape, "small_cnn")
    flat = 16 * (h // 4) * (w // 4)
    return nn.Sequential(
        _conv_stack(c, (8, 16)),
        nn.Linear(flat, 32),
        nn.ReLU(),
        nn.Linear(32, num_classes),
    )


def lenet5(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The LeNet-style CNN of NIID-Bench (Li, Diao, Chen, He 2021, "Federated Learning on
    Non-IID Data Silos: An Experimental Study", ICDE): 5x5 conv 6, pool, 5x5 conv 16, pool
    (no padding), fc 120, fc 84, fc out; 44,426 parameters on 28x28x1."""
    c, h, w = _image_shape(input_shape, "lenet5")
    side = lambda n: ((n - 4) // 2 - 4) // 2  # noqa: E731  (two valid 5x5 convs, two pools)
    flat = 16 * side(h) * side(w)
    return nn.Sequential(
        nn.Conv2d(c, 6, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    )


_MODELS: dict[str, Factory] = {
    "logreg": logreg,
    "mlp": mlp,
    "mlp2nn": mlp2nn,
    "cnn": cnn,
    "small_cnn": small_cnn,
    "lenet5": lenet5,
}


def available_models() -> list[str]:
    return sorted(_MODELS)


def build_model(name: str, *, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build reference model ``name`` for inputs of ``input_shape`` and ``num_classes``."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available_models())}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return _MODELS[name](tuple(input_shape), num_classes)
