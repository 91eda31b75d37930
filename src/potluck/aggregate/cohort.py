"""Bounds on a round's updates relative to the round's own cohort (issue 13, finding 4).

A deployed server cannot trust what a member claims, and a fixed bound (``deploy.
max_update_norm``) needs a scale the operator rarely knows before round 1. These bounds take
their scale from the round itself: the *lower median* of the accepted updates (the middle
value, the smaller of the two middle ones for an even count). While fewer than half of a
round's updates are hostile, the lower median lies between the smallest and the largest
honest value, so an honest update within ``ratio`` times every other honest one is never
refused nor capped, and a hostile one can weigh and move at most ``ratio`` times an honest
one. They apply from ``MIN_UPDATES`` updates on; below that a median is not robust (with two
updates, either one sets it) and only the fixed bounds hold.

- ``norm_outliers``: an update is refused if any of its uploaded arrays (the delta, and what
  the terms upload) has an L2 norm above ``ratio`` times that array's lower median. An array
  whose median norm is 0 has no such bound.
- ``capped``: example weights (FedAvg's ``num_examples``, which only the member knows) are
  capped at ``ratio`` times their lower median; the update is kept.

This is a safety net against one member destroying the model, not a robust aggregator: a
hostile update within the bounds still counts (see the robust aggregators for that).

Example:
    >>> import numpy as np
    >>> norm_outliers({"delta": np.array([1.0, 1.2, 0.9, 1e6])}, ratio=10.0)
    [None, None, None, "'delta' has L2 norm 1e+06, above 10 times the round's median (1)"]
    >>> capped(np.array([100.0, 120.0, 80.0, 1e9]), ratio=10.0).tolist()
    [100.0, 120.0, 80.0, 1000.0]
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

MIN_UPDATES = 3  # a round's updates needed before the relative bounds apply


def lower_median(values: np.ndarray) -> float:
    """The middle value of ``values``, the lower of the two middle ones for an even count.

    Example:
        >>> lower_median(np.array([4.0, 1.0, 3.0, 2.0]))
        2.0
    """
    if values.size == 0:
        raise ValueError("the lower median of no values")
    return float(np.sort(values)[(values.size - 1) // 2])


def norm_outliers(norms: Mapping[str, np.ndarray], ratio: float) -> list[str | None]:
    """For each update (one L2 norm per update in each uploaded array), why it is refused, or
    None; nothing is refused with fewer than ``MIN_UPDATES`` updates."""
    if ratio < 1:
        raise ValueError(f"the norm ratio must be >= 1, got {ratio}")
    sizes = {len(v) for v in norms.values()}
    if len(sizes) > 1:
        raise ValueError(f"every array needs one norm per update, got counts {sorted(sizes)}")
    n = sizes.pop() if sizes else 0
    reasons: list[str | None] = [None] * n
    if n < MIN_UPDATES:
        return reasons
    for name, values in norms.items():
        median = lower_median(values)
        if not median > 0:
            continue
        for i, norm in enumerate(values.tolist()):
            if reasons[i] is None and norm > ratio * median:
                reasons[i] = (
                    f"{name!r} has L2 norm {norm:.6g}, above {ratio:g} times the round's "
                    f"median ({median:.6g})"
                )
    return reasons


def capped(weights: np.ndarray, ratio: float) -> np.ndarray:
    """``weights`` capped at ``ratio`` times their lower median (unchanged with fewer than
    ``MIN_UPDATES`` of them, or a median of 0)."""
    if ratio < 1:
        raise ValueError(f"the weight ratio must be >= 1, got {ratio}")
    if weights.size < MIN_UPDATES:
        return weights.copy()
    median = lower_median(weights)
    if not median > 0:
        return weights.copy()
    return np.minimum(weights, ratio * median)
