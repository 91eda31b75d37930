"""Privacy accounting with Google's ``dp-accounting``: the event each round's mechanism is,
epsilon over what ran, and the noise multiplier a target epsilon needs.

A round of central DP (``privacy.central.GaussianMean``) is a Gaussian mechanism of noise
multiplier ``z`` on the sum of the sampled clients' clipped updates; sampling amplifies it:
- Poisson sampling (``PoissonSampler``, each client with probability ``q``):
  ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``, under add-or-remove-one adjacency;
- fixed-size sampling (``UniformSampler``, ``m`` of ``N`` without replacement):
  ``SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z / 2))``, under replace-one
  adjacency (the RDP accountant only; ``dp-accounting``'s PLD accountant has no such event):
  replacing one client's data moves the sum of clipped updates by up to twice the clip, and
  dp-accounting takes the noise multiplier over that sensitivity.
The unit of privacy is one client (all of its data): user-level DP.

Example:
    >>> rounds = [Round(z=1.1, sampling=Poisson(q=0.01))] * 1000
    >>> round(epsilon(rounds, delta=1e-5), 4), round(epsilon(rounds, 1e-5, "pld"), 4)
    (1.7118, 1.5154)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import groupby
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:  # dp-accounting (and SciPy) load where an accountant runs: ~1.4 s
    import dp_accounting as dpa

ACCOUNTANTS = ("rdp", "pld")
Z_RANGE = (0.3, 1000.0)  # noise multipliers calibration searches


@contextmanager
def _quiet() -> Iterator[None]:
    """dp-accounting logs (through absl) each RDP order it leaves out; the epsilon it
    returns already accounts for that."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


@dataclass(frozen=True)
class Poisson:
    """Each client takes part independently with probability ``q``."""

    q: float
    sensitivity: ClassVar[float] = 1.0  # in clips: adding or removing one client

    def event(self, inner: dpa.DpEvent) -> dpa.DpEvent:
        import dp_accounting as dpa

        return dpa.PoissonSampledDpEvent(self.q, inner)

    @property
    def relation(self) -> dpa.NeighboringRelation:
        import dp_accounting as dpa

        return dpa.NeighboringRelation.ADD_OR_REMOVE_ONE

    def describe(self) -> str:
        return f"Poisson sampling, q = {self.q:g}"


@dataclass(frozen=True)
class WithoutReplacement:
    """``m`` of ``n`` clients, uniformly without replacement."""

    n: int
    m: int
    sensitivity: ClassVar[float] = 2.0  # in clips: replacing one client's data

    def event(self, inner: dpa.DpEvent) -> dpa.DpEvent:
        import dp_accounting as dpa

        return dpa.SampledWithoutReplacementDpEvent(self.n, self.m, inner)

    @property
    def relation(self) -> dpa.NeighboringRelation:
        import dp_accounting as dpa

        return dpa.NeighboringRelation.REPLACE_ONE

    def describe(self) -> str:
        return (
            f"{self.m} of {self.n} clients without replacement (replace-one: sensitivity "
            "twice the clip)"
        )


Sampling = Poisson | WithoutReplacement


@dataclass(frozen=True)
class Round:
    """One round of the Gaussian mechanism: noise multiplier ``z`` (noise std over the
    clip) and how its participants were sampled, which sets the sensitivity in clips."""

    z: float
    sampling: Sampling

    def event(self) -> dpa.DpEvent:
        import dp_accounting as dpa

        return self.sampling.event(dpa.GaussianDpEvent(self.z / self.sampling.sensitivity))


def composed(rounds: Sequence[Round]) -> dpa.DpEvent:
    """The composition of ``rounds``, runs of equal rounds self-composed."""
    import dp_accounting as dpa

    runs = [dpa.SelfComposedDpEvent(r.event(), len(list(g))) for r, g in groupby(rounds)]
    return dpa.ComposedDpEvent(runs)


def accountant(kind: str, relation: dpa.NeighboringRelation) -> dpa.PrivacyAccountant:
    """A fresh ``rdp`` or ``pld`` accountant for ``relation``."""
    import dp_accounting as dpa
    from dp_accounting import pld, rdp

    if kind == "rdp":
        return rdp.RdpAccountant(neighboring_relation=relation)
    if kind == "pld":
        if relation != dpa.NeighboringRelation.ADD_OR_REMOVE_ONE:
            raise ValueError(
                "the PLD accountant cannot account sampling without replacement; use "
                'accountant = "rdp" (or Poisson sampling)'
            )
        return pld.PLDAccountant()
    raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {kind!r}")


def epsilon(rounds: Sequence[Round], delta: float, kind: str = "rdp") -> float:
    """Epsilon at ``delta`` after ``rounds`` (0 for none; infinite if one had no noise).

    Example:
        >>> epsilon([Round(1.0, WithoutReplacement(100, 10))] * 10, 1e-5) > 0
        True
        >>> epsilon([Round(0.0, WithoutReplacement(100, 10))], 1e-5)
        inf
    """
    if not rounds:
        return 0.0
    if any(r.z == 0 for r in rounds):  # a release without noise: no guarantee at all
        return math.inf
    relations = {r.sampling.relation for r in rounds}
    if len(relations) > 1:
        raise ValueError("rounds under different adjacency relations cannot be composed")
    acc = accountant(kind, relations.pop())
    with _quiet():
        acc.compose(composed(rounds))
        return float(acc.get_epsilon(delta))


def calibrate(
    target_epsilon: float, delta: float, rounds: int, sampling: Sampling, kind: str = "rdp"
) -> float:
    """The smallest noise multiplier whose ``rounds`` rounds spend at most ``target_epsilon``
    (``dp_accounting.calibrate_dp_mechanism``, to 1e-6 in the multiplier).

    Example:
        >>> z = calibrate(2.0, 1e-5, 100, Poisson(0.05))
        >>> round(z, 2), epsilon([Round(z, Poisson(0.05))] * 100, 1e-5) <= 2.0
        (1.44, True)
    """
    import dp_accounting as dpa

    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    low, high = Z_RANGE
    for z in Z_RANGE:
        spent = epsilon([Round(z, sampling)] * rounds, delta, kind)
        if (z == low and spent <= target_epsilon) or (z == high and spent > target_epsilon):
            raise ValueError(
                f"target_epsilon {target_epsilon:g} is not reached with a noise multiplier in "
                f"[{low:g}, {high:g}] ({rounds} rounds, {sampling.describe()}: epsilon "
                f"{spent:.4g} at {z:g})"
            )
    with _quiet():
        z = dpa.calibrate_dp_mechanism(
            lambda: accountant(kind, sampling.relation),
            lambda z: dpa.SelfComposedDpEvent(Round(z, sampling).event(), rounds),
            target_epsilon,
            delta,
            dpa.ExplicitBracketInterval(low, high),
            tol=1e-6,  # in noise multiplier
        )
    return float(z)
