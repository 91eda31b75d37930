"""DP-FTRL: differentially private follow-the-regularized-leader with tree aggregation
(Kairouz, McMahan, Song, Thakkar, Thakurta, Xu 2021, "Practical and Private (Deep) Learning
without Sampling or Shuffling", ICML), the mechanism behind Gboard's DP language models.

Each round's updates are clipped to L2 norm ``clip`` and summed with weight 1 each, as in
DP-FedAvg, but the noise is not fresh each round: the server releases noisy *prefix sums*
of the round sums through the binary tree mechanism (Dwork et al. 2010; Chan, Shi, Song
2011). Round ``t``'s prefix sum is the sum of at most ``floor(log2 t) + 1`` tree nodes, each
carrying its own Gaussian noise of std ``noise_multiplier * clip``; moving from round
``t - 1`` to ``t`` completes the node at level ``trailing_zeros(t)`` (one fresh noise
vector) and retires the nodes below it. This aggregator returns the difference of
consecutive noisy prefix sums over a fixed denominator (the expected cohort), so server SGD
of rate ``lr`` gives FTRL's ``w_t = w_0 + lr (S_t + noise_t) / m``; any server optimizer is
post-processing of the released prefix sums (server momentum gives the paper's DP-FTRLM).
``restart_every`` restarts the tree (the current model becomes the new anchor), which keeps
the trees shallow.

The privacy needs no sampling assumption: ``privacy.participation`` accounts the run as one
Gaussian mechanism from how often each client took part. The live nodes (at most one per
level) are server state, checkpointed with the round, so a resumed run continues the same
tree with the same noise.

Example:
    >>> import torch
    >>> from potluck.core.parts import part_context
    >>> agg = TreeAggregatedMean(clip=1.0, noise_multiplier=0.0, denominator=2.0)
    >>> deltas = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    >>> state = agg.init(torch.zeros(2))
    >>> step, state = agg.aggregate(deltas, torch.ones(2), state, part_context(0, 1, "aggregator"))
    >>> [round(v, 4) for v in step.tolist()], int(state["t"])
    ([0.45, 0.6], 1)
"""

from __future__ import annotations

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


def trailing_zeros(t: int) -> int:
    """The level of the tree node that round ``t`` (1-based) completes.

    Example:
        >>> [trailing_zeros(t) for t in range(1, 9)]
        [0, 1, 0, 2, 0, 1, 0, 3]
    """
    return (t & -t).bit_length() - 1


@register("aggregator", "dp_ftrl")
@dataclass(frozen=True)
class TreeAggregatedMean:
    """DP-FTRL's aggregate: the step between consecutive noisy prefix sums of the clipped
    round sums, over a fixed denominator (``None``: the sampler's expected cohort)."""

    clip: float = 1.0
    noise_multiplier: float = 1.0
    restart_every: int | None = None
    denominator: float | None = None
    noise: str = "seed"
    label: ClassVar[str] = "DP-FTRL (tree aggregation)"  # how the run describes its privacy
    needs: ClassVar[frozenset[str]] = frozenset({Need.ONLY_THE_DELTA})
    gives: ClassVar[frozenset[str]] = frozenset({Need.FIXED_DENOMINATOR, Need.EQUAL_WEIGHTS})

    def __post_init__(self) -> None:
        check_gaussian(self.clip, self.noise_multiplier, self.noise)
        if self.restart_every is not None and self.restart_every < 1:
            raise ValueError(f"restart_every must be >= 1 or None, got {self.restart_every}")
        if self.denominator is not None and not self.denominator > 0:
            raise ValueError(f"denominator must be > 0, got {self.denominator}")

    def bind_cohort(self, expected_cohort: float) -> TreeAggregatedMean:
        """This aggregator with its denominator: ``expected_cohort`` unless one is given."""
        return self if self.denominator is not None else replace(self, denominator=expected_cohort)

    def init(self, w: torch.Tensor) -> State:
        return {"t": torch.tensor(0, dtype=torch.int64)}

    def aggregate(
        self, deltas: torch.Tensor, weights: torch.Tensor, state: State, ctx: Context
    ) -> tuple[torch.Tensor, State]:
        if self.denominator is None:
            raise RuntimeError("TreeAggregatedMean needs a denominator: bind_cohort(m)")
        total = clipped_sum(deltas, clip_scales(row_norms(deltas), self.clip))
        nodes, t = _nodes(state), int(state.get("t", 0))
        if self.restart_every is not None and t == self.restart_every:
            nodes, t = {}, 0  # the old tree's noise stays in the model it anchored
        before = _noise(nodes, total.shape[0])
        t += 1
        level = trailing_zeros(t)
        nodes = {lv: v for lv, v in nodes.items() if lv > level}
        fresh = gaussian_noise(total.shape[0], self.noise_multiplier * self.clip, self.noise, ctx)
        nodes[level] = fresh.to(torch.float32)
        step = total + _noise(nodes, total.shape[0]) - before
        new_state: State = {"t": torch.tensor(t, dtype=torch.int64)}
        new_state.update({f"node_{lv}": v for lv, v in nodes.items()})
        return (step / self.denominator).to(deltas.dtype), new_state


def _nodes(state: State) -> dict[int, torch.Tensor]:
    return {int(k.removeprefix("node_")): v for k, v in state.items() if k.startswith("node_")}


def _noise(nodes: dict[int, torch.Tensor], d: int) -> torch.Tensor:
    """The noise of the prefix sum the live ``nodes`` make up (float64)."""
    out = torch.zeros(d, dtype=torch.float64)
    for v in nodes.values():
        out += v.double()
    return out
