"""The privacy ledger of a run with central DP: what each round released, in the server
state, and the budget that stops a run.

The round loop keeps one server-state slot, ``privacy``, holding ``z``: the noise
multiplier of every round released so far (float64, one per round), with the clip and the
sampling (``sampling``: q, N, m; N and m are 0 for Poisson sampling). It is committed with
every round's checkpoint, so a resumed run continues the same ledger; epsilon is always
computed afresh by the accountant over it (``accounting.epsilon``) and the run's sampling,
never stored as a claim. Before a round, ``admits`` says whether it would take epsilon past
``max_epsilon``; the run then stops with that reason.

Example:
    >>> from potluck.privacy.central import GaussianMean
    >>> from potluck.sampling.poisson import PoissonSampler
    >>> budget = PrivacyBudget(delta=1e-5, max_epsilon=1.0)
    >>> sampling = sampling_of(PoissonSampler(0.01), 10_000)
    >>> ledger = Ledger(GaussianMean(noise_multiplier=1.1), sampling, budget)
    >>> state = {}
    >>> for _ in range(3):
    ...     state, eps = ledger.record(state)
    >>> round(eps, 4), ledger.admits(state) is None
    (0.8211, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from potluck.core.parts import State
from potluck.privacy import distributed
from potluck.privacy.accounting import (
    ACCOUNTANTS,
    Poisson,
    Round,
    Sampling,
    WithoutReplacement,
    calibrate,
    epsilon,
)
from potluck.privacy.participation import Participation, ParticipationLedger, gaussian_calibrate

if TYPE_CHECKING:
    from potluck.privacy.distributed import DistributedLedger

SLOT = "privacy"


@dataclass(frozen=True)
class PrivacyBudget:
    """What a run's privacy is stated at and held to: epsilon at ``delta``, computed by the
    ``accountant`` (``rdp`` or ``pld``); ``max_epsilon`` stops the run before a round that
    would exceed it; ``target_epsilon`` sets the noise multiplier before the run so that all
    its rounds spend it (``accounting.calibrate``)."""

    delta: float = 1e-5
    max_epsilon: float | None = None
    target_epsilon: float | None = None
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        if not 0 < self.delta < 1:
            raise ValueError(f"privacy delta must be in (0, 1), got {self.delta}")
        for name in ("max_epsilon", "target_epsilon"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"privacy {name} must be a finite number > 0, got {value}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"privacy accountant must be one of {ACCOUNTANTS}")


@runtime_checkable
class GaussianMechanism(Protocol):
    """An aggregator that releases each round's sum through a Gaussian mechanism."""

    @property
    def clip(self) -> float: ...

    @property
    def noise_multiplier(self) -> float: ...

    def bind_cohort(self, expected_cohort: float) -> Any: ...


def check_deployable(algorithm: Any) -> None:
    """Refuse private noise that follows from the run seed, for a deployment: anyone with
    the config could subtract it."""
    from potluck.privacy.dp_sgd import example_mechanisms

    for ns, part in [*private_parts(algorithm), *example_mechanisms(algorithm)]:
        if getattr(part, "noise", None) == "seed":
            raise ValueError(
                f'{ns}.noise = "seed": a deployment\'s DP noise must not follow from the '
                'config\'s seed (anyone with the config could subtract it); set noise = "secure"'
            )


def private_parts(algorithm: Any) -> list[tuple[str, Any]]:
    """The parts of ``algorithm`` that release through a private mechanism (namespace,
    part): a private aggregator, local DP transforms, distributed DP on secure aggregation,
    central DP on a secure sum."""
    from potluck.privacy.local import LocalGaussian
    from potluck.privacy.secure_central import SecureCentralGaussian
    from potluck.secagg.distributed_dp import DistributedSkellam

    private = LocalGaussian | DistributedSkellam | SecureCentralGaussian
    found: list[tuple[str, Any]] = [
        (f"transforms.{i}", t) for i, t in enumerate(algorithm.transforms) if isinstance(t, private)
    ]
    if isinstance(algorithm.aggregator, GaussianMechanism):
        found.append(("aggregator", algorithm.aggregator))
    return found


def _participation(part: Any) -> Participation | None:
    """How ``part``'s privacy is accounted per client (None: by sampling, central DP)."""
    from potluck.privacy.local import LocalGaussian
    from potluck.privacy.tree import TreeAggregatedMean

    if isinstance(part, LocalGaussian):
        return Participation("local")
    if isinstance(part, TreeAggregatedMean):
        return Participation("tree", part.restart_every)
    return None


def private_mechanism(algorithm: Any) -> tuple[str, Any] | None:
    """The one private mechanism of ``algorithm`` (namespace, part), or None; two are
    refused, since the ledger accounts one."""
    found = private_parts(algorithm)
    if len(found) > 1:
        names = ", ".join(f"{ns} ({type(p).__name__})" for ns, p in found)
        raise ValueError(
            f"privacy: {names} are each a private mechanism; a run is accounted for one of "
            "them (keep the one whose guarantee you state)"
        )
    return found[0] if found else None


def max_participations(sampler: Any, num_clients: int, window: int, aligned: bool) -> int:
    """The most of ``window`` consecutive rounds one client can take part in: the sampler's
    own bound where it has one (``ShuffledSampler``: one per epoch; a window that does not
    start with an epoch can touch one more), else every round."""
    bound = getattr(sampler, "max_participations", None)
    if bound is None:
        return window
    within = int(bound(num_clients, window))
    return within if aligned else min(window, within + 1)


def prepare(algorithm: Any, num_clients: int, rounds: int, budget: PrivacyBudget) -> Any:
    """``algorithm`` with its private mechanism's noise calibrated to the budget's
    ``target_epsilon`` (unchanged without one) and its denominator bound."""
    found = private_mechanism(algorithm)
    if found is None:
        return algorithm
    ns, part = found
    participation = _participation(part)
    if _distributed(part):
        sampling = sampling_of(algorithm.sampler, num_clients)
        part = distributed.prepared(part, sampling, rounds, budget)
    elif participation is None:
        sampling = sampling_of(algorithm.sampler, num_clients)
        check = getattr(part, "check_sampling", None)  # a sampling it is not accounted under
        if check is not None:
            check(sampling)
        part = calibrated(part, budget, rounds, sampling)
    elif budget.target_epsilon is not None:
        bound = _sensitivity_bound(participation, algorithm.sampler, num_clients, rounds)
        z = gaussian_calibrate(budget.target_epsilon, budget.delta, budget.accountant)
        part = replace(part, noise_multiplier=z * math.sqrt(bound))
    if ns == "aggregator":
        part.bind_cohort(expected_cohort(algorithm.sampler, num_clients))  # its own checks
        return replace(algorithm, aggregator=part)
    transforms = list(algorithm.transforms)
    transforms[int(ns.split(".")[1])] = part
    return replace(algorithm, transforms=tuple(transforms))


def _sensitivity_bound(
    participation: Participation, sampler: Any, num_clients: int, rounds: int
) -> float:
    """The largest squared sensitivity the run can reach: each tree (or the whole run)
    with the most participations the sampler allows in it."""
    every = participation.restart_every if participation.kind == "tree" else None
    window = min(every or rounds, rounds)
    epoch = getattr(sampler, "epoch_rounds", None)
    aligned = window == rounds or (epoch is not None and window % epoch(num_clients) == 0)
    k = max_participations(sampler, num_clients, window, aligned)
    return participation.bound(rounds, k)


def ledger_for(
    algorithm: Any, num_clients: int, budget: PrivacyBudget
) -> Ledger | ParticipationLedger | DistributedLedger | None:
    """The privacy ledger of ``algorithm``'s private mechanism (None without one)."""
    found = private_mechanism(algorithm)
    if found is None:
        return None
    part = found[1]
    if _distributed(part):
        return distributed.DistributedLedger.of(
            part, sampling_of(algorithm.sampler, num_clients), budget
        )
    participation = _participation(part)
    if participation is None:
        return Ledger(part, sampling_of(algorithm.sampler, num_clients), budget)
    return ParticipationLedger(participation, part.noise_multiplier, part.clip, budget, num_clients)


def stored_ledger(
    state: State, budget: PrivacyBudget
) -> Ledger | ParticipationLedger | DistributedLedger:
    """The ledger a run stored (its ``privacy`` slot), of whichever mechanism it was."""
    if "mu" in state:
        return distributed.DistributedLedger.stored(state, budget)
    if "kind" in state:
        return ParticipationLedger.stored(state, budget)
    return Ledger.stored(state, budget)


def _distributed(part: Any) -> bool:
    from potluck.secagg.distributed_dp import DistributedSkellam

    return isinstance(part, DistributedSkellam)


def sampling_of(sampler: object, num_clients: int) -> Sampling:
    """How ``sampler`` draws a cohort, for the accountant; other samplers are refused."""
    from potluck.sampling.poisson import PoissonSampler
    from potluck.sampling.uniform import UniformSampler

    if isinstance(sampler, PoissonSampler):
        return Poisson(sampler.rate)
    if isinstance(sampler, UniformSampler):
        return WithoutReplacement(num_clients, sampler.cohort_size(num_clients))
    raise ValueError(
        f"central DP is accounted for Poisson sampling (PoissonSampler) or sampling without "
        f"replacement (UniformSampler), not for {type(sampler).__name__}"
    )


def expected_cohort(sampler: Any, num_clients: int) -> float:
    """The mean cohort size of ``sampler`` over ``num_clients`` (a DP mean's denominator)."""
    expected = getattr(sampler, "expected_cohort", None)
    return float(expected(num_clients) if expected else sampler.cohort_size(num_clients))


class Ledger:
    """The rounds a run's Gaussian mechanism released, against its budget."""

    def __init__(self, mechanism: GaussianMechanism, sampling: Sampling, budget: PrivacyBudget):
        self.mechanism, self.sampling, self.budget = mechanism, sampling, budget
        self._spent: dict[tuple[float, ...], float] = {}  # admits and record ask alike

    def rounds(self, state: State) -> list[Round]:
        z = state.get("z", torch.zeros(0, dtype=torch.float64))
        return [Round(float(v), self.sampling) for v in z.tolist()]

    def spent(self, state: State) -> float:
        """Epsilon at the budget's delta over the rounds in ``state``."""
        rounds = self.rounds(state)
        key = tuple(r.z for r in rounds)
        if key not in self._spent:
            self._spent = {key: epsilon(rounds, self.budget.delta, self.budget.accountant)}
        return self._spent[key]

    def admits(self, state: State) -> str | None:
        """Why the next round must not run (it would exceed ``max_epsilon``), or None."""
        cap = self.budget.max_epsilon
        if cap is None:
            return None
        after = self.spent(self._with_next(state))
        if after <= cap:
            return None
        done = len(self.rounds(state))
        return (
            f"privacy budget: round {done + 1} would spend epsilon {after:.4g} at delta "
            f"{self.budget.delta:g}, above max_epsilon = {cap:g} (spent after round {done}: "
            f"{self.spent(state):.4g})"
        )

    def record(self, state: State, cohort: object = ()) -> tuple[State, float]:
        """The ledger with this round released, and epsilon spent after it (the sampling,
        not the ``cohort`` it drew, is what amplifies the round)."""
        new = self._with_next(state)
        return new, self.spent(new)

    def statement(self, state: State) -> str:
        """The privacy statement of the rounds in ``state``."""
        rounds = self.rounds(state)
        zs = sorted({r.z for r in rounds}) or [self.mechanism.noise_multiplier]
        noise = f"{zs[0]:.4g}" if len(zs) == 1 else f"{zs[0]:.4g} to {zs[-1]:.4g}"
        quantile = getattr(self.mechanism, "target_quantile", None)
        clip = f"clipped to L2 norm {self.mechanism.clip:g}"
        if quantile is not None:
            clip = (
                f"clipped adaptively to the {quantile:g} quantile of their norms (from "
                f"{self.mechanism.clip:g}; the private count included)"
            )
        return (
            f"({self.spent(state):.4g}, {self.budget.delta:g})-DP at the level of one client "
            f"(user-level, all of its data), over {len(rounds)} rounds of the Gaussian "
            f"mechanism: updates {clip}, noise multiplier {noise}, "
            f"{self.sampling.describe()}; {self.budget.accountant.upper()} accountant "
            "(dp-accounting)"
        )

    def per_round(self, state: State) -> list[float]:
        """Epsilon spent after each round."""
        rounds = self.rounds(state)
        return [
            epsilon(rounds[: t + 1], self.budget.delta, self.budget.accountant)
            for t in range(len(rounds))
        ]

    def _with_next(self, state: State) -> State:
        z = state.get("z", torch.zeros(0, dtype=torch.float64))
        step = torch.tensor([self.mechanism.noise_multiplier], dtype=torch.float64)
        s = self.sampling
        q, n, m = (s.q, 0, 0) if isinstance(s, Poisson) else (s.m / s.n, s.n, s.m)
        out = {
            "z": torch.cat([z, step]),
            "clip": torch.tensor(self.mechanism.clip, dtype=torch.float64),
            "sampling": torch.tensor([q, n, m], dtype=torch.float64),
        }
        quantile = getattr(self.mechanism, "target_quantile", None)
        if quantile is not None:  # an adaptive clip: ``clip`` is where it started
            out["target_quantile"] = torch.tensor(quantile, dtype=torch.float64)
        return out

    @classmethod
    def stored(cls, state: State, budget: PrivacyBudget) -> Ledger:
        """The ledger a run stored (its ``privacy`` slot), to state its privacy afresh."""
        missing = {"z", "clip", "sampling"} - set(state)
        if missing:
            raise ValueError(f"the stored privacy ledger lacks {sorted(missing)}")
        q, n, m = state["sampling"].tolist()
        sampling: Sampling = Poisson(q) if n == 0 else WithoutReplacement(int(n), int(m))
        z = state["z"].tolist()
        quantile = state.get("target_quantile")
        q_value = None if quantile is None else float(quantile)
        mechanism = _Stored(float(state["clip"]), z[-1] if z else 0.0, q_value)
        return cls(mechanism, sampling, budget)


@dataclass(frozen=True)
class _Stored:
    clip: float
    noise_multiplier: float
    target_quantile: float | None = None

    def bind_cohort(self, expected_cohort: float) -> _Stored:
        return self


def calibrated(mechanism: Any, budget: PrivacyBudget, rounds: int, sampling: Sampling) -> Any:
    """``mechanism`` with the noise multiplier that makes ``rounds`` rounds spend the
    budget's ``target_epsilon`` (unchanged without one)."""
    if budget.target_epsilon is None:
        return mechanism
    z = calibrate(budget.target_epsilon, budget.delta, rounds, sampling, budget.accountant)
    return replace(mechanism, noise_multiplier=z)
