"""Coordinate-wise median and trimmed mean (Yin, Chen, Ramchandran, Bartlett 2018,
"Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML).

Each coordinate is aggregated on its own: the median of the K values, or the mean of the
values left after removing the ``b`` largest and ``b`` smallest. Both hold for a fraction
of Byzantine clients below one half (the median for ``f < n / 2``; the trimmed mean for
``f <= b`` with ``2b < n``), and both count every update alike (weights ignored). A sort
along the clients, block by block of coordinates (``by_coordinates``), no loop over them.

Example:
    >>> import torch
    >>> from potluck.core.parts import part_context
    >>> deltas = torch.tensor([[1.0, 0.0], [2.0, 1.0], [3.0, 2.0], [100.0, -50.0]])
    >>> ctx = part_context(0, 1, "aggregator")
    >>> CoordinateMedian(byzantine=1).aggregate(deltas, torch.ones(4), {}, ctx)[0]
    tensor([2.5000, 0.5000])
    >>> TrimmedMean(trim=1).aggregate(deltas, torch.ones(4), {}, ctx)[0]
    tensor([2.5000, 0.5000])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from potluck.aggregate.byzantine import (
    ON_DEVICE_ROBUST,
    ByzantineRobust,
    by_coordinates,
    coordinate_median,
)
from potluck.core.parts import State
from potluck.core.registry import register


@register("aggregator", "median")
@dataclass(frozen=True)
class CoordinateMedian(ByzantineRobust):
    """The coordinate-wise median, configured for ``byzantine`` = f Byzantine clients (a
    count, or a fraction of the cohort); it assumes ``n >= 2f + 1``."""

    byzantine: int | float = 0
    rule: ClassVar[str] = "n >= 2f + 1"
    gives: ClassVar[frozenset[str]] = ON_DEVICE_ROBUST

    def needed(self, f: int) -> int:
        return 2 * f + 1

    def combine(self, deltas: torch.Tensor, f: int, state: State) -> tuple[torch.Tensor, State]:
        return coordinate_median(deltas), state


@register("aggregator", "trimmed_mean")
@dataclass(frozen=True)
class TrimmedMean(ByzantineRobust):
    """The coordinate-wise ``trim``-trimmed mean: per coordinate, the mean of the values
    left after dropping the ``trim`` largest and ``trim`` smallest (a count, or a fraction
    of the cohort: Yin et al.'s beta). It tolerates f <= trim Byzantine clients and
    assumes ``2 trim < n``."""

    trim: int | float = 0.1
    rule: ClassVar[str] = "2 trim < n"
    gives: ClassVar[frozenset[str]] = ON_DEVICE_ROBUST
    setting: ClassVar[str] = "trim"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.trim, float) and not self.trim < 0.5:
            raise ValueError(f"trim must be below 0.5 of the cohort, got {self.trim!r}")

    def needed(self, f: int) -> int:
        return 2 * f + 1

    def combine(self, deltas: torch.Tensor, f: int, state: State) -> tuple[torch.Tensor, State]:
        return trimmed_mean(deltas, f), state


def trimmed_mean(deltas: torch.Tensor, b: int) -> torch.Tensor:
    """Per coordinate, the mean of a (K, d) stack's values without its ``b`` largest and
    ``b`` smallest (summed in float64)."""
    k = deltas.shape[0]

    def kept_mean(rows: torch.Tensor) -> torch.Tensor:
        kept = rows.sort(dim=1).values[:, b : k - b]
        return kept.sum(dim=1, dtype=torch.float64) / (k - 2 * b)

    return by_coordinates(deltas, kept_mean)
