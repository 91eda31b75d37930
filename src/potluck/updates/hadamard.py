"""The fast Walsh-Hadamard transform of each row of a matrix, the one randomised rotations
use: QSGD's (``updates.quantize``) per block, distributed DP's (``secagg.rotation``) on
the whole padded update.

Each butterfly level ``h`` (1, 2, 4, ...) maps the pair ``(a, b)`` of coordinates ``i`` and
``i + h`` (bit ``h`` of ``i`` clear) to ``(a + b, a - b)``, in place (one spare buffer for
the differences). Level 2 runs on a complex64 view of the rows (a complex sum is the two float
sums), as level 1 of pairs: torch loops over runs of 2 floats slowly. Every coordinate is
the same sum of the same rounded terms in the same order as a plain butterfly.

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
    return fwht_(rows.clone(memory_format=torch.contiguous_format))


def fwht_(rows: torch.Tensor) -> torch.Tensor:
    """``fwht`` in place on contiguous ``rows``; returns ``rows``.

    Example:
        >>> x = torch.tensor([[3.0, 1.0]])
        >>> fwht_(x) is x, x.tolist()
        (True, [[4.0, 2.0]])
    """
    count, n = rows.shape
    if n & (n - 1):
        raise ValueError(f"a Hadamard transform needs a power-of-two length, got {n}")
    if not rows.is_contiguous():
        raise ValueError("fwht_ needs contiguous rows")
    spare, h = torch.empty(count * n // 2, dtype=rows.dtype), 1
    while h < n:
        x, d, run = rows, spare, h
        if h == 2 and rows.dtype in (torch.float32, torch.float64):
            x, d = (torch.view_as_complex(t.view(-1, 2)) for t in (rows, spare))
            run = 1
        pairs = x.reshape(count, n // (2 * h), 2, run)
        a, b, d = pairs[:, :, 0, :], pairs[:, :, 1, :], d.view(count, n // (2 * h), run)
        torch.sub(a, b, out=d)
        a.add_(b)
        b.copy_(d)
        h *= 2
    return rows
