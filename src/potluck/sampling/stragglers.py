"""Stragglers: devices that finish only part of their local work in a round.

As in FedProx's experiments (Li et al. 2020, "Federated Optimization in Heterogeneous
Networks", MLSys, Section 5.2): each round a ``fraction`` of the cohort are stragglers, each
doing ``x ~ U{1..E}`` of the ``E`` local epochs. With ``mode="drop"`` (FedAvg's behaviour in
that paper) their updates never arrive and the round aggregates the others; with
``mode="partial"`` (FedProx) their partial updates are aggregated.

Example:
    >>> import numpy as np
    >>> work, reports = Stragglers(0.5, "drop").plan(4, 10, np.random.default_rng(0))
    >>> int(reports.sum()), bool((work[reports] == 1).all())
    (2, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from potluck.core.parts import Need
from potluck.core.registry import register


@register("stragglers", "random")
@dataclass(frozen=True)
class Stragglers:
    """A share of each cohort that completes only part of its local epochs (a declared need
    of several local steps when ``fraction > 0``)."""

    fraction: float = 0.0
    mode: Literal["drop", "partial"] = "partial"

    def __post_init__(self) -> None:
        if not 0 <= self.fraction <= 1:
            raise ValueError(f"stragglers fraction must be in [0, 1], got {self.fraction}")
        if self.mode not in ("drop", "partial"):
            raise ValueError(f"stragglers mode must be 'drop' or 'partial', got {self.mode!r}")

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({Need.SEVERAL_LOCAL_STEPS}) if self.fraction else frozenset()

    def plan(
        self, cohort_size: int, epochs: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(work, reports)``: each member's share of local work in (0, 1], and whether
        its update reaches the server."""
        work = np.ones(cohort_size)
        reports = np.ones(cohort_size, dtype=bool)
        count = round(self.fraction * cohort_size)
        if count == 0:
            return work, reports
        slow = rng.choice(cohort_size, size=count, replace=False)
        work[slow] = rng.integers(1, epochs + 1, size=count) / epochs
        if self.mode == "drop":
            reports[slow] = False
        return work, reports
