"""Quantised uploads: stochastic k-bit quantisation (QSGD) with an optional randomised
Hadamard rotation, and half-precision casting.

``QSGD`` sends each coordinate as one of ``2 s + 1`` levels, ``s = 2**(bits - 1) - 1``, from
minus its block's scale to plus it, rounded up or down at random so that the decoded update
is unbiased (Alistarh, Grubic, Li, Tomioka, Vojnovic 2017, "QSGD: Communication-Efficient
SGD via Gradient Quantization and Encoding", NeurIPS). With ``rotate`` each block is first
multiplied by random signs and an orthonormal Hadamard matrix, which spreads a few large
coordinates over the whole block and so shrinks the scale the others are quantised against
(Suresh, Yu, Kumar, McMahan 2017, "Distributed Mean Estimation with Limited Communication",
ICML); the signs come from the part's stream for the round and the client, so the server
draws the same ones and inverts the rotation.

On the wire, level ``q`` (``-s`` to ``s``) is the code ``q + 2**(bits - 1)`` (1 to
``2**bits - 1``; 0 is refused), packed by ``bitpack``, and each block's scale a float32.
The rounding is one addition: ``t = x s / scale + u`` with ``u`` uniform on ``[2**(bits -
1), 2**(bits - 1) + 1)``, its code ``floor(t)`` (``t`` is at least 1, so a float-to-integer
cast). ``u`` is a float32 built from ``24 - bits`` random bits, as many as ``t``'s float32
grid resolves, so rounding up has the probability of ``t``'s fractional part to within one
step of that grid (``2**(bits - 24)`` of a level; the scaled value itself is rounded to
half a step). The random words come from ``LANES`` SFC64 generators of the part's stream,
each for a fixed part of the coordinates, drawn in parallel threads: the same words
whatever the threads.

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
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from potluck.core.message import Message, MessageError
from potluck.core.params import ParamSpec
from potluck.core.parts import Context, Need, State
from potluck.core.registry import register
from potluck.core.seeding import Seeds
from potluck.updates import bitpack
from potluck.updates.base import Transform
from potluck.updates.hadamard import fwht, fwht_

SCALE = "delta/scale"  # the per-block scales, next to the packed delta
LANES = 2  # the rounding stream's fixed parts, each from its own generator
CHUNK = 1 << 17  # coordinates a lane quantises in one pass (its temporaries stay in the cache)
PARALLEL = 1 << 16  # coordinates from which the lanes are drawn in threads
TINY = 2.0**-100  # the smallest scale a block is quantised against (s / scale stays finite)


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

    @property
    def offset(self) -> int:
        """What is added to a level ``-s..s`` to make its code: ``2**(bits - 1)``."""
        return 2 ** (self.bits - 1)

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

    def _gain(self) -> float:
        """What the rotation's unnormalised transform multiplies the norm by: ``sqrt(block)``."""
        return math.sqrt(self.block) if self.rotate else 1.0

    def _scales(self, x: torch.Tensor) -> torch.Tensor:
        """Each block's norm of ``x``, the padded delta or its start (zeros beyond)."""
        if not self.block:
            parts = torch.split(x, list(self.numels))
            if self.norm == "max":
                return torch.stack([p.abs().max() for p in parts])
            return torch.stack([torch.linalg.vector_norm(p) for p in parts])
        full = len(x) // self.block * self.block
        rows = [x[:full].view(-1, self.block)]
        if full < len(x):
            rows.append(x[full:].view(1, -1))
        if self.norm == "l2":
            return torch.cat([torch.linalg.vector_norm(r, dim=1) for r in rows])
        # the largest magnitude, by the largest and the smallest (no |x| temporary)
        return torch.cat([torch.maximum(r.amax(1), -r.amin(1)) for r in rows])

    def _each_scale(self, x: np.ndarray, per: np.ndarray, out: np.ndarray, a: int, b: int) -> None:
        """``out = x[a:b]`` times each coordinate's entry of ``per`` (one per block), ``x``
        zero beyond its end; ``a`` starts a block."""
        end = min(b, len(x))
        out[max(0, end - a) :] = 0
        if not self.block:
            start = 0
            for j, n in enumerate(self.numels):
                lo, hi = max(a, start), min(end, start + n)
                if lo < hi:
                    np.multiply(x[lo:hi], per[j], out=out[lo - a : hi - a])
                start += n
            return
        full = a + max(0, end - a) // self.block * self.block
        shape = (-1, self.block)
        rows = per[a // self.block : full // self.block, None]
        np.multiply(x[a:full].reshape(shape), rows, out=out[: full - a].reshape(shape))
        if full < end:
            np.multiply(x[full:end], per[full // self.block], out=out[full - a : end - a])

    def _lane_cuts(self) -> tuple[list[int], int]:
        """Where the rounding stream's lanes start (and the end), and the coordinates done
        in one pass of a lane (in the cache): whole blocks and whole bytes of codes each."""
        n, unit = self._padded(), math.lcm(self.block or 1, 8)
        cuts = [min(n, -(-n * j // (LANES * unit)) * unit) for j in range(LANES)]
        return [*cuts, n], max(1, CHUNK // unit) * unit

    def _signs(self, ctx: Context) -> np.ndarray:
        """The rotation's signs, one random bit a coordinate, as float32 sign-bit masks."""
        n = self._padded()
        bitgen = np.random.SFC64(Seeds(ctx.seed).sequence(*ctx.stream, "rotation"))
        bits = np.unpackbits(bitgen.random_raw(-(-n // 64)).view(np.uint8), count=n)
        return np.left_shift(bits, np.uint32(31), dtype=np.uint32)

    def _flip(self, x: np.ndarray, ctx: Context) -> None:
        """Multiply the padded float32 ``x`` by the rotation's signs, in place (sign bits)."""
        words = x.view(np.uint32)
        np.bitwise_xor(words, self._signs(ctx), out=words)

    # ---- the two halves ----

    def encode(self, message: Message, state: State, ctx: Context) -> tuple[Message, State]:
        delta = message.arrays["delta"]
        if delta.shape != (self.size,):
            raise ValueError(f"qsgd: delta has shape {tuple(delta.shape)}, not ({self.size},)")
        x = delta.float().contiguous()
        if self.rotate:
            x = torch.zeros(self._padded(), dtype=torch.float32)
            x[: self.size] = delta
            self._flip(x.numpy(), ctx)
            fwht_(x.view(-1, self.block))
        scales = self._sent_scales(self._scales(x))
        packed = self._quantise(x.numpy(), self._inverse(scales), ctx)
        arrays = {**message.arrays, "delta": torch.from_numpy(packed), SCALE: scales}
        return replace(message, arrays=arrays), state

    def _sent_scales(self, scales: torch.Tensor) -> torch.Tensor:
        """The scales of the orthonormal blocks (float32; at least ``TINY`` where not 0),
        rounded up so that ``scale * gain`` bounds every coordinate of the blocks."""
        gain, wide = self._gain(), scales.double()
        sent = torch.where(wide > 0, (wide / gain).clamp(min=TINY), 0.0).float()
        return torch.nextafter(sent, torch.tensor(math.inf)) if self.rotate else sent

    def _inverse(self, scales: torch.Tensor) -> np.ndarray:
        """``s / (scale * gain)`` a block, rounded toward 0 (so ``|x| * inverse < s``)."""
        inverse = (self.levels / (scales.double() * self._gain())).float()
        inverse = torch.nextafter(inverse, torch.tensor(0.0))
        return torch.where(scales > 0, inverse, 0.0).numpy()

    def _quantise(self, x: np.ndarray, inverse: np.ndarray, ctx: Context) -> np.ndarray:
        """The packed codes of ``x`` (the delta, padded or not, maybe rotated), lane by lane,
        a cache-sized chunk at a time."""
        (cuts, chunk), bits = self._lane_cuts(), self.bits
        # u in [offset, offset + 1): the offset's exponent, 24 - bits random mantissa bits
        # (16 at 8 bits: a 16-bit word each, else the low bits of a 32-bit word)
        exponent = np.float32(self.offset).view(np.uint32)
        mantissa, word = np.uint32((1 << (24 - bits)) - 1), np.uint16 if bits == 8 else np.uint32
        per_raw = 8 // np.dtype(word).itemsize

        def lane(j: int) -> list[np.ndarray]:
            bitgen = np.random.SFC64(Seeds(ctx.seed).sequence(*ctx.stream, "rounding", j))
            scaled, t, packed = np.empty(chunk, np.float32), np.empty(chunk, np.float32), []
            for a in range(cuts[j], cuts[j + 1], chunk):
                b = min(a + chunk, cuts[j + 1])
                words = bitgen.random_raw(-(-(b - a) // per_raw)).view(word)[: b - a]
                u = t[: b - a].view(np.uint32)
                if word is np.uint16:
                    np.bitwise_or(words, exponent, out=u)
                else:
                    np.bitwise_and(words, mantissa, out=u)
                    u |= exponent
                self._each_scale(x, inverse, scaled[: b - a], a, b)
                v = u.view(np.float32)
                v += scaled[: b - a]
                packed.append(bitpack.pack(v.astype(np.uint8), bits))  # v >= 1: the cast floors
            return packed

        wide = self._padded() >= PARALLEL
        return np.concatenate([p for part in _in_parallel(lane, LANES, wide) for p in part])

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
        codes = bitpack.unpack(packed.numpy(), self.bits, self._padded())
        if codes.size and codes.min() == 0:
            raise MessageError("qsgd: a code is 0, which is no level (codes are 1 and up)")
        codes -= np.uint8(self.offset)  # the level -s..s, as int8
        x = torch.from_numpy(codes.view(np.int8)).float()
        step = (scales.double() / (self.levels * self._gain())).float()
        flat = x.numpy()
        if self.block:  # torch's threads (the encode's lanes are NumPy's)
            x.view(-1, self.block).mul_(step.unsqueeze(1))
        else:
            self._each_scale(flat, step.numpy(), flat, 0, len(flat))
        if self.rotate:
            fwht_(x.view(-1, self.block))
            self._flip(flat, ctx)
        arrays = {k: v for k, v in message.arrays.items() if k != SCALE}
        arrays["delta"] = x[: self.size]
        return replace(message, arrays=arrays)


_POOL: tuple[int, ThreadPoolExecutor] | None = None


def _in_parallel(fn: Callable[[int], Any], count: int, wide: bool) -> list[Any]:
    """``[fn(0), ..., fn(count - 1)]``, in threads when ``wide`` and torch may use more than
    one (NumPy's generators and array passes release the GIL). The pool is this process's:
    a forked worker makes its own."""
    global _POOL
    if not wide or torch.get_num_threads() < 2 or count < 2:
        return [fn(j) for j in range(count)]
    if _POOL is None or _POOL[0] != os.getpid():
        _POOL = (os.getpid(), ThreadPoolExecutor(LANES - 1, thread_name_prefix="qsgd"))
    rest = [_POOL[1].submit(fn, j) for j in range(1, count)]
    first = fn(0)
    return [first, *(f.result() for f in rest)]


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
