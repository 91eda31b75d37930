"""Uniform sampling without replacement, by count or fraction (McMahan et al. 2017's C).

Example:
    >>> import numpy as np
    >>> sampler = UniformSampler(fraction=0.1, min_clients=2)
    >>> cohort = sampler.sample(100, np.random.default_rng(0))
    >>> len(cohort), bool((np.diff(cohort) > 0).all())
    (10, True)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class UniformSampler:
    """Sample ``clients_per_round`` clients, or ``max(fraction * N, min_clients)``."""

    clients_per_round: int | None = None
    fraction: float | None = None
    min_clients: int = 1

    def __post_init__(self) -> None:
        if (self.clients_per_round is None) == (self.fraction is None):
            raise ValueError("give exactly one of clients_per_round or fraction")
        if self.clients_per_round is not None and self.clients_per_round < 1:
            raise ValueError(f"clients_per_round must be >= 1, got {self.clients_per_round}")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.min_clients < 1:
            raise ValueError(f"min_clients must be >= 1, got {self.min_clients}")

    def cohort_size(self, num_clients: int) -> int:
        if self.clients_per_round is not None:
            k = self.clients_per_round
        else:
            k = max(round(float(self.fraction or 0) * num_clients), self.min_clients)
        if k > num_clients or self.min_clients > num_clients:
            raise ValueError(
                f"cannot sample {max(k, self.min_clients)} clients per round from a "
                f"federation of {num_clients}"
            )
        return max(k, self.min_clients)

    def sample(self, num_clients: int, rng: np.random.Generator) -> np.ndarray:
        """Sorted unique client ids (int64)."""
        k = self.cohort_size(num_clients)
        return np.sort(rng.choice(num_clients, size=k, replace=False)).astype(np.int64)
