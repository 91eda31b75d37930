"""The Ray engine: the pool engine's worker protocol on Ray actors, for a cluster.

``potluck run exp.toml --engine ray --ray-address ray://head:10001`` trains on an existing
Ray cluster (every node needs potluck and the task's code installed); without an address a
local Ray is started for the run and stopped after it. Ray is the scale-out path: potluck
builds no cluster manager of its own.

- The client program (task, model, federation) is put in Ray's object store once; each
  actor (one CPU each, ``workers`` of them, default one per CPU of the cluster) builds
  nothing else and keeps it for the run.
- Each round the global weights and the broadcast go into the object store once (actors on
  the same node read them without copying); the cohort is split by local steps as in the pool
  engine (``worker.assign``) and each actor runs ``ClientProgram.run_round`` on its shard, so
  clients get exactly what the inline engine gives them.
- Results come back as records (scalars plus one mapping of numpy arrays, which Ray keeps
  in shared memory), never as pickled messages.

Example (needs ``pip install "potluck[ray]"``; starts a local Ray):
    >>> engine = RayEngine(program, EngineOptions(workers=2))  # doctest: +SKIP
    >>> results = engine.train(job)  # doctest: +SKIP
    >>> engine.close()  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from potluck.client.program import ClientProgram, ClientResult, EvalResult, RoundInput
from potluck.client.rules import Tensors
from potluck.engines.base import EngineOptions
from potluck.engines.worker import (
    Records,
    assign,
    cohort_costs,
    gather,
    pack_results,
    pack_states,
    shard_job,
    unpack_results,
    unpack_states,
)

Arrays = dict[str, np.ndarray]


class RayEngineError(RuntimeError):
    """A Ray actor failed or died."""


def _to_numpy(tensors: Mapping[str, torch.Tensor]) -> Arrays:
    return {k: t.detach().cpu().numpy() for k, t in tensors.items()}


def _to_torch(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(a) for k, a in arrays.items()}  # copies: Ray's arrays are read-only


class RayWorker:
    """What one actor runs: the client program on shards of a cohort."""

    def __init__(self, program: ClientProgram, threads: int) -> None:
        torch.set_num_threads(threads)
        self.program = program

    def train(
        self,
        round: int,
        shared: Arrays,
        cohort: np.ndarray,
        states: Arrays,
        work: np.ndarray,
    ) -> tuple[list[dict[str, int | float | str]], Arrays]:
        g = _to_torch(shared)
        w = g.pop("w")
        job = RoundInput(round, w, cohort, g, unpack_states(_to_torch(states), len(cohort)), work)
        records = pack_results(self.program.run_round(job))
        return records.scalars, _to_numpy(records.tensors)

    def evaluate(
        self, clients: np.ndarray, shared: Arrays, states: Arrays
    ) -> list[dict[str, EvalResult]]:
        w = torch.tensor(shared["w"])
        return self.program.evaluate_clients(
            clients, w, unpack_states(_to_torch(states), len(clients))
        )


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

    def train(self, job: RoundInput) -> list[ClientResult]:
        shards = self._shards(cohort_costs(self.program, job))
        shared = self._ray.put(_to_numpy({"w": job.w, **job.broadcast}))
        calls = {}
        for i, positions in shards.items():
            part = shard_job(job, positions)
            states = _to_numpy(pack_states(part.states))
            calls[i] = self._actors[i].train.remote(
                part.round, shared, part.cohort, states, part.work
            )
        replies = self._get(calls, job.cohort, shards)
        parts = [unpack_results(Records(s, _to_torch(t))) for s, t in replies]
        return gather(parts, list(shards.values()), len(job.cohort))

    def evaluate(
        self, clients: np.ndarray, w: torch.Tensor, states: tuple[Tensors, ...]
    ) -> list[dict[str, EvalResult]]:
        shards = self._shards([1] * len(clients))
        shared = self._ray.put(_to_numpy({"w": w}))
        calls = {}
        for i, positions in shards.items():
            part_states = _to_numpy(pack_states(tuple(states[int(p)] for p in positions)))
            calls[i] = self._actors[i].evaluate.remote(clients[positions], shared, part_states)
        return gather(self._get(calls, clients, shards), list(shards.values()), len(clients))

    def evaluate_test(self, w: torch.Tensor) -> EvalResult:
        """Centralised evaluation in this process."""
        return self.program.evaluate_test(w)

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
        return {i: s for i, s in enumerate(assign(costs, self.workers)) if len(s)}

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
