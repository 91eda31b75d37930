"""Monitoring's per-update distances: how far each client's local model went
(``update_norm``) and how far it ends from the round's aggregate (``client_drift``).

The drift comes from the expansion ``|delta_k - a|^2 = |delta_k|^2 - 2 delta_k . a + |a|^2``
over the rows' norms and their dot products with the aggregate (the cosine score's: no
pass over the stack of its own), summed in float64. Where the drift is small against the
norms (``drift^2 < WELL_CONDITIONED (|delta_k|^2 + |a|^2)``), the float32 rounding of the
norms and dot products could dominate the difference, so those rows are computed directly,
a block of rows at a time through one buffer of at most ``BLOCK_ELEMENTS``: the whole
``deltas - aggregate`` would be a second (K, d) stack, fresh pages every round (200 updates
of a 1.66 M-parameter CNN: 1.33 GB). The direct computation of every row cost a deployed
round 0.6-0.9 s of its work after the last update (BENCHMARKS.md section 9); the expansion
costs nothing over the scores, and on 200 updates of that CNN it agreed with the direct
float32 distances to 3.3e-5 (relative), the rounding of float32 dot products over 1.66 M
terms.

Example:
    >>> deltas, aggregate = torch.tensor([[3.0, 4.0], [0.0, 0.0]]), torch.tensor([0.0, 4.0])
    >>> update_distances(deltas, aggregate)
    ([5.0, 0.0], [3.0, 4.0])
"""

from __future__ import annotations

import torch

from potluck.privacy.central import row_norms

BLOCK_ELEMENTS = 1 << 22  # the direct computation's buffer: 16 MiB of float32
WELL_CONDITIONED = 1e-2  # drift^2 / (|delta|^2 + |a|^2) from which the expansion is kept


def update_distances(
    deltas: torch.Tensor,
    aggregate: torch.Tensor,
    norms: torch.Tensor | None = None,
    dots: torch.Tensor | None = None,
) -> tuple[list[float], list[float]]:
    """Each row's L2 norm and its L2 distance to ``aggregate``, from a (K, d) stack; the
    rows' ``norms`` and dot products with the aggregate (``dots``, float64, on the stack's
    device) where they are known."""
    a = aggregate.to(deltas.dtype)
    norms = row_norms(deltas) if norms is None else norms
    dots = (deltas @ a).double() if dots is None else dots
    a_sq = float(torch.linalg.vector_norm(aggregate.double())) ** 2
    sq = norms.square() - 2 * dots + a_sq
    drifts = sq.clamp(min=0).sqrt()
    near = sq < WELL_CONDITIONED * (norms.square() + a_sq)
    if bool(near.any()):
        direct = direct_distances(deltas, a, near)
        drifts = torch.where(near, direct, drifts)
    return norms.tolist(), drifts.tolist()


def direct_distances(deltas: torch.Tensor, a: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``|deltas[k] - a|`` (float64) for at least the rows ``k`` where the boolean ``rows``
    is true, a block of consecutive rows at a time: a block without such a row is skipped (0
    there), one with any is computed whole (no gathered copy of the rows).

    Example:
        >>> x = torch.tensor([[1.0, 1.0], [3.0, 5.0]])
        >>> direct_distances(x, torch.tensor([0.0, 1.0]), torch.tensor([False, True])).tolist()
        [1.0, 5.0]
    """
    k, d = deltas.shape
    step = max(1, min(k, BLOCK_ELEMENTS // max(d, 1)))
    block = deltas.new_empty((step, d))
    out = deltas.new_zeros(k, dtype=torch.float64)
    wanted = rows.tolist()
    for start in range(0, k, step):
        end = min(k, start + step)
        if any(wanted[start:end]):
            part = block[: end - start]
            torch.sub(deltas[start:end], a, out=part)
            out[start:end] = row_norms(part)
    return out
