"""Scaled sign compression with error feedback, EF-signSGD (Karimireddy, Rebjock, Stich,
Jaggi 2019, "Error Feedback Fixes SignSGD and other Gradient Compression Schemes", ICML).

Each client sends ``C(e) = mean|e_l| * sign(e_l)`` for each parameter tensor ``e_l`` of
``e = delta + residual``: one bit per coordinate (``np.packbits``, 32x fewer bytes than
float32) and one float32 scale per tensor, the paper's scaled sign applied per layer. It
keeps what the compression lost, ``residual = e - C(e)``, as its client state and adds it to
its next delta; without the memory, sign compression can fail to converge (the paper's
counterexamples), with it the method converges like SGD. A coordinate of exactly zero is
sent as ``+scale`` (one bit has no zero). The server takes the model's layout from its own
``ParamSpec``, never from the client.

Example:
    >>> import torch
    >>> from potluck.core.message import Message
    >>> from potluck.core.params import ParamSpec
    >>> from potluck.core.parts import part_context
    >>> sign = SignEF().bind(ParamSpec(("a", "b"), ((2,), (1,))))
    >>> ctx = part_context(0, 1, "transforms.0.sign_ef", client=0)
    >>> sent, state = sign.encode(Message({"delta": torch.tensor([0.5, -1.5, 2.0])}), {}, ctx)
    >>> sent.nbytes  # 3 bits in 1 byte, 2 float32 scales
    9
    >>> sign.decode(sent, ctx).arrays["delta"].tolist(), state["residual"].tolist()
    ([1.0, -1.0, 2.0], [-0.5, -0.5, 0.0])
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np
import torch

from potluck.core.message import Message, MessageError
from potluck.core.params import ParamSpec
from potluck.core.parts import Context, Need, State
from potluck.core.registry import register
from potluck.updates.base import Transform

SCALE = "delta/scale"  # the per-tensor scales, next to the packed signs


@register("transform", "sign_ef")
@dataclass(frozen=True)
class SignEF(Transform):
    """One bit per coordinate and one float32 scale per parameter tensor up; the compression
    error fed back on the client (``error_feedback``; without it, the plain scaled sign).

    Its contraction is exact: ``||e - C(e)||^2 = sum_l ||e_l||^2 - ||e_l||_1^2 / n_l``.
    Bytes up: ``ceil(d / 8)`` plus 4 per tensor.
    """

    error_feedback: bool = True
    numels: tuple[int, ...] = field(default=(), init=False, compare=False, repr=False)
    needs: ClassVar[frozenset[str]] = frozenset({Need.LAST_TRANSFORM})
    # deployed, a site keeps its residual (and warm start) to itself: it never travels
    site_state: ClassVar[bool] = True

    def bind(self, spec: ParamSpec) -> SignEF:
        bound = replace(self)
        object.__setattr__(bound, "numels", spec.numels)
        return bound

    @property
    def size(self) -> int:
        if not self.numels:
            raise RuntimeError("sign_ef must be bound to the model's ParamSpec first (bind)")
        return sum(self.numels)

    @property
    def client_state(self) -> dict[str, str]:
        """Names and dtypes of the client state (none without error feedback)."""
        return {"residual": "float32"} if self.error_feedback else {}

    def client_state_shapes(self, spec: ParamSpec) -> dict[str, tuple[int, ...]]:
        return {name: (spec.size,) for name in self.client_state}

    def _per_coordinate(self, scales: torch.Tensor) -> torch.Tensor:
        return scales.repeat_interleave(torch.tensor(self.numels))

    def compress(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``C(e)``, its sign bits (``e >= 0``) and its per-tensor scales ``mean|e_l|``."""
        sums = torch.stack([x.abs().sum() for x in torch.split(e, list(self.numels))])
        counts = torch.tensor(self.numels, dtype=torch.float32)
        scales = torch.where(counts > 0, sums / counts.clamp(min=1), 0.0)
        positive = e >= 0
        per = self._per_coordinate(scales)
        return torch.where(positive, per, -per), positive, scales

    def encode(self, message: Message, state: State, ctx: Context) -> tuple[Message, State]:
        delta = message.arrays["delta"]
        if delta.shape != (self.size,):
            raise ValueError(f"sign_ef: delta has shape {tuple(delta.shape)}, not ({self.size},)")
        e = delta + state["residual"] if self.error_feedback and "residual" in state else delta
        sent, positive, scales = self.compress(e)
        bits = torch.from_numpy(np.packbits(positive.numpy()))
        arrays = {**message.arrays, "delta": bits, SCALE: scales}
        return replace(message, arrays=arrays), {
            "residual": e - sent
        } if self.error_feedback else {}

    def decode(self, message: Message, ctx: Context) -> Message:
        bits, scales, size = message.arrays.get("delta"), message.arrays.get(SCALE), self.size
        nbytes, layers = -(-size // 8), len(self.numels)
        if not isinstance(bits, torch.Tensor) or bits.dtype != torch.uint8:
            got = bits.dtype if isinstance(bits, torch.Tensor) else type(bits).__name__
            raise MessageError(f"sign_ef: 'delta' must be the packed uint8 signs, got {got}")
        if bits.shape != (nbytes,):
            raise MessageError(
                f"sign_ef: 'delta' must be {nbytes} bytes ({size} signs), got {tuple(bits.shape)}"
            )
        if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32:
            got = scales.dtype if isinstance(scales, torch.Tensor) else type(scales).__name__
            raise MessageError(f"sign_ef: {SCALE!r} must be a float32 array, got {got}")
        if scales.shape != (layers,):
            raise MessageError(
                f"sign_ef: {SCALE!r} must hold {layers} scales (one per tensor), got "
                f"{tuple(scales.shape)}"
            )
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            raise MessageError(f"sign_ef: {SCALE!r} must be finite and >= 0")
        unpacked = np.unpackbits(bits.contiguous().numpy())
        if unpacked[size:].any():
            raise MessageError("sign_ef: the padding bits after the last sign are set")
        positive = torch.from_numpy(unpacked[:size].astype(bool))
        per = self._per_coordinate(scales)
        arrays = {name: v for name, v in message.arrays.items() if name != SCALE}
        arrays["delta"] = torch.where(positive, per, -per)
        return replace(message, arrays=arrays)
