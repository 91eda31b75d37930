"""The transform protocol, ``Chain`` and the first member, L2 clipping.

Example:
    >>> import torch
    >>> from potluck.core.message import Message
    >>> chain = Chain((ClipNorm(1.0),))
    >>> m = Message(arrays={"delta": torch.tensor([3.0, 4.0])}, scalars={"num_examples": 1})
    >>> out = chain.decode(chain.encode(m, EncodeContext(client_id=0, round=1)))
    >>> [round(v, 6) for v in out.arrays["delta"].tolist()]
    [0.6, 0.8]
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import torch

from potluck.core.message import Message


@dataclass(frozen=True)
class EncodeContext:
    """Where an update is being encoded: which client, which round."""

    client_id: int
    round: int


class Transform(Protocol):
    """One stage of the update pipeline; ``decode`` inverts what ``encode`` changed in form."""

    def encode(self, message: Message, ctx: EncodeContext) -> Message: ...

    def decode(self, message: Message) -> Message: ...


@dataclass(frozen=True)
class Chain:
    """Transforms applied in order on the client and in reverse order on the server."""

    transforms: tuple[Transform, ...] = ()

    def encode(self, message: Message, ctx: EncodeContext) -> Message:
        for t in self.transforms:
            message = t.encode(message, ctx)
        return message

    def decode(self, message: Message) -> Message:
        for t in reversed(self.transforms):
            message = t.decode(message)
        return message


@dataclass(frozen=True)
class ClipNorm:
    """Scale the update ``delta`` so its L2 norm is at most ``max_norm`` (direction kept).

    The clipping step of DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private
    Recurrent Language Models", ICLR) and a simple robustness guard on its own.
    """

    max_norm: float

    def __post_init__(self) -> None:
        if not self.max_norm > 0:
            raise ValueError(f"ClipNorm.max_norm must be > 0, got {self.max_norm}")

    def encode(self, message: Message, ctx: EncodeContext) -> Message:
        delta = message.arrays["delta"]
        norm = float(torch.linalg.vector_norm(delta))
        scale = min(1.0, self.max_norm / norm) if norm > 0 else 1.0
        arrays = {**message.arrays, "delta": delta * scale}
        scalars = {**message.scalars, "clip_norm_before": norm}
        return replace(message, arrays=arrays, scalars=scalars)

    def decode(self, message: Message) -> Message:
        return message
