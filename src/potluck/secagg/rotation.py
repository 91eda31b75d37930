"""The randomized Hadamard rotation that flattens a vector before it is rounded to integers
(Kairouz, Liu, Steinke 2021, "The Distributed Discrete Gaussian Mechanism for Federated
Learning with Secure Aggregation", ICML; used for Skellam by Agarwal, Kairouz, Liu 2021).

``rotate(x) = H D x / sqrt(n)``: ``D`` a diagonal of random signs, ``H`` the ``n x n``
Walsh-Hadamard matrix, ``n`` the length padded to a power of two. The rotation is orthogonal
(norms are kept, ``unrotate`` inverts it exactly in real arithmetic), and each coordinate of
``rotate(x)`` is a Rademacher sum ``sum_i +-x_i / sqrt(n)``: sub-Gaussian with variance proxy
``|x|^2 / n`` (Hoeffding), so no coordinate of a sum is much larger than its norm over
``sqrt(n)``, which bounds how far the noised sum can reach before it wraps the modulus. The
signs are public (the server needs them to invert the rotation): in a run they follow the
seed, the part and the round, the same for every client and the server.

Example:
    >>> x = np.array([3.0, 4.0, 0.0])
    >>> signs = rotation_signs(0, "transforms.0.dskellam", 1, padded(3))
    >>> y = rotate(np.pad(x, (0, 1)), signs)
    >>> round(float(np.linalg.norm(y)), 9), np.allclose(unrotate(y, signs)[:3], x)
    (5.0, True)
"""

from __future__ import annotations

import math

import numpy as np
import torch

from potluck.core.seeding import Seeds
from potluck.updates import hadamard


def padded(d: int) -> int:
    """The rotation's length for ``d`` coordinates: the next power of two (at least 1)."""
    return 1 << max(0, d - 1).bit_length()


def fwht(x: np.ndarray) -> np.ndarray:
    """``H x`` for the unnormalised Walsh-Hadamard matrix ``H`` (float64, a new array), in
    ``n log2 n`` additions; ``H H = n I`` (``updates.hadamard.fwht`` on one row)."""
    row = torch.from_numpy(np.array(x, dtype=np.float64)).reshape(1, -1)
    return hadamard.fwht(row).reshape(-1).numpy()


def rotation_signs(seed: int, namespace: str, round: int, n: int) -> np.ndarray:
    """The diagonal ``D`` of round ``round``'s rotation: ``n`` signs +-1 (float64) from the
    run seed, the part's namespace and the round."""
    bits = Seeds(seed).numpy(namespace, round, "rotation").integers(0, 2, n)
    return (2 * bits - 1).astype(np.float64)


def rotate(x: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """``H D x / sqrt(n)``."""
    return fwht(signs * x) / math.sqrt(x.size)


def unrotate(y: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """The inverse rotation, ``D H y / sqrt(n)``."""
    return signs * fwht(y) / math.sqrt(y.size)
