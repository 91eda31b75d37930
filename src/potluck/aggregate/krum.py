"""Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui, Stainer 2017, "Machine Learning
with Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS) and Bulyan (El Mhamdi,
Guerraoui, Rouault 2018, "The Hidden Vulnerability of Distributed Learning in Byzantium",
ICML).

Krum scores each update by the sum of its squared distances to its ``n - f - 2`` nearest
other updates and keeps the one of lowest score; Multi-Krum averages the ``m`` of lowest
score. Both assume ``n >= 2f + 3``. Bulyan selects ``theta = n - 2f`` updates by Krum
applied again and again to those not yet selected, then, per coordinate, averages the
``beta = theta - 2f`` selected values closest to their median; it assumes ``n >= 4f + 3``.
When the set left is too small for Krum's ``n - f - 2`` neighbours (Bulyan's last
selections) a score sums the two nearest (or the only other one): the nearest alone would
score the two closest updates alike. Every update counts alike (weights ignored); Krum's
score sums one distance only for ``n = 3, f = 0``, where the two closest updates tie and
the first is kept.

The d-dimensional work is one Gram matrix of the stack (``pairwise_sq_distances``); the
selection works on the (K, K) distances (Bulyan's ``theta`` selections loop over that small
matrix, never over the updates).

Example:
    >>> import torch
    >>> from potluck.core.parts import part_context
    >>> deltas = torch.tensor([[0.0, 0.0], [0.25, 0.0], [0.0, 0.3], [0.1, 0.1], [50.0, 50.0]])
    >>> ctx = part_context(0, 1, "aggregator")
    >>> Krum(byzantine=1).aggregate(deltas, torch.ones(5), {}, ctx)[0]
    tensor([0.1000, 0.1000])
    >>> MultiKrum(byzantine=1, selected=2).aggregate(deltas, torch.ones(5), {}, ctx)[0]
    tensor([0.0500, 0.0500])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from potluck.aggregate.byzantine import (
    ON_DEVICE_ROBUST,
    ByzantineRobust,
    by_coordinates,
    check_positive_int,
    pairwise_sq_distances,
    row_medians,
)
from potluck.core.parts import State
from potluck.core.registry import register


def krum_scores(d2: torch.Tensor, neighbours: int) -> torch.Tensor:
    """Each row's Krum score from (K, K) squared distances: the sum of its ``neighbours``
    smallest distances to the other rows.

    Example:
        >>> d2 = torch.tensor([[0.0, 1.0, 4.0], [1.0, 0.0, 9.0], [4.0, 9.0, 0.0]])
        >>> krum_scores(d2, 2).tolist()
        [5.0, 10.0, 13.0]
    """
    others = d2 + torch.diag(d2.new_full((d2.shape[0],), float("inf")))
    return others.topk(neighbours, dim=1, largest=False).values.sum(dim=1)


def multi_krum(deltas: torch.Tensor, f: int, m: int) -> torch.Tensor:
    """The mean of the ``m`` rows of lowest Krum score (Krum for ``m = 1``)."""
    scores = krum_scores(pairwise_sq_distances(deltas), deltas.shape[0] - f - 2)
    best = scores.topk(m, largest=False).indices
    return deltas[best].mean(dim=0)


@register("aggregator", "krum")
@dataclass(frozen=True)
class Krum(ByzantineRobust):
    """The update of lowest Krum score, for ``byzantine`` = f Byzantine clients (a count
    or a fraction of the cohort); it assumes ``n >= 2f + 3``."""

    byzantine: int | float = 1
    rule: ClassVar[str] = "n >= 2f + 3"
    gives: ClassVar[frozenset[str]] = ON_DEVICE_ROBUST

    def needed(self, f: int) -> int:
        return 2 * f + 3

    def combine(self, deltas: torch.Tensor, f: int, state: State) -> tuple[torch.Tensor, State]:
        return multi_krum(deltas, f, 1), state


@register("aggregator", "multi_krum")
@dataclass(frozen=True)
class MultiKrum(ByzantineRobust):
    """The mean of the ``selected`` = m updates of lowest Krum score (``None``: m = n - f),
    for ``byzantine`` = f Byzantine clients; it assumes ``n >= 2f + 3`` and ``m <= n - f``."""

    byzantine: int | float = 1
    selected: int | None = None
    rule: ClassVar[str] = "n >= 2f + 3 and m <= n - f"
    gives: ClassVar[frozenset[str]] = ON_DEVICE_ROBUST

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.selected is not None:
            check_positive_int("selected", self.selected)

    def needed(self, f: int) -> int:
        return max(2 * f + 3, f + (self.selected or 0))

    def combine(self, deltas: torch.Tensor, f: int, state: State) -> tuple[torch.Tensor, State]:
        return multi_krum(deltas, f, self.selected or deltas.shape[0] - f), state


def bulyan_selection(d2: torch.Tensor, f: int, theta: int) -> torch.Tensor:
    """The indices of ``theta`` rows chosen by Krum again and again on the rows not yet
    chosen (El Mhamdi et al.'s recursive selection), from (K, K) squared distances; on
    ``r`` rows left a score sums ``max(r - f - 2, 2)`` neighbours (at most ``r - 1``).

    Example:
        >>> d2 = pairwise_sq_distances(torch.tensor([[0.0], [0.1], [0.3], [9.0]]))
        >>> bulyan_selection(d2, 0, 3).tolist()
        [1, 2, 0]
    """
    left = torch.arange(d2.shape[0], device=d2.device)
    chosen = []
    for _ in range(theta):
        r = left.numel()
        if r == 1:
            chosen.append(int(left[0]))
            break
        sub = d2[left][:, left]
        best = int(krum_scores(sub, min(max(r - f - 2, 2), r - 1)).argmin())
        chosen.append(int(left[best]))
        left = torch.cat([left[:best], left[best + 1 :]])
    return torch.tensor(chosen, dtype=torch.int64, device=d2.device)


def closest_to_median_mean(selected: torch.Tensor, beta: int) -> torch.Tensor:
    """Per coordinate, the mean of the ``beta`` values of a (theta, d) stack closest to
    their median."""

    def nearest_mean(rows: torch.Tensor) -> torch.Tensor:
        nearest = (rows - row_medians(rows)[:, None]).abs().topk(beta, dim=1, largest=False)
        return rows.gather(1, nearest.indices).sum(dim=1, dtype=torch.float64) / beta

    return by_coordinates(selected, nearest_mean, torch.float64)


@register("aggregator", "bulyan")
@dataclass(frozen=True)
class Bulyan(ByzantineRobust):
    """Bulyan over Krum, for ``byzantine`` = f Byzantine clients (a count or a fraction of
    the cohort); it assumes ``n >= 4f + 3``."""

    byzantine: int | float = 1
    rule: ClassVar[str] = "n >= 4f + 3"
    gives: ClassVar[frozenset[str]] = ON_DEVICE_ROBUST

    def needed(self, f: int) -> int:
        return 4 * f + 3

    def combine(self, deltas: torch.Tensor, f: int, state: State) -> tuple[torch.Tensor, State]:
        theta = deltas.shape[0] - 2 * f
        chosen = bulyan_selection(pairwise_sq_distances(deltas), f, theta)
        return closest_to_median_mean(deltas[chosen], theta - 2 * f).to(deltas.dtype), state
