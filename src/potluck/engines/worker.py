"""The worker protocol shared by the engines that train a cohort in other processes (``pool``
on this machine, ``ray`` on a cluster).

A round's cohort is split into one shard per worker by estimated cost (local steps), each
worker runs ``ClientProgram.run_round`` on its shard, and the results are put back in cohort
order. Results travel as plain records: a list of per-client scalars (small, sent as is) and
one flat ``name -> tensor`` mapping (large, moved through shared memory or an object store),
never as pickled messages.

Example:
    >>> [s.tolist() for s in assign([5, 1, 4, 2], 2)]
    [[0, 1], [2, 3]]
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from potluck.client.program import ClientProgram, ClientResult, RoundInput
from potluck.client.rules import Tensors
from potluck.core.message import Message

T = TypeVar("T")
_SEP = "/"


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


def shard_job(job: RoundInput, positions: np.ndarray) -> RoundInput:
    """The part of ``job`` for the cohort members at ``positions``."""
    return RoundInput(
        job.round,
        job.w,
        job.cohort[positions],
        job.broadcast,
        tuple(job.states[int(p)] for p in positions),
        job.work[positions],
    )


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


def cohort_costs(program: ClientProgram, job: RoundInput) -> list[int]:
    """Estimated cost of each cohort member: its local steps (at least 1 for evaluation)."""
    pairs = zip(job.cohort, job.work, strict=True)
    return [max(1, program.steps_for(int(c), float(w))) for c, w in pairs]


# ---- records: results and states as (small scalars, one flat tensor mapping) ----------------


@dataclass(frozen=True)
class Records:
    """Per-item scalars (small) and all items' tensors in one flat mapping (large)."""

    scalars: list[dict[str, int | float | str]]
    tensors: dict[str, torch.Tensor]


def pack_states(states: Sequence[Tensors]) -> dict[str, torch.Tensor]:
    """Client states as one flat mapping ``"k/name"``.

    Example:
        >>> sorted(pack_states([{"c": torch.zeros(2)}, {}]))
        ['0/c']
    """
    return {f"{k}{_SEP}{name}": t for k, state in enumerate(states) for name, t in state.items()}


def unpack_states(tensors: Mapping[str, torch.Tensor], n: int) -> tuple[Tensors, ...]:
    """Inverse of ``pack_states`` for ``n`` clients."""
    states: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for key, t in tensors.items():
        k, name = key.split(_SEP, 1)
        states[int(k)][name] = t
    return tuple(states)


def pack_results(results: Sequence[ClientResult]) -> Records:
    """Client results as records: message arrays under ``"k/m/name"``, states ``"k/s/name"``."""
    tensors: dict[str, torch.Tensor] = {}
    for k, res in enumerate(results):
        tensors.update({f"{k}{_SEP}m{_SEP}{n}": t for n, t in res.message.arrays.items()})
        tensors.update({f"{k}{_SEP}s{_SEP}{n}": t for n, t in res.state.items()})
    return Records([dict(r.message.scalars) for r in results], tensors)


def unpack_results(records: Records) -> list[ClientResult]:
    """Inverse of ``pack_results``."""
    n = len(records.scalars)
    arrays: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    states: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for key, t in records.tensors.items():
        k, kind, name = key.split(_SEP, 2)
        (arrays if kind == "m" else states)[int(k)][name] = t
    return [
        ClientResult(Message(arrays=a, scalars=s), st)
        for a, s, st in zip(arrays, records.scalars, states, strict=True)
    ]
