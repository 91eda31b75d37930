"""Accounting for distributed DP on secure aggregation: the rounds of the distributed Skellam
mechanism (Agarwal, Kairouz, Liu 2021, "The Skellam Mechanism for Differentially Private
Federated Learning", NeurIPS), composed in Rényi DP.

A round releases, to the server, the sum of the survivors' encodings
(``secagg.ddp_encoding``): each a clipped, scaled, rotated and conditionally rounded integer
vector of L2 norm at most ``l2`` (so L1 at most ``l2^2``: its coordinates are integers),
plus that survivor's Skellam share. The round aborts, revealing nothing, unless at least
``h`` honest survivors' shares are in the sum, so the noise the accountant counts, ``Sk(mu)``
with ``mu = h x`` a share's variance, is always there (``Release``).

One release is ``(alpha, eps(alpha))``-RDP, for a change of the sum of L1 norm ``D1`` and L2
norm ``D2`` (Agarwal et al. 2021, the multi-dimensional Skellam mechanism; ``skellam_rdp``)::

    eps(alpha) = alpha D2^2 / (2 mu) + min(((2 alpha - 1) D2^2 + 6 D1) / (4 mu^2), 3 D1 / (2 mu))

Replacing one client's data changes its vector by at most ``D2 = 2 l2``, ``D1 = 2 l2^2``
(replace-one adjacency: the server knows who took part). Two guarantees follow:

- ``epsilon_server``: against the server, which draws the cohorts and sees who took part,
  with no amplification: the rounds of the most-participating client compose, ``k eps``
  (who is sampled never depends on the data, so accounting the realised participation is
  valid; every sampled client counts, whether or not its update arrived);
- ``epsilon``, the run's budget: against anyone who sees the models but not the cohorts,
  also amplified by sampling ``m`` of ``N`` clients without replacement: Wang, Balle,
  Kasiviswanathan 2019 ("Subsampled Rényi Differential Privacy and Analytical Moments
  Accountant", AISTATS), Theorem 9, the bound for any mechanism (here with ``eps(inf) =
  inf``), or ``eps`` itself where that is smaller (``sampled_rdp``), summed over all the
  rounds; the RDP curve is the smaller of that and the participation bound's, order by
  order (both bound the same releases), so ``epsilon <= epsilon_server``.

RDP is converted to ``(epsilon, delta)`` by dp-accounting's ``compute_epsilon`` (Canonne,
Kamath, Steinke 2020's conversion) over the integer orders ``ORDERS``. Poisson sampling is
not accounted: the number of survivors, which the server learns and which decides whether a
round aborts, would tell whether a client took part.

Example:
    >>> release = Release(l2=2.0**19, mu=(1.0 * 2**19) ** 2)  # noise multiplier 1
    >>> sampled = 100 * sampled_rdp(release, 10 / 1000)  # 100 rounds of 10 of 1000 clients
    >>> round(epsilon_of(sampled, 1e-5), 3), round(epsilon_of(100 * release.rdp(), 1e-5), 1)
    (11.213, 410.1)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from potluck.core.parts import State
from potluck.privacy.accounting import Poisson, Sampling, WithoutReplacement, _quiet

if TYPE_CHECKING:
    from potluck.privacy.ledger import PrivacyBudget

ORDERS = np.array([*range(2, 65), 72, 80, 96, 112, 128, 160, 192, 256], dtype=np.int64)
Z_RANGE = (0.01, 1000.0)  # the noise multipliers calibration searches


def skellam_rdp(orders: np.ndarray, l1: float, l2: float, mu: float) -> np.ndarray:
    """Agarwal et al.'s RDP bound of the Skellam mechanism of variance ``mu`` at ``orders``,
    for a change of L1 norm ``l1`` and L2 norm ``l2`` (integer units); infinite for
    ``mu = 0``."""
    a = orders.astype(np.float64)
    if mu <= 0:
        return np.full(a.shape, math.inf)
    second = np.minimum(((2 * a - 1) * l2**2 + 6 * l1) / (4 * mu**2), 3 * l1 / (2 * mu))
    return a * l2**2 / (2 * mu) + second


def subsampled_rdp(
    orders: np.ndarray, gamma: float, rdp: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """Wang et al.'s Theorem 9 for a mechanism of RDP ``rdp`` (at integer orders) on ``m``
    of ``N`` elements sampled without replacement, ``gamma = m / N``, with ``eps(inf) =
    inf``, at integer ``orders`` (each at least 2); the mechanism's own RDP where smaller::

        (alpha - 1) eps'(alpha) <= log(1 + gamma^2 C(alpha, 2) min(4 (e^eps(2) - 1),
                                       2 e^eps(2)) + sum_{j=3}^alpha 2 gamma^j C(alpha, j)
                                       e^((j - 1) eps(j)))

    Example:
        >>> gaussian = lambda a: a / (2 * 1.5**2)
        >>> subsampled_rdp(np.array([2, 8]), 1.0, gaussian).tolist()  # no sampling: itself
        [0.4444444444444444, 1.7777777777777777]
    """
    base = np.asarray(rdp(orders), dtype=np.float64)
    if gamma == 0:
        return np.zeros(len(orders))
    top = int(orders.max())
    j = np.arange(2, top + 1)
    eps = np.asarray(rdp(j), dtype=np.float64)
    log_fact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, top + 1)))])
    log_gamma = math.log(gamma)
    out = np.empty(len(orders))
    for i, alpha in enumerate(int(a) for a in orders):
        js = j[: alpha - 1]  # 2..alpha
        log_comb = log_fact[alpha] - log_fact[js] - log_fact[alpha - js]
        e2 = eps[0]
        second = 2 * log_gamma + log_comb[0] + min(math.log(4) + _log_expm1(e2), e2 + math.log(2))
        rest = math.log(2) + (js[1:] - 1) * eps[1 : alpha - 1] + js[1:] * log_gamma
        terms = np.concatenate([[0.0, second], rest + log_comb[1:]])
        out[i] = _logsumexp(terms) / (alpha - 1)
    return np.minimum(out, base)


def epsilon_of(rdp: np.ndarray, delta: float) -> float:
    """Epsilon at ``delta`` of a composed RDP curve over ``ORDERS``."""
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    with _quiet():
        return float(compute_epsilon(ORDERS, rdp, delta)[0])


@dataclass(frozen=True)
class Release:
    """One round's release, in the encoding's integer units: ``l2`` bounds the L2 norm of a
    client's rounded vector, ``mu`` is the variance of the noise the accountant counts."""

    l2: float
    mu: float

    def rdp(self, orders: np.ndarray = ORDERS) -> np.ndarray:
        """Its RDP under replace-one: a change of L2 norm ``2 l2``, L1 norm ``2 l2^2``."""
        return skellam_rdp(orders, 2 * self.l2**2, 2 * self.l2, self.mu)


@cache
def sampled_rdp(release: Release, gamma: float) -> np.ndarray:
    """The RDP over ``ORDERS`` of one round of ``release`` on a cohort sampled without
    replacement at rate ``gamma``."""
    return subsampled_rdp(ORDERS, gamma, release.rdp)


def calibrate(
    target_epsilon: float,
    delta: float,
    rounds: int,
    sampling: WithoutReplacement,
    release_at: Callable[[float], Release],
) -> float:
    """The smallest noise multiplier (to a relative 1e-6) whose ``rounds`` rounds of
    ``release_at(z)`` spend at most ``target_epsilon``."""
    gamma = sampling.m / sampling.n

    def spent(z: float) -> float:
        return epsilon_of(rounds * sampled_rdp(release_at(z), gamma), delta)

    low, high = Z_RANGE
    if spent(low) <= target_epsilon or spent(high) > target_epsilon:
        raise ValueError(
            f"target_epsilon {target_epsilon:g} is not reached with a noise multiplier in "
            f"[{low:g}, {high:g}] ({rounds} rounds, {sampling.describe()}: epsilon "
            f"{spent(low):.4g} at {low:g}, {spent(high):.4g} at {high:g})"
        )
    while high / low > 1 + 1e-6:
        mid = math.sqrt(low * high)
        low, high = (low, mid) if spent(mid) <= target_epsilon else (mid, high)
    return high


def fixed_size(sampling: Sampling) -> WithoutReplacement:
    """``sampling`` if it draws a fixed-size cohort; Poisson sampling is refused."""
    if isinstance(sampling, Poisson):
        raise ValueError(
            "distributed DP is accounted for a fixed-size cohort (UniformSampler: "
            "clients_per_round), not Poisson sampling: the server learns how many clients "
            "survive and whether the round aborts, which would tell whether one took part"
        )
    return sampling


def prepared(part: Any, sampling: Sampling, rounds: int, budget: PrivacyBudget) -> Any:
    """``part`` (a ``secagg.distributed_dp.DistributedSkellam``) with its survivors bound to
    the cohort and, with a ``target_epsilon``, its calibrated noise multiplier; the sampling
    and accountant it cannot be accounted under are refused."""
    sampling = fixed_size(sampling)
    if budget.accountant != "rdp":
        raise ValueError('distributed DP is accounted in RDP: set privacy accountant = "rdp"')
    part = part.bind_cohort(sampling.m)
    if budget.target_epsilon is not None:
        z = calibrate(budget.target_epsilon, budget.delta, rounds, sampling, part.release_at)
        part = replace(part, noise_multiplier=z)
    return part


class DistributedLedger:
    """The rounds of distributed DP a run released, against its budget (a
    ``ledger.PrivacyBudget``). Its server-state slot ``privacy`` holds, per round, ``l2``,
    ``mu`` and ``most`` (the most rounds any client was sampled for, so far); each client's
    sampled rounds (``counts``); the sampling (``N``, ``m``); and the clip, noise multiplier
    and honest survivors the statement names (``described``).

    ``epsilon`` holds for anyone who sees the models: the RDP curve of the sampled bound over
    all rounds, or of the most-participating client's rounds where that is smaller (both
    bound the same releases); ``epsilon_server`` is the second alone."""

    def __init__(
        self,
        release: Release,
        sampling: WithoutReplacement,
        budget: PrivacyBudget,
        described: tuple[float, float, int],  # clip, noise multiplier, honest survivors
    ) -> None:
        self.release, self.sampling, self.budget = release, sampling, budget
        self.described = described

    @classmethod
    def of(cls, part: Any, sampling: Sampling, budget: PrivacyBudget) -> DistributedLedger:
        """The ledger of a prepared ``DistributedSkellam``."""
        described = (part.clip, part.noise_multiplier, part.honest)
        return cls(part.release(), fixed_size(sampling), budget, described)

    def spent(self, state: State) -> float:
        """``epsilon``: against anyone who sees the models but not who took part."""
        return self._epsilon(_releases(state), self.most_rounds(state))

    def server_spent(self, state: State) -> float:
        """``epsilon_server``: against the server, for the most-participating client."""
        curve = _participation_rdp(_releases(state), self.most_rounds(state))
        return epsilon_of(curve, self.budget.delta)

    def most_rounds(self, state: State) -> int:
        """The most rounds any client was sampled for."""
        most = state.get("most")
        return int(most[-1]) if most is not None and len(most) else 0

    def record(self, state: State, cohort: object = ()) -> tuple[State, float]:
        """The ledger with a round in which ``cohort`` was sampled (every sampled client
        counts, whether or not its update arrived), and ``epsilon`` after it."""
        new = self._with_next(state, np.asarray(cohort, dtype=np.int64))
        return new, self.spent(new)

    def metrics(self, state: State) -> dict[str, float]:
        """The round's metrics beside ``epsilon``."""
        return {"epsilon_server": self.server_spent(state)}

    def admits(self, state: State) -> str | None:
        """Why the next round must not run (it would take ``epsilon`` past ``max_epsilon``
        for a client sampled in it), or None."""
        cap = self.budget.max_epsilon
        if cap is None:
            return None
        done = _releases(state)
        after = self._epsilon([*done, self.release], self.most_rounds(state) + 1)
        if after <= cap:
            return None
        return (
            f"privacy budget: round {len(done) + 1} would spend epsilon {after:.4g} at delta "
            f"{self.budget.delta:g}, above max_epsilon = {cap:g} (spent after round "
            f"{len(done)}: {self.spent(state):.4g})"
        )

    def per_round(self, state: State) -> list[float]:
        """``epsilon`` after each round."""
        releases = _releases(state)
        most = state.get("most", torch.zeros(0, dtype=torch.int64)).tolist()
        return [self._epsilon(releases[: t + 1], int(k)) for t, k in enumerate(most)]

    def statement(self, state: State) -> str:
        """The privacy statement of the rounds in ``state``."""
        clip, z, honest = self.described
        delta = self.budget.delta
        return (
            f"({self.spent(state):.4g}, {delta:g})-DP at the level of one client (user-level, "
            f"all of its data) for anyone who sees the models, over "
            f"{len(_releases(state))} rounds of the distributed Skellam mechanism on secure "
            f"aggregation: updates clipped to L2 norm {clip:g} on the clients, noise "
            f"multiplier {z:.4g} counted for the {honest} honest survivors a round needs, "
            f"{self.sampling.describe()} (replace-one); against the server, which sees who "
            f"took part: ({self.server_spent(state):.4g}, {delta:g})-DP for the "
            f"most-participating client ({self.most_rounds(state)} rounds), no amplification; "
            "RDP (Skellam: Agarwal et al. 2021; sampling: Wang et al. 2019)"
        )

    def _epsilon(self, releases: Sequence[Release], most: int) -> float:
        if not releases:
            return 0.0
        gamma = self.sampling.m / self.sampling.n
        sampled = np.zeros(len(ORDERS))
        for r in set(releases):
            sampled = sampled + releases.count(r) * sampled_rdp(r, gamma)
        curve = np.minimum(sampled, _participation_rdp(releases, most))
        return epsilon_of(curve, self.budget.delta)

    def _with_next(self, state: State, cohort: np.ndarray) -> State:
        n = self.sampling.n
        counts = state["counts"].numpy().copy() if "counts" in state else np.zeros(n, np.int64)
        counts[cohort] += 1

        def grown(key: str, value: float, dtype: torch.dtype) -> torch.Tensor:
            old = state.get(key, torch.zeros(0, dtype=dtype))
            return torch.cat([old, torch.tensor([value], dtype=dtype)])

        return {
            "l2": grown("l2", self.release.l2, torch.float64),
            "mu": grown("mu", self.release.mu, torch.float64),
            "most": grown("most", int(counts.max(initial=0)), torch.int64),
            "counts": torch.from_numpy(counts),
            "sampling": torch.tensor([n, self.sampling.m], dtype=torch.int64),
            "described": torch.tensor(self.described, dtype=torch.float64),
        }

    @classmethod
    def stored(cls, state: State, budget: PrivacyBudget) -> DistributedLedger:
        """The ledger a run stored (its ``privacy`` slot), to state its privacy afresh."""
        missing = {"l2", "mu", "most", "counts", "sampling", "described"} - set(state)
        if missing:
            raise ValueError(f"the stored privacy ledger lacks {sorted(missing)}")
        n, m = (int(v) for v in state["sampling"].tolist())
        clip, z, honest = state["described"].tolist()
        releases = _releases(state)
        last = releases[-1] if releases else Release(0.0, 0.0)
        return cls(last, WithoutReplacement(n, m), budget, (clip, z, int(honest)))


def _participation_rdp(releases: Sequence[Release], most: int) -> np.ndarray:
    """The RDP of ``most`` rounds, each the worst of ``releases`` (exact when they are
    equal), for a client taking part in that many of them."""
    if not releases or most == 0:
        return np.zeros(len(ORDERS))
    return most * np.max([r.rdp() for r in set(releases)], axis=0)


def _releases(state: State) -> list[Release]:
    empty = torch.zeros(0, dtype=torch.float64)
    l2, mu = state.get("l2", empty).tolist(), state.get("mu", empty).tolist()
    return [Release(a, b) for a, b in zip(l2, mu, strict=True)]


def _log_expm1(x: float) -> float:
    """``log(e^x - 1)`` for ``x >= 0`` (``-inf`` at 0)."""
    if x == 0:
        return -math.inf
    return x + math.log1p(-math.exp(-x)) if x > 1 else math.log(math.expm1(x))


def _logsumexp(terms: np.ndarray) -> float:
    top = float(terms.max())
    if not math.isfinite(top):
        return top
    return top + math.log(float(np.exp(terms - top).sum()))
