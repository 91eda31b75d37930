"""The inputs both sides of ``benchmarks/compare_flower_secagg.py`` draw (NumPy only, so the
Flower environment imports it as potluck's does): each client's vector and weight, and each
round's dropouts.

Example:
    >>> x, w = client_input(0, 3, 4)
    >>> x.dtype.name, len(x), 1 <= w <= 600, len(dropouts(0, 50, 2, 0.1))
    ('float32', 4, True, 5)
"""

from __future__ import annotations

import numpy as np


def client_input(seed: int, client: int, d: int) -> tuple[np.ndarray, int]:
    """Client ``client``'s vector (``d`` uniform values in [-0.5, 0.5]) and weight (1-600)."""
    rng = np.random.default_rng([seed, client])
    weight = int(rng.integers(1, 601))
    return rng.uniform(-0.5, 0.5, d).astype(np.float32), weight


def dropouts(seed: int, n: int, rnd: int, rate: float) -> set[int]:
    """The clients that drop out in round ``rnd``."""
    k = round(rate * n)
    return set(np.random.default_rng([seed, n, rnd]).choice(n, size=k, replace=False).tolist())
