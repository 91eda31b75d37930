"""Fixed-point encoding of a weighted update as integers modulo ``2^bits``, so that the sum of
the encodings is the encoding of the weighted sum.

A client with update ``delta`` and aggregation weight ``w`` (at most ``max_weight``) encodes
``a = w / max_weight`` in ``[0, 1]``, each coordinate ``a * clip(delta, -c, c) / c`` in
``[-1, 1]``, scales both by ``2^(quantization_bits - 1)`` and rounds stochastically (up with
probability the fractional part, so the rounding is unbiased), then appends a count of 1.
Negative values wrap around the modulus (two's complement). The vector has ``d + 2``
coordinates: the ``d`` weighted coordinates, the weight, the count.

The sum of ``n`` encodings cannot overflow when ``n * 2^(quantization_bits - 1)`` stays
below ``2^(bits - 1)`` (``check_capacity``, before each round). The server decodes the sum
as signed integers: the weighted mean is ``c * sum_j / sum_weight`` (the scale and
``max_weight`` cancel), with an error of at most about ``n (c + |mean_j|) /
(2^(q-1) sum(w) / max_weight)`` per coordinate from the rounding.

Example:
    >>> import numpy as np
    >>> fp = FixedPoint(clip_range=1.0, quantization_bits=16, bits=32, max_weight=10.0)
    >>> rng = np.random.default_rng(0)
    >>> a = fp.encode(np.array([0.5, -0.25], np.float32), 4.0, rng)
    >>> b = fp.encode(np.array([0.1, 0.3], np.float32), 6.0, rng)
    >>> [round(v, 3) for v in fp.decode(a + b).tolist()], int(fp.signed(a + b)[-1])
    ([0.26, 0.08], 2)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from potluck.secagg.crypto import DTYPES

SIGNED: dict[int, np.dtype[Any]] = {32: np.dtype(np.int32), 64: np.dtype(np.int64)}


class Encoding(Protocol):
    """What the masked input needs of an encoding: its modulus ``2^bits``, the overflow
    check of a cohort, ``encode`` of an update and ``decode`` of the unmasked sum
    (``FixedPoint``; ``ddp_encoding.SkellamEncoding`` for distributed DP)."""

    @property
    def bits(self) -> int: ...

    def check_capacity(self, n: int) -> None: ...

    def encode(self, delta: np.ndarray, weight: float, rng: np.random.Generator) -> np.ndarray: ...

    def decode(self, total: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class FixedPoint:
    """The encoding's settings; ``where`` names them in errors (the transform's namespace)."""

    clip_range: float
    quantization_bits: int
    bits: int
    max_weight: float
    where: str = "secagg"

    @property
    def dtype(self) -> np.dtype[Any]:
        """The unsigned integer type of the encodings (arithmetic wraps modulo ``2^bits``)."""
        return DTYPES[self.bits]

    @property
    def scale(self) -> int:
        """``2^(quantization_bits - 1)``: the encoding of 1."""
        return 1 << (self.quantization_bits - 1)

    def check_capacity(self, n: int) -> None:
        """Refuse a cohort of ``n`` whose sum could overflow the modulus, saying which
        setting to change.

        Example:
            >>> FixedPoint(1.0, 24, 32, 100.0, "transforms.0.secagg").check_capacity(300)
            ... # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            ValueError: transforms.0.secagg: 300 clients can sum to 300 * 2^23, which ... = 64
        """
        if n * self.scale < 1 << (self.bits - 1):
            return
        fits = self.bits - math.ceil(math.log2(n + 1))
        raise ValueError(
            f"{self.where}: {n} clients can sum to {n} * 2^{self.quantization_bits - 1}, "
            f"which overflows the modulus 2^{self.bits} (the sum's signed range is "
            f"2^{self.bits - 1}): lower quantization_bits to at most {fits}, sample fewer "
            f"clients per round, or set bits = 64"
        )

    def encode(self, delta: np.ndarray, weight: float, rng: np.random.Generator) -> np.ndarray:
        """The ``d + 2`` integers (modulo ``2^bits``) of ``weight * delta``, the weight and a
        count of 1, rounded stochastically with ``rng``."""
        if not (math.isfinite(weight) and 0 <= weight <= self.max_weight):
            raise ValueError(
                f"{self.where}: an aggregation weight must be in [0, max_weight = "
                f"{self.max_weight:g}], got {weight:g}: raise max_weight"
            )
        a = weight / self.max_weight
        clipped = np.clip(delta.astype(np.float64), -self.clip_range, self.clip_range)
        real = np.empty(delta.size + 1, dtype=np.float64)
        np.multiply(clipped, a * self.scale / self.clip_range, out=real[:-1])
        real[-1] = a * self.scale
        low = np.floor(real)
        rounded = low + (rng.random(real.size) < real - low)
        out = np.empty(delta.size + 2, dtype=np.int64)
        out[:-1] = rounded
        out[-1] = 1
        return out.astype(self.dtype)  # two's complement: negatives wrap

    def signed(self, total: np.ndarray) -> np.ndarray:
        """A sum modulo ``2^bits`` as signed integers (int64)."""
        return total.astype(self.dtype, copy=False).view(SIGNED[self.bits]).astype(np.int64)

    def decode(self, total: np.ndarray) -> np.ndarray:
        """The weighted mean (float64, ``d``) from the sum of encodings; refused when the
        summed weight is not positive."""
        z = self.signed(total)
        weight = int(z[-2])
        if weight <= 0:
            raise ValueError(f"the summed weight is {weight}: no positive weight to divide by")
        return z[:-2].astype(np.float64) * (self.clip_range / weight)
