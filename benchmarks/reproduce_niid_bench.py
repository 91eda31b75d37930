"""Reproduce NIID-Bench on Fashion-MNIST (Li, Diao, Chen, He 2021, "Federated Learning on
Non-IID Data Silos: An Experimental Study", ICDE; as replicated in Flower's niid_bench).

10 clients, all of them every round, 10 local epochs, batch 64, SGD lr 0.01 momentum 0.9,
the LeNet-style CNN (``lenet5``), FedProx mu 0.01, evaluated on the 10,000-image test set.
Partitions: IID, Dirichlet(0.5) label skew, and two labels per client (``c2``: NIID-Bench's
``#C=2``, client ``i`` holds label ``i`` and one other drawn at random, each label split
evenly among its holders); ``shards`` is McMahan's two-shards-per-client split (20
label-sorted shards of 3,000), compared against the same published #C=2 numbers.

    .venv/bin/python benchmarks/reproduce_niid_bench.py            # the full 50 rounds
    .venv/bin/python benchmarks/reproduce_niid_bench.py --rounds 5 --partitions dir0.5
    .venv/bin/python benchmarks/reproduce_niid_bench.py --plot-only   # redraw from the results

The full grid (16 runs) takes about 9 CPU-hours (one round about 40 s at 1 thread with the
inline engine; the vectorized engine is slower here: LeNet's convolutions under ``vmap``
become grouped convolutions), so it can be run a few algorithms or partitions at a time:
each invocation adds its runs to the result file (same rounds) and replaces runs of the
same algorithm and partition; two invocations may run side by side. 50 rounds write
benchmarks/results/niid_bench_fmnist.json and benchmarks/plots/niid_bench_fmnist.png; other
schedules ``niid_bench_fmnist_{R}r.*``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import time
from typing import Any

from _common import RESULTS, header, save_curves, write_result

from potluck.config import ExperimentConfig
from potluck.core.message import MessageError
from potluck.orchestrator import run_experiment

PUBLISHED = {  # best test accuracy (%) reported by NIID-Bench, Fashion-MNIST (#C=2 for shards)
    "fedavg": {"iid": 89.23, "dir0.5": 88.09, "c2": 78.10, "shards": 78.10},
    "scaffold": {"iid": 89.33, "dir0.5": 88.44, "c2": 33.80, "shards": 33.80},
    "fedprox": {"iid": 89.42, "dir0.5": 88.15, "c2": 78.05, "shards": 78.05},
    "fednova": {"iid": 89.36, "dir0.5": 88.22, "c2": 71.67, "shards": 71.67},
}
PARTITIONS: dict[str, dict[str, Any]] = {
    "iid": {"kind": "iid"},
    "dir0.5": {"kind": "dirichlet", "alpha": 0.5, "min_size": 10},
    "c2": {"kind": "labels", "labels_per_client": 2},
    "shards": {"kind": "shards", "shards_per_client": 2},
}
TITLES = {"iid": "IID", "dir0.5": "Dir(0.5)", "c2": "#C=2", "shards": "#C=2 as McMahan's shards"}


def config(algorithm: str, partition: str, rounds: int, engine: str) -> ExperimentConfig:
    return ExperimentConfig.from_dict(
        {
            "seed": 0,
            "rounds": rounds,
            "data": {
                "dataset": "fashion_mnist",
                "num_clients": 10,
                "test_fraction": 0.0,
                "partition": PARTITIONS[partition],
            },
            "model": {"name": "lenet5"},
            "algorithm": {"name": algorithm, **({"mu": 0.01} if algorithm == "fedprox" else {})},
            "sampler": {"clients_per_round": 10},
            "client": {"epochs": 10, "batch_size": 64, "lr": 0.01, "momentum": 0.9},
            "run": {"threads": 1, "engine": engine},  # 2 threads on 2 shared cores can stall 10x
            "evaluation": {"every": 1, "centralized": True, "federated_clients": 0},
        }
    )


def run_one(algorithm: str, partition: str, rounds: int, engine: str) -> dict[str, Any]:
    """One run's test accuracy per round. A run whose clients' updates turn NaN or Inf is
    stopped by the server (``MessageError``); it keeps its curve up to there and says where
    and why in ``diverged``."""
    t0 = time.perf_counter()
    accuracy: list[float] = []
    diverged = None
    experiment = config(algorithm, partition, rounds, engine).build()
    try:
        run_experiment(experiment, on_round=lambda _, m: accuracy.append(m["test_accuracy"]))
    except MessageError as exc:
        if not accuracy:
            raise
        diverged = {"round": len(accuracy) + 1, "reason": str(exc)}
    run = {
        "algorithm": algorithm,
        "partition": partition,
        "accuracy": accuracy,
        "best": max(accuracy),
        "final": accuracy[-1],
        "published_best": PUBLISHED[algorithm][partition] / 100,
        "seconds": time.perf_counter() - t0,
    }
    return run if diverged is None else {**run, "diverged": diverged}


def result_name(rounds: int) -> str:
    return "niid_bench_fmnist" if rounds == 50 else f"niid_bench_fmnist_{rounds}r"


def merged(name: str, new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Earlier runs in result file ``name`` not redone by ``new``, then ``new``, in grid order."""
    path = RESULTS / f"{name}.json"
    old = json.loads(path.read_text())["runs"] if path.exists() else []
    redone = {(r["algorithm"], r["partition"]) for r in new}
    runs = [r for r in old if (r["algorithm"], r["partition"]) not in redone] + new
    order = {(a, p): i for i, (p, a) in enumerate((p, a) for p in PARTITIONS for a in PUBLISHED)}
    return sorted(runs, key=lambda r: order[(r["algorithm"], r["partition"])])


def plot(runs: list[dict[str, Any]], partitions: list[str], name: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.3 * len(partitions), 3.6))
    axes = fig.subplots(1, len(partitions), squeeze=False)[0]
    for ax, part in zip(axes, partitions, strict=True):
        for run in (r for r in runs if r["partition"] == part):
            rounds = range(1, len(run["accuracy"]) + 1)
            line = ax.plot(rounds, run["accuracy"], label=run["algorithm"])[0]
            if "diverged" in run:  # an x where the run stopped: NaN or Inf updates next round
                ax.plot(rounds[-1], run["accuracy"][-1], "x", color=line.get_color(), ms=9)
    save_curves(
        fig,
        axes,
        [TITLES[p] for p in partitions],
        "test accuracy",
        "NIID-Bench, Fashion-MNIST, reproduced with potluck",
        name,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--partitions", default=",".join(PARTITIONS))
    parser.add_argument("--algorithms", default="fedavg,scaffold,fedprox,fednova")
    parser.add_argument("--engine", default="inline", help="inline or vectorized")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot, run nothing")
    args = parser.parse_args()
    partitions = args.partitions.split(",")
    name = result_name(args.rounds)
    if args.plot_only:
        runs = json.loads((RESULTS / f"{name}.json").read_text())["runs"]
        plot(runs, [p for p in PARTITIONS if any(r["partition"] == p for r in runs)], name)
        return
    source = header(name)["source"]  # the code this process imported, not a later HEAD
    for part in partitions:
        for algorithm in args.algorithms.split(","):
            payload = header(name)  # written after every run: a long grid may be cut short
            run = run_one(algorithm, part, args.rounds, args.engine)
            print(
                f"{algorithm:9s} {part:7s} best={run['best']:.4f} final={run['final']:.4f}"
                f" published={run['published_best']:.4f} ({run['seconds']:.0f} s)"
                + (f" diverged: {run['diverged']}" if "diverged" in run else ""),
                flush=True,
            )
            run.update(engine=args.engine, source=source)
            with (RESULTS / f".{name}.lock").open("w") as lock:  # streams may run side by side
                fcntl.flock(lock, fcntl.LOCK_EX)
                runs = merged(name, [run])
                payload.update(rounds=args.rounds, runs=runs)
                write_result(name, payload)
            done = [p for p in PARTITIONS if any(r["partition"] == p for r in runs)]
            plot(runs, done, name)


if __name__ == "__main__":
    main()
