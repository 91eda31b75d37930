"""The monitoring figures of one round, from numbers the round already produced.

Fairness (Li, Sanjabi, Beirami and Smith 2020, "Fair Resource Allocation in Federated
Learning", ICLR, measure it by the variance of the per-client accuracy; Mohri, Sivek and
Suresh 2019, "Agnostic Federated Learning", by the worst client): the spread of the global
model's accuracy over the clients' local test sets, as its variance, its worst 10 % and its
Gini coefficient. Convergence: the least-squares slope of a metric over the last rounds, a
plateau (no new best for a window of rounds) and divergence (a non-finite loss, or one
grown past a factor of its best). Client drift (Karimireddy et al. 2020, "SCAFFOLD", ICML):
how far the clients' local models end from the global one they move to.

Example:
    >>> fairness([0.9, 0.8, 0.5, 0.6])["worst10"]
    0.5
    >>> round(gini([1.0, 1.0, 1.0, 1.0]), 6), round(gini([0.0, 0.0, 0.0, 1.0]), 6)
    (0.0, 0.75)
    >>> slope([1.0, 0.8, 0.6])
    -0.2
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def gini(values: Sequence[float] | np.ndarray) -> float:
    """The Gini coefficient of non-negative ``values``: the mean absolute difference of all
    ordered pairs over twice the mean (0: all equal; ``1 - 1/n``: one holds everything);
    NaN for no values or a zero sum.

    Example:
        >>> round(gini([1.0, 3.0]), 6)
        0.25
    """
    x = np.sort(np.asarray(values, dtype=np.float64))
    n, total = len(x), float(np.sum(x))
    if n == 0 or total <= 0:
        return math.nan
    if float(x[0]) < 0:
        raise ValueError(f"gini of negative values (min {float(x[0]):g})")
    ranks = np.arange(1, n + 1, dtype=np.float64)
    return float(np.sum((2 * ranks - n - 1) * x) / (n * total))


def worst_share(values: Sequence[float] | np.ndarray, share: float = 0.1) -> float:
    """The mean of the lowest ``ceil(share * n)`` values (at least one); NaN for none.

    Example:
        >>> worst_share([0.9, 0.1, 0.5, 0.3], share=0.5)
        0.2
    """
    x = np.sort(np.asarray(values, dtype=np.float64))
    if len(x) == 0:
        return math.nan
    k = max(1, math.ceil(share * len(x) - 1e-9))
    return float(np.mean(x[:k]))


def fairness(accuracies: Sequence[float]) -> dict[str, float]:
    """The spread of per-client accuracies: ``mean``, ``var`` (population variance),
    ``min``, ``worst10`` (mean of the worst 10 %), ``gini`` and ``count``.

    Example:
        >>> f = fairness([1.0, 0.5])
        >>> f["mean"], f["var"], f["min"], f["count"]
        (0.75, 0.0625, 0.5, 2.0)
    """
    x = np.asarray(accuracies, dtype=np.float64)
    if len(x) == 0:
        return {}
    return {
        "mean": float(np.mean(x)),
        "var": float(np.var(x)),
        "min": float(np.min(x)),
        "worst10": worst_share(x, 0.1),
        "gini": gini(x),
        "count": float(len(x)),
    }


def group_means(
    per_client: Mapping[int, float], groups: Mapping[str, Sequence[int]]
) -> dict[str, float]:
    """Each group's mean of the per-client values of its members that have one (groups
    with none are left out).

    Example:
        >>> group_means({0: 0.9, 1: 0.7, 2: 0.4}, {"a": [0, 1], "b": [2, 5], "c": [7]})
        {'a': 0.8, 'b': 0.4}
    """
    out = {}
    for name, members in groups.items():
        got = [per_client[c] for c in members if c in per_client]
        if got:
            out[name] = float(np.mean(got))
    return out


def slope(values: Sequence[float]) -> float:
    """The least-squares slope per round of ``values`` (one per round, non-finite ones
    skipped); NaN with fewer than two finite values.

    Example:
        >>> slope([0.5, float("nan"), 0.7])
        0.1
    """
    y = np.asarray(values, dtype=np.float64)
    t = np.arange(len(y), dtype=np.float64)
    keep = np.isfinite(y)
    if int(keep.sum()) < 2:
        return math.nan
    t, y = t[keep], y[keep]
    t = t - t.mean()
    return round(float(np.sum(t * (y - y.mean())) / np.sum(t * t)), 12)


def plateaued(values: Sequence[float], window: int, tol: float, *, lower: bool) -> bool:
    """Whether the last ``window`` values bring no improvement over the best before them
    larger than ``tol`` (relative to its size; ``lower``: smaller is better). Needs more
    than ``window`` finite values.

    Example:
        >>> plateaued([1.0, 0.5, 0.5, 0.5], window=2, tol=1e-3, lower=True)
        True
        >>> plateaued([1.0, 0.5, 0.4, 0.3], window=2, tol=1e-3, lower=True)
        False
    """
    x = [v for v in values if math.isfinite(v)]
    if len(x) <= window:
        return False
    before, recent = x[:-window], x[-window:]
    if lower:
        best, new = min(before), min(recent)
        return best - new <= tol * max(abs(best), 1e-12)
    best, new = max(before), max(recent)
    return new - best <= tol * max(abs(best), 1e-12)


def diverging(losses: Sequence[float], factor: float) -> bool:
    """Whether the last loss is non-finite, or more than ``factor`` times the best one
    before it.

    Example:
        >>> diverging([1.0, 0.5, 1.2], factor=2.0), diverging([1.0, 0.5, 0.9], factor=2.0)
        (True, False)
        >>> diverging([0.5, float("inf")], factor=2.0)
        True
    """
    if not losses:
        return False
    last = losses[-1]
    if not math.isfinite(last):
        return True
    before = [v for v in losses[:-1] if math.isfinite(v)]
    return bool(before) and last > factor * min(before)


def cost_per_gain(total_bytes: float, accuracy: float, baseline: float) -> float:
    """Bytes moved so far per point of accuracy (in percent) gained over ``baseline``; NaN
    while there is no gain.

    Example:
        >>> cost_per_gain(1_000_000, 0.60, 0.10)
        20000.0
    """
    gain = 100.0 * (accuracy - baseline)
    if not (math.isfinite(gain) and gain > 0):
        return math.nan
    return total_bytes / gain
