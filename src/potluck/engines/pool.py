"""The pool engine: persistent worker processes on this machine, talking through shared memory.

Workers are forked once, when the engine is made, so each inherits the client program (task,
model, federation data: copy-on-write, nothing is rebuilt or pickled) and then lives for the
whole run. Each round:

1. the server writes the global weights and the broadcast once into a shared-memory slab that
   every worker reads;
2. the cohort is split into one shard per worker by local steps (``worker.assign``); each
   worker's clients' states go into that worker's input slab;
3. each worker runs ``ClientProgram.run_round`` on its shard (so every client gets exactly what
   the inline engine gives it: the same seeds, batches and steps) and writes the encoded uploads
   and new states into its output slab;
4. over the pipe go only commands, slab layouts (names, dtypes, shapes, offsets) and scalars.

A slab that is too small is replaced by a larger one (the worker says how large). A worker
that raises reports its traceback; a worker that dies is reported with its exit code and
clients, and the engine is then closed. Workers use ``threads`` torch threads each (1 by
default: one process per core parallelises small models far better than intra-op threads).

Example:
    >>> import numpy as np
    >>> import torch
    >>> from potluck.client import ClientProgram, LocalSGD
    >>> from potluck.client.program import RoundInput
    >>> from potluck.core.task import Task
    >>> from potluck.data import Federation
    >>> fed = Federation.from_client_data([(torch.randn(8, 2), torch.arange(8) % 2)] * 3)
    >>> program = ClientProgram(Task(lambda: torch.nn.Linear(2, 2)), fed, LocalSGD())
    >>> engine = PoolEngine(program, workers=2)
    >>> job = RoundInput(1, torch.zeros(6), np.array([0, 2]), {}, ({}, {}), np.ones(2))
    >>> [r.message.scalars["num_steps"] for r in engine.train(job)]
    [1, 1]
    >>> engine.close()
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import traceback
from collections.abc import Mapping
from multiprocessing.connection import Connection, wait
from typing import Any, NoReturn

import numpy as np
import torch
import torch.multiprocessing  # registers shared-tensor pickling for the pipes

from potluck.client.program import (
    EVAL_BATCH,
    ClientProgram,
    ClientResult,
    EvalResult,
    RoundInput,
)
from potluck.client.rules import Tensors
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

_ALIGN = 64
Layout = tuple[tuple[str, str, tuple[int, ...], int], ...]


def usable_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Slab:
    """A shared-memory byte buffer holding named tensors at aligned offsets.

    Example:
        >>> slab = Slab(1024)
        >>> layout = slab.write({"w": torch.arange(3.0), "n": torch.tensor(7)})
        >>> slab.read(layout)["w"].tolist()
        [0.0, 1.0, 2.0]
        >>> slab.write({"big": torch.zeros(1000)}) is None  # does not fit
        True
    """

    def __init__(self, nbytes: int, buf: torch.Tensor | None = None) -> None:
        self.buf = buf if buf is not None else torch.empty(nbytes, dtype=torch.uint8)
        if buf is None:
            self.buf.share_memory_()

    @property
    def nbytes(self) -> int:
        return self.buf.numel()

    @staticmethod
    def required(tensors: Mapping[str, torch.Tensor]) -> int:
        """Bytes ``tensors`` take in a slab."""
        return sum(_aligned(t.numel() * t.element_size()) for t in tensors.values())

    def write(self, tensors: Mapping[str, torch.Tensor]) -> Layout | None:
        """Copy ``tensors`` in; their layout, or None if they do not fit."""
        if self.required(tensors) > self.nbytes:
            return None
        layout, offset = [], 0
        for name, t in tensors.items():
            flat = t.detach().contiguous().reshape(-1)
            size = flat.numel() * flat.element_size()
            self.buf[offset : offset + size].copy_(flat.view(torch.uint8))
            layout.append((name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset))
            offset += _aligned(size)
        return tuple(layout)

    def read(self, layout: Layout) -> dict[str, torch.Tensor]:
        """Copies of the tensors at ``layout``."""
        out = {}
        for name, dtype_name, shape, offset in layout:
            dtype = getattr(torch, dtype_name)
            size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            raw = self.buf[offset : offset + size]
            out[name] = raw.view(dtype).reshape(shape).clone()
        return out


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _described(shards: Mapping[int, np.ndarray], cohort: np.ndarray) -> dict[int, str]:
    return {i: f"clients {cohort[positions].tolist()}" for i, positions in shards.items()}


class PoolError(RuntimeError):
    """A pool worker failed (raised, or died)."""


class PoolEngine:
    """Persistent forked workers, one per core by default, exchanging tensors in shared memory."""

    name = "pool"
    remote = False

    def __init__(self, program: ClientProgram, workers: int | None = None, threads: int = 1):
        self.program = program
        self.workers = workers or usable_cores()
        if self.workers < 1 or threads < 1:
            raise ValueError(f"pool: workers and threads must be >= 1, got {workers}, {threads}")
        d = program.spec.size
        self._global = Slab(_aligned(4 * d) * 4)
        self._inputs = [Slab(_ALIGN) for _ in range(self.workers)]
        self._outputs = [Slab(_aligned(4 * d) * 4) for _ in range(self.workers)]
        ctx = mp.get_context("fork")  # workers inherit the program: nothing to rebuild
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        for i in range(self.workers):
            parent, child = ctx.Pipe()
            slabs = {"global": self._global, "in": self._inputs[i], "out": self._outputs[i]}
            proc = ctx.Process(
                target=_serve,
                args=(child, program, threads, slabs),
                name=f"potluck-pool-{i}",
                daemon=True,
            )
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        self._closed = False

    # ---- the Engine protocol ----

    def train(self, job: RoundInput) -> list[ClientResult]:
        shards = self._shards(cohort_costs(self.program, job))
        self._put_global({"w": job.w, **job.broadcast})
        for i, positions in shards.items():
            part = shard_job(job, positions)
            self._send_states(i, part.states)
            self._send(i, ("train", part.round, part.cohort, part.work))
        replies = self._collect(_described(shards, job.cohort))
        parts = [unpack_results(replies[i]) for i in shards]
        return gather(parts, list(shards.values()), len(job.cohort))

    def evaluate(
        self, clients: np.ndarray, w: torch.Tensor, states: tuple[Tensors, ...]
    ) -> list[dict[str, EvalResult]]:
        shards = self._shards([1] * len(clients))
        self._put_global({"w": w})
        for i, positions in shards.items():
            self._send_states(i, tuple(states[int(p)] for p in positions))
            self._send(i, ("evaluate", clients[positions]))
        replies = self._collect(_described(shards, clients))
        return gather([replies[i] for i in shards], list(shards.values()), len(clients))

    def evaluate_test(self, w: torch.Tensor) -> EvalResult:
        """The centralised evaluation split over the workers at multiples of the evaluation
        batch (so every batch is the one ``ClientProgram.evaluate_test`` would form)."""
        n = len(self.program.federation.source.test)
        batches = math.ceil(n / EVAL_BATCH)
        per = math.ceil(batches / self.workers) * EVAL_BATCH  # rows per worker
        rows = {i: (i * per, min(n, (i + 1) * per)) for i in range(self.workers) if i * per < n}
        if not rows:
            return self.program.evaluate_test(w)
        self._put_global({"w": w})
        for i, (start, stop) in rows.items():
            self._send(i, ("central", start, stop))
        replies = self._collect({i: f"test rows {a}:{b}" for i, (a, b) in rows.items()})
        parts: list[EvalResult] = list(replies.values())
        return EvalResult(
            sum(p.loss_sum for p in parts), sum(p.correct for p in parts), sum(p.n for p in parts)
        )

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for conn, proc in zip(self._conns, self._procs, strict=True):
            with contextlib.suppress(BrokenPipeError, OSError):
                conn.send(("stop",))
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
            conn.close()

    def __del__(self) -> None:  # a forgotten close must not leave processes behind
        if not getattr(self, "_closed", True):
            self.close()

    # ---- internals ----

    def _shards(self, costs: list[int]) -> dict[int, np.ndarray]:
        if self._closed:
            raise PoolError("the pool engine is closed")
        shards = assign(costs, self.workers)
        return {i: s for i, s in enumerate(shards) if len(s)}

    def _send(self, i: int, msg: tuple[Any, ...]) -> None:
        try:
            self._conns[i].send(msg)
        except (BrokenPipeError, OSError):
            self._fail(i, "while receiving work")

    def _put_global(self, tensors: Mapping[str, torch.Tensor]) -> None:
        layout = self._global.write(tensors)
        if layout is None:
            self._global = Slab(Slab.required(tensors) * 2)
            for i in range(self.workers):
                self._send(i, ("slab", "global", self._global.buf))
            layout = self._global.write(tensors)
        for i in range(self.workers):
            self._send(i, ("global", layout))

    def _send_states(self, i: int, states: tuple[Tensors, ...]) -> None:
        tensors = pack_states(states)
        layout = self._inputs[i].write(tensors)
        if layout is None:
            self._inputs[i] = Slab(Slab.required(tensors) * 2)
            self._send(i, ("slab", "in", self._inputs[i].buf))
            layout = self._inputs[i].write(tensors)
        self._send(i, ("states", layout, len(states)))

    def _collect(self, work: Mapping[int, str]) -> dict[int, Any]:
        """Wait for every busy worker's reply (``work``: worker -> what it handles, for error
        messages), growing output slabs on request."""
        replies: dict[int, Any] = {}
        while len(replies) < len(work):
            busy = [i for i in work if i not in replies]
            conns = {id(self._conns[i]): i for i in busy}
            sentinels = {self._procs[i].sentinel: i for i in busy}
            for ready in wait([*(self._conns[i] for i in busy), *sentinels]):
                i = sentinels[ready] if isinstance(ready, int) else conns[id(ready)]
                if i in replies:
                    continue
                during = f"while handling {work[i]}"
                if isinstance(ready, int) and not self._conns[i].poll():
                    self._fail(i, during)  # exited without a reply
                try:
                    reply = self._conns[i].recv()
                except EOFError:
                    self._fail(i, during)
                if reply[0] == "error":
                    self.close()
                    raise PoolError(f"pool worker {i} raised:\n{reply[1]}")
                if reply[0] == "grow":
                    self._outputs[i] = Slab(reply[1])
                    self._send(i, ("slab", "out", self._outputs[i].buf))
                    self._send(i, ("fetch",))
                else:
                    replies[i] = self._decode(i, reply)
        return replies

    def _decode(self, i: int, reply: tuple[Any, ...]) -> Any:
        if reply[0] == "evaluated":
            return reply[1]
        _, scalars, layout = reply
        return Records(scalars, self._outputs[i].read(layout))

    def _fail(self, i: int, during: str) -> NoReturn:
        proc = self._procs[i]
        proc.join(timeout=1)
        code = proc.exitcode
        self.close()
        raise PoolError(
            f"pool worker {i} (pid {proc.pid}) exited with code {code} {during}; the run "
            "stops here and can be resumed from its last checkpoint"
        )


def _serve(conn: Connection, program: ClientProgram, threads: int, slabs: dict[str, Slab]) -> None:
    """A worker's loop: commands in, results out through the slabs, until "stop"."""
    torch.set_num_threads(threads)
    layouts: dict[str, Any] = {}
    pending: Records | None = None
    while True:
        try:
            msg = conn.recv()
        except EOFError:  # the engine is gone
            return
        op = msg[0]
        try:
            if op == "stop":
                return
            if op == "slab":
                slabs[msg[1]] = Slab(0, buf=msg[2])
            elif op == "global":
                layouts["global"] = msg[1]
            elif op == "states":
                layouts["states"] = (msg[1], msg[2])
            elif op == "train":
                g = slabs["global"].read(layouts["global"])
                w = g.pop("w")
                layout, n = layouts["states"]
                states = unpack_states(slabs["in"].read(layout), n)
                job = RoundInput(msg[1], w, msg[2], g, states, msg[3])
                pending = pack_results(program.run_round(job))
                _reply(conn, slabs["out"], pending)
            elif op == "fetch":
                assert pending is not None
                _reply(conn, slabs["out"], pending)
            elif op == "central":
                w = slabs["global"].read(layouts["global"])["w"]
                conn.send(("evaluated", program.evaluate_test(w, slice(msg[1], msg[2]))))
            elif op == "evaluate":
                w = slabs["global"].read(layouts["global"])["w"]
                layout, n = layouts["states"]
                states = unpack_states(slabs["in"].read(layout), n)
                conn.send(("evaluated", program.evaluate_clients(msg[1], w, states)))
            else:
                raise ValueError(f"unknown command {op!r}")
        except Exception:
            conn.send(("error", traceback.format_exc()))


def _reply(conn: Connection, out: Slab, records: Records) -> None:
    layout = out.write(records.tensors)
    if layout is None:
        conn.send(("grow", Slab.required(records.tensors) * 5 // 4))
    else:
        conn.send(("done", records.scalars, layout))
