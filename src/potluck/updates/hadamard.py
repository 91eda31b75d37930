"""The fast Walsh-Hadamard transform of each row of a matrix, the one randomised rotations
use: QSGD's (``updates.quantize``) per block, distributed DP's (``secagg.rotation``) on
the whole padded update.

Example:
    >>> import torch
    >>> fwht(torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])).tolist()
    [[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]]
"""

from __future__ import annotations

import torch


def fwht(rows: torch.Tensor) -> torch.Tensor:
    """``rows @ H`` for the unnormalised ``n x n`` Walsh-Hadamard matrix ``H`` (``H H = n I``),
    rows of a power-of-two length ``n``, in ``log2 n`` butterfly passes of ``a + b, a - b``
    (a new tensor of the same dtype)."""
    count, n = rows.shape
    if n & (n - 1):
        raise ValueError(f"a Hadamard transform needs a power-of-two length, got {n}")
    y, h = rows, 1
    while h < n:
        pairs = y.reshape(count, n // (2 * h), 2, h)
        a, b = pairs[:, :, 0, :], pairs[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(count, n).clone() if y is rows else y.reshape(count, n)
