"""Shuffled epochs: each epoch is a fresh random permutation of the clients cut into cohorts
of ``clients_per_round``, so every client takes part at most once per epoch of
``N // clients_per_round`` rounds (the clients left over by the cut sit that epoch out).
This bounds participation the way DP-FTRL's accounting uses it (Kairouz et al. 2021), with
no sampling assumption: ``max_participations`` is what the noise is calibrated for.

Example:
    >>> from potluck.core.parts import Context
    >>> sampler = ShuffledSampler(clients_per_round=2)
    >>> rounds = [sampler.sample(4, {}, Context(0, r, ("sampling", r)))[0] for r in (1, 2)]
    >>> sorted(int(c) for c in np.concatenate(rounds)), sampler.max_participations(4, 5)
    ([0, 1, 2, 3], 3)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from potluck.core.parts import Context, State
from potluck.core.registry import register
from potluck.core.seeding import Seeds


@register("sampler", "shuffle")
@dataclass(frozen=True)
class ShuffledSampler:
    """``clients_per_round`` clients per round, each at most once per epoch."""

    clients_per_round: int = 10

    def __post_init__(self) -> None:
        if self.clients_per_round < 1:
            raise ValueError(f"clients_per_round must be >= 1, got {self.clients_per_round}")

    def init(self, num_clients: int) -> State:
        return {}

    def cohort_size(self, num_clients: int) -> int:
        if self.clients_per_round > num_clients:
            raise ValueError(
                f"cannot sample {self.clients_per_round} clients per round from a federation "
                f"of {num_clients}"
            )
        return self.clients_per_round

    def epoch_rounds(self, num_clients: int) -> int:
        """Rounds per epoch."""
        return num_clients // self.cohort_size(num_clients)

    def max_participations(self, num_clients: int, rounds: int) -> int:
        """The most rounds one client can take part in, of ``rounds`` from round 1."""
        return math.ceil(rounds / self.epoch_rounds(num_clients))

    def sample(self, num_clients: int, state: State, ctx: Context) -> tuple[np.ndarray, State]:
        """Sorted client ids (int64): this round's slice of its epoch's permutation."""
        per_epoch = self.epoch_rounds(num_clients)
        epoch, slot = divmod(ctx.round - 1, per_epoch)
        order = Seeds(ctx.seed).numpy("sampling", "epoch", epoch).permutation(num_clients)
        m = self.clients_per_round
        return np.sort(order[slot * m : (slot + 1) * m]).astype(np.int64), state
