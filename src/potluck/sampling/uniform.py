"""Uniform sampling without replacement, by count or fraction (McMahan et al. 2017's C).

Example:
    >>> from potluck.core.parts import Context
    >>> sampler = UniformSampler(fraction=0.1, min_clients=2)
    >>> cohort, _ = sampler.sample(100, {}, Context(seed=0, round=1, stream=("sampling", 1)))
    >>> len(cohort), bool((np.diff(cohort) > 0).all())
    (10, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from potluck.core.parts import Context, State
from potluck.core.registry import register

DEFAULT_COHORT = 10


@register("sampler", "uniform")
@dataclass(frozen=True)
class UniformSampler:
    """Sample ``clients_per_round`` clients, or ``max(fraction * N, min_clients)``; with
    neither given, 10 clients per round."""

    clients_per_round: int | None = None
    fraction: float | None = None
    min_clients: int = 1

    def __post_init__(self) -> None:
        if self.clients_per_round is not None and self.fraction is not None:
            raise ValueError("give one of clients_per_round or fraction, not both")
        if self.clients_per_round is not None and self.clients_per_round < 1:
            raise ValueError(f"clients_per_round must be >= 1, got {self.clients_per_round}")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.min_clients < 1:
            raise ValueError(f"min_clients must be >= 1, got {self.min_clients}")

    def init(self, num_clients: int) -> State:
        return {}

    def cohort_size(self, num_clients: int) -> int:
        if self.fraction is not None:
            k = max(round(self.fraction * num_clients), self.min_clients)
        else:
            k = self.clients_per_round or DEFAULT_COHORT
        if k > num_clients or self.min_clients > num_clients:
            raise ValueError(
                f"cannot sample {max(k, self.min_clients)} clients per round from a "
                f"federation of {num_clients}"
            )
        return max(k, self.min_clients)

    samples_available: ClassVar[bool] = True  # samples among ctx.available when given

    def resized(self, clients_per_round: int) -> UniformSampler:
        """This sampler drawing ``clients_per_round`` (the virtual clock's over-selection)."""
        return UniformSampler(clients_per_round=clients_per_round, min_clients=1)

    def sample(self, num_clients: int, state: State, ctx: Context) -> tuple[np.ndarray, State]:
        """Sorted unique client ids (int64), among ``ctx.available`` if given (as many as
        are online, if fewer); the state is unchanged (there is none)."""
        k = self.cohort_size(num_clients)
        if ctx.available is not None:
            pool = np.asarray(ctx.available, dtype=np.int64)
            picked = ctx.rng().choice(len(pool), size=min(k, len(pool)), replace=False)
            return np.sort(pool[picked]), state
        cohort = ctx.rng().choice(num_clients, size=k, replace=False)
        return np.sort(cohort).astype(np.int64), state
