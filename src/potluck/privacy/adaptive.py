"""DP-FedAvg with adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy 2021,
"Differentially Private Learning with Adaptive Clipping", NeurIPS).

The clip follows a quantile of the updates' norms instead of being tuned by hand. In round
``t``, with clip ``C_t``, each update is clipped to ``C_t`` and the clipped updates are summed
and noised as in ``GaussianMean`` (noise multiplier ``z_delta``); the server also counts the
updates whose norm was at most ``C_t``, privately: ``b = (sum_i (1[|d_i| <= C_t] - 1/2) +
N(0, s^2)) / m + 1/2`` over the expected cohort ``m`` (the centred indicator has sensitivity
1/2). The clip then moves geometrically towards the ``target_quantile`` ``g``:
``C_{t+1} = C_t exp(-lr (b - g))``. The two releases are one Gaussian mechanism of noise
multiplier ``z = (z_delta^-2 + (2 s)^-2)^(-1/2)`` (the paper's Theorem 1), so
``noise_multiplier`` is that ``z``, the one the accountant composes, and
``z_delta = (z^-2 - (2 s)^-2)^(-1/2)``; ``count_noise`` ``s`` defaults to ``m / 20``, the
paper's choice. The clip is server state, checkpointed with the round.

Example:
    >>> import torch
    >>> from potluck.core.parts import part_context
    >>> agg = AdaptiveGaussianMean(clip=1.0, noise_multiplier=0.0).bind_cohort(4.0)
    >>> deltas = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 2.0], [1.0, 0.0]])
    >>> state = agg.init(torch.zeros(2))
    >>> _, state = agg.aggregate(deltas, torch.ones(4), state, part_context(0, 1, "aggregator"))
    >>> round(float(state["clip"]), 4)  # half of the norms were <= 1: b = 0.5, no move
    1.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from potluck.core.parts import Context, Need, State
from potluck.core.registry import register
from potluck.privacy.central import (
    check_gaussian,
    clip_scales,
    clipped_sum,
    gaussian_noise,
    row_norms,
)

COUNT_NOISE_SHARE = 0.05  # the count's noise std, as a share of the expected cohort


@register("aggregator", "dp_mean_adaptive")
@dataclass(frozen=True)
class AdaptiveGaussianMean:
    """The noised mean of ``GaussianMean`` with a clip that tracks the ``target_quantile``
    of the update norms, starting from ``clip``."""

    clip: float = 0.1
    noise_multiplier: float = 1.0
    target_quantile: float = 0.5
    lr: float = 0.2
    count_noise: float | None = None
    denominator: float | None = None
    noise: str = "seed"
    label: ClassVar[str] = "central DP (adaptive clip)"  # how the run describes its privacy
    needs: ClassVar[frozenset[str]] = frozenset({Need.ONLY_THE_DELTA})
    gives: ClassVar[frozenset[str]] = frozenset({Need.FIXED_DENOMINATOR, Need.EQUAL_WEIGHTS})

    def __post_init__(self) -> None:
        check_gaussian(self.clip, self.noise_multiplier, self.noise)
        if not 0 < self.target_quantile < 1:
            raise ValueError(f"target_quantile must be in (0, 1), got {self.target_quantile}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("count_noise", "denominator"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        if self.count_noise is not None:
            self.delta_noise_multiplier()  # refuses a count noise too small for the total

    def bind_cohort(self, expected_cohort: float) -> AdaptiveGaussianMean:
        """With its denominator (``expected_cohort`` unless given) and, without a
        ``count_noise``, the default one (a 20th of the denominator)."""
        bound = self if self.denominator is not None else replace(self, denominator=expected_cohort)
        if bound.count_noise is None and bound.noise_multiplier > 0:
            assert bound.denominator is not None
            bound = replace(bound, count_noise=COUNT_NOISE_SHARE * bound.denominator)
        return bound

    def delta_noise_multiplier(self) -> float:
        """``z_delta``: the sum's share of the total noise multiplier."""
        z = self.noise_multiplier
        if z == 0:
            return 0.0
        s = self.count_noise
        if s is None or not 2 * s > z:
            raise ValueError(
                f"adaptive clipping: count_noise {s} leaves no noise for the sum: it must be "
                f"more than noise_multiplier / 2 = {z / 2:g}"
            )
        return float((z**-2 - (2 * s) ** -2) ** -0.5)

    def init(self, w: torch.Tensor) -> State:
        return {"clip": torch.tensor(self.clip, dtype=torch.float64)}

    def aggregate(
        self, deltas: torch.Tensor, weights: torch.Tensor, state: State, ctx: Context
    ) -> tuple[torch.Tensor, State]:
        if self.denominator is None:
            raise RuntimeError("AdaptiveGaussianMean needs a denominator: bind_cohort(...)")
        clip = float(state.get("clip", torch.tensor(self.clip)))
        z_delta, s = self.delta_noise_multiplier(), self.count_noise or 0.0
        norms = row_norms(deltas)
        total = clipped_sum(deltas, clip_scales(norms, clip))
        total += gaussian_noise(total.shape[0], z_delta * clip, self.noise, ctx, "sum")
        centred = float(((norms <= clip).double() - 0.5).sum())
        count = centred + float(gaussian_noise(1, s, self.noise, ctx, "count")[0])
        below = count / self.denominator + 0.5
        new_clip = clip * math.exp(-self.lr * (below - self.target_quantile))
        mean = (total / self.denominator).to(deltas.dtype)
        return mean, {"clip": torch.tensor(new_clip, dtype=torch.float64)}
