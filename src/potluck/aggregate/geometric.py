"""The geometric median by the smoothed Weiszfeld algorithm: RFA, robust federated
aggregation (Pillutla, Kakade, Harchaoui 2022, "Robust Aggregation for Federated
Learning", IEEE Transactions on Signal Processing).

The geometric median ``argmin_v sum_k ||v - x_k||`` has breakdown point one half: it holds
for ``f < n / 2`` Byzantine clients (``n >= 2f + 1``). Each smoothed Weiszfeld step is a
weighted mean of the updates with weights ``1 / max(nu, ||v - x_k||)`` (``nu`` =
``smoothing`` keeps a weight finite when ``v`` lands on an update), a batched kernel over the
(K, d) stack; ``iterations`` steps start from the coordinate-wise median (a robust start:
from the mean, which a Byzantine update can move arbitrarily far, a fixed number of steps
would not come back). RFA weighs update ``k`` by its client's share ``alpha_k``; here every
update counts alike (weights ignored), since a Byzantine client could claim any weight.

Example:
    >>> import torch
    >>> from potluck.core.parts import part_context
    >>> deltas = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1e6, 1e6]])
    >>> agg = GeometricMedian(byzantine=1)
    >>> v, _ = agg.aggregate(deltas, torch.ones(4), {}, part_context(0, 1, "aggregator"))
    >>> bool(v.norm() < 1.0)
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from potluck.aggregate.byzantine import (
    ON_DEVICE_ROBUST,
    ByzantineRobust,
    check_positive,
    check_positive_int,
    coordinate_median,
)
from potluck.core.parts import State
from potluck.core.registry import register


def smoothed_weiszfeld(
    deltas: torch.Tensor, start: torch.Tensor, iterations: int, smoothing: float
) -> torch.Tensor:
    """``iterations`` smoothed Weiszfeld steps from ``start`` towards the geometric median
    of the rows of a (K, d) stack, each weight ``1 / max(smoothing, ||v - x_k||)``.

    Example:
        >>> x = torch.tensor([[0.0], [1.0], [10.0]])
        >>> v = smoothed_weiszfeld(x, torch.tensor([5.0]), 50, 1e-6)  # the median, 1
        >>> round(float(v), 4)
        1.0
    """
    v = start
    for _ in range(iterations):
        distance = torch.linalg.vector_norm(deltas - v, dim=1).double()
        beta = 1.0 / torch.clamp(distance, min=smoothing)
        v = ((beta / beta.sum()).to(deltas.dtype) @ deltas).to(deltas.dtype)
    return v


@register("aggregator", "geometric_median")
@dataclass(frozen=True)
class GeometricMedian(ByzantineRobust):
    """RFA's geometric median for ``byzantine`` = f Byzantine clients (a count or a fraction
    of the cohort); it assumes ``n >= 2f + 1``."""

    byzantine: int | float = 0
    iterations: int = 10
    smoothing: float = 1e-6
    rule: ClassVar[str] = "n >= 2f + 1"
    gives: ClassVar[frozenset[str]] = ON_DEVICE_ROBUST

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("iterations", self.iterations)
        check_positive("smoothing", self.smoothing)

    def needed(self, f: int) -> int:
        return 2 * f + 1

    def combine(self, deltas: torch.Tensor, f: int, state: State) -> tuple[torch.Tensor, State]:
        start = coordinate_median(deltas)
        return smoothed_weiszfeld(deltas, start, self.iterations, self.smoothing), state
