"""A user part that makes the server fail: FedAvg's weighted mean, except that it raises in
round ``fail_round`` (0: never). Named by import path (``server_faults:FailingMean``) in the
tests of a server that fails mid-run; the sites import it too (they build every part), so
this directory is on their ``PYTHONPATH``.

Example:
    >>> import torch
    >>> from potluck.core.parts import part_context
    >>> FailingMean(fail_round=2).aggregate(
    ...     torch.ones(1, 2), torch.ones(1), {}, part_context(0, 1, "aggregator"))[0]
    tensor([1., 1.])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from potluck.aggregate.mean import WeightedMean
from potluck.core.parts import Context, State


class ServerFault(RuntimeError):
    """The failure ``FailingMean`` raises on the server."""


@dataclass(frozen=True)
class FailingMean(WeightedMean):
    """The weighted mean of the updates, failing in round ``fail_round``."""

    fail_round: int = 0

    def aggregate(
        self, deltas: torch.Tensor, weights: torch.Tensor, state: State, ctx: Context
    ) -> tuple[torch.Tensor, State]:
        if ctx.round == self.fail_round:
            raise ServerFault(f"the aggregator fails in round {ctx.round} (a test fault)")
        return super().aggregate(deltas, weights, state, ctx)
