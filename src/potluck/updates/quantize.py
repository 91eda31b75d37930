"""Quantised uploads: stochastic k-bit quantisation (QSGD) with an optional randomised
Hadamard rotation, and half-precision casting.

``QSGD`` sends each coordinate as a sign bit and a level of ``s = 2**(bits - 1) - 1``
levels of its block's scale, rounded up or down at random so that the decoded update is
unbiased (Alistarh, Grubic, Li, Tomioka, Vojnovic 2017, "QSGD: Communication-Efficient SGD
via Gradient Quantization and Encoding", NeurIPS). With ``rotate`` each block is first
multiplied by random signs and an orthonormal Hadamard matrix, which spreads a few large
coordinates over the whole block and so shrinks the scale the others are quantised against
(Suresh, Yu, Kumar, McMahan 2017, "Distributed Mean Estimation with Limited Communication",
ICML); the signs come from the part's stream for the round and the client, so the server
draws the same ones and inverts the rotation.

Example:
    >>> import torch
    >>> from potluck.core.message import Message
    >>> from potluck.core.params import ParamSpec
    >>> from potluck.core.parts import part_context
    >>> q = QSGD(bits=4, block=4).bind(ParamSpec(("w",), ((6,),)))
    >>> ctx = part_context(0, 1, "transforms.0.qsgd", client=0)
    >>> delta = torch.tensor([0.7, -0.7, 0.0, 0.3, 1.4, 0.2])
    >>> sent, _ = q.encode(Message({"delta": delta}), {}, ctx)
    >>> sent.nbytes  # 8 codes (6 and the block's padding) of 4 bits, 2 float32 scales
    12
    >>> [round(v, 2) for v in q.decode(sent, ctx).arrays["delta"].tolist()]
    [0.7, -0.7, 0.0, 0.3, 1.4, 0.2]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import ClassVar, Literal

import torch

from potluck.core.message import Message, MessageError
from potluck.core.params import ParamSpec
from potluck.core.parts import Context, Need, State
from potluck.core.registry import register
from potluck.updates import bitpack
from potluck.updates.base import Transform
from potluck.updates.hadamard import fwht

SCALE = "delta/scale"  # the per-block scales, next to the packed delta


@register("transform", "qsgd")
@dataclass(frozen=True)
class QSGD(Transform):
    """Stochastic ``bits``-bit quantisation of the delta, one scale per ``block`` coordinates
    (``block = 0``: one per parameter tensor). ``norm``: the scale is the block's largest
    magnitude (``"max"``: the variant used in practice, variance at most ``scale^2 / (4 s^2)``
    per coordinate) or its L2 norm (``"l2"``: the paper's, variance at most
    ``min(n / s^2, sqrt(n) / s) ||v||^2`` for a block of ``n``). ``rotate``: a randomised
    Hadamard rotation per block first (``block`` a power of two).

    Bytes up: ``bits`` per coordinate (blocks padded to full length) plus 4 per scale.
    """

    bits: int = 8
    block: int = 512
    norm: Literal["max", "l2"] = "max"
    rotate: bool = False
    size: int = field(default=0, init=False, compare=False, repr=False)
    numels: tuple[int, ...] = field(default=(), init=False, compare=False, repr=False)
    needs: ClassVar[frozenset[str]] = frozenset({Need.LAST_TRANSFORM})

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"qsgd.bits must be 2 to 8 (a sign and a level), got {self.bits}")
        if self.block < 0:
            raise ValueError(f"qsgd.block must be >= 0 (0: one scale per tensor), got {self.block}")
        if self.norm not in ("max", "l2"):
            raise ValueError(f"qsgd.norm must be 'max' or 'l2', got {self.norm!r}")
        if self.rotate and (self.block < 2 or self.block & (self.block - 1)):
            raise ValueError(f"qsgd.rotate needs block a power of two >= 2, got {self.block}")

    @property
    def levels(self) -> int:
        """``s``: the magnitude levels above zero."""
        return 2 ** (self.bits - 1) - 1

    def bind(self, spec: ParamSpec) -> QSGD:
        bound = replace(self)
        object.__setattr__(bound, "size", spec.size)
        object.__setattr__(bound, "numels", spec.numels)
        return bound

    # ---- layout: blocks of the padded delta, or the tensors ----

    def _lengths(self) -> tuple[int, ...]:
        if not self.size:
            raise RuntimeError("QSGD must be bound to the model's ParamSpec first (bind)")
        if self.block:
            return (self.block,) * max(1, -(-self.size // self.block))
        return self.numels

    def _padded(self) -> int:
        return sum(self._lengths())

    def _scales(self, x: torch.Tensor) -> torch.Tensor:
        if self.block:
            rows = x.view(-1, self.block)
            if self.norm == "max":
                return rows.abs().amax(1)
            return torch.linalg.vector_norm(rows, dim=1)
        parts = torch.split(x, list(self.numels))
        if self.norm == "max":
            return torch.stack([p.abs().max() for p in parts])
        return torch.stack([torch.linalg.vector_norm(p) for p in parts])

    def _per_coordinate(self, scales: torch.Tensor) -> torch.Tensor:
        if self.block:
            return scales.repeat_interleave(self.block)
        return scales.repeat_interleave(torch.tensor(self.numels))

    def _signs(self, ctx: Context) -> torch.Tensor:
        flips = torch.randint(0, 2, (self._padded(),), generator=ctx.generator("rotation"))
        return 1.0 - 2.0 * flips.float()

    # ---- the two halves ----

    def encode(self, message: Message, state: State, ctx: Context) -> tuple[Message, State]:
        delta = message.arrays["delta"]
        if delta.shape != (self.size,):
            raise ValueError(f"qsgd: delta has shape {tuple(delta.shape)}, not ({self.size},)")
        x = torch.zeros(self._padded(), dtype=torch.float32)
        x[: self.size] = delta
        if self.rotate:
            x = hadamard((x * self._signs(ctx)).view(-1, self.block)).reshape(-1)
        scales = self._scales(x)
        per = self._per_coordinate(scales)
        s = self.levels
        ratio = torch.where(per > 0, x.abs() / torch.where(per > 0, per, 1.0), 0.0)
        r = (ratio * s).clamp(0, s)
        low = r.floor()
        u = torch.rand(len(r), generator=ctx.generator("rounding"))
        level = (low + (u < r - low).float()).to(torch.uint8)
        codes = level | ((x < 0).to(torch.uint8) << (self.bits - 1))
        packed = torch.from_numpy(bitpack.pack(codes.numpy(), self.bits))
        arrays = {**message.arrays, "delta": packed, SCALE: scales.float()}
        return replace(message, arrays=arrays), state

    def decode(self, message: Message, ctx: Context) -> Message:
        packed, scales = message.arrays.get("delta"), message.arrays.get(SCALE)
        lengths = self._lengths()
        if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32:
            raise MessageError(f"qsgd: {SCALE!r} must be a float32 array")
        if scales.shape != (len(lengths),):
            raise MessageError(f"qsgd: {SCALE!r} must hold {len(lengths)} scales")
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            raise MessageError(f"qsgd: {SCALE!r} must be finite and >= 0")
        if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
            raise MessageError("qsgd: the packed delta must be a uint8 array")
        codes = torch.from_numpy(bitpack.unpack(packed.numpy(), self.bits, self._padded()))
        top = self.bits - 1
        level = (codes & ((1 << top) - 1)).float()
        sign = 1.0 - 2.0 * (codes >> top).float()
        x = sign * level / self.levels * self._per_coordinate(scales)
        if self.rotate:
            x = hadamard(x.view(-1, self.block)).reshape(-1) * self._signs(ctx)
        arrays = {k: v for k, v in message.arrays.items() if k != SCALE}
        arrays["delta"] = x[: self.size].contiguous()
        return replace(message, arrays=arrays)


def hadamard(rows: torch.Tensor) -> torch.Tensor:
    """Each row times the orthonormal Walsh-Hadamard matrix (rows of a power-of-two length):
    its own inverse.

    Example:
        >>> hadamard(torch.tensor([[1.0, 0.0, 0.0, 0.0]])).tolist()
        [[0.5, 0.5, 0.5, 0.5]]
    """
    return fwht(rows) / math.sqrt(rows.shape[1])


@register("transform", "cast")
@dataclass(frozen=True)
class CastUpdate(Transform):
    """Send the delta as ``bfloat16`` or ``float16`` (half the bytes up); the server casts it
    back to float32. Deterministic rounding to nearest, so biased by at most half a unit in
    the last place; float16 saturates at its largest finite value (65504) rather than
    sending an infinity.

    Example:
        >>> from potluck.core.parts import part_context
        >>> ctx = part_context(0, 1, "transforms.0.cast", client=0)
        >>> half = CastUpdate("float16")
        >>> sent, _ = half.encode(Message({"delta": torch.tensor([1e6, 0.5])}), {}, ctx)
        >>> sent.nbytes, half.decode(sent, ctx).arrays["delta"].tolist()
        (4, [65504.0, 0.5])
    """

    dtype: Literal["bfloat16", "float16"] = "bfloat16"
    needs: ClassVar[frozenset[str]] = frozenset({Need.LAST_TRANSFORM})

    def __post_init__(self) -> None:
        if self.dtype not in ("bfloat16", "float16"):
            raise ValueError(f"cast.dtype must be 'bfloat16' or 'float16', got {self.dtype!r}")

    def encode(self, message: Message, state: State, ctx: Context) -> tuple[Message, State]:
        target = getattr(torch, self.dtype)
        delta = message.arrays["delta"]
        if target == torch.float16:
            delta = delta.clamp(-65504.0, 65504.0)
        return replace(message, arrays={**message.arrays, "delta": delta.to(target)}), state

    def decode(self, message: Message, ctx: Context) -> Message:
        sent = message.arrays.get("delta")
        target = getattr(torch, self.dtype)
        if not isinstance(sent, torch.Tensor) or sent.dtype != target:
            got = sent.dtype if isinstance(sent, torch.Tensor) else type(sent).__name__
            raise MessageError(f"cast: the delta must be {self.dtype}, got {got}")
        return replace(message, arrays={**message.arrays, "delta": sent.float()})


@register("downlink", "quantize")
@dataclass(frozen=True)
class QuantizeDownlink:
    """Send the broadcast's float32 arrays as ``bits``-bit codes on a uniform grid from each
    block's minimum to its maximum (``block`` coordinates a block, rounded to the nearest
    level; a float32 minimum and step per block): a quarter of the bytes down at 8 bits. Each
    client decodes before training, so the rounding of the weights (at most half a step) is
    the only change; updates are computed against the weights the client received.

    Example:
        >>> down = QuantizeDownlink(bits=8, block=4)
        >>> sent = down.encode(Message({"w": torch.tensor([0.0, 0.5, 1.0, 0.25, 7.0])}))
        >>> sent.nbytes  # 8 codes of 8 bits (5 and the padding) and 2 blocks x 2 floats
        24
        >>> [round(v, 3) for v in down.decode(sent).arrays["w"].tolist()]
        [0.0, 0.498, 1.0, 0.251, 7.0]
    """

    bits: int = 8
    block: int = 512

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise ValueError(f"downlink quantize.bits must be 1 to 8, got {self.bits}")
        if self.block < 1:
            raise ValueError(f"downlink quantize.block must be >= 1, got {self.block}")

    def encode(self, message: Message) -> Message:
        arrays: dict[str, torch.Tensor] = {}
        scalars = dict(message.scalars)
        for name, a in message.arrays.items():
            if a.dtype != torch.float32 or a.dim() != 1:
                arrays[name] = a
                continue
            blocks = -(-len(a) // self.block) or 1
            x = torch.zeros(blocks * self.block, dtype=torch.float32)
            x[: len(a)] = a
            rows = x.view(blocks, self.block)
            lo, hi = rows.amin(1), rows.amax(1)
            step = (hi - lo) / (2**self.bits - 1)
            safe = torch.where(step > 0, step, 1.0).unsqueeze(1)
            codes = ((rows - lo.unsqueeze(1)) / safe).round().clamp(0, 2**self.bits - 1)
            arrays[name] = torch.from_numpy(
                bitpack.pack(codes.to(torch.uint8).numpy().ravel(), self.bits)
            )
            arrays[f"{name}/grid"] = torch.stack((lo, step), dim=1).reshape(-1)
            scalars[f"{name}/size"] = len(a)
        return replace(message, arrays=arrays, scalars=scalars)

    def decode(self, message: Message) -> Message:
        arrays = {k: v for k, v in message.arrays.items() if not k.endswith("/grid")}
        scalars = {k: v for k, v in message.scalars.items() if not k.endswith("/size")}
        for key, size in message.scalars.items():
            if not key.endswith("/size"):
                continue
            name = key.removesuffix("/size")
            arrays[name] = self._decode(name, size, message)
        return replace(message, arrays=arrays, scalars=scalars)

    def _decode(self, name: str, size: object, message: Message) -> torch.Tensor:
        packed, grid = message.arrays.get(name), message.arrays.get(f"{name}/grid")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise MessageError(f"downlink quantize: {name!r} has a bad size {size!r}")
        blocks = -(-size // self.block) or 1
        if not isinstance(grid, torch.Tensor) or grid.dtype != torch.float32:
            raise MessageError(f"downlink quantize: {name!r} has no float32 grid")
        if grid.shape != (2 * blocks,) or not bool(torch.isfinite(grid).all()):
            raise MessageError(f"downlink quantize: {name!r} needs {2 * blocks} finite grid values")
        if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
            raise MessageError(f"downlink quantize: {name!r} must be packed uint8 codes")
        codes = bitpack.unpack(packed.numpy(), self.bits, blocks * self.block)
        lo, step = grid.view(blocks, 2).unbind(1)
        rows = torch.from_numpy(codes).float().view(blocks, self.block)
        return (lo.unsqueeze(1) + rows * step.unsqueeze(1)).reshape(-1)[:size].contiguous()
