"""The pool engine: persistent worker processes on this machine, talking through shared memory.

Workers are forked once, when the engine is made, so each inherits the client program (task,
model, federation data: copy-on-write, nothing is rebuilt or pickled) and then lives for the
whole run. Each round:

1. the server writes a stage's shared message (the broadcast) once into a shared-memory slab
   that every worker reads;
2. the members are split into one shard per worker by cost (``worker.assign``); each
   worker's members' payloads and states go into that worker's input slab
   (``records.pack_job``);
3. each worker runs ``ClientProgram.run_stage`` on its shard (so every client gets exactly
   what the inline engine gives it: the same seeds, batches and steps) and writes the replies
   into its output slab (``records.pack_replies``);
4. over the pipe go only commands, slab layouts (names, dtypes, shapes, offsets) and scalars.

A process that has used CUDA is refused (``core.device.fork_problem``): PyTorch's autograd
does not run in workers forked after CUDA's threads started, even on CPU.

A slab that is too small is replaced by a larger one (the worker says how large). A worker
that raises reports its traceback; a worker that dies is reported with its exit code and
clients, and the engine is then closed. Workers use ``threads`` torch threads each (1 by
default: one process per core parallelises small models far better than intra-op threads).

A worker never outlives the engine's process: it closes the parent ends of the pipes it
inherited (its own and earlier workers'), so when the parent dies an idle worker reads EOF and
exits. On Linux, when the engine is made on the main thread (the kernel signals when the forking
thread ends), each worker also asks for SIGKILL on its parent's death (``prctl``
``PR_SET_PDEATHSIG``, then exits at once if the parent is already gone), which stops a busy one.

Example:
    >>> import numpy as np
    >>> import torch
    >>> from potluck.algorithms import fedavg
    >>> from potluck.client import ClientProgram
    >>> from potluck.core.message import Message
    >>> from potluck.core.records import StageJob
    >>> from potluck.core.task import Task
    >>> from potluck.data import Federation
    >>> fed = Federation.from_client_data([(torch.randn(8, 2), torch.arange(8) % 2)] * 3)
    >>> program = ClientProgram(Task(lambda: torch.nn.Linear(2, 2)), fed, fedavg())
    >>> engine = PoolEngine(program, workers=2)
    >>> job = StageJob("train", 1, Message({"w": torch.zeros(6)}), np.array([0, 2]),
    ...                (Message(), Message()), ({}, {}))
    >>> [r.message.scalars["num_steps"] for r in engine.run_stage(job)]
    [1, 1]
    >>> engine.close()
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import multiprocessing as mp
import os
import signal
import sys
import threading
import traceback
from collections.abc import Mapping
from multiprocessing.connection import Connection, wait
from typing import Any, NoReturn

import numpy as np
import torch
import torch.multiprocessing  # registers shared-tensor pickling for the pipes

from potluck.client.program import EVAL_BATCH, ClientProgram, EvalResult
from potluck.core.device import fork_problem
from potluck.core.message import Message
from potluck.core.records import (
    Packed,
    Reply,
    StageJob,
    pack_job,
    pack_replies,
    unpack_job,
    unpack_replies,
)
from potluck.engines.worker import gather, shards

_ALIGN = 64
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
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
        if (unforkable := fork_problem()) is not None:
            raise ValueError(
                f"engine 'pool' forks its workers, and {unforkable}; use engine = \"inline\" "
                'or "vectorized" here, or start the pool in a fresh process'
            )
        self.program = program
        self.workers = workers or usable_cores()
        if self.workers < 1 or threads < 1:
            raise ValueError(f"pool: workers and threads must be >= 1, got {workers}, {threads}")
        d = program.spec.size
        self._global = Slab(_aligned(4 * d) * 4)
        self._inputs = [Slab(_ALIGN) for _ in range(self.workers)]
        self._outputs = [Slab(_aligned(4 * d) * 4) for _ in range(self.workers)]
        ctx = mp.get_context("fork")  # workers inherit the program: nothing to rebuild
        # the kernel's parent-death signal follows the forking thread: only the main one lives
        # as long as the process
        origin = (os.getpid(), threading.current_thread() is threading.main_thread())
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        for i in range(self.workers):
            parent, child = ctx.Pipe()
            slabs = {"global": self._global, "in": self._inputs[i], "out": self._outputs[i]}
            inherited = (*self._conns, parent)  # parent ends the fork copies into the worker
            proc = ctx.Process(
                target=_worker,
                args=(child, inherited, origin, program, threads, slabs),
                name=f"potluck-pool-{i}",
                daemon=True,
            )
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        self._closed = False

    # ---- the Engine protocol ----

    def run_stage(self, job: StageJob) -> list[Reply | None]:
        parts = self._shards(self.program.cost(job))
        self._put_global(job.shared.arrays)
        for i, positions in parts.items():
            packed = pack_job(job.subset(positions))
            layout = self._write_input(i, packed.tensors)
            members = (job.clients[positions], packed.scalars)
            self._send(
                i, ("stage", job.stage, job.round, dict(job.shared.scalars), layout, members)
            )
        replies = self._collect(_described(parts, job.clients))
        return gather([replies[i] for i in parts], list(parts.values()), len(job.clients))

    def evaluate_test(self, w: torch.Tensor, rows: np.ndarray | None = None) -> EvalResult:
        """The centralised evaluation split over the workers at multiples of the evaluation
        batch (so every batch is the one ``ClientProgram.evaluate_test`` would form); on the
        test ``rows`` if given."""
        n = len(self.program.federation.source.test) if rows is None else len(rows)
        batches = math.ceil(n / EVAL_BATCH)
        per = math.ceil(batches / self.workers) * EVAL_BATCH  # rows per worker
        spans = {i: (i * per, min(n, (i + 1) * per)) for i in range(self.workers) if i * per < n}
        if not spans:
            return self.program.evaluate_test(w, rows)
        self._put_global({"w": w})
        for i, (start, stop) in spans.items():
            part = slice(start, stop) if rows is None else rows[start:stop]
            self._send(i, ("central", part))
        replies = self._collect({i: f"test rows {a}:{b}" for i, (a, b) in spans.items()})
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
        return shards(costs, self.workers)

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

    def _write_input(self, i: int, tensors: Mapping[str, torch.Tensor]) -> Layout:
        layout = self._inputs[i].write(tensors)
        if layout is None:
            self._inputs[i] = Slab(Slab.required(tensors) * 2)
            self._send(i, ("slab", "in", self._inputs[i].buf))
            layout = self._inputs[i].write(tensors)
        assert layout is not None
        return layout

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
        return unpack_replies(self._outputs[i].read(layout), scalars)

    def _fail(self, i: int, during: str) -> NoReturn:
        proc = self._procs[i]
        proc.join(timeout=1)
        code = proc.exitcode
        self.close()
        raise PoolError(
            f"pool worker {i} (pid {proc.pid}) exited with code {code} {during}; the run "
            "stops here and can be resumed from its last checkpoint"
        )


def _worker(
    conn: Connection,
    inherited: tuple[Connection, ...],
    origin: tuple[int, bool],
    program: ClientProgram,
    threads: int,
    slabs: dict[str, Slab],
) -> None:
    """A worker's entry: tie its life to the parent's (``origin``: the parent's pid, and
    whether it forked from its main thread), then serve."""
    for end in inherited:  # else the worker holds its own pipe open and never reads EOF
        end.close()
    parent_pid, main_thread = origin
    if main_thread:
        _die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before the worker could ask
        return
    _serve(conn, program, threads, slabs)


def _die_with_parent() -> None:
    """Ask the kernel (Linux only) to SIGKILL this process when its parent dies."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # no libc or no prctl: EOF still works
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def _serve(conn: Connection, program: ClientProgram, threads: int, slabs: dict[str, Slab]) -> None:
    """A worker's loop: commands in, results out through the slabs, until "stop"."""
    torch.set_num_threads(threads)
    layouts: dict[str, Any] = {}
    pending: Packed | None = None
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
            elif op == "stage":
                _, stage, rnd, shared_scalars, layout, (clients, scalars) = msg
                shared = Message(slabs["global"].read(layouts["global"]), shared_scalars)
                packed = Packed(slabs["in"].read(layout), scalars)
                job = unpack_job(stage, rnd, shared, clients, packed)
                pending = Packed(*pack_replies(program.run_stage(job)))
                _reply(conn, slabs["out"], pending)
            elif op == "fetch":
                assert pending is not None
                _reply(conn, slabs["out"], pending)
            elif op == "central":
                w = slabs["global"].read(layouts["global"])["w"]
                conn.send(("evaluated", program.evaluate_test(w, msg[1])))
            else:
                raise ValueError(f"unknown command {op!r}")
        except Exception:
            try:
                conn.send(("error", traceback.format_exc()))
            except (BrokenPipeError, ConnectionResetError):  # the engine is gone
                return


def _reply(conn: Connection, out: Slab, packed: Packed) -> None:
    layout = out.write(packed.tensors)
    if layout is None:
        conn.send(("grow", Slab.required(packed.tensors) * 5 // 4))
    else:
        conn.send(("done", packed.scalars, layout))
