"""The default experiment end to end: ``potluck run`` as a user runs it, against start-up floors.

Measured in one invocation, interleaved:

- ``potluck run --store TMP`` (the built-in default experiment: Fashion-MNIST, 100 clients,
  Dirichlet 0.5, FedAvg with 10 clients per round, small CNN, 20 rounds) with torch's
  default thread count, and the same with ``--set run.threads=1``. For each: wall time from
  process start to exit, peak RSS and user+system CPU (GNU ``time`` around the command), and from
  the run store the final test accuracy, the per-round ``round_seconds`` and the commit
  timestamps, which split the wall time into start-up, rounds, commits and the tail
  (summary, report, exit).
- Floors: ``python -c pass``, ``python -c "import torch"``, ``potluck --help`` (CLI start-up)
  and ``python -c "<build the default experiment>"`` (imports + Fashion-MNIST load +
  partition), each several times.
- Anatomy of one round, in this process: training the round-1 cohort with the inline engine,
  centralised evaluation on the 10,000 test images and federated evaluation on 10 clients,
  with torch's default thread count and with 1 thread; centralised evaluation also with an
  evaluation batch of 256 instead of the shipped ``EVAL_BATCH`` (set in this process only).

Run from the repository root:
    .venv/bin/python benchmarks/default_run.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from _common import cohort_of, header, summary, train_cohort, write_result

PY = sys.executable
POTLUCK = str(Path(sys.executable).with_name("potluck"))
BUILD = "from potluck.config import ExperimentConfig; ExperimentConfig.from_dict({}).build()"
FLOORS: dict[str, list[str]] = {
    "python_bare": [PY, "-c", "pass"],
    "import_torch": [PY, "-c", "import torch"],
    "potluck_help": [POTLUCK, "--help"],
    "build_default_experiment": [PY, "-c", BUILD],
}
RUNS: dict[str, list[str]] = {
    "default_threads": [],
    "threads_1": ["--set", "run.threads=1"],
}


GNU_TIME = "/usr/bin/time" if Path("/usr/bin/time").exists() else None


def spawn(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run ``cmd`` to completion; wall time, peak RSS and CPU time of that one process.

    Peak RSS and CPU come from GNU time when present: a child forked straight from this
    process would report at least this process's own RSS (Linux carries the pre-exec
    high-water mark into ``ru_maxrss``), which here includes torch.
    """
    timefile = log.with_suffix(".time")
    wrapped = [GNU_TIME, "-f", "%M %U %S", "-o", str(timefile), *cmd] if GNU_TIME else cmd
    with log.open("wb") as out:
        start_epoch = time.time()
        t0 = time.perf_counter()
        proc = subprocess.Popen(wrapped, stdout=out, stderr=out)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        end_epoch = time.time()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.stderr.write(log.read_text(errors="replace")[-4000:])
        raise RuntimeError(f"{cmd} exited with {proc.returncode}")
    if GNU_TIME:
        maxrss_kib, user, system = timefile.read_text().split()[-3:]
        rss_mib, cpu = int(maxrss_kib) / 1024, float(user) + float(system)
    else:  # ru_maxrss is in KiB on Linux; see the caveat above
        rss_mib, cpu = usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime
    return {
        "wall_s": wall,
        "peak_rss_mib": rss_mib,
        "cpu_s": cpu,
        "cpu_utilisation": cpu / wall,
        "start_epoch": start_epoch,
        "end_epoch": end_epoch,
    }


def read_store(store: Path) -> dict[str, Any]:
    """Accuracy, round times and the wall-clock split of the one run in ``store``."""
    from potluck.store.sqlite import RunStore

    with RunStore(store) as st:
        (info,) = st.list_runs()
        rounds = st.rounds(info.run_id)
    seconds = [r.metrics["round_seconds"] for r in rounds]
    commits = [datetime.fromisoformat(r.committed_at).timestamp() for r in rounds]
    return {
        "run_id": info.run_id,
        "status": info.status,
        "rounds": len(rounds),
        "final_test_accuracy": info.summary.get("test_accuracy"),
        "final_test_loss": info.summary.get("test_loss"),
        "sum_round_seconds": sum(seconds),
        "median_round_seconds": statistics.median(seconds),
        "max_round_seconds": max(seconds),
        "round_seconds": seconds,
        "_first_round_start": commits[0] - seconds[0],
        "_last_commit": commits[-1],
    }


def measure_run(name: str, extra: list[str], workdir: Path) -> dict[str, Any]:
    store = workdir / f"store-{name}"
    proc = spawn([POTLUCK, "run", "--store", str(store), *extra], workdir / f"{name}.log")
    res = read_store(store)
    first, last = res.pop("_first_round_start"), res.pop("_last_commit")
    span = last - first
    res["split_s"] = {
        "startup": first - proc["start_epoch"],
        "rounds": res["sum_round_seconds"],
        "commits_and_callbacks": span - res["sum_round_seconds"],
        "tail_summary_report_exit": proc["end_epoch"] - last,
    }
    proc.pop("start_epoch")
    proc.pop("end_epoch")
    return {"command": [Path(POTLUCK).name, "run", "--store", "TMP", *extra], **proc, **res}


def _median_time(fn: Callable[[], Any], reps: int) -> dict[str, float]:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return summary(times)


def _with_eval_batch(size: int, fn: Callable[[], dict[str, float]]) -> dict[str, float]:
    """``fn()`` with ``potluck.client.program.EVAL_BATCH`` set to ``size`` (then restored)."""
    from potluck.client import program as program_module

    shipped = program_module.EVAL_BATCH
    program_module.EVAL_BATCH = size
    try:
        return fn()
    finally:
        program_module.EVAL_BATCH = shipped


def round_anatomy(reps: int) -> dict[str, Any]:
    """Training vs evaluation within one default round, in this process."""
    import numpy as np
    import torch

    from potluck.client import ClientProgram
    from potluck.config import ExperimentConfig
    from potluck.engines.inline import InlineEngine

    exp = ExperimentConfig.from_dict({}).build()
    program = ClientProgram(exp.task, exp.federation, exp.algorithm, seed=exp.seed)
    engine = InlineEngine(program)
    w = program.initial_weights()
    n = exp.federation.num_clients
    cohort = cohort_of(exp.algorithm, n, exp.seed, 1)
    fed_clients = np.sort(np.random.default_rng(0).choice(n, size=10, replace=False))
    test = exp.federation.source.test
    test_x = test.features()
    from potluck.client import program as program_module

    out: dict[str, Any] = {
        "cohort": [int(c) for c in cohort],
        "eval_batch_shipped": program_module.EVAL_BATCH,
    }

    def federated_eval() -> None:  # what the engine's evaluate does for the global model
        for cid in fed_clients:
            data = exp.federation.client(int(cid))
            program.evaluate_arrays(w, data.x_test, data.y_test)

    default_threads = torch.get_num_threads()
    for threads in (default_threads, 1):
        torch.set_num_threads(threads)
        train_cohort(engine, exp.algorithm, cohort, w, 1)  # warm-up
        out[f"threads_{threads}"] = {
            "train_cohort_s": _median_time(
                lambda: train_cohort(engine, exp.algorithm, cohort, w, 1), reps
            ),
            "centralised_eval_s": _median_time(
                lambda: program.evaluate_arrays(w, test_x, test.y), reps
            ),
            "centralised_eval_batch_256_s": _with_eval_batch(
                256, lambda: _median_time(lambda: program.evaluate_arrays(w, test_x, test.y), reps)
            ),
            "federated_eval_10_clients_s": _median_time(lambda: federated_eval(), reps),
        }
    torch.set_num_threads(default_threads)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--floor-reps", type=int, default=5, help="repetitions of each floor")
    parser.add_argument("--run-reps", type=int, default=1, help="runs of each run variant")
    parser.add_argument("--anatomy-reps", type=int, default=3, help="repetitions (0: skip)")
    parser.add_argument("--output", default="default_run", help="results/NAME.json")
    args = parser.parse_args(argv)

    payload = header("default_run")
    payload["settings"] = {
        "floor_reps": args.floor_reps,
        "run_reps": args.run_reps,
        "thread_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
        "timer": "perf_counter around Popen + os.wait4 (wall, process start to exit)",
        "rss_and_cpu": f"GNU time (%M, %U + %S) of the command: {GNU_TIME}"
        if GNU_TIME
        else "os.wait4 rusage (peak RSS includes this process's RSS at fork)",
    }
    floors: dict[str, list[dict[str, Any]]] = {k: [] for k in FLOORS}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in RUNS}
    with tempfile.TemporaryDirectory(prefix="potluck-bench-") as tmp:
        workdir = Path(tmp)
        for i in range(max(args.floor_reps, args.run_reps)):
            if i < args.floor_reps:
                names = list(FLOORS)
                names = names[i % len(names) :] + names[: i % len(names)]
                for name in names:
                    floors[name].append(spawn(FLOORS[name], workdir / f"{name}.log"))
            if i < args.run_reps:
                order = list(RUNS) if i % 2 == 0 else list(reversed(RUNS))
                for name in order:
                    print(f"run {name} ({i + 1}/{args.run_reps}) ...", file=sys.stderr)
                    runs[name].append(measure_run(f"{name}-{i}", RUNS[name], workdir))
                    r = runs[name][-1]
                    print(
                        f"  {r['wall_s']:.1f} s, acc {r['final_test_accuracy']:.4f}",
                        file=sys.stderr,
                    )

    floor_stats: dict[str, dict[str, Any]] = {
        name: {
            "command": " ".join(Path(c).name if c in (PY, POTLUCK) else c for c in FLOORS[name]),
            "wall_s": summary([s["wall_s"] for s in samples]),
            "peak_rss_mib": summary([s["peak_rss_mib"] for s in samples]),
            "samples": samples,
        }
        for name, samples in floors.items()
    }
    torch_floor = floor_stats["import_torch"]["wall_s"]["median"]
    run_stats: dict[str, Any] = {}
    for name, samples in runs.items():
        if not samples:
            continue
        wall = statistics.median(s["wall_s"] for s in samples)
        rounds = statistics.median(s["sum_round_seconds"] for s in samples)
        run_stats[name] = {
            "wall_s": summary([s["wall_s"] for s in samples]),
            "peak_rss_mib": summary([s["peak_rss_mib"] for s in samples]),
            "wall_over_import_torch": wall / torch_floor,
            "rounds_share_of_wall": rounds / wall,
            "samples": samples,
        }
    payload["floors"] = floor_stats
    payload["runs"] = run_stats
    if args.anatomy_reps:
        print("round anatomy ...", file=sys.stderr)
        payload["round_anatomy"] = round_anatomy(args.anatomy_reps)
    path = write_result(args.output, payload)

    print(f"\nwritten to {path}")
    for name, st in floor_stats.items():
        w = st["wall_s"]
        rss = st["peak_rss_mib"]["median"]
        print(f"{name:26} wall median {w['median']:6.2f} s (min {w['min']:.2f}), {rss:.0f} MiB")
    for name, st in run_stats.items():
        for s in st["samples"]:
            split = ", ".join(f"{k} {v:.1f}" for k, v in s["split_s"].items())
            print(
                f"run {name:17} wall {s['wall_s']:6.1f} s = {s['wall_s'] / torch_floor:5.1f}x "
                f"import torch; rss {s['peak_rss_mib']:.0f} MiB; acc "
                f"{s['final_test_accuracy']:.4f}; rounds sum {s['sum_round_seconds']:.1f} s "
                f"(median {s['median_round_seconds']:.2f}, max {s['max_round_seconds']:.2f}); "
                f"split: {split}"
            )


if __name__ == "__main__":
    main()
