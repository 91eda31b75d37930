"""Weighted mean of updates, FedAvg's aggregator (McMahan et al. 2017).

One fused reduction over the stacked (K, d) buffer: ``weights @ deltas`` (for a large stack, a
batched product over blocks of coordinates, so that every torch thread reads its share:
``weighted_sum``).

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
from typing import ClassVar

import torch

from potluck.core.parts import Context, Need, State
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


BLOCKS = 16  # blocks of coordinates in ``weighted_sum``'s batched product
BATCHED = 2**24  # elements of the smallest stack summed as a batched product (64 MiB float32)


def weighted_sum(w: torch.Tensor, deltas: torch.Tensor, batched: int = BATCHED) -> torch.Tensor:
    """``w @ deltas`` for (K,) weights and a (K, d) stack; from ``batched`` elements on, one
    batched product over ``BLOCKS`` blocks of coordinates (the few left over by themselves).
    MKL's vector-matrix product reads the stack on one thread: on two cores, 0.6-0.7 of the
    memory bandwidth (BENCHMARKS.md section 20); the batched product shares the blocks among
    torch's threads. A smaller stack does not repay waking them.

    Example:
        >>> x, w = torch.arange(40.0).reshape(2, 20), torch.tensor([0.25, 0.75])
        >>> bool(torch.equal(weighted_sum(w, x, batched=0), w @ x))
        True
    """
    k, d = deltas.shape
    if k * d < batched:
        return w @ deltas
    width = d // BLOCKS
    head = BLOCKS * width
    out = deltas.new_empty(d)
    blocks = deltas[:, :head].reshape(k, BLOCKS, width).transpose(0, 1)
    torch.bmm(w.expand(BLOCKS, 1, k), blocks, out=out[:head].view(BLOCKS, 1, width))
    out[head:] = w @ deltas[:, head:]
    return out


@register("aggregator", "mean")
@dataclass(frozen=True)
class WeightedMean:
    """``sum_k w_k delta_k / sum_k w_k``, weights usually the clients' example counts."""

    gives: ClassVar[frozenset[str]] = frozenset({Need.LINEAR_AGGREGATE, Need.ON_DEVICE})

    def init(self, w: torch.Tensor) -> State:
        return {}

    def aggregate(
        self, deltas: torch.Tensor, weights: torch.Tensor, state: State, ctx: Context
    ) -> tuple[torch.Tensor, State]:
        check_stack(deltas, weights)
        w = weights.to(torch.float64)
        w = (w / w.sum()).to(deltas.dtype)
        return weighted_sum(w, deltas), state
