"""What the engines that run a stage in other processes share (``pool`` on this machine,
``ray`` on a cluster): how a stage's members are split among workers, and put back.

A stage's members are split into one shard per worker by estimated cost (local steps for
``train``, ``ClientProgram.cost``), each worker runs ``ClientProgram.run_stage`` on its
shard, and the replies are put back in member order. Jobs and replies travel packed by
``potluck.core.records`` (named tensors plus per-member scalars), never as pickled
messages.

Example:
    >>> [s.tolist() for s in assign([5, 1, 4, 2], 2)]
    [[0, 1], [2, 3]]
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


def assign(costs: Sequence[int], workers: int) -> list[np.ndarray]:
    """Cohort positions per worker: longest processing time first, each to the least loaded
    worker (Graham 1969, within 4/3 of the best makespan); positions ascending per worker.

    Example:
        >>> [s.tolist() for s in assign([3, 3, 2, 2, 2], 2)]
        [[0, 2, 4], [1, 3]]
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    loads = [(0, w) for w in range(workers)]
    shards: list[list[int]] = [[] for _ in range(workers)]
    for pos in sorted(range(len(costs)), key=lambda p: (-costs[p], p)):
        load, w = heapq.heappop(loads)
        shards[w].append(pos)
        heapq.heappush(loads, (load + costs[pos], w))
    return [np.array(sorted(s), dtype=np.int64) for s in shards]


def gather(parts: Sequence[Sequence[T]], shards: Sequence[np.ndarray], n: int) -> list[T]:
    """Put per-shard results back in cohort order.

    Example:
        >>> gather([["a", "c"], ["b"]], [np.array([0, 2]), np.array([1])], 3)
        ['a', 'b', 'c']
    """
    out: list[Any] = [None] * n
    for part, positions in zip(parts, shards, strict=True):
        if len(part) != len(positions):
            raise RuntimeError(f"a worker returned {len(part)} results for {len(positions)}")
        for result, pos in zip(part, positions, strict=True):
            out[int(pos)] = result
    return out


def shards(costs: Sequence[int], workers: int) -> dict[int, np.ndarray]:
    """Worker -> member positions, for the workers that get any (``assign``)."""
    return {i: s for i, s in enumerate(assign(costs, workers)) if len(s)}
