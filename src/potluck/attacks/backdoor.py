"""The pixel-pattern backdoor with model replacement (Bagdasaryan, Veit, Hua, Estrin,
Shmatikov 2020, "How To Backdoor Federated Learning", AISTATS).

Each attacker stamps a trigger (a checkerboard of ``size`` x ``size`` pixels in the bottom-
right corner of every image, or of the last features of a flat input that is not a square
image) on ``poison_fraction`` of its training examples and relabels them ``target``, trains
as usual, then scales its update by ``boost`` (model replacement: with ``boost = n / eta``
for ``n`` equally weighted updates and server learning rate ``eta``, the new global model is
the attacker's) and, with a ``norm_bound``, scales it back to that L2 norm if it is longer
(the paper's train-and-scale, which evades a server bounding norms at that value). With
``alpha < 1`` the attackers train on the paper's constrain-and-scale loss ``alpha * L_class
+ (1 - alpha) * L_ano``, with the anomaly term ``L_ano = ||w - w_global||^2``, the squared
distance a norm- or distance-based defence looks at. The round loop reports
``backdoor_accuracy``, the attack success rate: the share of the held-out test examples not
of class ``target`` that the global model classifies as ``target`` once triggered.

Example:
    >>> attack = Backdoor(target=1, size=2, value=1.0)
    >>> attack.trigger(torch.zeros(1, 1, 3, 3))[0, 0]
    tensor([[0., 0., 0.],
            [0., 1., 0.],
            [0., 0., 1.]])
    >>> x, y = attack.triggered(torch.zeros(3, 4), torch.tensor([0, 1, 2]))
    >>> x.tolist(), y.tolist()
    ([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0]], [1, 1])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from potluck.attacks.poisoning import Attack, _check_positive
from potluck.core.parts import Context
from potluck.core.registry import register

__all__ = ["Backdoor"]


@register("attack", "backdoor")
@dataclass(frozen=True)
class Backdoor(Attack):
    """The pixel-pattern backdoor (see the module)."""

    fraction: float = 0.1
    target: int = 0
    poison_fraction: float = 0.5
    size: int = 3
    value: float | None = None
    boost: float = 1.0
    norm_bound: float | None = None
    alpha: float = 1.0
    poisons_data: ClassVar[bool] = True
    crafts: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.target, bool) or not isinstance(self.target, int) or self.target < 0:
            raise ValueError(f"attack.target must be a class index >= 0, got {self.target!r}")
        if not (isinstance(self.poison_fraction, int | float) and 0 < self.poison_fraction <= 1):
            raise ValueError(
                f"attack.poison_fraction must be in (0, 1], got {self.poison_fraction!r}"
            )
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"attack.size must be an int >= 1 (pixels), got {self.size!r}")
        if self.value is not None and not math.isfinite(self.value):
            raise ValueError(f"attack.value must be finite, got {self.value!r}")
        _check_positive("boost", self.boost)
        if self.norm_bound is not None:
            _check_positive("norm_bound", self.norm_bound)
        if not (isinstance(self.alpha, int | float) and 0 < self.alpha <= 1):
            raise ValueError(f"attack.alpha must be in (0, 1], got {self.alpha!r}")

    @property
    def steers(self) -> bool:
        return self.alpha < 1

    def gradient(self, w: torch.Tensor, g: torch.Tensor, w_global: torch.Tensor) -> torch.Tensor:
        """The gradient of ``alpha * L_class + (1 - alpha) * ||w - w_global||^2``."""
        return self.alpha * g + (2 * (1 - self.alpha)) * (w - w_global)

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (a batch) with the trigger stamped on every example."""
        if x.dim() < 2:
            raise ValueError(f"attack: a backdoor needs a batch of examples, got shape {x.shape}")
        mask = self._mask(tuple(x.shape[1:]))
        value = float(x.max()) if self.value is None else self.value
        return torch.where(mask, torch.tensor(value, dtype=x.dtype), x)

    def _mask(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Where the trigger goes in one example of ``shape``: a checkerboard ending in the
        bottom-right corner of its image (the last two dimensions, or a flat square)."""
        if len(shape) == 1:
            side = math.isqrt(shape[0])
            if side * side == shape[0] and side >= self.size:
                return self._mask((side, side)).reshape(shape)
            k = min(self.size * self.size, shape[0])
            flat = torch.zeros(shape, dtype=torch.bool)
            flat[shape[0] - k :: 2] = True
            return flat
        h, w = shape[-2], shape[-1]
        if h < self.size or w < self.size:
            raise ValueError(f"attack: a {self.size}-pixel trigger does not fit images {h}x{w}")
        ii, jj = torch.meshgrid(torch.arange(self.size), torch.arange(self.size), indexing="ij")
        square = (ii + jj) % 2 == 0
        mask = torch.zeros((h, w), dtype=torch.bool)
        mask[h - self.size :, w - self.size :] = square
        return mask.expand(shape)

    def poison(
        self, x: torch.Tensor, y: torch.Tensor, num_classes: int, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.target >= num_classes:
            raise ValueError(
                f"attack.target {self.target} outside the task's {num_classes} classes"
            )
        n = len(y)
        k = math.ceil(self.poison_fraction * n)
        rows = torch.randperm(n, generator=gen)[:k]
        x, y = x.clone(), y.clone()
        x[rows] = self.trigger(x[rows]) if k else x[rows]
        y[rows] = self.target
        return x, y

    def craft(self, delta: torch.Tensor, ctx: Context) -> torch.Tensor:
        boosted = self.boost * delta
        if self.norm_bound is None:
            return boosted
        norm = float(boosted.norm())
        return boosted * min(1.0, self.norm_bound / norm) if norm > 0 else boosted

    def triggered(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The attack success rate's test set: the examples of ``(x, y)`` not of class
        ``target``, triggered, labelled ``target``."""
        keep = y != self.target
        return self.trigger(x[keep]), torch.full_like(y[keep], self.target)
