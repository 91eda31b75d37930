"""Oort: guided participant selection by statistical and system utility (Lai, Zhu,
Madhyastha, Chowdhury 2021, "Oort: Efficient Federated Learning via Guided Participant
Selection", OSDI).

A client's utility is its statistical utility ``n_i * loss_i`` (the paper's ``|B_i|
sqrt(mean of the squared per-example losses)``; potluck's clients report their mean training
loss, so the mean stands in for the root mean square), plus the temporal uncertainty
``sqrt(staleness_weight * ln R / L_i)`` of a client last chosen in round ``L_i``, times ``(T /
t_i)^alpha`` when its last round took ``t_i`` longer than the preferred duration ``T``
(virtual seconds, from the clock; the median observed duration when not given). Each round,
``(1 - epsilon) K`` clients are exploited: drawn with probability proportional to utility
among the explored clients whose utility is at least ``cutoff`` times the ``(1 - epsilon)
K``-th largest; the other ``epsilon K`` explore clients never chosen. ``epsilon`` decays from
``epsilon`` by ``epsilon_decay`` a round down to ``min_epsilon``.

The round loop feeds it each member's outcome after the round (``observe``): the loss and
examples of those whose update was used, and every timed member's duration on a virtual
clock. Its state (utility, last round, duration, explored, per client) is server state.

Example:
    >>> import numpy as np
    >>> from potluck.core.parts import Context
    >>> oort = OortSampler(clients_per_round=2, epsilon=0.0, min_epsilon=0.0)
    >>> state = oort.init(4)
    >>> seen = {c: {"train_loss": loss, "num_examples": 10.0} for c, loss in
    ...         enumerate([0.1, 3.0, 0.2, 2.0])}
    >>> state = oort.observe(state, seen, Context(0, 1, ("sampling", 1)))
    >>> cohort, _ = oort.sample(4, state, Context(0, 2, ("sampling", 2)))
    >>> cohort.tolist()  # the two high-loss clients
    [1, 3]
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch

from potluck.core.parts import Context, State
from potluck.core.registry import register


@register("sampler", "oort")
@dataclass(frozen=True)
class OortSampler:
    """Oort's selection of ``clients_per_round`` clients (see the module)."""

    clients_per_round: int = 10
    epsilon: float = 0.9
    epsilon_decay: float = 0.98
    min_epsilon: float = 0.2
    alpha: float = 2.0
    preferred_s: float | None = None
    cutoff: float = 0.95
    staleness_weight: float = 0.1
    samples_available: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.clients_per_round < 1:
            raise ValueError(f"oort.clients_per_round must be >= 1, got {self.clients_per_round}")
        for name in ("epsilon", "epsilon_decay", "min_epsilon", "cutoff"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"oort.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.min_epsilon > self.epsilon:
            raise ValueError("oort.min_epsilon must not exceed oort.epsilon")
        if not self.alpha >= 0 or not self.staleness_weight >= 0:
            raise ValueError("oort.alpha and oort.staleness_weight must be >= 0")
        if self.preferred_s is not None and not self.preferred_s > 0:
            raise ValueError(f"oort.preferred_s must be > 0, got {self.preferred_s}")

    def init(self, num_clients: int) -> State:
        return {
            "utility": torch.zeros(num_clients, dtype=torch.float64),
            "last": torch.zeros(num_clients, dtype=torch.int64),
            "duration": torch.full((num_clients,), math.nan, dtype=torch.float64),
        }

    def cohort_size(self, num_clients: int) -> int:
        if self.clients_per_round > num_clients:
            raise ValueError(
                f"cannot sample {self.clients_per_round} clients per round from a federation "
                f"of {num_clients}"
            )
        return self.clients_per_round

    def resized(self, clients_per_round: int) -> OortSampler:
        """This sampler choosing ``clients_per_round`` (the clock's over-selection)."""
        return replace(self, clients_per_round=clients_per_round)

    def sample(self, num_clients: int, state: State, ctx: Context) -> tuple[np.ndarray, State]:
        state = state or self.init(num_clients)
        pool = np.arange(num_clients) if ctx.available is None else np.asarray(ctx.available)
        k = min(self.cohort_size(num_clients), len(pool))
        last = state["last"].numpy()[pool]
        explored = pool[last > 0]
        eps = max(self.min_epsilon, self.epsilon * self.epsilon_decay ** (ctx.round - 1))
        exploit = min(len(explored), k - min(round(eps * k), int((last == 0).sum())))
        rng = ctx.rng()
        chosen = (
            self._exploit(explored, exploit, state, ctx.round, rng)
            if exploit
            else np.zeros(0, np.int64)
        )
        fresh = pool[last == 0]
        rest = np.setdiff1d(pool, chosen)
        unexplored = fresh if len(fresh) >= k - len(chosen) else rest
        more = rng.choice(unexplored, size=k - len(chosen), replace=False)
        return np.sort(np.concatenate([chosen, more]).astype(np.int64)), state

    def _exploit(
        self, explored: np.ndarray, k: int, state: State, rnd: int, rng: np.random.Generator
    ) -> np.ndarray:
        score = self.utility(explored, state, rnd)
        threshold = self.cutoff * np.sort(score)[::-1][k - 1]
        candidates = explored[score >= threshold]
        weights = score[score >= threshold]
        p = weights / weights.sum() if weights.sum() > 0 else None
        return rng.choice(candidates, size=k, replace=False, p=p)

    def utility(self, clients: np.ndarray, state: State, rnd: int) -> np.ndarray:
        """Each of ``clients``' (explored) utility at round ``rnd``."""
        stat = state["utility"].numpy()[clients]
        last = state["last"].numpy()[clients].astype(np.float64)
        score = stat + np.sqrt(self.staleness_weight * math.log(max(rnd, 1)) / last)
        duration = state["duration"].numpy()
        t = duration[clients]
        known = duration[~np.isnan(duration)]
        preferred = self.preferred_s or (float(np.median(known)) if len(known) else None)
        if preferred is not None:
            slow = ~np.isnan(t) & (t > preferred)
            score[slow] *= (preferred / t[slow]) ** self.alpha
        return score

    def observe(
        self, state: State, outcomes: Mapping[int, Mapping[str, float]], ctx: Context
    ) -> State:
        """Record a round's members: statistical utility from ``train_loss`` and
        ``num_examples``, the round, and ``duration_s`` where the clock timed them."""
        new = {k: v.clone() for k, v in state.items()}
        for c, seen in outcomes.items():
            if "train_loss" in seen:
                new["utility"][c] = float(seen.get("num_examples", 1.0)) * float(seen["train_loss"])
            new["last"][c] = ctx.round
            if "duration_s" in seen:
                new["duration"][c] = float(seen["duration_s"])
        return new
