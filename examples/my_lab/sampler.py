"""A round-robin sampler with server state: each round takes the next ``clients_per_round``
clients in id order, wrapping around, so every client takes part equally often. Where the
cycle stands is the sampler's state, checkpointed with the round, so a resumed run goes on
where it stopped.

Example:
    >>> from potluck.core.parts import Context
    >>> sampler, ctx = RoundRobin(3), Context(0, 1, ("sampling", 1))
    >>> cohort, state = sampler.sample(5, sampler.init(5), ctx)
    >>> cohort.tolist(), sampler.sample(5, state, ctx)[0].tolist()
    ([0, 1, 2], [0, 3, 4])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from potluck.core.parts import Context, State


@dataclass(frozen=True)
class RoundRobin:
    """The next ``clients_per_round`` clients in id order, every round."""

    clients_per_round: int = 10

    def init(self, num_clients: int) -> State:
        return {"next": torch.tensor(0, dtype=torch.int64)}

    def cohort_size(self, num_clients: int) -> int:
        if not 1 <= self.clients_per_round <= num_clients:
            raise ValueError(
                f"cannot take {self.clients_per_round} clients per round from {num_clients}"
            )
        return self.clients_per_round

    def sample(self, num_clients: int, state: State, ctx: Context) -> tuple[np.ndarray, State]:
        start = int(state["next"])
        k = self.cohort_size(num_clients)
        cohort = np.sort((start + np.arange(k)) % num_clients).astype(np.int64)
        return cohort, {"next": torch.tensor((start + k) % num_clients, dtype=torch.int64)}
