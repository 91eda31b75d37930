"""Short versions of the reproductions, for checking that a change of the code leaves the
numbers unchanged: NIID-Bench's four algorithms on Fashion-MNIST Dir(0.5) (LeNet-5, local
momentum 0.9; 2 rounds of 1 local epoch instead of 50 of 10) and FedProx's stragglers
experiment on Synthetic(1, 1) (4 settings, 10 rounds instead of 200). Each run's final
accuracy, loss and the sum and L1 norm of its final weights (float64) are written as JSON.

The configs are written in config format 1, which every commit reads (revision 2 upgrades
it), so ``ab_revisions.py --benchmark same_results`` can run this file against an older
``src/``:

    .venv/bin/python benchmarks/same_results.py --out results.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

NIID = {
    "seed": 0,
    "rounds": 2,
    "data": {
        "dataset": "fashion_mnist",
        "num_clients": 10,
        "test_fraction": 0.0,
        "partition": {"kind": "dirichlet", "alpha": 0.5},
    },
    "model": {"name": "lenet5"},
    "sampler": {"clients_per_round": 10},
    "client": {"epochs": 1, "batch_size": 64, "lr": 0.01, "momentum": 0.9},
    "run": {"threads": 1},
    "evaluation": {"every": 1, "centralized": True, "federated_clients": 0},
}
SYNTHETIC = {
    "seed": 0,
    "rounds": 10,
    "data": {
        "dataset": "synthetic",
        "num_clients": 30,
        "synthetic_alpha": 1.0,
        "synthetic_beta": 1.0,
        "test_fraction": 0.2,
        "partition": {"kind": "natural"},
    },
    "model": {"name": "logreg"},
    "sampler": {"clients_per_round": 10},
    "client": {"epochs": 20, "batch_size": 10, "lr": 0.01},
    "run": {"threads": 1},
    "evaluation": {"every": 5, "centralized": True, "federated_clients": -1},
}


def runs() -> dict[str, dict[str, Any]]:
    """Every run's config (format 1: the algorithm's settings in ``[algorithm]``)."""
    out = {}
    for name in ("fedavg", "scaffold", "fedprox", "fednova"):
        algorithm = {"name": name, **({"mu": 0.01, "q": 1.0} if name == "fedprox" else {})}
        out[f"niid/{name}"] = {**NIID, "algorithm": algorithm}
    for name, mu, stragglers in (
        ("fedavg", 0.0, 0.5),
        ("fedprox", 1.0, 0.5),
        ("fedprox", 0.0, 0.9),
        ("fedavg", 0.0, 0.9),
    ):
        algorithm = {"name": name, "mu": mu, "q": 1.0, "stragglers": stragglers}
        out[f"synthetic/{name}-mu{mu:g}-stragglers{stragglers:g}"] = {
            **SYNTHETIC,
            "algorithm": algorithm,
        }
    return out


def main() -> None:
    from potluck.config import ExperimentConfig
    from potluck.orchestrator import run_experiment

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    results = {}
    for name, config in runs().items():
        result = run_experiment(ExperimentConfig.from_dict(config).build())
        w = result.weights.double()
        results[name] = {
            "test_accuracy": result.final.get("test_accuracy"),
            "loss": result.final.get("fed_loss", result.final.get("test_loss")),
            "weights_sum": float(w.sum()),
            "weights_l1": float(w.abs().sum()),
        }
        print(name, results[name], flush=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
