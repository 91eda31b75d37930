"""The Ray engine: the pool engine's worker protocol on Ray actors, for a cluster.

``potluck run exp.toml --engine ray --ray-address ray://head:10001`` trains on an existing
Ray cluster (every node needs potluck and the task's code installed); without an address a
local Ray is started for the run and stopped after it. Ray is the scale-out path: potluck
builds no cluster manager of its own.

- The client program (task, model, federation) is put in Ray's object store once; each
  actor (one CPU each, ``workers`` of them, default one per CPU of the cluster) builds
  nothing else and keeps it for the run.
- Each stage's shared message (the broadcast) goes into the object store once (actors on
  the same node read it without copying); the members are split by cost as in the pool
  engine (``worker.assign``) and each actor runs ``ClientProgram.run_stage`` on its shard,
  so clients get exactly what the inline engine gives them.
- Jobs and replies travel packed by ``potluck.core.records`` (scalars plus one mapping of
  numpy arrays, which Ray keeps in shared memory), never as pickled messages.

Example (needs ``pip install "potluck[ray]"``; starts a local Ray):
    >>> engine = RayEngine(program, EngineOptions(workers=2))  # doctest: +SKIP
    >>> replies = engine.run_stage(job)  # doctest: +SKIP
    >>> engine.close()  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from potluck.client.program import ClientProgram, EvalResult
from potluck.core.message import Message, Scalar
from potluck.core.records import (
    Packed,
    Reply,
    StageJob,
    pack_job,
    pack_replies,
    unpack_job,
    unpack_replies,
)
from potluck.engines.base import EngineOptions
from potluck.engines.worker import gather, shards

Arrays = dict[str, np.ndarray]


class RayEngineError(RuntimeError):
    """A Ray actor failed or died."""


_BF16 = "\x00bfloat16"  # NumPy has no bfloat16: such arrays travel as int16 bits


def _to_numpy(tensors: Mapping[str, torch.Tensor]) -> Arrays:
    out: Arrays = {}
    for k, t in tensors.items():
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            out[k + _BF16] = t.view(torch.int16).numpy()
        else:
            out[k] = t.numpy()
    return out


def _to_torch(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    out = {}
    for k, a in arrays.items():
        t = torch.tensor(a)  # a copy: Ray's arrays are read-only
        if k.endswith(_BF16):
            out[k.removesuffix(_BF16)] = t.view(torch.bfloat16)
        else:
            out[k] = t
    return out


class RayWorker:
    """What one actor runs: the client program on shards of a stage."""

    def __init__(self, program: ClientProgram, threads: int) -> None:
        torch.set_num_threads(threads)
        self.program = program

    def run_stage(
        self,
        stage: str,
        round: int,
        shared: tuple[Arrays, dict[str, Scalar]],
        clients: np.ndarray,
        packed: tuple[Arrays, list[dict[str, Scalar]]],
    ) -> tuple[Arrays, list[dict[str, Scalar]]]:
        message = Message(_to_torch(shared[0]), shared[1])
        job = unpack_job(stage, round, message, clients, Packed(_to_torch(packed[0]), packed[1]))
        tensors, scalars = pack_replies(self.program.run_stage(job))
        return _to_numpy(tensors), scalars


class RayEngine:
    """Ray actors running the client program; a local Ray unless ``ray_address`` is given."""

    name = "ray"
    remote = False

    def __init__(self, program: ClientProgram, options: EngineOptions | None = None) -> None:
        import ray

        opts = options or EngineOptions()
        self.program = program
        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # CPU only: quiet
            ray.init(
                address=opts.ray_address,
                num_cpus=None if opts.ray_address else opts.workers,
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=True,
            )
        self.workers = opts.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        threads = opts.per_worker_threads(self.workers) if not opts.ray_address else 1
        actor = ray.remote(num_cpus=1)(RayWorker)
        program_ref = ray.put(program)
        self._actors: list[Any] = [actor.remote(program_ref, threads) for _ in range(self.workers)]
        self._closed = False

    def run_stage(self, job: StageJob) -> list[Reply | None]:
        parts = self._shards(self.program.cost(job))
        shared = self._ray.put((_to_numpy(job.shared.arrays), dict(job.shared.scalars)))
        calls = {}
        for i, positions in parts.items():
            packed = pack_job(job.subset(positions))
            calls[i] = self._actors[i].run_stage.remote(
                job.stage,
                job.round,
                shared,
                job.clients[positions],
                (_to_numpy(packed.tensors), packed.scalars),
            )
        replies = self._get(calls, job.clients, parts)
        unpacked = [unpack_replies(_to_torch(t), s) for t, s in replies]
        return gather(unpacked, list(parts.values()), len(job.clients))

    def evaluate_test(self, w: torch.Tensor, rows: np.ndarray | None = None) -> EvalResult:
        """Centralised evaluation in this process."""
        return self.program.evaluate_test(w, rows)

    def close(self) -> None:
        """Release the actors; stop Ray if this engine started it (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors = []
        if self._started:
            self._ray.shutdown()

    def _shards(self, costs: list[int]) -> dict[int, np.ndarray]:
        if self._closed:
            raise RayEngineError("the Ray engine is closed")
        return shards(costs, self.workers)

    def _get(
        self, calls: Mapping[int, Any], cohort: np.ndarray, shards: Mapping[int, np.ndarray]
    ) -> list[Any]:
        try:
            return list(self._ray.get(list(calls.values())))
        except self._ray.exceptions.RayError as exc:
            clients = {i: cohort[shards[i]].tolist() for i in calls}
            self.close()
            raise RayEngineError(
                f"a Ray actor failed while handling clients {clients}: {exc}"
            ) from exc
