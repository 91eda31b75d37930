"""The (K, d) stack of a round's updates, written into one buffer kept across rounds.

A fresh (K, d) tensor every round is paid in first-touch page faults on every page: for
200 updates of the McMahan CNN (1.33 GB) that was 0.6 s of a deployed round's 0.8 s of
stacking and averaging (BENCHMARKS.md §9), and more where the host reclaims freed pages.
Writing into the same buffer each round touches memory that is already mapped. The buffer
may live on an accelerator (``device``): the rows are then copied there one by one.

Example:
    >>> import torch
    >>> buf = StackBuffer()
    >>> first = buf.stack([torch.ones(3), torch.zeros(3)])
    >>> first.tolist()
    [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    >>> again = buf.stack([torch.full((3,), 2.0)])
    >>> again.tolist(), again.data_ptr() == first.data_ptr()
    ([[2.0, 2.0, 2.0]], True)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from potluck.core.device import HOST


class StackBuffer:
    """Stacks equal-length 1-D rows into a reused buffer on ``device`` (the host by
    default). The returned (K, d) tensor is a view of the buffer: valid until the next
    ``stack`` call."""

    def __init__(self, device: torch.device = HOST) -> None:
        self.device = device
        self._buffer: torch.Tensor | None = None

    def stack(self, rows: Sequence[torch.Tensor]) -> torch.Tensor:
        """``torch.stack(rows)``, written into the kept buffer (grown when too small)."""
        if not rows:
            raise ValueError("cannot stack zero rows")
        first = rows[0]
        if first.dim() != 1:
            raise ValueError(f"rows must be 1-D, got shape {tuple(first.shape)}")
        k, d = len(rows), first.numel()
        buf = self._buffer
        if buf is None or buf.shape[1] != d or buf.dtype != first.dtype or buf.shape[0] < k:
            buf = self._buffer = torch.empty(k, d, dtype=first.dtype, device=self.device)
        out = buf[:k]
        if self.device == first.device:
            torch.stack(list(rows), out=out)
        else:
            for i, row in enumerate(rows):
                out[i].copy_(row)
        return out
