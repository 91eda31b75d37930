"""The server optimizer protocol: explicit state in, new weights and state out.

``step`` treats the aggregated mean delta as the negative of a pseudo-gradient. State is a
dict of tensors so it checkpoints with safetensors.
"""

from __future__ import annotations

from typing import Protocol

import torch

State = dict[str, torch.Tensor]


class ServerOptimizer(Protocol):
    """How the aggregate moves the global model (part 5 of an algorithm)."""

    @property
    def lr(self) -> float: ...

    def init(self, w: torch.Tensor) -> State: ...

    def step(
        self, w: torch.Tensor, mean_delta: torch.Tensor, state: State
    ) -> tuple[torch.Tensor, State]: ...
