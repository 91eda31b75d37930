"""potluck against Flower 1.42 (its Ray simulation) on the same workloads, same machine.

Workloads (FedAvg weighted by examples, plain SGD, centralised evaluation on the whole test
set after every round, no federated evaluation, every client trains on all of its data:
``data.test_fraction = 0``):

- **w1**: scikit-learn digits, MLP 64-64-10, 100 clients IID, 10 per round, 5 local epochs,
  batch 8, lr 0.1, 5 rounds (the workload of ``/work/shared/baselines/flower_sim_digits.py``).
- **w2**: Fashion-MNIST, ``small_cnn``, 1,000 clients Dirichlet(0.5), 50 per round, 1 epoch,
  batch 20, lr 0.05, 10 rounds.
- **w3**: Fashion-MNIST, logistic regression, 10,000 clients **IID** (Dirichlet(0.5) cannot
  give 10,000 clients one example each: potluck's partitioner refuses after 100 draws),
  100 per round, 1 epoch, batch 20, lr 0.1, 10 rounds.
- **w4** (chosen and written down before it was first measured, and not tuned on since: the
  check that the harness and the engines are not fitted to w1-w3): Fashion-MNIST, McMahan
  et al.'s 2NN (784-200-200-10), 300 clients with two labels each (``labels``, #C=2),
  30 per round, 2 local epochs, batch 32, lr 0.05, 8 rounds.

For each workload the driver builds potluck's federation once and exports it to a temporary
directory as ``.npy`` files (the train/test arrays, every client's train indices, every
round's cohort as potluck's sampler draws it, potluck's round-0 weights); the Flower app
(``benchmarks/flower/fedavg_app.py``, in ``.venv-flower``) trains exactly those clients,
those cohorts, from those weights. Then, one after another:

- potluck: ``.venv/bin/potluck run W.toml --store TMP --set run.engine=E`` for each engine
  of ``--engines``, at ``run.threads = --threads``;
- Flower: ``.venv-flower/bin/python benchmarks/flower/fedavg_app.py ...`` with
  ``--flower-cpus`` Ray CPUs (= concurrent ClientApp actors, one torch thread each).

Both run as ``unshare -n sh -c 'ip link set lo up && exec ...'``: a fresh network namespace
with only loopback, so Ray binds 127.0.0.1.

Measured per run: end-to-end wall time (process start to exit); round-loop time (potluck:
sum of the stored ``round_seconds``, which cover sampling, training, aggregation and the
evaluation, not the commit; Flower: the time around ``strategy.start`` minus its round-0
evaluation, which potluck does not do; both raw numbers are kept); peak memory of the whole
process tree, sampled from this process (a child subreaper, so daemonised Ray processes stay
in the tree): RSS every ``--interval`` s from ``/proc/PID/statm`` and PSS (proportional set
size: shared pages divided among their sharers) from ``/proc/PID/smaps_rollup`` as often as
a CPU budget allows (``--pss-cpu-share`` of one core: reading smaps_rollup walks the page
tables, about 1 ms per 100 MB here); the final centralised test accuracy. For potluck also
the training FLOP rate against the float32 matmul peak of the cores the run used (inline
and vectorized: ``run.threads``; pool: its workers): FLOPs per example of one training
step (forward and backward) counted with ``torch.utils.flop_counter.FlopCounterMode`` as it
runs, times the examples trained (sum over rounds and cohort members of epochs x train
size), divided by the round-loop time; the peak is the best of several 2048x2048
``torch.mm`` on 1 and on all cores, measured before and after the runs. The headline is
**rounds after the first** and **end to end**; the first round (Flower starts Ray inside
it) and the start-up (process start to the first round: imports, data, Ray) are their own
columns. An *anatomy* in this process times one round's training per engine (the round-1
cohort through ``engine.train``) apart from one centralised evaluation, with the FLOP rate
of each and the operators that take the training time (``torch.profiler``).

Every run is checked before it counts (``measured``): it must exit by ``--timeout``, every
cohort member must have answered in every round with all of its examples trained, and the
test accuracy must have moved (not the same in every round, and at least ``--min-gain``
above the initial model's); otherwise the run is marked invalid and rerun (``--reruns``).
The CPU the rest of the machine used during a run (``/proc/stat`` busy time minus this
process tree's) is recorded; a run during which it exceeded ``--max-other-cpu`` cores is
rerun, and if it stays loaded it is kept and marked (``load_exceeded``, ``!`` in the
table). Every process (Flower's and potluck's) gets its own fresh ``RAY_TMPDIR``, so no run
can join another's Ray cluster; every run's log is kept in ``--logs``, one file per
setting and attempt.

Ratios are Flower / potluck (above 1: potluck is faster or smaller).

Run from the repository root (``bash scripts/setup_flower.sh`` first):
    .venv/bin/python benchmarks/compare_flower.py --flower-cpus 1,2   # full size, ~10 min
    .venv/bin/python benchmarks/compare_flower.py --rounds 3          # quick, ~3 min
    .venv/bin/python benchmarks/compare_flower.py --workloads w2 --engines inline,auto
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from _common import REPO, W1_DIGITS_MLP, cohort_of, cpu_times, header, own_cpu_s, write_result

POTLUCK = str(Path(sys.executable).with_name("potluck"))
FLOWER_PY = REPO / ".venv-flower" / "bin" / "python"
FLOWER_APP = REPO / "benchmarks" / "flower" / "fedavg_app.py"
EVAL_BATCH = 256  # potluck.client.program.EVAL_BATCH; the Flower app evaluates alike
PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 2**20


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    config: dict[str, Any]  # an ExperimentConfig dict (rounds included)


_COMMON: dict[str, Any] = {
    "seed": 0,
    "evaluation": {"every": 1, "centralized": True, "federated_clients": 0},
}
WORKLOADS = {
    w.name: w
    for w in (
        Workload(
            "w1",
            "digits, MLP 64-64-10, 100 clients IID, 10/round, E=5, B=8, lr 0.1, 5 rounds",
            {
                **_COMMON,
                **W1_DIGITS_MLP,
                "data": {**W1_DIGITS_MLP["data"], "test_fraction": 0.0},
                "sampler": {"clients_per_round": 10},
                "rounds": 5,
            },
        ),
        Workload(
            "w2",
            "Fashion-MNIST, small_cnn, 1,000 clients Dir(0.5), 50/round, E=1, B=20, lr 0.05, "
            "10 rounds",
            {
                **_COMMON,
                "data": {
                    "dataset": "fashion_mnist",
                    "num_clients": 1000,
                    "test_fraction": 0.0,
                    "partition": {"kind": "dirichlet", "alpha": 0.5},
                },
                "model": {"name": "small_cnn"},
                "client": {"epochs": 1, "batch_size": 20, "lr": 0.05},
                "sampler": {"clients_per_round": 50},
                "rounds": 10,
            },
        ),
        Workload(
            "w3",
            "Fashion-MNIST, logreg, 10,000 clients IID, 100/round, E=1, B=20, lr 0.1, 10 rounds",
            {
                **_COMMON,
                "data": {
                    "dataset": "fashion_mnist",
                    "num_clients": 10000,
                    "test_fraction": 0.0,
                    "partition": {"kind": "iid"},
                },
                "model": {"name": "logreg"},
                "client": {"epochs": 1, "batch_size": 20, "lr": 0.1},
                "sampler": {"clients_per_round": 100},
                "rounds": 10,
            },
        ),
        Workload(
            "w4",
            "Fashion-MNIST, 2NN, 300 clients #C=2, 30/round, E=2, B=32, lr 0.05, 8 rounds",
            {
                **_COMMON,
                "data": {
                    "dataset": "fashion_mnist",
                    "num_clients": 300,
                    "test_fraction": 0.0,
                    "partition": {"kind": "labels", "labels_per_client": 2},
                },
                "model": {"name": "mlp2nn"},
                "client": {"epochs": 2, "batch_size": 32, "lr": 0.05},
                "sampler": {"clients_per_round": 30},
                "rounds": 8,
            },
        ),
    )
}


# -- process-tree memory sampling ------------------------------------------------------------


def become_subreaper() -> None:
    """Make orphaned descendants (daemonised Ray processes) children of this process."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state) of ``pid``, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rindex(")") + 2 :].split()
    return int(rest[1]), rest[0]


def descendants(root: int, exclude: frozenset[int] = frozenset()) -> list[int]:
    """Live (not zombie) descendants of ``root`` outside the subtrees of ``exclude``, from
    one scan of /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None and st[1] != "Z":
                children.setdefault(st[0], []).append(int(entry.name))
    out, todo = [], [p for p in children.get(root, []) if p not in exclude]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


@dataclass
class TreeSampler:
    """Peak RSS and PSS summed over this process's descendants, sampled in a thread."""

    interval: float = 0.05
    pss_cpu_share: float = 0.05
    exclude: frozenset[int] = frozenset()  # this process's children from before the run
    peak_rss: int = 0
    peak_pss: int = 0
    peak_procs: int = 0
    rss_samples: int = 0
    pss_sweeps: int = 0
    max_pss_gap_s: float = 0.0
    pss_breakdown: dict[str, int] = field(default_factory=dict)
    sampler_cpu_s: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        cpu0, me = time.thread_time(), os.getpid()
        next_pss = early_pss = 0.0
        last_pss = time.perf_counter()
        while not self._stop.is_set():
            t = time.perf_counter()
            pids = descendants(me, self.exclude)
            rss = sum(_rss(p) for p in pids)
            self.rss_samples += 1
            self.peak_procs = max(self.peak_procs, len(pids))
            new_high = rss > self.peak_rss
            self.peak_rss = max(self.peak_rss, rss)
            # a sweep when the budget allows; a new RSS high may bring it forward (at most
            # doubling the budget while memory grows)
            if pids and (t >= next_pss or (new_high and t >= early_pss)):
                per = {p: _pss(p) for p in pids}
                end = time.perf_counter()
                total = sum(per.values())
                if total > self.peak_pss:
                    self.peak_pss = total
                    self.pss_breakdown = {}
                    for p, v in per.items():
                        name = _comm(p)
                        self.pss_breakdown[name] = self.pss_breakdown.get(name, 0) + v
                self.pss_sweeps += 1
                self.max_pss_gap_s = max(self.max_pss_gap_s, end - last_pss)
                last_pss = end
                gap = (end - t) / self.pss_cpu_share
                next_pss = end + max(self.interval, gap)
                early_pss = end + max(self.interval, gap / 2)
            self._stop.wait(max(0.0, self.interval - (time.perf_counter() - t)))
        self.sampler_cpu_s = time.thread_time() - cpu0

    def result(self) -> dict[str, Any]:
        return {
            "peak_pss_mib": self.peak_pss / MIB,
            "peak_rss_mib": self.peak_rss / MIB,
            "peak_processes": self.peak_procs,
            "rss_samples": self.rss_samples,
            "pss_sweeps": self.pss_sweeps,
            "max_gap_between_pss_sweeps_s": self.max_pss_gap_s,
            "pss_at_peak_by_process_mib": {
                k: round(v / MIB, 1)
                for k, v in sorted(self.pss_breakdown.items(), key=lambda kv: -kv[1])
            },
            "sampler_cpu_s": self.sampler_cpu_s,
        }


def _reap_and_wait_tree(grace_s: float, exclude: frozenset[int]) -> dict[str, Any]:
    """After the main child exited: wait for its leftover descendants (reaping zombies
    re-parented to this process), kill any still alive after ``grace_s``."""
    t0, killed = time.perf_counter(), []
    while True:
        while True:  # reap zombies re-parented to us
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
        alive = descendants(os.getpid(), exclude)
        if not alive:
            break
        if time.perf_counter() - t0 > grace_s:
            for pid in alive:
                killed.append(_comm(pid))
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
            continue
        time.sleep(0.05)
    return {"tree_gone_after_exit_s": time.perf_counter() - t0, "killed_leftovers": killed}


def spawn(
    cmd: list[str],
    log: Path,
    sampler_args: dict[str, float],
    env: dict[str, str] | None = None,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Run ``cmd`` to completion (killed with its tree after ``timeout_s``) while sampling
    its process tree's memory and the CPU the rest of the machine used meanwhile."""
    before = frozenset(descendants(os.getpid()))  # e.g. an engine's workers left running
    sampler = TreeSampler(**sampler_args, exclude=before)
    cpu0, own0 = cpu_times(), own_cpu_s()
    with log.open("wb") as out:
        start_epoch, t0 = time.time(), time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        sampler.start()
        timed_out = False
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            code = proc.wait()
        wall = time.perf_counter() - t0
        end_epoch = time.time()
        tree = _reap_and_wait_tree(grace_s=0.0 if timed_out else 30.0, exclude=before)
        sampler.stop()
    cpu1, own1 = cpu_times(), own_cpu_s()
    other = (cpu1["busy_s"] - cpu0["busy_s"]) - (own1 - own0)
    return {
        "wall_s": wall,
        "exit_code": code,
        "timed_out": timed_out,
        "log": log.name,
        "start_epoch": start_epoch,
        "end_epoch": end_epoch,
        **tree,
        **sampler.result(),
        "unrelated_children_excluded": len(before),
        "tree_cpu_s": own1 - own0,
        "other_processes_cpu_s": other,
        "other_processes_cores": max(0.0, other) / max(wall, 1e-9),
        "interrupts_s": cpu1.get("irq_s", 0.0) - cpu0.get("irq_s", 0.0),  # charged to no one
    }


def failure(proc: dict[str, Any], log: Path) -> str | None:
    """Why a finished process gives no result (a timeout, an exit code), or ``None``."""
    if proc["timed_out"]:
        return f"timed out after {proc['wall_s']:.0f} s"
    if proc["exit_code"] != 0:
        tail = log.read_text(errors="replace")[-1500:]
        return f"exited with {proc['exit_code']}: ...{tail}"
    return None


def in_netns(cmd: list[str]) -> list[str]:
    """``cmd`` in a fresh network namespace with only loopback up (Ray, in Flower and in
    potluck's ray engine, would otherwise bind the machine's interface address); both sides
    run this way (about 8 ms)."""
    return ["unshare", "-n", "sh", "-c", f"ip link set lo up && exec {shlex.join(cmd)}"]


@contextlib.contextmanager
def flower_env(app_dir: Path | None = None) -> Any:
    """The environment of a Flower (or any Ray) process: telemetry off and a fresh, short
    ``RAY_TMPDIR`` of its own, removed afterwards (Ray finds a running cluster through
    ``ray_current_cluster`` in its temporary directory: a shared one lets a run join another
    run's cluster and hang; Unix socket paths there must stay under 108 bytes)."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rcf", dir="/tmp"))
    try:
        yield {
            **os.environ,
            "FLWR_TELEMETRY_ENABLED": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_TMPDIR": str(ray_tmp),
            **({} if app_dir is None else {"PYTHONPATH": str(app_dir)}),
        }
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


# -- potluck side ----------------------------------------------------------------------------


def export(workload: Workload, out: Path, threads: int) -> dict[str, Any]:
    """Write potluck's federation, cohorts and initial weights for the Flower app; count
    training FLOPs. Returns what the report needs about the workload."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from potluck.client import ClientProgram
    from potluck.config import ExperimentConfig
    from potluck.core.task import Task
    from potluck.models import build_model

    cfg = ExperimentConfig.from_dict(workload.config)
    fed = cfg.build_federation()
    source, algo, n = fed.source, cfg.algorithm_parts(), fed.num_clients
    out.mkdir(parents=True, exist_ok=True)
    for name, value in (
        ("x_train", source.train.features()),
        ("y_train", source.train.y),
        ("x_test", source.test.features()),
        ("y_test", source.test.y),
    ):
        np.save(out / f"{name}.npy", value)
    # client train indices, as Federation.client gathers them (local test split first)
    parts, offsets = [], [0]
    for cid in range(n):
        idx = fed.partition.client(cid)
        perm = fed.seeds.numpy("split", cid).permutation(len(idx))
        n_test = math.floor(fed.test_fraction * len(idx) + 1e-9)
        parts.append(idx[perm[n_test:]])
        offsets.append(offsets[-1] + len(parts[-1]))
    indices = np.concatenate(parts).astype(np.int64)
    np.save(out / "client_indices.npy", indices)
    np.save(out / "client_offsets.npy", np.asarray(offsets, np.int64))
    cohorts = np.stack([cohort_of(algo, n, cfg.seed, r) for r in range(1, cfg.rounds + 1)]).astype(
        np.int64
    )
    np.save(out / "cohorts.npy", cohorts)
    for cid in cohorts[0]:  # the export gives exactly potluck's client data
        data, rows = fed.client(int(cid)), parts[int(cid)]
        assert np.array_equal(data.x_train, source.train.features(rows)), cid
        assert np.array_equal(data.y_train, source.train.y[rows]), cid

    model_name = cfg.model.name
    task = Task(
        model_fn=lambda: build_model(
            model_name, input_shape=source.input_shape, num_classes=source.num_classes
        )
    )
    program = ClientProgram(task, fed, algo, seed=cfg.seed)
    w0 = program.spec.unflatten(program.initial_weights())
    np.savez(out / "init.npz", **{k: v.numpy() for k, v in w0.items()})
    spec = {
        "model": model_name,
        "input_shape": list(source.input_shape),
        "num_classes": source.num_classes,
        "num_clients": n,
        "rounds": cfg.rounds,
        "epochs": cfg.client["epochs"],
        "batch_size": cfg.client["batch_size"],
        "lr": cfg.client["lr"],
        "seed": cfg.seed,
        "eval_batch": EVAL_BATCH,
    }
    (out / "spec.json").write_text(json.dumps(spec, indent=1))

    torch.set_num_threads(threads)
    rows = slice(0, cfg.client["batch_size"])
    batch = torch.from_numpy(source.train.features(rows))
    labels = torch.from_numpy(source.train.y[rows])
    program.model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        program.model(batch)
    fwd_per_example = counter.get_total_flops() / len(batch)
    program.model.train()  # a training step counted as it runs: no input gradient is formed
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(program.model(batch), labels).backward()
    step_per_example = counter.get_total_flops() / len(batch)
    program.model.zero_grad(set_to_none=True)
    sizes = fed.num_examples_all()
    trained = int(cfg.client["epochs"] * sizes[cohorts].sum())
    initial = program.evaluate_test(program.initial_weights())
    return {
        "description": workload.description,
        "config": cfg.to_dict(),
        "num_params": program.spec.size,
        "train_examples_total": len(indices),
        "client_train_size": {
            "min": int(sizes.min()),
            "median": float(np.median(sizes)),
            "max": int(sizes.max()),
        },
        "test_examples": len(source.test.y),
        "cohorts": cohorts.tolist(),
        "forward_flops_per_example": fwd_per_example,
        "train_step_flops_per_example": step_per_example,
        "train_step_over_forward": step_per_example / fwd_per_example,
        "examples_trained": trained,
        "examples_per_round": [int(sizes[c].sum()) for c in cohorts],  # members' train sets
        "initial_test_accuracy": initial.accuracy,
        "train_flops": step_per_example * trained,
        "eval_flops": fwd_per_example * len(source.test.y) * cfg.rounds,
    }


# Read in a fresh process, by the potluck code that wrote the store (this process imported
# potluck when it started; src/ may have changed since).
READ_STORE = """
import json, sys
from potluck.store.sqlite import RunStore
with RunStore(sys.argv[1]) as st:
    (info,) = st.list_runs()
    cohorts, examples = {}, {}
    for rnd, cid, m in st.client_metrics(info.run_id):
        cohorts.setdefault(rnd, []).append(cid)
        examples[rnd] = examples.get(rnd, 0) + int(m.get("num_examples", 0))
    print(json.dumps({
        "status": info.status,
        "summary": info.summary,
        "rounds": [
            {"round": r.round, "metrics": r.metrics, "committed_at": r.committed_at}
            for r in st.rounds(info.run_id)
        ],
        "cohorts": {str(k): sorted(v) for k, v in cohorts.items()},
        "examples": {str(k): v for k, v in examples.items()},
        "run": info.config["run"],
    }))
"""


def run_potluck(
    workload: Workload,
    engine: str,
    threads: int,
    workdir: Path,
    sampler: dict[str, float],
    extra: list[str],
    timeout_s: float,
    attempt: int,
) -> dict[str, Any]:
    from potluck.config import ExperimentConfig

    toml = workdir / "potluck.toml"
    toml.write_text(ExperimentConfig.from_dict(workload.config).to_toml())
    store = workdir / f"store-{engine}-{attempt}"
    cmd = [POTLUCK, "run", str(toml), "--store", str(store)]
    cmd += ["--set", f"run.engine={json.dumps(engine)}", "--set", f"run.threads={threads}"]
    cmd += [arg for item in extra for arg in ("--set", item)]
    log = workdir / f"potluck-{engine}-{attempt}.log"
    with flower_env() as env:  # a fresh RAY_TMPDIR for the ray engine
        proc = spawn(in_netns(cmd), log, sampler, env, timeout_s)
    shown = [Path(POTLUCK).name, "run", f"{workload.name}.toml", "--store", "TMP", *cmd[5:]]
    why = failure(proc, log)
    if why is not None:
        return {"command": shown, "invalid": [why], **proc}
    read = subprocess.run(
        [sys.executable, "-c", READ_STORE, str(store)], capture_output=True, text=True
    )
    if read.returncode != 0:
        raise RuntimeError(f"reading {store}: {read.stderr[-2000:]}")
    stored = json.loads(read.stdout)
    rounds = stored["rounds"]
    seconds = [r["metrics"]["round_seconds"] for r in rounds]
    commits = [datetime.fromisoformat(r["committed_at"]).timestamp() for r in rounds]
    first_start = commits[0] - seconds[0]
    return {
        "command": shown,
        "status": stored["status"],
        "run": stored["run"],
        "end_to_end_s": proc.pop("wall_s"),
        "round_loop_s": sum(seconds),
        "round_loop_with_commits_s": commits[-1] - first_start,
        "first_round_s": seconds[0],
        "rounds_after_first_s": sum(seconds[1:]),
        "round_seconds": seconds,
        "startup_s": first_start - proc.pop("start_epoch"),
        "tail_s": proc.pop("end_epoch") - commits[-1],
        "final_test_accuracy": stored["summary"].get("test_accuracy"),
        "final_test_loss": stored["summary"].get("test_loss"),
        "test_accuracy": [r["metrics"].get("test_accuracy") for r in rounds],
        "answers": [int(r["metrics"].get("updates", 0)) for r in rounds],
        "failed": [int(r["metrics"].get("failed", 0)) for r in rounds],
        "examples": [stored["examples"].get(str(r["round"]), 0) for r in rounds],
        "_cohorts": [stored["cohorts"].get(str(r["round"]), []) for r in rounds],
        **proc,
    }


def untrained(res: dict[str, Any], info: dict[str, Any], min_gain: float) -> list[str]:
    """Why a side's run does not show the workload's training (empty: it does): a member
    that did not answer, examples not trained, an accuracy that did not move."""
    why, sizes = [], [len(c) for c in info["cohorts"]]
    for rnd, (k, got) in enumerate(zip(sizes, res["answers"], strict=True), 1):
        if got != k:
            why.append(f"round {rnd}: {got} answers from a cohort of {k}")
    if any(res.get("failed", [])):
        why.append(f"failed members per round {res['failed']}")
    examples = res.get("examples")
    if examples is not None and examples != info["examples_per_round"]:
        why.append(f"examples trained {examples}, expected {info['examples_per_round']}")
    acc, start = res["test_accuracy"], info["initial_test_accuracy"]
    if len(set(acc)) == 1:
        why.append(f"test accuracy {acc[0]:.4f} in every round")
    if res["final_test_accuracy"] - start < min_gain:
        why.append(
            f"final accuracy {res['final_test_accuracy']:.4f}, not {min_gain} above the "
            f"initial model's {start:.4f}"
        )
    return why


def measured(run: Any, reruns: int, max_other: float, info: dict[str, Any], gain: float) -> Any:
    """``run(attempt)`` until it is valid and the rest of the machine stayed under
    ``max_other`` cores, at most ``1 + reruns`` times; the last attempt, with ``invalid``
    reasons (a failure, no training) and ``load_exceeded`` where they apply, and the
    attempts before it."""
    attempts: list[dict[str, Any]] = []
    for attempt in range(1 + reruns):
        res = run(attempt)
        if "invalid" not in res:
            res["invalid"] = untrained(res, info, gain)
        res["load_exceeded"] = res["other_processes_cores"] > max_other
        attempts.append(
            {k: res[k] for k in ("invalid", "load_exceeded", "other_processes_cores", "log")}
        )
        if not res["invalid"] and not res["load_exceeded"]:
            break
        print(f"  attempt {attempt + 1}: {attempts[-1]}", flush=True)
    res["attempts"] = attempts
    return res


def anatomy(
    workload: Workload, engines: list[str], info: dict[str, Any], reps: int = 3
) -> dict[str, Any]:
    """In this process: one round's training (the round-1 cohort, ``engine.train``) per
    engine and one centralised evaluation, timed apart (median of ``reps`` after a warm-up),
    with the FLOP rate of each phase and the operators that take the training time."""

    from _common import train_cohort
    from torch.profiler import ProfilerActivity, profile

    from potluck.client import ClientProgram
    from potluck.config import ExperimentConfig
    from potluck.engines.base import make_engine

    exp = ExperimentConfig.from_dict(workload.config).build()
    algo, fed = exp.algorithm, exp.federation
    program = ClientProgram(exp.task, fed, algo, seed=exp.seed)
    w, cohort = program.initial_weights(), np.asarray(info["cohorts"][0])
    fwd = info["forward_flops_per_example"]
    step = info["train_step_flops_per_example"]
    train_flops = step * algo.local.epochs * int(fed.num_examples_all()[cohort].sum())

    def timed(fn: Any) -> float:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    out: dict[str, Any] = {"cohort_train_flops": train_flops, "engines": {}}
    test = fed.source.test
    eval_s = timed(lambda: program.evaluate_arrays(w, test.features(), test.y))
    out["centralised_eval_s"] = eval_s
    out["eval_flops_per_s"] = fwd * len(test.y) / eval_s
    for name in engines:
        try:
            engine = make_engine(name, program)
        except ValueError as exc:
            out["engines"][name] = {"error": str(exc)}
            continue
        try:
            train_cohort(engine, algo, cohort, w, 1)  # warm-up (lazy imports, allocations)
            train_s = timed(lambda e=engine: train_cohort(e, algo, cohort, w, 1))
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                train_cohort(engine, algo, cohort, w, 1)
        finally:
            engine.close()
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in ops) or 1.0
        out["engines"][name] = {
            "train_s": train_s,
            "train_flops_per_s": train_flops / train_s,
            "top_ops_self_cpu_share": {
                e.key: round(e.self_cpu_time_total / total, 3) for e in ops[:8]
            },
        }
    return out


# -- Flower side -----------------------------------------------------------------------------


def run_flower(
    datadir: Path,
    workdir: Path,
    cpus: int,
    sampler: dict[str, float],
    timeout_s: float,
    attempt: int,
) -> dict[str, Any]:
    out = workdir / f"flower_result-{cpus}-{attempt}.json"
    app = [str(FLOWER_PY), str(FLOWER_APP), "--data", str(datadir), "--out", str(out)]
    cmd = in_netns([*app, "--cpus", str(cpus)])
    log = workdir / f"flower-cpus{cpus}-{attempt}.log"
    with flower_env(FLOWER_APP.parent) as env:
        proc = spawn(cmd, log, sampler, env=env, timeout_s=timeout_s)
    shown = [*cmd[:4], cmd[4].replace(str(datadir), "DATA").replace(str(out), "OUT")]
    why = failure(proc, log)
    if why is not None:
        return {"command": shown, "invalid": [why], "ray_cpus": cpus, **proc}
    res = json.loads(out.read_text())
    start, end = proc.pop("start_epoch"), proc.pop("end_epoch")
    replies = res["train_replies"]
    return {
        "command": shown,
        "end_to_end_s": proc.pop("wall_s"),
        "round_loop_s": res["strategy_start_s"] - res["round0_eval_s"],
        "strategy_start_s": res["strategy_start_s"],
        "round0_eval_s": res["round0_eval_s"],
        "first_round_s": res["round_seconds"][0],
        "rounds_after_first_s": sum(res["round_seconds"][1:]),
        "round_seconds": res["round_seconds"],
        "startup_s": res["strategy_start_epoch"] - start + res["round0_eval_s"],
        "tail_s": end - res["strategy_end_epoch"],
        "run_simulation_s": res["run_simulation_s"],
        "final_test_accuracy": res["final_test_accuracy"],
        "final_test_loss": res["final_test_loss"],
        "test_accuracy": res["test_accuracy"][1:],
        "answers": [r.get("answers", 0) for r in replies],
        "failed": [r.get("errors", 0) for r in replies],
        "examples": [r.get("examples", 0) for r in replies],
        "eval_seconds": res["eval_seconds"],
        "ray_cpus": cpus,
        **proc,
    }


# -- machine peak ----------------------------------------------------------------------------


def matmul_peak(threads: int, size: int = 2048, reps: int = 8) -> dict[str, float]:
    """Best float32 ``torch.mm`` rate (FLOP/s) at ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(2):
        torch.mm(a, b)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return {"flops_per_s": 2.0 * size**3 / best, "best_s": best, "size": size, "reps": reps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="w1,w2,w3,w4", help="comma-separated: w1..w4")
    parser.add_argument(
        "--engines", default="inline,vectorized", help="potluck engines, comma-separated"
    )
    parser.add_argument("--rounds", type=int, help="override every workload's rounds (quick)")
    parser.add_argument("--threads", type=int, default=1, help="potluck's torch threads")
    parser.add_argument(
        "--flower-cpus",
        default="1",
        help="Ray CPUs (= concurrent Flower clients), comma-separated: one Flower run each",
    )
    parser.add_argument(
        "--potluck-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra potluck --set for every potluck run (e.g. run.workers=2); repeatable",
    )
    parser.add_argument("--skip-flower", action="store_true")
    parser.add_argument("--interval", type=float, default=0.05, help="RSS sampling period, s")
    parser.add_argument(
        "--pss-cpu-share", type=float, default=0.05, help="CPU budget of the PSS sweeps"
    )
    parser.add_argument(
        "--no-anatomy",
        dest="anatomy",
        action="store_false",
        help="skip the in-process timing of one round's training and evaluation",
    )
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds per run before it is killed"
    )
    parser.add_argument(
        "--max-other-cpu",
        type=float,
        default=0.25,
        help="cores the rest of the machine may use during a run before it is rerun",
    )
    parser.add_argument("--reruns", type=int, default=2, help="reruns of an invalid or loaded run")
    parser.add_argument(
        "--min-gain", type=float, default=0.05, help="accuracy a run must gain over round 0"
    )
    parser.add_argument(
        "--logs",
        type=Path,
        default=REPO / "benchmarks" / "logs" / "compare_flower",
        help="every run's log is kept here, one file per setting and attempt",
    )
    parser.add_argument(
        "--result", default="compare_flower", help="benchmarks/results/RESULT.json to write"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    flower_cpus = [int(c) for c in args.flower_cpus.split(",") if c.strip()]
    unknown = set(names) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}; known: {sorted(WORKLOADS)}")
    if not args.skip_flower and not FLOWER_PY.exists():
        parser.error(f"{FLOWER_PY} missing: run bash scripts/setup_flower.sh")

    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    become_subreaper()
    payload = header("compare_flower")
    payload["settings"] = {
        "rounds_override": args.rounds,
        "potluck_threads": args.threads,
        "flower_ray_cpus": flower_cpus,
        "engines": engines,
        "potluck_set": args.potluck_set,
        "rss_interval_s": args.interval,
        "pss_cpu_share": args.pss_cpu_share,
    }
    payload["note"] = (
        "ratios are Flower / potluck; round loop: potluck sum of round_seconds, Flower "
        "strategy.start minus its round-0 evaluation; memory: peak of PSS (and RSS) summed "
        "over the whole process tree"
    )
    payload["settings"].update(
        timeout_s=args.timeout,
        max_other_processes_cores=args.max_other_cpu,
        reruns=args.reruns,
        min_accuracy_gain=args.min_gain,
    )
    sampler = {"interval": args.interval, "pss_cpu_share": args.pss_cpu_share}
    ncpu = len(os.sched_getaffinity(0))
    counts = sorted({1, min(args.threads, ncpu), ncpu})
    peaks_before = {c: matmul_peak(c) for c in counts}
    torch.set_num_threads(args.threads)
    for c, p in peaks_before.items():
        print(f"matmul peak on {c} core(s): {p['flops_per_s'] / 1e9:.1f} GF/s")
    tmp = Path(tempfile.mkdtemp(prefix="compare-flower-"))
    args.logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    try:
        payload["import_torch_floor"] = floor = import_floor(tmp, sampler)
        print(f"python -c 'import torch': median {floor['median_s']:.2f} s", flush=True)
        for name in names:
            results[name] = measure_workload(name, args, engines, flower_cpus, sampler, tmp)
    finally:
        for log in tmp.glob("*/*.log"):
            shutil.copy(log, args.logs / f"{log.parent.name}-{log.name}")
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    peaks_after = {c: matmul_peak(c) for c in counts}
    torch.set_num_threads(args.threads)
    peak = {c: max(peaks_before[c]["flops_per_s"], peaks_after[c]["flops_per_s"]) for c in counts}
    payload["matmul_peak"] = {
        "before": peaks_before,
        "after": peaks_after,
        "peak_flops_per_s_by_cores": peak,
    }
    payload["logs"] = str(
        args.logs.relative_to(REPO) if args.logs.is_relative_to(REPO) else args.logs
    )
    for name, entry in results.items():
        shares(name, entry, peak, args.threads, ncpu)
        for res in entry["potluck"].values():
            if not res["invalid"]:
                res["end_to_end_over_import_torch"] = res["end_to_end_s"] / floor["median_s"]
    payload["workloads"] = results
    print_table(results)
    print(f"wrote {write_result(args.result, payload)}")


def import_floor(tmp: Path, sampler: dict[str, float], runs: int = 5) -> dict[str, Any]:
    """The end-to-end floor of any torch program here: ``python -c "import torch"`` in a
    fresh network namespace like the runs (median and best of ``runs``)."""
    walls = []
    for i in range(runs):
        proc = spawn(
            in_netns([sys.executable, "-c", "import torch"]), tmp / f"floor-{i}.log", sampler
        )
        walls.append(proc["wall_s"])
    return {"median_s": statistics.median(walls), "best_s": min(walls), "runs": walls}


def measure_workload(
    name: str,
    args: argparse.Namespace,
    engines: list[str],
    flower_cpus: list[int],
    sampler: dict[str, float],
    tmp: Path,
) -> dict[str, Any]:
    """Export one workload, then run potluck on each engine and Flower at each Ray CPU count,
    each until valid and unloaded (``measured``)."""
    workload = WORKLOADS[name]
    if args.rounds:
        workload = Workload(name, workload.description, {**workload.config, "rounds": args.rounds})
    workdir = tmp / name
    info = export(workload, workdir / "data", args.threads)
    cohorts = info["cohorts"]
    entry: dict[str, Any] = {k: v for k, v in info.items() if k != "cohorts"}
    entry["potluck"], entry["flower"] = {}, {}
    if args.anatomy:
        entry["anatomy"] = anatomy(workload, engines, info)
    for engine in engines:

        def pot(attempt: int, engine: str = engine) -> dict[str, Any]:
            return run_potluck(
                workload,
                engine,
                args.threads,
                workdir,
                sampler,
                args.potluck_set,
                args.timeout,
                attempt,
            )

        res = measured(pot, args.reruns, args.max_other_cpu, info, args.min_gain)
        if "_cohorts" in res and res.pop("_cohorts") != [sorted(c) for c in cohorts]:
            res["invalid"].append("potluck's cohorts differ from the export")
        entry["potluck"][engine] = res
        report(f"{name} potluck/{engine}", res)
    for cpus in [] if args.skip_flower else flower_cpus:

        def flo(attempt: int, cpus: int = cpus) -> dict[str, Any]:
            return run_flower(workdir / "data", workdir, cpus, sampler, args.timeout, attempt)

        fl = measured(flo, args.reruns, args.max_other_cpu, info, args.min_gain)
        entry["flower"][f"ray_cpus_{cpus}"] = fl
        report(f"{name} flower (Ray CPUs {cpus})", fl)
    return entry


def report(what: str, res: dict[str, Any]) -> None:
    if res["invalid"]:
        print(f"{what}: INVALID: {res['invalid']}", flush=True)
        return
    print(
        f"{what}: e2e {res['end_to_end_s']:.1f} s, rounds 2.. {res['rounds_after_first_s']:.2f}"
        f" s, first {res['first_round_s']:.2f} s, PSS {res['peak_pss_mib']:.0f} MiB, acc "
        f"{res['final_test_accuracy']:.4f}, other processes {res['other_processes_cores']:.2f}"
        " cores",
        flush=True,
    )


def cores_used(run: dict[str, Any], threads: int, ncpu: int) -> int:
    """Cores a potluck run's training could use: its threads, or its workers' threads."""
    if run.get("engine") not in ("pool", "ray"):
        return min(ncpu, run.get("threads") or threads)
    workers = run.get("workers") or ncpu
    return min(ncpu, workers * max(1, (run.get("threads") or threads) // workers))


def shares(
    name: str, entry: dict[str, Any], peak: dict[int, float], threads: int, ncpu: int
) -> None:
    """Each valid run's FLOP rate as a share of the matmul peak of the cores it used, and
    the Flower / potluck ratios."""
    for engine, an in entry.get("anatomy", {}).get("engines", {}).items():
        if "train_flops_per_s" in an:
            cores = ncpu if engine in ("pool", "ray") else min(threads, ncpu)
            an["cores"] = cores
            an["train_share_of_matmul_peak"] = an["train_flops_per_s"] / peak[cores]
            print(
                f"{name} {engine}: training phase alone {an['train_share_of_matmul_peak']:.1%}"
                f" of the matmul peak of {cores} core(s)"
            )
    if "anatomy" in entry:
        one = peak[min(threads, ncpu)]
        entry["anatomy"]["eval_share_of_matmul_peak"] = entry["anatomy"]["eval_flops_per_s"] / one
    valid = {k: v for k, v in entry["flower"].items() if not v["invalid"]}
    for engine, res in entry["potluck"].items():
        if res["invalid"]:
            continue
        cores = cores_used(res["run"], threads, ncpu)
        rate = entry["train_flops"] / res["round_loop_s"]
        res["cores"] = cores
        res["train_flops_per_s"] = rate
        res["train_flops_share_of_matmul_peak"] = rate / peak[cores]
        res["train_and_eval_flops_share_of_matmul_peak"] = (
            (entry["train_flops"] + entry["eval_flops"]) / res["round_loop_s"] / peak[cores]
        )
        res["flower_over_potluck"] = {
            variant: {
                "rounds_after_first": fl["rounds_after_first_s"]
                / max(res["rounds_after_first_s"], 1e-9),
                "end_to_end": fl["end_to_end_s"] / res["end_to_end_s"],
                "round_loop": fl["round_loop_s"] / res["round_loop_s"],
                "first_round": fl["first_round_s"] / res["first_round_s"],
                "peak_pss": fl["peak_pss_mib"] / res["peak_pss_mib"],
                "peak_rss": fl["peak_rss_mib"] / res["peak_rss_mib"],
            }
            for variant, fl in valid.items()
        }
        print(
            f"{name} {engine}: {res['train_flops_share_of_matmul_peak']:.1%} of the matmul "
            f"peak of {cores} core(s)"
        )


def print_table(results: dict[str, Any]) -> None:
    """The comparison as a Markdown table: rounds after the first and end to end first,
    the first round and start-up as their own columns; a run that was invalid or ran while
    the machine was loaded is marked."""
    print(
        "| workload | potluck engine | Flower Ray CPUs | rounds 2.. potluck / Flower (s) "
        "| **rounds 2..** | end to end potluck / Flower (s) | **end to end** | first round "
        "potluck / Flower (s) | start-up potluck / Flower (s) | peak PSS | final acc "
        "potluck / Flower | other CPU (cores) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, entry in results.items():
        for engine, res in entry["potluck"].items():
            if res["invalid"]:
                print(f"| {name} | {engine} | | invalid: {'; '.join(res['invalid'])[:200]} |")
                continue
            for variant, fl in entry["flower"].items():
                if fl["invalid"]:
                    print(
                        f"| {name} | {engine} | {fl['ray_cpus']} | Flower invalid: "
                        f"{'; '.join(fl['invalid'])[:200]} |"
                    )
                    continue
                r = res["flower_over_potluck"][variant]
                loaded = "!" if res["load_exceeded"] or fl["load_exceeded"] else ""
                print(
                    f"| {name} | {engine} | {fl['ray_cpus']} | "
                    f"{res['rounds_after_first_s']:.2f} / {fl['rounds_after_first_s']:.2f} | "
                    f"**{r['rounds_after_first']:.1f}x** | {res['end_to_end_s']:.1f} / "
                    f"{fl['end_to_end_s']:.1f} | **{r['end_to_end']:.1f}x** | "
                    f"{res['first_round_s']:.2f} / {fl['first_round_s']:.2f} | "
                    f"{res['startup_s']:.1f} / {fl['startup_s']:.1f} | {r['peak_pss']:.2f}x | "
                    f"{res['final_test_accuracy']:.4f} / {fl['final_test_accuracy']:.4f} | "
                    f"{res['other_processes_cores']:.2f} / {fl['other_processes_cores']:.2f}"
                    f"{loaded} |"
                )


if __name__ == "__main__":
    main()
