"""The attacker's copy of a task's model and what it knows of the data.

A curious server knows the architecture (it built the global model), the input shape, the
number of classes and the range of feature values (e.g. the pixel box after
standardisation). :class:`AttackModel` evaluates the model functionally at any flat weight
vector (``torch.func.functional_call``, as a client does in ``client/program.py``), in eval
mode, with the task's cross-entropy taking class probabilities as targets.

Example:
    >>> import torch
    >>> from potluck.core.task import Task
    >>> model = AttackModel(Task(lambda: torch.nn.Linear(64, 10)), (64,), 10, (0.0, 1.0))
    >>> model.image_shape, model.spec.size
    ((1, 8, 8), 650)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.func import functional_call
from torch.nn import functional as F

from potluck.core.params import ParamSpec
from potluck.core.task import Task, cross_entropy

if TYPE_CHECKING:
    from potluck.data.sources import DataSource
    from potluck.orchestrator import Experiment

__all__ = ["AttackModel", "feature_box", "image_shape"]


def image_shape(input_shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """``(C, H, W)`` of an input: itself, ``(1, H, W)`` for 2-D inputs, ``(1, s, s)`` for a
    flat input of a square length (8x8 digits are stored as 64 features); else ``None``.

    Example:
        >>> image_shape((64,)), image_shape((1, 28, 28)), image_shape((60,))
        ((1, 8, 8), (1, 28, 28), None)
    """
    if len(input_shape) == 3:
        c, h, w = input_shape
        return c, h, w
    if len(input_shape) == 2:
        return 1, input_shape[0], input_shape[1]
    if len(input_shape) == 1:
        side = math.isqrt(input_shape[0])
        if side * side == input_shape[0] and side > 1:
            return 1, side, side
    return None


class AttackModel:
    """The attacker's copy of the task's model, with what it knows of the data: the input
    shape, the number of classes and the box ``bounds = (lo, hi)`` of feature values
    (e.g. the pixel range after standardisation)."""

    def __init__(
        self,
        task: Task,
        input_shape: tuple[int, ...],
        num_classes: int,
        bounds: tuple[float, float],
    ) -> None:
        if task.loss_fn is not cross_entropy:
            raise ValueError(
                "gradient inversion here needs the task's loss to be potluck's cross_entropy "
                "(it matches gradients of cross-entropy with soft labels); this task has "
                f"{getattr(task.loss_fn, '__name__', task.loss_fn)!r}"
            )
        lo, hi = float(bounds[0]), float(bounds[1])
        if not hi > lo:
            raise ValueError(f"bounds must be (lo, hi) with hi > lo, got {bounds}")
        self.task, self.num_classes = task, int(num_classes)
        self.input_shape, self.bounds = tuple(input_shape), (lo, hi)
        self.image_shape = image_shape(self.input_shape)
        self.model = task.build_model()
        self.model.eval()
        self.spec = ParamSpec.from_module(self.model)

    @classmethod
    def of(cls, experiment: Experiment) -> AttackModel:
        """The model of ``experiment``'s task over its data: input shape, classes and the
        box spanned by the source's training features."""
        source = experiment.federation.source
        return cls(experiment.task, source.input_shape, source.num_classes, feature_box(source))

    @property
    def data_range(self) -> float:
        return self.bounds[1] - self.bounds[0]

    def initial_weights(self) -> torch.Tensor:
        return self.spec.from_module_values(self.model)

    def one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        return F.one_hot(labels.long(), self.num_classes).float()

    def logits(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, self.spec.unflatten(w), (x,))

    def gradient(
        self, w: torch.Tensor, x: torch.Tensor, targets: torch.Tensor, create_graph: bool = False
    ) -> torch.Tensor:
        """The flat gradient at ``w`` of the mean cross-entropy of ``x`` against the class
        probabilities ``targets`` (``(B, C)``); differentiable in ``x`` and ``targets``
        with ``create_graph``."""
        leaves = {n: t.detach().requires_grad_(True) for n, t in self.spec.unflatten(w).items()}
        loss = self.task.loss_fn(functional_call(self.model, leaves, (x,)), targets)
        grads = torch.autograd.grad(
            loss, list(leaves.values()), create_graph=create_graph, materialize_grads=True
        )
        return torch.cat([g.reshape(-1) for g in grads])

    @torch.no_grad()
    def scores(
        self, w: torch.Tensor, x: np.ndarray, y: np.ndarray, batch: int = 1024
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-example cross-entropy of the model at ``w`` on ``(x, y)``, and the
        logit-scaled confidence ``log(p_y / (1 - p_y)) = z_y - logsumexp_{j != y} z_j``
        (computed from the logits ``z``, stable where ``p_y`` rounds to 1).

        Example:
            >>> net = AttackModel(Task(lambda: torch.nn.Linear(2, 2)), (2,), 2, (0.0, 1.0))
            >>> loss, phi = net.scores(torch.zeros(6), np.zeros((1, 2), np.float32), np.array([1]))
            >>> round(float(loss[0]), 4), float(phi[0])  # log 2; p = 1/2
            (0.6931, 0.0)
        """
        self.spec.check(w, "the attacked weights")
        losses, confidences = [], []
        for start in range(0, len(y), batch):
            xb = torch.from_numpy(x[start : start + batch])
            yb = torch.from_numpy(y[start : start + batch]).long()
            z = self.logits(w, xb).double()
            losses.append(F.cross_entropy(z, yb, reduction="none"))
            true = z.gather(1, yb[:, None])[:, 0]
            others = z.scatter(1, yb[:, None], -math.inf).logsumexp(1)
            confidences.append(true - others)
        if not losses:
            return np.zeros(0), np.zeros(0)
        return torch.cat(losses).numpy(), torch.cat(confidences).numpy()

    @torch.no_grad()
    def predict(self, w: torch.Tensor, x: np.ndarray, batch: int = 1024) -> np.ndarray:
        """The predicted class of each example (the argmax of the logits)."""
        out = [
            self.logits(w, torch.from_numpy(x[i : i + batch])).argmax(1)
            for i in range(0, len(x), batch)
        ]
        return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (``(B, *input_shape)``) as ``(B, C, H, W)`` images."""
        if self.image_shape is None:
            raise ValueError(f"inputs of shape {self.input_shape} are not images")
        return x.reshape(len(x), *self.image_shape)

    def last_layer(self) -> tuple[str, str | None]:
        """The names of the output layer's weight (``(num_classes, d)``) and bias (or
        ``None``): the last 2-D parameter with ``num_classes`` rows."""
        names, shapes = self.spec.names, self.spec.shapes
        for i in range(len(names) - 1, -1, -1):
            if len(shapes[i]) == 2 and shapes[i][0] == self.num_classes:
                bias = names[i + 1] if i + 1 < len(names) else None
                ok = bias is not None and shapes[i + 1] == (self.num_classes,)
                return names[i], bias if ok else None
        raise ValueError(
            f"the model has no output layer with {self.num_classes} rows (a Linear layer to "
            f"the classes) among {list(names)[-4:]}; analytic labels need one"
        )


def feature_box(source: DataSource) -> tuple[float, float]:
    """The smallest and largest feature value of a ``DataSource``'s training set (read from
    the stored codes, decoded, for uint8 images)."""
    train = source.train
    raw = np.array([train.x.min(), train.x.max()])
    if train.decode is not None:
        scale, shift = train.decode
        raw = raw * scale + shift
    return float(raw[0]), float(raw[1])
