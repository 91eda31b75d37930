"""Adaptive server optimizers on non-IID Fashion-MNIST at tuned learning rates (Reddi et al.
2021, "Adaptive Federated Optimization", ICLR), next to FedAvg and FedAvgM.

The default experiment (100 clients, Dirichlet(0.5) label skew, 10 clients per round, small
CNN, 2 local epochs of batch-32 SGD at lr 0.1) with each server optimizer; each optimizer's
server learning rate is tuned over a small grid on the final test accuracy, and the best
curve of each is plotted.

    .venv/bin/python benchmarks/compare_server_optimizers.py [--rounds 20]

Writes benchmarks/results/server_optimizers.json and benchmarks/plots/server_optimizers.png.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from _common import header, save_curves, write_result

from potluck.config import ExperimentConfig
from potluck.orchestrator import run_experiment

GRID: dict[str, tuple[dict[str, Any], tuple[float, ...]]] = {
    "FedAvg": ({"optimizer": "sgd"}, (1.0,)),
    "FedAvgM": ({"optimizer": "sgd", "momentum": 0.9}, (0.1, 0.3, 1.0)),
    "FedAdam": ({"optimizer": "adam"}, (0.003, 0.01, 0.03)),
    "FedYogi": ({"optimizer": "yogi"}, (0.003, 0.01, 0.03)),
    "FedAdagrad": ({"optimizer": "adagrad"}, (0.01, 0.03, 0.1)),
}


def run_one(server: dict[str, Any], lr: float, rounds: int) -> dict[str, Any]:
    cfg = ExperimentConfig.from_dict(
        {
            "rounds": rounds,
            "server": {**server, "lr": lr},
            "run": {"threads": 1},  # 2 threads on 2 shared cores can stall 10x
            "evaluation": {"every": 1, "federated_clients": 0},
        }
    )
    t0 = time.perf_counter()
    history = run_experiment(cfg.build()).history
    accuracy = [m["test_accuracy"] for m in history]
    return {
        "lr": lr,
        "accuracy": accuracy,
        "final": accuracy[-1],
        "seconds": time.perf_counter() - t0,
    }


def plot(best: dict[str, dict[str, Any]]) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    for name, run in best.items():
        rounds = range(1, len(run["accuracy"]) + 1)
        ax.plot(rounds, run["accuracy"], label=f"{name} (server lr {run['lr']:g})")
    title = "Server optimizers, Fashion-MNIST Dir(0.5), tuned server lr"
    save_curves(fig, [ax], [title], "test accuracy", "", "server_optimizers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    payload = header("server_optimizers")
    runs: dict[str, list[dict[str, Any]]] = {}
    for name, (server, lrs) in GRID.items():
        runs[name] = [run_one(server, lr, args.rounds) for lr in lrs]
        for r in runs[name]:
            print(
                f"{name:10s} lr={r['lr']:<6g} final={r['final']:.4f} ({r['seconds']:.0f} s)",
                flush=True,
            )
    best = {name: max(rs, key=lambda r: r["final"]) for name, rs in runs.items()}
    payload.update(rounds=args.rounds, runs=runs, best={k: v["lr"] for k, v in best.items()})
    write_result("server_optimizers", payload)
    plot(best)


if __name__ == "__main__":
    main()
