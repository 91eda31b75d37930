"""Pool workers never outlive the engine's process (issue 13, finding 7).

Each worker closes the parent ends of the pipes it inherited, so it reads EOF when the parent
dies; on Linux it also has the kernel SIGKILL it then (``PR_SET_PDEATHSIG``), which stops a
worker that is busy in a client's training. The deadlines here are generous bounds on
existence, not on speed.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from potluck.algorithms import fedavg
from potluck.client import ClientProgram
from potluck.core.task import Task
from potluck.data import Federation
from potluck.engines.pool import PoolEngine, _worker

DEADLINE = 10.0  # seconds for a worker to be gone

# A parent that makes a 2-worker pool, runs one stage, prints its workers' pids and waits. With
# a folder argument it then creates ``go`` there and runs a second stage whose loss never
# returns; each worker touches a file named by its pid in the folder when it is stuck inside.
PARENT = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import numpy as np
    import torch
    from potluck.algorithms import fedavg
    from potluck.client import ClientProgram
    from potluck.core.message import Message
    from potluck.core.records import StageJob
    from potluck.core.task import Task
    from potluck.data import Federation
    from potluck.engines.pool import PoolEngine

    busy = Path(sys.argv[1]) if len(sys.argv) > 1 else None

    def loss(logits, y):
        if busy is not None and (busy / "go").exists():
            (busy / str(os.getpid())).touch()
            time.sleep(300)  # only a signal ends this worker now
        return torch.nn.functional.cross_entropy(logits, y)

    fed = Federation.from_client_data([(torch.randn(8, 2), torch.arange(8) % 2)] * 4)
    program = ClientProgram(Task(lambda: torch.nn.Linear(2, 2), loss_fn=loss), fed, fedavg())
    engine = PoolEngine(program, workers=2)
    job = StageJob("train", 1, Message({"w": program.initial_weights()}),
                   np.array([0, 1, 2, 3]), (Message(),) * 4, ({},) * 4)
    assert all(r is not None for r in engine.run_stage(job))
    print(" ".join(str(p.pid) for p in engine._procs), flush=True)
    if busy is not None:
        (busy / "go").touch()
        engine.run_stage(job)
    time.sleep(300)
    """
)


def _state(pid: int) -> str | None:
    """The process's state letter, or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:  # no /proc here: ask the kernel whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return "?"
    return stat.rsplit(")", 1)[1].split()[0]


def _alive(pid: int) -> bool:
    return _state(pid) not in (None, "Z", "X")  # an unreaped orphan is a zombie: it is gone


def _wait_gone(pids: list[int]) -> list[int]:
    """The pids still alive after the deadline."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _orphans(*args: str) -> tuple[subprocess.Popen[str], list[int]]:
    """Start the parent script; it and its workers' pids once it has run its first stage."""
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, *args], stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    line = parent.stdout.readline()  # blocks until the first stage is done (or the script died)
    if not line:
        parent.kill()
        parent.wait()
        pytest.fail(f"the parent script exited with code {parent.returncode} before its stage")
    return parent, [int(pid) for pid in line.split()]


def _kill_parent_and_check(parent: subprocess.Popen[str], workers: list[int]) -> None:
    try:
        assert all(_alive(pid) for pid in workers)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert _wait_gone(workers) == [], "pool workers outlived their killed parent"
    finally:
        _kill(workers)  # a failing run must not leave them behind either
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_idle_workers_exit_when_their_parent_is_killed() -> None:
    parent, workers = _orphans()
    assert len(workers) == 2
    _kill_parent_and_check(parent, workers)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_busy_workers_are_killed_when_their_parent_is_killed(tmp_path: Path) -> None:
    """Stuck in a client's loss, a worker reads no pipe: only the kernel's signal stops it."""
    parent, workers = _orphans(str(tmp_path))
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / str(p)).exists() for p in workers):
            assert time.monotonic() < deadline, "the workers never reached the hanging loss"
            assert parent.poll() is None, f"the parent script exited with {parent.returncode}"
            time.sleep(0.05)
    except BaseException:
        _kill(workers)
        parent.kill()
        parent.wait()
        raise
    _kill_parent_and_check(parent, workers)


def test_a_worker_whose_parent_end_is_closed_exits() -> None:
    """The EOF path: worker 0's pipe end in the parent closed (worker 1 inherited it too)."""
    fed = Federation.from_client_data([(torch.randn(8, 2), torch.arange(8) % 2)] * 2)
    engine = PoolEngine(ClientProgram(Task(lambda: nn.Linear(2, 2)), fed, fedavg()), workers=2)
    try:
        engine._conns[0].close()
        engine._procs[0].join(timeout=DEADLINE)
        assert engine._procs[0].exitcode == 0  # left its loop on EOF
        assert engine._procs[1].is_alive()
    finally:
        engine.close()
    assert engine._procs[1].exitcode == 0


def test_a_worker_whose_parent_is_not_the_forker_exits_at_once() -> None:
    """The race: the parent died between fork and prctl, so the worker's parent pid is another
    process's (here: a pid that is nobody's)."""
    parent_end, child_end = mp.get_context("fork").Pipe()
    proc = mp.get_context("fork").Process(
        target=_worker, args=(child_end, (parent_end,), (0, True), None, 1, {}), daemon=True
    )
    proc.start()
    child_end.close()
    proc.join(timeout=DEADLINE)
    try:
        assert proc.exitcode == 0
        with pytest.raises(EOFError):
            parent_end.recv()  # it sent nothing, and its end of the pipe is closed
    finally:
        if proc.is_alive():
            proc.kill()
        parent_end.close()
