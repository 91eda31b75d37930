"""A coordinate-wise median aggregator (Yin et al. 2018, "Byzantine-Robust Distributed
Learning: Towards Optimal Statistical Rates", ICML): each coordinate of the aggregate is the
median of the clients' values, so a minority of arbitrary updates cannot drag it far.

Example:
    >>> import torch
    >>> from potluck.core.parts import part_context
    >>> deltas = torch.tensor([[0.0, 1.0], [1.0, 2.0], [100.0, -50.0]])
    >>> Median().aggregate(deltas, torch.ones(3), {}, part_context(0, 1, "aggregator"))[0]
    tensor([1., 1.])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from potluck.core.parts import Context, Need, State


@dataclass(frozen=True)
class Median:
    """The coordinate-wise median of the updates (weights are ignored)."""

    needs: ClassVar[frozenset[str]] = frozenset({Need.INDIVIDUAL_UPDATES})

    def init(self, w: torch.Tensor) -> State:
        return {}

    def aggregate(
        self, deltas: torch.Tensor, weights: torch.Tensor, state: State, ctx: Context
    ) -> tuple[torch.Tensor, State]:
        return torch.quantile(deltas, 0.5, dim=0), state
