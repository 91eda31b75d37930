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
        for c in top:  # Horner
            y = (y * x + c) % PRIME
        shares.append(y)
    return shares


def combine(points: Sequence[tuple[int, int]]) -> bytes:
    """The secret of polynomial through ``points`` ``(x, f(x))``: pass exactly ``t`` shares
    (more are fine if they agree; fewer give a wrong value, which a caller detects by a
    commitment to the secret).

    Example:
        >>> combine([(1, 5)])[-1]
        5
    """
    if not points:
        raise ValueError("no shares to combine")
    xs = [x for x, _ in points]
    _check_points(xs)
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >> (8 * SECRET_BYTES):
        raise ValueError("the shares do not combine to a 32-byte secret (a share is wrong)")
    return secret.to_bytes(SECRET_BYTES, "big")


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
