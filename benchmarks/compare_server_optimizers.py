"""Adaptive server optimizers on non-IID Fashion-MNIST at tuned learning rates (Reddi et al.
2021, "Adaptive Federated Optimization", ICLR), next to FedAvg and FedAvgM.

The default experiment (100 clients, Dirichlet(0.5) label skew, 10 clients per round, small
CNN, 2 local epochs of batch-32 SGD at lr 0.1) with each server optimizer; each optimizer's
server learning rate is tuned on seed 0 over a grid, by the mean test accuracy of the last 5
rounds (less noisy than the last round alone), then rerun on the other seeds (which also
change the partition, the sampling and the initial model); the mean curve of each is
plotted.

    .venv/bin/python benchmarks/compare_server_optimizers.py [--rounds 20] [--seeds 0,1,2]

Writes benchmarks/results/server_optimizers.json and benchmarks/plots/server_optimizers.png.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any

from _common import header, save_curves, write_result

from potluck.config import ExperimentConfig
from potluck.core.message import MessageError
from potluck.orchestrator import run_experiment

GRID: dict[str, tuple[dict[str, Any], tuple[float, ...]]] = {
    "FedAvg": ({"name": "sgd"}, (1.0,)),
    "FedAvgM": ({"name": "sgd", "momentum": 0.9}, (0.1, 0.3, 1.0, 3.0)),
    "FedAdam": ({"name": "adam"}, (0.003, 0.01, 0.03)),
    "FedYogi": ({"name": "yogi"}, (0.003, 0.01, 0.03, 0.1)),
    "FedAdagrad": ({"name": "adagrad"}, (0.03, 0.1, 0.3, 1.0)),
}
TAIL = 5  # rounds averaged for tuning and for the table


def run_one(server: dict[str, Any], lr: float, rounds: int, seed: int = 0) -> dict[str, Any]:
    cfg = ExperimentConfig.from_dict(
        {
            "seed": seed,
            "rounds": rounds,
            "server": {**server, "lr": lr},
            "run": {"threads": 1},  # 2 threads on 2 shared cores can stall 10x
            "evaluation": {"every": 1, "federated_clients": 0},
        }
    )
    t0, accuracy = time.perf_counter(), []
    try:
        run_experiment(
            cfg.build(), on_round=lambda rnd, m: accuracy.append(float(m["test_accuracy"]))
        )
        diverged = None
    except MessageError as exc:  # a client's update turned NaN: this learning rate diverges
        diverged = f"round {len(accuracy) + 1}: {exc}"
    return {
        "seed": seed,
        "lr": lr,
        "accuracy": accuracy,
        "diverged": diverged,
        "final": None if diverged else accuracy[-1],
        "tail_mean": None if diverged else statistics.fmean(accuracy[-TAIL:]),
        "seconds": time.perf_counter() - t0,
    }


def plot(seeded: dict[str, list[dict[str, Any]]]) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    for name, runs in seeded.items():
        curves = [r["accuracy"] for r in runs if not r["diverged"]]
        if not curves:
            continue
        mean = [statistics.fmean(c) for c in zip(*curves, strict=True)]
        label = f"{name} (server lr {runs[0]['lr']:g}, {len(curves)} seeds)"
        ax.plot(range(1, len(mean) + 1), mean, label=label)
    title = "Server optimizers, Fashion-MNIST Dir(0.5), tuned server lr, mean over seeds"
    save_curves(fig, [ax], [title], "test accuracy", "", "server_optimizers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seeds", default="0,1,2", help="the first one tunes the server lr")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    payload = header("server_optimizers")
    runs: dict[str, list[dict[str, Any]]] = {}
    seeded: dict[str, list[dict[str, Any]]] = {}
    for name, (server, lrs) in GRID.items():
        runs[name] = [_report(name, run_one(server, lr, args.rounds, seeds[0])) for lr in lrs]
        best = max(runs[name], key=_score)
        others = [run_one(server, best["lr"], args.rounds, s) for s in seeds[1:]]
        seeded[name] = [best, *(_report(name, r) for r in others)]
    summary = {
        name: {
            "lr": rs[0]["lr"],
            "tail_mean": statistics.fmean(r["tail_mean"] for r in rs),
            "tail_std": statistics.pstdev(r["tail_mean"] for r in rs),
            "final_mean": statistics.fmean(r["final"] for r in rs),
        }
        for name, rs in seeded.items()
        if not any(r["diverged"] for r in rs)
    }
    payload.update(
        rounds=args.rounds, tail=TAIL, seeds=seeds, grid=runs, seeded=seeded, summary=summary
    )
    write_result("server_optimizers", payload)
    plot(seeded)


def _score(run: dict[str, Any]) -> float:
    return -math.inf if run["diverged"] else float(run["tail_mean"])


def _report(name: str, r: dict[str, Any]) -> dict[str, Any]:
    outcome = (
        f"DIVERGED ({r['diverged']})"
        if r["diverged"]
        else (f"final={r['final']:.4f} last-{TAIL}={r['tail_mean']:.4f}")
    )
    line = f"{name:10s} seed={r['seed']} lr={r['lr']:<6g} {outcome} ({r['seconds']:.0f} s)"
    print(line, flush=True)
    return r


if __name__ == "__main__":
    main()
