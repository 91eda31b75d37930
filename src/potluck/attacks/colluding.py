"""Colluding model-poisoning attacks: the round's attackers craft their updates together.

Each attack here knows the round's honest updates of every attacker (``colluders``) and, if
``omniscient``, every benign update too; a non-omniscient one estimates the benign updates'
statistics from the attackers' own honest updates, as the papers' partial-knowledge
variants do. All attackers of a round send the same crafted update (the papers' choice:
identical malicious updates reinforce each other in distance-based rules), except Fang et
al.'s trimmed-mean attack, which draws each one's values.

Example:
    >>> import torch
    >>> from potluck.attacks.poisoning import attack_context
    >>> honest = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    >>> IPM(epsilon=0.5).collude(honest[:1], honest[1:], attack_context(0, 1)).tolist()
    [[-1.0, -0.5]]
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist
from typing import ClassVar, Literal

import torch

from potluck.aggregate.byzantine import pairwise_sq_distances
from potluck.aggregate.krum import krum_scores
from potluck.attacks.poisoning import Attack, Knowledge, _check_positive
from potluck.core.parts import Context
from potluck.core.registry import register

__all__ = ["ALIE", "IPM", "FangKrum", "FangTrimmedMean", "MinMax", "MinSum"]


@dataclass(frozen=True)
class _Colluding(Attack):
    fraction: float = 0.2
    omniscient: bool = True
    colludes: ClassVar[bool] = True

    @property
    def knowledge(self) -> Knowledge:
        return "omniscient" if self.omniscient else "colluders"

    def reference(self, malicious: torch.Tensor, benign: torch.Tensor) -> torch.Tensor:
        """The updates the attackers take for the benign ones: every benign update if
        omniscient (with their own honest ones), else their own honest updates."""
        return torch.cat([benign, malicious]) if self.omniscient and len(benign) else malicious


@register("attack", "alie")
@dataclass(frozen=True)
class ALIE(_Colluding):
    """ "A little is enough" (Baruch, Baruch, Goldberg 2019, "A Little Is Enough:
    Circumventing Defenses For Distributed Learning", NeurIPS): every attacker sends
    ``mean - z * std`` of the reference updates, coordinate-wise, with the paper's
    ``z = Phi^-1((n - s) / n)``, ``s = floor(n / 2 + 1) - f`` for ``n`` updates of which
    ``f`` malicious (``z`` given: that one). Non-omniscient by default, as in the paper.

    Example:
        >>> ALIE.paper_z(50, 12) > 0
        True
    """

    fraction: float = 0.2
    omniscient: bool = False
    z: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.z is not None:
            _check_positive("z", self.z)

    @staticmethod
    def paper_z(n: int, f: int) -> float:
        """The paper's ``z_max`` for ``n`` updates of which ``f`` are malicious."""
        s = math.floor(n / 2 + 1) - f
        p = min(max((n - s) / n, 1e-6), 1 - 1e-6)
        return NormalDist().inv_cdf(p)

    def collude(self, malicious: torch.Tensor, benign: torch.Tensor, ctx: Context) -> torch.Tensor:
        ref = self.reference(malicious, benign)
        n, f = len(malicious) + len(benign), len(malicious)
        z = self.z if self.z is not None else self.paper_z(n, f)
        mean, std = ref.mean(0), ref.std(0, correction=0)
        return (mean - z * std).expand_as(malicious).clone()


@register("attack", "ipm")
@dataclass(frozen=True)
class IPM(_Colluding):
    """Inner-product manipulation (Xie, Koyejo, Gupta 2020, "Fall of Empires: Breaking
    Byzantine-tolerant SGD by Inner Product Manipulation", UAI): every attacker sends
    ``-epsilon`` times the mean of the reference updates, so the aggregate's inner product
    with the true mean turns negative (a small ``epsilon`` passes Krum, a large one the
    median)."""

    fraction: float = 0.2
    epsilon: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive("epsilon", self.epsilon)

    def collude(self, malicious: torch.Tensor, benign: torch.Tensor, ctx: Context) -> torch.Tensor:
        mean = self.reference(malicious, benign).mean(0)
        return (-self.epsilon * mean).expand_as(malicious).clone()


Direction = Literal["std", "unit", "sign"]


@dataclass(frozen=True)
class _Optimized(_Colluding, ABC):
    """Shejwalkar and Houmansadr's AGR-agnostic attacks: ``mean + gamma * p`` with the
    perturbation ``p`` (``std``: minus the coordinate-wise std; ``unit``: minus the unit
    mean; ``sign``: minus the mean's sign) and the largest ``gamma`` the attack's condition
    allows, found by the paper's halving search from ``gamma_init`` to precision ``tau``."""

    fraction: float = 0.2
    direction: Direction = "std"
    gamma_init: float = 10.0
    tau: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.direction not in ("std", "unit", "sign"):
            raise ValueError(
                f"attack.direction must be 'std', 'unit' or 'sign', got {self.direction!r}"
            )
        _check_positive("gamma_init", self.gamma_init)
        _check_positive("tau", self.tau)

    def perturbation(self, ref: torch.Tensor) -> torch.Tensor:
        mean = ref.mean(0)
        if self.direction == "std":
            return -ref.std(0, correction=0)
        if self.direction == "unit":
            return -mean / mean.norm().clamp(min=1e-12)
        return -mean.sign()

    @abstractmethod
    def allowed(self, crafted: torch.Tensor, ref: torch.Tensor, d2: torch.Tensor) -> bool:
        """Whether ``crafted`` meets the attack's condition against the reference updates
        ``ref`` (their pairwise squared distances ``d2``)."""

    def collude(self, malicious: torch.Tensor, benign: torch.Tensor, ctx: Context) -> torch.Tensor:
        ref = self.reference(malicious, benign)
        mean, p = ref.mean(0), self.perturbation(ref)
        d2 = pairwise_sq_distances(ref)

        def ok(gamma: float) -> bool:
            return self.allowed(mean + gamma * p, ref, d2)

        gamma = halving_search(ok, self.gamma_init, self.tau)
        return (mean + gamma * p).expand_as(malicious).clone()


def halving_search(ok: Callable[[float], bool], gamma_init: float, tau: float) -> float:
    """Shejwalkar and Houmansadr's Algorithm 1: the largest ``gamma`` found for which
    ``ok(gamma)`` holds, by steps halved from ``gamma_init / 2`` until they are below
    ``tau`` (0 if none holds).

    Example:
        >>> round(halving_search(lambda g: g <= 3.0, 10.0, 1e-6), 4)
        3.0
    """
    gamma, step, best = gamma_init, gamma_init / 2, 0.0
    while step > tau:
        if ok(gamma):
            best = gamma
            gamma += step
        else:
            gamma -= step
        step /= 2
    return best


@register("attack", "min_max")
@dataclass(frozen=True)
class MinMax(_Optimized):
    """Min-Max (Shejwalkar, Houmansadr 2021, "Manipulating the Byzantine: Optimizing Model
    Poisoning Attacks and Defenses for Federated Learning", NDSS): the crafted update's
    largest distance to a reference update stays within the largest distance between two
    of them."""

    def allowed(self, crafted: torch.Tensor, ref: torch.Tensor, d2: torch.Tensor) -> bool:
        return float(((ref - crafted) ** 2).sum(1).max()) <= float(d2.max())


@register("attack", "min_sum")
@dataclass(frozen=True)
class MinSum(_Optimized):
    """Min-Sum (Shejwalkar, Houmansadr 2021, NDSS): the crafted update's sum of squared
    distances to the reference updates stays within the largest such sum of one of them."""

    def allowed(self, crafted: torch.Tensor, ref: torch.Tensor, d2: torch.Tensor) -> bool:
        return float(((ref - crafted) ** 2).sum()) <= float(d2.sum(1).max())


@register("attack", "fang_krum")
@dataclass(frozen=True)
class FangKrum(_Colluding):
    """Fang et al.'s attack on Krum (Fang, Cao, Jia, Gong 2020, "Local Model Poisoning
    Attacks to Byzantine-Robust Federated Learning", USENIX Security), in update space:
    every attacker sends ``-lambda * s`` with ``s`` the sign of the reference mean, and
    ``lambda`` halved from the paper's upper bound until Krum (for ``f`` = the round's
    attackers) selects the crafted update, down to ``threshold`` (then that). Full knowledge
    by default, as the paper's main attack."""

    fraction: float = 0.2
    threshold: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive("threshold", self.threshold)

    def collude(self, malicious: torch.Tensor, benign: torch.Tensor, ctx: Context) -> torch.Tensor:
        ref = self.reference(malicious, benign)
        m, c = len(malicious) + len(benign), len(malicious)
        s = ref.mean(0).sign()
        lam = _fang_upper_bound(ref, m, c)
        others = benign if self.omniscient else malicious  # the benign updates, or a guess
        while lam > self.threshold:
            crafted = (-lam * s).expand(c, -1)
            if _krum_picks_crafted(torch.cat([crafted, others]), c):
                break
            lam /= 2
        return (-max(lam, self.threshold) * s).expand_as(malicious).clone()


def _fang_upper_bound(ref: torch.Tensor, m: int, c: int) -> float:
    """Fang et al.'s bound on lambda: the reference updates' smallest sum of distances to
    their ``m - c - 2`` nearest others over ``(m - 2c - 1) sqrt(d)``, plus their largest
    norm over ``sqrt(d)`` (their distance to the global model)."""
    d = ref.shape[1]
    k = min(max(m - c - 2, 1), len(ref) - 1)
    if k < 1:
        return float(ref.norm(dim=1).max()) / math.sqrt(d)
    dist = pairwise_sq_distances(ref).clamp(min=0).sqrt()
    nearest = krum_scores(dist, k).min()
    return float(nearest) / (max(m - 2 * c - 1, 1) * math.sqrt(d)) + float(
        ref.norm(dim=1).max()
    ) / math.sqrt(d)


def _krum_picks_crafted(stack: torch.Tensor, c: int) -> bool:
    n = stack.shape[0]
    neighbours = min(max(n - c - 2, 1), n - 1)
    return int(krum_scores(pairwise_sq_distances(stack), neighbours).argmin()) < c


@register("attack", "fang_trimmed_mean")
@dataclass(frozen=True)
class FangTrimmedMean(_Colluding):
    """Fang et al.'s attack on trimmed mean and median (Fang et al. 2020, USENIX Security),
    in update space: in each coordinate where the reference mean is positive an attacker
    sends a value drawn uniformly beyond the reference minimum (in ``[min / b, min]`` if the
    minimum is positive, else ``[b * min, min]``), where it is not, beyond the maximum
    (``[max, b * max]`` or ``[max, max / b]``), with ``b`` = 2 as in the paper."""

    fraction: float = 0.2
    b: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.b, int | float) and self.b > 1):
            raise ValueError(f"attack.b must be a number > 1, got {self.b!r}")

    def collude(self, malicious: torch.Tensor, benign: torch.Tensor, ctx: Context) -> torch.Tensor:
        ref = self.reference(malicious, benign)
        lo, hi = ref.min(0).values, ref.max(0).values
        b = self.b
        # the interval beyond the minimum (pushing a positive coordinate down) and beyond
        # the maximum (pushing the others up)
        low_start = torch.where(lo > 0, lo / b, lo * b)
        high_end = torch.where(hi > 0, hi * b, hi / b)
        start = torch.where(ref.mean(0) > 0, low_start, hi)
        end = torch.where(ref.mean(0) > 0, lo, high_end)
        u = torch.rand(malicious.shape, generator=ctx.generator(), dtype=torch.float32)
        return (start + u.to(ref.dtype) * (end - start)).to(malicious.dtype)
