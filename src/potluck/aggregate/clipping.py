"""Aggregators that bound each update's influence by clipping it.

- ``CenteredClipping`` (Karimireddy, He, Jaggi 2021, "Learning from History for Byzantine
  Robust Optimization", ICML): starting from the previous round's aggregate ``v`` (its
  server state, checkpointed with the round; zero before the first), each of
  ``iterations`` steps moves ``v`` by the mean of the updates' differences from it, each
  difference clipped to L2 norm ``tau``: ``v += mean_k (x_k - v) min(1, tau / ||x_k - v||)``.
  A Byzantine update moves it by at most ``tau / n`` a step. Their analysis holds for a
  Byzantine fraction ``delta <= 0.1`` (``n >= 10f``).
- ``NormBounding`` (Sun, Kairouz, Suresh, McMahan 2019, "Can You Really Backdoor Federated
  Learning?"): each update clipped to L2 norm ``bound``, averaged, and, with
  ``noise_std > 0``, Gaussian noise of that standard deviation added to the average ("weak
  DP", drawn from the run's seeded stream). No assumption on ``f``: ``f`` attackers move the
  average by at most ``f * bound / n``. The weak DP noise is *not* accounted as a
  differential-privacy guarantee (no clip-to-noise calibration, no accountant, and the
  seeded noise is known to whoever has the config); use ``dp_mean`` for one.

Both count every update alike (weights ignored).

Example:
    >>> import torch
    >>> from potluck.core.parts import part_context
    >>> deltas = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    >>> ctx = part_context(0, 1, "aggregator")
    >>> NormBounding(bound=1.0).aggregate(deltas, torch.ones(2), {}, ctx)[0]
    tensor([0.4500, 0.6000])
    >>> cc = CenteredClipping(tau=1.0)
    >>> v, state = cc.aggregate(deltas, torch.ones(2), cc.init(torch.zeros(2)), ctx)
    >>> v, bool(torch.equal(state["center"], v))
    (tensor([0.4500, 0.6000]), True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from potluck.aggregate.byzantine import (
    ON_DEVICE_ROBUST,
    ROBUST_NEEDS,
    ByzantineRobust,
    check_positive,
    check_positive_int,
)
from potluck.aggregate.mean import check_stack
from potluck.core.parts import Context, State
from potluck.core.registry import register
from potluck.privacy.central import clip_scales, clipped_sum, gaussian_noise, row_norms


def centered_clip(
    deltas: torch.Tensor, center: torch.Tensor, tau: float, iterations: int
) -> torch.Tensor:
    """``iterations`` centred-clipping steps from ``center`` over a (K, d) stack."""
    v = center.to(deltas.dtype)
    for _ in range(iterations):
        diffs = deltas - v
        scales = clip_scales(row_norms(diffs), tau)
        v = v + (clipped_sum(diffs, scales) / deltas.shape[0]).to(deltas.dtype)
    return v


@register("aggregator", "centered_clipping")
@dataclass(frozen=True)
class CenteredClipping(ByzantineRobust):
    """Centred clipping of radius ``tau`` around the previous aggregate, for
    ``byzantine`` = f Byzantine clients (a count or a fraction of the cohort); it assumes
    ``n >= 10f``."""

    tau: float = 1.0
    iterations: int = 1
    byzantine: int | float = 0
    rule: ClassVar[str] = "f <= 0.1 n"
    gives: ClassVar[frozenset[str]] = ON_DEVICE_ROBUST

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("tau", self.tau)
        check_positive_int("iterations", self.iterations)

    def needed(self, f: int) -> int:
        return max(10 * f, 1)

    def init(self, w: torch.Tensor) -> State:
        return {"center": torch.zeros_like(w)}

    def combine(self, deltas: torch.Tensor, f: int, state: State) -> tuple[torch.Tensor, State]:
        center = state.get("center", deltas.new_zeros(deltas.shape[1]))
        v = centered_clip(deltas, center, self.tau, self.iterations)
        return v, {"center": v.clone()}


@register("aggregator", "norm_bounding")
@dataclass(frozen=True)
class NormBounding:
    """Each update clipped to L2 norm ``bound`` and averaged, plus N(0, noise_std^2) per
    coordinate (weak DP, not accounted as a DP guarantee)."""

    bound: float = 1.0
    noise_std: float = 0.0
    needs: ClassVar[frozenset[str]] = ROBUST_NEEDS
    gives: ClassVar[frozenset[str]] = ON_DEVICE_ROBUST

    def __post_init__(self) -> None:
        check_positive("bound", self.bound)
        if not (math.isfinite(self.noise_std) and self.noise_std >= 0):
            raise ValueError(f"noise_std must be a finite number >= 0, got {self.noise_std!r}")

    def init(self, w: torch.Tensor) -> State:
        return {}

    def aggregate(
        self, deltas: torch.Tensor, weights: torch.Tensor, state: State, ctx: Context
    ) -> tuple[torch.Tensor, State]:
        check_stack(deltas, weights)
        total = clipped_sum(deltas, clip_scales(row_norms(deltas), self.bound))
        mean = total / deltas.shape[0]
        mean += gaussian_noise(mean.shape[0], self.noise_std, "seed", ctx).to(mean.device)
        return mean.to(deltas.dtype), state
