"""The encoding of distributed DP on secure aggregation: the client half of the distributed
Skellam mechanism (Agarwal, Kairouz, Liu 2021, "The Skellam Mechanism for Differentially
Private Federated Learning", NeurIPS), with the flattening and conditional rounding of the
distributed discrete Gaussian (Kairouz, Liu, Steinke 2021, ICML).

A client's update ``delta`` (``d`` coordinates) becomes ``n + 1`` integers modulo ``2^bits``
(``n``: ``d`` padded to a power of two):

1. clipped to L2 norm ``clip`` and scaled by ``s = 2^(quantization_bits - 1) / clip``, so
   its norm is at most ``c = 2^(quantization_bits - 1)`` integer units;
2. rotated, ``H D x / sqrt(n)`` (``rotation``): orthogonal, so still of norm ``c``, and
   flat: each coordinate sub-Gaussian with variance proxy ``c^2 / n``;
3. rounded to integers stochastically, *conditionally*: redrawn until the rounded vector's
   norm is at most ``l2 = (1 + 2^-10) c`` (``norm_bound``), so the sensitivity holds for
   every outcome. Kairouz et al.'s bound: the norm exceeds ``sqrt(c^2 + n/4 + sqrt(2
   log(1/beta)) (c + sqrt(n)/2))`` with probability at most ``beta``; ``check_rounding``
   refuses a model so large that this exceeds ``l2`` at ``beta = e^-1/2`` (a draw then
   succeeds with probability at least 0.39, and far more in practice);
4. plus Skellam noise of variance ``variance`` per coordinate (``privacy.skellam``);
5. a count of 1 appended (the server checks the survivors against it and divides by it).

Negative values wrap around the modulus (two's complement), so the masked sum is the sum
of the noised encodings. The server decodes the unmasked sum: signed integers, rotated
back, unscaled, over the count.

``check_capacity`` is the modular-clipping budget: for ``m`` clients, coordinate ``j`` of
the sum is the rotation of the sum of the scaled updates (norm at most ``m c``: Hoeffding,
``P(|.| > a) <= 2 exp(-a^2 n / (2 m^2 c^2))``), plus at most ``m`` of rounding, plus the
summed noise ``Sk(m variance)`` (Bennett: ``P(|.| > t) <= 2 exp(-t^2 / (2 (V + t/3)))``).
A cohort for which some coordinate could reach ``2^(bits - 1)`` with probability above
``WRAP_PROBABILITY`` (a union bound over the coordinates) is refused before its round,
naming the setting to change. (A wrap would not weaken privacy, which is post-processing
of the noised sum, only wreck the round's model.)

Example:
    >>> from potluck.privacy.skellam import seeded_bytes
    >>> enc = SkellamEncoding(clip=1.0, quantization_bits=16, bits=32, size=3, variance=4.0)
    >>> enc = enc.for_round(seed=0, round=1, noise=seeded_bytes(np.random.default_rng(0)))
    >>> rng = np.random.default_rng(1)
    >>> total = enc.encode(np.array([0.3, -0.4, 0.0]), 1.0, rng) + enc.encode(
    ...     np.array([0.1, 0.2, 0.5]), 1.0, rng)
    >>> [round(v, 3) for v in enc.decode(total).tolist()]  # the mean, with noise std ~1e-4
    [0.2, -0.1, 0.25]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from potluck.privacy.central import NORM_SLACK
from potluck.privacy.skellam import Bytes, skellam
from potluck.secagg.crypto import DTYPES
from potluck.secagg.encoding import SIGNED
from potluck.secagg.rotation import padded, rotate, rotation_signs, unrotate

ROUNDING_SLACK = 2.0**-10  # the rounded norm's bound over the scaled clip, less 1
ROUNDING_TRIES = 64  # conditional rounding succeeds with probability >= 0.39 per try
WRAP_PROBABILITY = 2.0**-30  # the largest chance of a wrapped coordinate a cohort may have


def conditional_round(y: np.ndarray, bound: float, rng: np.random.Generator) -> np.ndarray:
    """``y`` rounded stochastically to integers (int64; up with probability the fractional
    part), redrawn until the result's L2 norm is at most ``bound``.

    Example:
        >>> r = conditional_round(np.array([0.5, 2.25, -1.75]), 3.0, np.random.default_rng(0))
        >>> r.dtype, bool(np.abs(r - [0.5, 2.25, -1.75]).max() < 1), float(r @ r) <= 9.0
        (dtype('int64'), True, True)
    """
    low = np.floor(y)
    frac = y - low
    # a float64 sum of n nonnegative terms is within n * 2^-53 of the true one: accept only
    # what stays below the bound with that error, so the bound holds exactly
    limit = bound**2 * (1 - 2 * y.size * 2.0**-53)
    for _ in range(ROUNDING_TRIES):
        rounded = low + (rng.random(y.size) < frac)
        if float(rounded @ rounded) <= limit:
            return rounded.astype(np.int64)
    raise RuntimeError(
        f"conditional rounding: {ROUNDING_TRIES} roundings of a vector of norm "
        f"{float(np.linalg.norm(y)):.6g} all exceeded {bound:.6g}"
    )


@dataclass(frozen=True)
class SkellamEncoding:
    """The settings of the encoding (``size``: the model's ``d``; ``variance``: each
    client's Skellam variance, in integer units); ``where`` names it in errors. A round's
    rotation signs and the client's noise source are set by ``for_round``."""

    clip: float
    quantization_bits: int
    bits: int
    size: int
    variance: float
    where: str = "dskellam"  # the part's namespace (it also names the rotation's stream)
    signs: np.ndarray | None = field(default=None, compare=False, repr=False)
    noise: Bytes | None = field(default=None, compare=False, repr=False)

    @property
    def dtype(self) -> np.dtype[Any]:
        return DTYPES[self.bits]

    @property
    def padded(self) -> int:
        """``n``: the rotation's length, ``d`` padded to a power of two."""
        return padded(self.size)

    @property
    def unit(self) -> int:
        """``c = 2^(quantization_bits - 1)``: the scaled clip, in integer units."""
        return 1 << (self.quantization_bits - 1)

    @property
    def norm_bound(self) -> float:
        """``l2``: the L2 norm a client's rounded vector is held to."""
        return (1 + ROUNDING_SLACK) * self.unit

    def for_round(self, seed: int, round: int, noise: Bytes | None = None) -> SkellamEncoding:
        """This encoding with round ``round``'s rotation (from the run ``seed``) and, on a
        client, its ``noise`` source."""
        signs = rotation_signs(seed, self.where, round, self.padded)
        return replace(self, signs=signs, noise=noise)

    def check_rounding(self) -> None:
        """Refuse a model whose rounding could exceed ``norm_bound`` (Kairouz et al.'s bound
        at ``beta = e^-1/2``), naming ``quantization_bits``.

        Example:
            >>> SkellamEncoding(1.0, 8, 32, 10_000, 0.0, "transforms.0.dskellam").check_rounding()
            ... # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            ValueError: transforms.0.dskellam: ... raise quantization_bits to at least 12
        """
        if _rounded_norm(self.unit, self.padded) <= self.norm_bound:
            return
        q = self.quantization_bits
        while _rounded_norm(1 << (q - 1), self.padded) > (1 + ROUNDING_SLACK) * (1 << (q - 1)):
            q += 1
        raise ValueError(
            f"{self.where}: at quantization_bits = {self.quantization_bits} the rounding of "
            f"{self.size} coordinates ({self.padded} rotated) could take a clipped update's "
            f"norm past its bound (1 + 2^-10) 2^{self.quantization_bits - 1}: raise "
            f"quantization_bits to at least {q}"
        )

    def check_capacity(self, n: int) -> None:
        """Refuse a cohort of ``n`` whose noised sum could wrap the modulus (with probability
        above ``WRAP_PROBABILITY``), saying which setting to change.

        Example:
            >>> big = SkellamEncoding(1.0, 24, 32, 1000, float(2**50), "transforms.0.dskellam")
            >>> big.check_capacity(100)  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            ValueError: transforms.0.dskellam: the noised sum of 100 clients ... bits = 64
        """
        reach = self.reach(n)
        limit = 2.0 ** (self.bits - 1)
        if reach < limit:
            return
        fits = None
        for q in range(self.quantization_bits - 1, 1, -1):  # the noise scales with the unit
            shrunk = replace(self, quantization_bits=q, variance=self.variance / 4.0 ** (
                self.quantization_bits - q))  # fmt: skip
            if shrunk.reach(n) < limit:
                fits = q
                break
        lower = f"lower quantization_bits to at most {fits}, " if fits else ""
        raise ValueError(
            f"{self.where}: the noised sum of {n} clients can reach {reach:.4g} in a "
            f"coordinate (its chance to go further is 2^{math.log2(WRAP_PROBABILITY):g}), "
            f"past the signed range "
            f"2^{self.bits - 1} of the modulus 2^{self.bits}, so it could wrap: {lower}lower "
            f"noise_multiplier, sample fewer clients per round, or set bits = 64"
        )

    def reach(self, n: int) -> float:
        """A bound that no coordinate of ``n`` clients' noised sum exceeds, except with
        probability ``WRAP_PROBABILITY``."""
        log_terms = math.log(4 * self.padded / WRAP_PROBABILITY)  # 2 tails, 2 parts, n coords
        signal = n * self.unit * math.sqrt(2 * log_terms / self.padded) + n
        v = n * self.variance
        noise = log_terms / 3 + math.sqrt(log_terms**2 / 9 + 2 * log_terms * v)
        return signal + noise

    def encode(self, delta: np.ndarray, weight: float, rng: np.random.Generator) -> np.ndarray:
        """The ``n + 1`` integers (modulo ``2^bits``) of the clipped, scaled, rotated,
        rounded (with ``rng``) and noised ``delta``, and the count; the weight is not used
        (every update counts alike)."""
        signs, noise = self._signs(), self.noise
        if noise is None:
            raise RuntimeError("a client's encoding needs its noise source (for_round)")
        x = delta.astype(np.float64).ravel()
        norm = float(np.linalg.norm(x))
        factor = min(1.0, self.clip / (norm * (1 + NORM_SLACK))) if norm > 0 else 1.0
        y = np.zeros(self.padded, dtype=np.float64)
        y[: x.size] = x * (factor * self.unit / self.clip)
        rounded = conditional_round(rotate(y, signs), self.norm_bound, rng)
        rounded += skellam(self.variance, self.padded, noise)
        out = np.empty(self.padded + 1, dtype=np.int64)
        out[:-1] = rounded
        out[-1] = 1
        return out.astype(self.dtype)  # two's complement: negatives wrap

    def decode(self, total: np.ndarray) -> np.ndarray:
        """The mean update (float64, ``d``) from the sum of encodings: rotated back,
        unscaled, over the count; refused when the count is not positive."""
        z = total.astype(self.dtype, copy=False).view(SIGNED[self.bits]).astype(np.int64)
        count = int(z[-1])
        if count <= 0:
            raise ValueError(f"the unmasked sum counts {count} inputs: nothing to average")
        x = unrotate(z[:-1].astype(np.float64), self._signs())[: self.size]
        return x * (self.clip / self.unit / count)

    def _signs(self) -> np.ndarray:
        if self.signs is None:
            raise RuntimeError("the encoding needs its round's rotation (for_round)")
        return self.signs


def _rounded_norm(c: float, n: int) -> float:
    """Kairouz et al.'s bound on the norm of a norm-``c`` vector of ``n`` coordinates after
    stochastic rounding, at ``beta = e^-1/2`` (``sqrt(2 log(1/beta)) = 1``)."""
    return math.sqrt(c * c + n / 4 + (c + math.sqrt(n) / 2))
