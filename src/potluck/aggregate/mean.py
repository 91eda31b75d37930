"""Weighted mean of updates, FedAvg's aggregator (McMahan et al. 2017).

One fused reduction over the stacked (K, d) buffer: ``weights @ deltas``.

Example:
    >>> import torch
    >>> from potluck.core.parts import part_context
    >>> deltas = torch.tensor([[1.0, 0.8, 0.5], [1.2, 0.9, 0.6], [0.9, 0.7, 0.4]])
    >>> weights = torch.tensor([100.0, 200.0, 700.0])
    >>> agg, _ = WeightedMean().aggregate(deltas, weights, {}, part_context(0, 1, "aggregator"))
    >>> [round(v, 6) for v in agg.tolist()]
    [0.97, 0.75, 0.45]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from potluck.core.parts import Context, State
from potluck.core.registry import register


def check_stack(deltas: torch.Tensor, weights: torch.Tensor) -> None:
    """Validate a (K, d) float32 stack and (K,) non-negative weights with a positive sum."""
    if deltas.dim() != 2:
        raise ValueError(f"deltas must be a (K, d) stack, got shape {tuple(deltas.shape)}")
    if weights.dim() != 1 or weights.numel() != deltas.shape[0]:
        raise ValueError(
            f"weights must have shape ({deltas.shape[0]},), got {tuple(weights.shape)}"
        )
    if deltas.shape[0] == 0:
        raise ValueError("cannot aggregate an empty cohort")
    if bool((weights < 0).any()) or not float(weights.sum()) > 0:
        raise ValueError("weights must be non-negative with a positive sum")


@register("aggregator", "mean")
@dataclass(frozen=True)
class WeightedMean:
    """``sum_k w_k delta_k / sum_k w_k``, weights usually the clients' example counts."""

    def init(self, w: torch.Tensor) -> State:
        return {}

    def aggregate(
        self, deltas: torch.Tensor, weights: torch.Tensor, state: State, ctx: Context
    ) -> tuple[torch.Tensor, State]:
        check_stack(deltas, weights)
        w = weights.to(torch.float64)
        w = (w / w.sum()).to(deltas.dtype)
        return w @ deltas, state
