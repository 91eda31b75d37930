"""Shamir's t-of-m secret sharing (Shamir 1979, "How to Share a Secret", CACM) over the prime
field of the Mersenne prime ``2^521 - 1``, for 32-byte secrets (keys and seeds, never vectors).

A secret ``s`` is the constant term of a random polynomial ``f`` of degree ``t - 1``; share
``i`` is ``f(x_i)`` at a distinct non-zero point ``x_i``. Any ``t`` shares give ``s`` back by
Lagrange interpolation at 0; fewer than ``t`` say nothing about it (every secret is equally
likely). The coefficients come from ``secrets`` (the operating system's entropy). A share is
a field element, written as ``SHARE_BYTES`` big-endian bytes.

Example:
    >>> secret = bytes(range(32))
    >>> shares = split(secret, [1, 2, 3, 4, 5], t=3)
    >>> combine([(2, shares[1]), (4, shares[3]), (5, shares[4])]) == secret
    True
"""

from __future__ import annotations

import functools
import secrets as _entropy
from collections.abc import Sequence

PRIME = (1 << 521) - 1  # a Mersenne prime: every 32-byte secret is a field element
SECRET_BYTES = 32
SHARE_BYTES = 66  # ceil(521 / 8)


def split(secret: bytes, xs: Sequence[int], t: int) -> list[int]:
    """The shares ``f(x)`` for each ``x`` in ``xs`` of a fresh random polynomial of degree
    ``t - 1`` with ``f(0) = secret``. ``xs`` must be distinct, in ``[1, PRIME)``; there may
    be fewer of them than ``t`` (the secret is then lost, never revealed).

    Example:
        >>> len(split(bytes(32), [7, 8], t=2)), split(bytes(32), [1], t=1)
        (2, [0])
    """
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a secret has {SECRET_BYTES} bytes, got {len(secret)}")
    if t < 1:
        raise ValueError(f"the threshold t must be at least 1, got {t}")
    _check_points(xs)
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [_entropy.randbelow(PRIME) for _ in range(t - 1)]
    top = coefficients[::-1]
    shares = []
    for x in xs:
        y = 0
        for c in top:  # Horner, reduced once at the end (the points are small)
            y = y * x + c
        shares.append(y % PRIME)
    return shares


def combine(points: Sequence[tuple[int, int]], base: tuple[int, ...] = ()) -> bytes:
    """The secret of polynomial through ``points`` ``(x, f(x))``: pass exactly ``t`` shares
    (more are fine if they agree; fewer give a wrong value, which a caller detects by a
    commitment to the secret). ``base``: points of which these are all but one, or all
    (their Lagrange weights, computed once, give these in linear time).

    Example:
        >>> shares = split(bytes(range(32)), [1, 2, 3, 4], t=3)
        >>> combine([(1, shares[0]), (3, shares[2]), (4, shares[3])], base=(1, 2, 3, 4))[-1]
        31
    """
    if not points:
        raise ValueError("no shares to combine")
    xs = tuple(x for x, _ in points)
    missing = set(base) - set(xs)
    if xs == base:
        weights = lagrange_at_zero(xs)
    elif len(base) == len(xs) + 1 and len(missing) == 1 and set(xs) < set(base):
        weights = _without(base, base.index(missing.pop()), xs)
    else:
        weights = lagrange_at_zero(xs)
    secret = sum(y * w for (_, y), w in zip(points, weights, strict=True)) % PRIME
    if secret >> (8 * SECRET_BYTES):
        raise ValueError("the shares do not combine to a 32-byte secret (a share is wrong)")
    return secret.to_bytes(SECRET_BYTES, "big")


@functools.lru_cache(maxsize=64)
def lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """The Lagrange weights of points ``xs`` at 0: ``f(0) = sum_i w_i f(x_i)`` for every
    polynomial of degree below ``len(xs)``. Cached: the server rebuilds many secrets from
    the shares of the same clients. One modular inversion for all of them (batch inversion).

    Example:
        >>> lagrange_at_zero((1, 2)) == (2, PRIME - 1)  # f(0) = 2 f(1) - f(2)
        True
    """
    _check_points(xs)
    numerators, denominators = [], []
    for i, xi in enumerate(xs):
        num = den = 1
        for j, xj in enumerate(xs):
            if j != i:
                num, den = num * xj % PRIME, den * (xj - xi) % PRIME
        numerators.append(num)
        denominators.append(den)
    inverses = _invert_all(denominators)
    return tuple(n * inv % PRIME for n, inv in zip(numerators, inverses, strict=True))


def _without(base: tuple[int, ...], i: int, xs: tuple[int, ...]) -> tuple[int, ...]:
    """The Lagrange weights at 0 of ``base`` less its ``i``-th point, in the order of
    ``xs``, from ``base``'s own: ``w'_j = w_j (x_i - x_j) / x_i``."""
    weights, xi = lagrange_at_zero(base), base[i]
    inv = pow(xi, -1, PRIME)
    by_x = {x: w * (xi - x) % PRIME * inv % PRIME for x, w in zip(base, weights, strict=True)}
    return tuple(by_x[x] for x in xs)


def _invert_all(values: list[int]) -> list[int]:
    prefix = [1]
    for v in values:
        prefix.append(prefix[-1] * v % PRIME)
    inverse = pow(prefix[-1], -1, PRIME)
    out = [0] * len(values)
    for i in range(len(values) - 1, -1, -1):
        out[i] = inverse * prefix[i] % PRIME
        inverse = inverse * values[i] % PRIME
    return out


def to_bytes(share: int) -> bytes:
    """A share as ``SHARE_BYTES`` big-endian bytes."""
    return share.to_bytes(SHARE_BYTES, "big")


def from_bytes(data: bytes) -> int:
    """A share from its bytes; refused if it is not a field element."""
    if len(data) != SHARE_BYTES:
        raise ValueError(f"a share has {SHARE_BYTES} bytes, got {len(data)}")
    value = int.from_bytes(data, "big")
    if value >= PRIME:
        raise ValueError("a share must be below the field's prime")
    return value


def _check_points(xs: Sequence[int]) -> None:
    if len(set(xs)) != len(xs):
        raise ValueError("the share points x must be distinct")
    bad = [x for x in xs if not 0 < x < PRIME]
    if bad:
        raise ValueError(f"share points must be in [1, 2^521 - 1), got {bad[0]}")
