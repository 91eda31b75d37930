"""Sign compression with error feedback (EF-signSGD: Karimireddy, Rebjock, Stich, Jaggi
2019, "Error Feedback Fixes SignSGD and other Gradient Compression Schemes", ICML).

Each client sends ``scale * sign(e)`` with ``e = delta + residual`` and ``scale = mean|e|``,
packed as one bit per coordinate (32x fewer bytes than float32), and keeps what the
compression lost, ``residual = e - scale * sign(e)``, as its own client state for the next
time it is sampled. The residual lives in the run store, so every engine and a resumed run
compute the same bits.

Example:
    >>> import torch
    >>> from potluck.core.message import Message
    >>> from potluck.core.parts import part_context
    >>> ctx = part_context(0, 1, "transforms.0.SignEF", client=0)
    >>> sent, state = SignEF().encode(Message({"delta": torch.tensor([0.5, -1.5])}), {}, ctx)
    >>> sent.arrays["delta"].dtype, sent.nbytes
    (torch.uint8, 1)
    >>> SignEF().decode(sent, ctx).arrays["delta"].tolist(), state["residual"].tolist()
    ([1.0, -1.0], [-0.5, -0.5])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch

from potluck.core.message import Message, MessageError
from potluck.core.parts import Context, State
from potluck.updates import Transform


@dataclass(frozen=True)
class SignEF(Transform):
    """One bit per coordinate up, with the compression error fed back on the client."""

    client_state: ClassVar[dict[str, str]] = {"residual": "float32"}

    def encode(self, message: Message, state: State, ctx: Context) -> tuple[Message, State]:
        delta = message.arrays["delta"]
        e = delta + state.get("residual", torch.zeros_like(delta))
        scale = float(e.abs().mean()) if len(e) else 0.0
        positive = e >= 0
        sent = torch.where(positive, scale, -scale)
        bits = torch.from_numpy(np.packbits(positive.numpy()))
        arrays = {**message.arrays, "delta": bits}
        scalars = {**message.scalars, "sign_scale": scale, "sign_size": len(e)}
        return replace(message, arrays=arrays, scalars=scalars), {"residual": e - sent}

    def decode(self, message: Message, ctx: Context) -> Message:
        bits, scale = message.arrays.get("delta"), message.scalars.get("sign_scale")
        size = message.scalars.get("sign_size")
        if not isinstance(size, int) or size < 0 or not isinstance(bits, torch.Tensor):
            raise MessageError("sign_ef: missing packed delta or sign_size")
        if bits.dtype != torch.uint8 or bits.shape != (math.ceil(size / 8),):
            raise MessageError(f"sign_ef: packed delta must be {math.ceil(size / 8)} uint8")
        if not isinstance(scale, float | int) or not math.isfinite(scale) or scale < 0:
            raise MessageError(f"sign_ef: bad scale {scale!r}")
        positive = np.unpackbits(bits.numpy(), count=size).astype(bool)
        delta = torch.where(torch.from_numpy(positive), float(scale), -float(scale))
        return replace(message, arrays={**message.arrays, "delta": delta.float()})
