"""The communication graph of SecAgg+ (Bell et al. 2020, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS): each client is paired with ``k`` neighbours, about
``log n``, instead of all ``n - 1`` of SecAgg (Bonawitz et al. 2017).

The graph is a Harary graph ``H(k, n)`` over a random order of the clients (as in Bell et
al.'s experiments and Flower's SecAgg+): on a ring of the shuffled clients each is joined to
the ``k / 2`` nearest on either side, so every client has exactly ``k`` neighbours (``k`` is
made even) and the neighbourhoods overlap like a random ``k``-regular graph's. ``k >= n - 1``
gives the complete graph, i.e. SecAgg.

Example:
    >>> import numpy as np
    >>> table = harary(np.arange(10, 20), 4, np.random.default_rng(0))
    >>> table.shape
    (10, 4)
    >>> all(10 + i in table[j - 10] for i in range(10) for j in table[i])  # symmetric
    True
"""

from __future__ import annotations

import math

import numpy as np


def degree(n: int, neighbours: int | str) -> int:
    """The number of neighbours of each of ``n`` clients: ``"log"`` for ``ceil(log2 n)``
    made even, ``"all"`` for ``n - 1`` (SecAgg), or a count; at most ``n - 1``.

    Example:
        >>> degree(100, "log"), degree(1000, "log"), degree(100, "all"), degree(5, 30)
        (8, 10, 99, 4)
    """
    if n <= 1:
        return 0
    if neighbours == "all":
        k = n - 1
    elif neighbours == "log":
        k = math.ceil(math.log2(n))
    else:
        k = int(neighbours)
    k += k % 2
    return min(k, n - 1)


def harary(members: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """The neighbours of each of ``members`` (row ``i`` for ``members[i]``), ``min(k, n-1)``
    of them, on ``H(k, n)`` over an order drawn from ``rng``; ``k`` even or ``>= n - 1``."""
    n = len(members)
    if k >= n - 1:
        rows = [np.delete(members, i) for i in range(n)]
        return np.array(rows, dtype=np.int64).reshape(n, max(n - 1, 0))
    if k % 2:
        raise ValueError(f"a Harary graph H(k, n) below the complete graph needs even k, got {k}")
    order = rng.permutation(n)
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    offsets = np.concatenate([np.arange(1, k // 2 + 1), -np.arange(1, k // 2 + 1)])
    ring = (position[:, None] + offsets[None, :]) % n
    return np.sort(np.asarray(members, dtype=np.int64)[order[ring]], axis=1)
