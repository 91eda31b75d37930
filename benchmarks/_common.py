"""Shared helpers for the benchmarks: machine description, result files, statistics.

Not a benchmark itself. The scripts in this directory import it as ``_common`` (they run as
``python benchmarks/NAME.py``, so this directory is on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def command_line() -> str:
    """The exact command that started this process, as typed (interpreter included)."""
    return shlex.join(sys.orig_argv)


def now_utc() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def cpu_times() -> dict[str, float]:
    """Whole-machine CPU seconds so far (all CPUs): busy (user, nice, system: what processes
    are charged), interrupts (hard and soft: network traffic on loopback lands here, charged
    to no process), idle and steal (from /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return {}
    ticks = [int(f) for f in fields] + [0] * 8
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = ticks[:8]
    return {
        "busy_s": (user + nice + system) / hz,
        "irq_s": (irq + softirq) / hz,
        "idle_s": (idle + iowait) / hz,
        "steal_s": steal / hz,
    }


def own_cpu_s() -> float:
    """CPU seconds used by this process and its waited-for children so far."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def machine() -> dict[str, Any]:
    """CPU count, CPU model, memory, OS, Python/torch/NumPy versions, torch threads, load."""
    import numpy
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "mem_total_gib": _mem_total_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "numpy": numpy.__version__,
        "loadavg_at_start": list(os.getloadavg()),
        "cpu_times_at_start": {**cpu_times(), "own_s": own_cpu_s()},
    }


def source_state() -> dict[str, Any]:
    """The commit measured and whether ``src/`` had uncommitted changes at the time."""
    dirty = _git("status", "--porcelain", "--", "src")
    return {
        "commit": _git("rev-parse", "HEAD"),
        "src_uncommitted_files": len(dirty.splitlines()) if dirty else 0,
    }


def header(benchmark: str) -> dict[str, Any]:
    """The fields every result file starts with."""
    return {
        "benchmark": benchmark,
        "command": command_line(),
        "cwd": os.getcwd(),
        "date": now_utc(),
        "machine": machine(),
        "source": source_state(),
    }


def call_seconds(fn: Callable[[], object], repeats: int, warm_up: bool = True) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn()``, after one warm-up call unless
    ``warm_up`` is False (a call too large to make twice)."""
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/NAME.json`` (with the load average at the end added)."""
    mach = payload["machine"]
    mach["loadavg_at_end"] = list(os.getloadavg())
    start, end = mach.pop("cpu_times_at_start"), cpu_times()
    during = {k: end[k] - start[k] for k in end if k in start}
    if during:
        during["this_benchmark_s"] = own_cpu_s() - start["own_s"]
        during["other_processes_s"] = during["busy_s"] - during["this_benchmark_s"]
    mach["machine_cpu_s_during_benchmark"] = during
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of repeated measurements."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


# -- shared workloads (ExperimentConfig overrides) --------------------------------------------

# W1 of the engine benchmarks: scikit-learn digits, MLP 64-64-10, 100 IID clients, E=5, B=8.
W1_DIGITS_MLP: dict[str, Any] = {
    "data": {"dataset": "digits", "num_clients": 100, "partition": {"kind": "iid"}},
    "model": {"name": "mlp"},
    "client": {"epochs": 5, "batch_size": 8, "lr": 0.1},
}
# Many tiny clients: Fashion-MNIST logistic regression, 1,000 clients Dir(0.5), E=1, B=20.
FMNIST_LOGREG_1000: dict[str, Any] = {
    "data": {"num_clients": 1000},
    "model": {"name": "logreg"},
    "client": {"epochs": 1, "batch_size": 20, "lr": 0.1},
}


# -- potluck API glue -----------------------------------------------------------------------


def train_cohort(engine: Any, algorithm: Any, cohort: Any, w: Any, rnd: int) -> list[Any]:
    """Run the ``train`` stage on ``engine`` for ``cohort`` from global weights ``w`` (fresh
    client states, full work); the upload messages."""
    import numpy as np

    from potluck.core.message import Message
    from potluck.core.records import StageJob

    program = engine.program
    arrays = {"w": w}
    for ns, term in zip(program.term_ns, program.terms, strict=True):
        arrays.update({f"{ns}/{k}": v for k, v in term.broadcast(term.server_init(w)).items()})
    k = len(cohort)
    job = StageJob(
        "train",
        rnd,
        Message(arrays),
        np.asarray(cohort),
        tuple(Message(scalars={"work": 1.0}) for _ in range(k)),
        tuple({} for _ in range(k)),
    )
    return [r.message for r in engine.run_stage(job)]


def cohort_of(algorithm: Any, num_clients: int, seed: int, rnd: int) -> Any:
    """The cohort ``algorithm``'s sampler draws in round ``rnd`` (as the round loop does)."""
    from potluck.core.parts import Context

    state = algorithm.sampler.init(num_clients)
    return algorithm.sampler.sample(num_clients, state, Context(seed, rnd, ("sampling", rnd)))[0]


def save_curves(
    fig: Any, axes: Sequence[Any], titles: Sequence[str], ylabel: str, suptitle: str, name: str
) -> Path:
    """Label per-round curve panels (title, "round" axis, grid; y label on the first; a legend
    on the first and on every panel whose curves differ from it), lay out the matplotlib
    ``Figure`` and write ``benchmarks/plots/NAME.png``."""
    first = axes[0].get_legend_handles_labels()[1]
    for i, (ax, title) in enumerate(zip(axes, titles, strict=True)):
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        if i == 0 or ax.get_legend_handles_labels()[1] != first:
            ax.legend()
    axes[0].set_ylabel(ylabel)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    out = REPO / "benchmarks" / "plots" / f"{name}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
