"""Poisson sampling: each client takes part independently with probability ``rate``, so the
cohort's size varies from round to round (mean ``rate * N``). Differential privacy's
amplification by sampling assumes it (Abadi et al. 2016; McMahan et al. 2018).

Example:
    >>> from potluck.core.parts import Context
    >>> sampler = PoissonSampler(rate=0.1)
    >>> sizes = [len(sampler.sample(1000, {}, Context(0, r, ("sampling", r)))[0]) for r in (1, 2)]
    >>> sizes, sampler.cohort_size(1000)
    ([95, 86], 100)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from potluck.core.parts import Context, State
from potluck.core.registry import register


@register("sampler", "poisson")
@dataclass(frozen=True)
class PoissonSampler:
    """Each client with probability ``rate``, independently; a round may have no client."""

    rate: float = 0.01

    def __post_init__(self) -> None:
        if not 0 < self.rate <= 1:
            raise ValueError(f"rate must be in (0, 1], got {self.rate}")

    def init(self, num_clients: int) -> State:
        return {}

    def expected_cohort(self, num_clients: int) -> float:
        return self.rate * num_clients

    def cohort_size(self, num_clients: int) -> int:
        """The expected cohort size, rounded (at least 1)."""
        if num_clients < 1:
            raise ValueError(f"cannot sample from a federation of {num_clients} clients")
        return max(1, round(self.expected_cohort(num_clients)))

    def sample(self, num_clients: int, state: State, ctx: Context) -> tuple[np.ndarray, State]:
        """Sorted client ids (int64), each drawn with probability ``rate``."""
        chosen = ctx.rng().random(num_clients) < self.rate
        return np.flatnonzero(chosen).astype(np.int64), state
