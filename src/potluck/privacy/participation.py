"""The privacy ledger of mechanisms accounted per client, from who took part: DP-FTRL's tree
aggregation (``privacy.tree``) and local DP (``privacy.local``).

Neither relies on amplification by sampling. Each is one Gaussian mechanism over the whole
run, whose sensitivity depends on how often a client took part: client ``c``'s squared
sensitivity ``s_c`` is in units of the clip squared, and the run releases noise of
``noise_multiplier * clip`` per coordinate, so it is a Gaussian mechanism of noise multiplier
``z / sqrt(max_c s_c)`` (Gaussian releases compose exactly into one, adaptively: Dong, Roth,
Su 2022, Gaussian differential privacy). Who takes part depends on the sampler, never on the
data, so accounting over the participation that actually happened is valid. Every client the
server sampled counts, whether or not its update arrived.

- Tree aggregation (Kairouz et al. 2021): a client in ``k`` of a tree's ``T`` rounds touches at
  most ``min(k, 2^l)`` of its releases at level ``l``, ``k`` in all, so ``s <= sum over the
  tree's ``floor(log2 T) + 1`` levels of ``k min(k, 2^l)`` (``k = 1``: the number of levels, as
  in dp-accounting's ``SingleEpochTreeAggregationDpEvent``), summed over restarted trees.
- Local DP: each of a client's ``k`` releases is its update clipped to ``clip``, so any change
  of its data moves it by at most ``2 clip``: ``s = 4 k``.

The ledger is the server-state slot ``privacy``: ``counts`` (each client's rounds in the
current tree), ``done`` (its squared sensitivity from finished trees), ``t`` (rounds in the
current tree) and ``s`` (the largest squared sensitivity after each round), with ``z`` and
``clip``. Epsilon is always computed afresh by the accountant from them.

Example:
    >>> import numpy as np
    >>> tree_sensitivity(np.array([0, 1, 2, 4]), 4).tolist()  # 3 levels: k min(k, 2^l)
    [0.0, 3.0, 10.0, 28.0]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from potluck.core.parts import State
from potluck.privacy.accounting import Z_RANGE, _quiet, accountant

if TYPE_CHECKING:
    from potluck.privacy.ledger import PrivacyBudget

KINDS = ("tree", "local")


def tree_sensitivity(counts: np.ndarray, rounds: int) -> np.ndarray:
    """Squared sensitivity (in clips squared) of clients in ``counts`` of a tree's
    ``rounds`` rounds: ``sum_l k min(k, 2^l)`` over its ``floor(log2 rounds) + 1`` levels."""
    k = counts.astype(np.float64)
    levels = [float(2**level) for level in range(max(rounds, 0).bit_length())]
    return sum((k * np.minimum(k, cap) for cap in levels), np.zeros_like(k))


def gaussian_epsilon(z_eff: float, delta: float, kind: str = "rdp") -> float:
    """Epsilon at ``delta`` of one Gaussian mechanism of noise multiplier ``z_eff``
    (infinite for 0)."""
    import dp_accounting as dpa

    if z_eff == 0:
        return math.inf
    acc = accountant(kind, dpa.NeighboringRelation.ADD_OR_REMOVE_ONE)
    with _quiet():
        acc.compose(dpa.GaussianDpEvent(z_eff))
        return float(acc.get_epsilon(delta))


def gaussian_calibrate(target_epsilon: float, delta: float, kind: str = "rdp") -> float:
    """The noise multiplier of one Gaussian mechanism that spends ``target_epsilon``."""
    import dp_accounting as dpa

    low, high = Z_RANGE[0] / 100, Z_RANGE[1]
    with _quiet():
        return float(
            dpa.calibrate_dp_mechanism(
                lambda: accountant(kind, dpa.NeighboringRelation.ADD_OR_REMOVE_ONE),
                dpa.GaussianDpEvent,
                target_epsilon,
                delta,
                dpa.ExplicitBracketInterval(low, high),
                tol=1e-7,
            )
        )


@dataclass(frozen=True)
class Participation:
    """How a per-client mechanism turns participation into sensitivity: ``kind`` ``tree``
    (restarted every ``restart_every`` rounds, or never) or ``local``."""

    kind: str
    restart_every: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"participation kind must be one of {KINDS}, got {self.kind!r}")

    def current(self, counts: np.ndarray, t: int) -> np.ndarray:
        """Squared sensitivity of the current tree (all of it, for local DP)."""
        if self.kind == "local":
            return 4.0 * counts.astype(np.float64)
        return tree_sensitivity(counts, t)

    def bound(self, rounds: int, participations: int) -> float:
        """The largest squared sensitivity ``rounds`` rounds can reach for a client in at
        most ``participations`` of them (``participations`` per tree, if restarted)."""
        if self.kind == "local":
            return 4.0 * participations
        every = self.restart_every or rounds
        full, rest = divmod(rounds, every)
        trees = [every] * full + ([rest] if rest else [])
        per_tree = min(participations, every)
        return float(sum(tree_sensitivity(np.array([min(per_tree, t)]), t)[0] for t in trees))


class ParticipationLedger:
    """The rounds a per-client Gaussian mechanism released, against its budget (a
    ``ledger.PrivacyBudget``)."""

    def __init__(
        self,
        participation: Participation,
        noise_multiplier: float,
        clip: float,
        budget: PrivacyBudget,
        num_clients: int,
    ) -> None:
        self.participation, self.z, self.clip = participation, noise_multiplier, clip
        self.budget, self.num_clients = budget, num_clients
        self._cache: dict[float, float] = {}

    def epsilon_at(self, sensitivity2: float) -> float:
        """Epsilon of the run so far when its largest squared sensitivity is
        ``sensitivity2`` (0 when no client took part)."""
        if sensitivity2 <= 0:
            return 0.0
        if sensitivity2 not in self._cache:
            z_eff = self.z / math.sqrt(sensitivity2)
            delta, kind = self.budget.delta, self.budget.accountant
            self._cache[sensitivity2] = gaussian_epsilon(z_eff, delta, kind)
        return self._cache[sensitivity2]

    def record(self, state: State, cohort: Sequence[int] | np.ndarray) -> tuple[State, float]:
        """The ledger with a round in which ``cohort`` took part, and epsilon after it."""
        new = self._with(state, np.asarray(cohort, dtype=np.int64))
        return new, self.spent(new)

    def spent(self, state: State) -> float:
        s = state.get("s")
        return 0.0 if s is None or len(s) == 0 else self.epsilon_at(float(s[-1]))

    def admits(self, state: State) -> str | None:
        """Why the next round must not run (some client's next participation would take
        epsilon past ``max_epsilon``), or None."""
        cap = self.budget.max_epsilon
        if cap is None:
            return None
        everyone = np.arange(self.num_clients, dtype=np.int64)
        after = self.epsilon_at(float(self._with(state, everyone)["s"][-1]))
        if after <= cap:
            return None
        done = len(state.get("s", ()))
        return (
            f"privacy budget: round {done + 1} would spend epsilon {after:.4g} at delta "
            f"{self.budget.delta:g} for a client that takes part in it, above max_epsilon = "
            f"{cap:g} (spent after round {done}: {self.spent(state):.4g})"
        )

    def per_round(self, state: State) -> list[float]:
        return [self.epsilon_at(float(s)) for s in state.get("s", torch.zeros(0)).tolist()]

    def most_rounds(self, state: State) -> int:
        """The most rounds any client took part in (over all trees)."""
        return int(state["taken"].max()) if "taken" in state and len(state["taken"]) else 0

    def _with(self, state: State, cohort: np.ndarray) -> State:
        n, every = self.num_clients, self.participation.restart_every
        counts = _array(state, "counts", n, np.int64)
        done = _array(state, "done", n, np.float64)
        taken = _array(state, "taken", n, np.int64)
        t = int(state["t"]) if "t" in state else 0
        if every is not None and t == every:  # the tree restarts: the old one is finished
            done = done + self.participation.current(counts, t)
            counts, t = np.zeros(n, dtype=np.int64), 0
        counts[cohort] += 1
        taken[cohort] += 1
        t += 1
        largest = float((done + self.participation.current(counts, t)).max(initial=0.0))
        s = state.get("s", torch.zeros(0, dtype=torch.float64))
        return {
            "counts": torch.from_numpy(counts),
            "done": torch.from_numpy(done),
            "taken": torch.from_numpy(taken),
            "t": torch.tensor(t, dtype=torch.int64),
            "s": torch.cat([s, torch.tensor([largest], dtype=torch.float64)]),
            "z": torch.tensor(self.z, dtype=torch.float64),
            "clip": torch.tensor(self.clip, dtype=torch.float64),
            "kind": torch.tensor(KINDS.index(self.participation.kind), dtype=torch.int64),
            "restart_every": torch.tensor(every or 0, dtype=torch.int64),
        }

    def statement(self, state: State) -> str:
        """The privacy statement of the rounds in ``state``."""
        rounds, k = len(state.get("s", ())), self.most_rounds(state)
        eps, delta = self.spent(state), self.budget.delta
        acc = self.budget.accountant.upper()
        s = float(state["s"][-1]) if rounds else 0.0
        gaussian = (
            f"accounted for the most-participating client ({k} rounds) as one Gaussian "
            f"mechanism of sensitivity {math.sqrt(s):.4g} x clip; {acc} accountant "
            "(dp-accounting)"
        )
        if self.participation.kind == "local":
            return (
                f"({eps:.4g}, {delta:g})-local DP for each client (user-level, all of its data, "
                f"against the server itself), over {rounds} rounds: each update clipped to L2 "
                f"norm {self.clip:g} and noised with std {self.z:g} x clip on the client "
                f"before it leaves; {gaussian}"
            )
        every = self.participation.restart_every
        restart = f", the tree restarted every {every} rounds" if every else ""
        return (
            f"({eps:.4g}, {delta:g})-DP at the level of one client (user-level, all of its "
            f"data), over {rounds} rounds of DP-FTRL with tree aggregation{restart}: updates "
            f"clipped to L2 norm {self.clip:g}, noise multiplier {self.z:g} per tree node, no "
            f"sampling assumption; {gaussian}"
        )

    @classmethod
    def stored(cls, state: State, budget: PrivacyBudget) -> ParticipationLedger:
        """The ledger a run stored (its ``privacy`` slot), to state its privacy afresh."""
        missing = {"counts", "s", "z", "clip", "kind", "restart_every"} - set(state)
        if missing:
            raise ValueError(f"the stored privacy ledger lacks {sorted(missing)}")
        every = int(state["restart_every"])
        participation = Participation(KINDS[int(state["kind"])], every or None)
        n = len(state["counts"])
        return cls(participation, float(state["z"]), float(state["clip"]), budget, n)


def _array(state: State, key: str, n: int, dtype: type) -> np.ndarray:
    if key in state:
        return state[key].numpy().astype(dtype, copy=True)
    return np.zeros(n, dtype=dtype)
