"""Accuracy against epsilon for user-level DP (issue 14): DP-FedAvg with a fixed clip and
with adaptive clipping, DP-FTRL with tree aggregation, and local DP, side by side with the
non-private run, on Fashion-MNIST.

3,000 clients (IID, 20 examples each on average), Poisson sampling with q = 100 / 3,000 (an
expected cohort of 100), 200 rounds, logistic regression, one local epoch of batch-20 SGD
(lr 0.1), server SGD with lr 1 and momentum 0.9 (DP-FedAvg's usual server step). For each
epsilon in {1, 2, 4, 8} at delta = 1e-5 the noise multiplier is calibrated before the run
(``privacy.target_epsilon``, RDP) and the epsilon spent is the accountant's over the rounds
that ran; "inf" is the same mechanism with no noise (clipping only) and plain FedAvg. Fixed
clip 0.5; the adaptive clip starts at 0.1 and tracks the median norm (Andrew et al. 2021).
DP-FTRL (Kairouz et al. 2021) takes no sampling: shuffled epochs of 100 clients (30 rounds
each, every client once per epoch), the tree restarted each epoch, clip 0.5, the same server
momentum (DP-FTRLM); its noise is calibrated for a client in every epoch. Local DP clips to
0.5 and noises on each client, 100 clients per round in the same shuffled epochs.
Reported: final test accuracy, the noise multiplier, the epsilon spent, the mean cohort.

Run from the repository root (about 10 minutes; the vectorized engine):
    .venv/bin/python benchmarks/dp_accuracy.py
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from _common import header, write_result

from potluck.config import ExperimentConfig
from potluck.orchestrator import run_experiment
from potluck.privacy.ledger import private_mechanism

CLIENTS, COHORT = 3000, 100


def config(
    rounds: int, algorithm: dict[str, Any], privacy: dict[str, Any] | None, seed: int
) -> dict:
    cfg: dict[str, Any] = {
        "seed": seed,
        "rounds": rounds,
        "data": {"num_clients": CLIENTS, "partition": {"kind": "iid"}},
        "model": {"name": "logreg"},
        "algorithm": algorithm,
        "client": {"epochs": 1, "batch_size": 20, "lr": 0.1},
        "server": {"name": "sgd", "lr": 1.0, "momentum": 0.9},
        "evaluation": {"federated_clients": 0, "every": rounds},
        "run": {"threads": 1, "store": "none", "engine": "vectorized"},
    }
    if privacy is not None:
        cfg["privacy"] = privacy
    return cfg


def variants(epsilons: list[float]) -> list[tuple[str, float | None, dict, dict | None]]:
    rate = COHORT / CLIENTS
    fixed = {"name": "dp_fedavg", "rate": rate, "clip": 0.5}
    adaptive = {**fixed, "clip": 0.1, "target_quantile": 0.5}
    out: list[tuple[str, float | None, dict, dict | None]] = [
        ("fedavg (no DP, Poisson sampling)", None, {"name": "fedavg"}, None)
    ]
    epoch = CLIENTS // COHORT
    tree = {"name": "dp_ftrl", "clients_per_round": COHORT, "clip": 0.5, "restart_every": epoch}
    local = {"name": "ldp_fedavg", "clip": 0.5}
    for name, algo in (
        ("dp_fedavg, fixed clip", fixed),
        ("dp_fedavg, adaptive clip", adaptive),
        ("dp_ftrl, tree restarted each epoch", tree),
        ("local DP (ldp_fedavg)", local),
    ):
        out.append((name, float("inf"), {**algo, "noise_multiplier": 0.0}, {"delta": 1e-5}))
        for eps in epsilons:
            out.append((name, eps, {**algo}, {"delta": 1e-5, "target_epsilon": eps}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--epsilons", default="1,2,4,8")
    parser.add_argument("--only", default=None, help="run only the variants whose name has this")
    parser.add_argument("--seeds", default="0", help="run seeds (the data split stays the same)")
    args = parser.parse_args()
    result = header("dp_accuracy")
    rows = []
    runs = [
        (seed, *variant)
        for variant in variants([float(e) for e in args.epsilons.split(",")])
        for seed in (int(s) for s in args.seeds.split(","))
        if args.only is None or args.only in variant[0]
    ]
    for seed, name, eps, algo, privacy in runs:
        cfg = config(args.rounds, algo, privacy, seed)
        if algo["name"] == "fedavg":
            cfg["sampler"] = {"name": "poisson", "rate": COHORT / CLIENTS}
        if algo["name"] == "ldp_fedavg":
            cfg["sampler"] = {"name": "shuffle", "clients_per_round": COHORT}
        exp = ExperimentConfig.from_dict(cfg).build()
        t0 = time.perf_counter()
        run = run_experiment(exp)
        seconds = time.perf_counter() - t0
        last = run.final
        found = private_mechanism(exp.algorithm)
        row = {
            "variant": name,
            "seed": seed,
            "target_epsilon": eps,
            "noise_multiplier": None if found is None else found[1].noise_multiplier,
            "epsilon_spent": last.get("epsilon"),
            "test_accuracy": last["test_accuracy"],
            "mean_updates_per_round": sum(m["updates"] for m in run.history) / len(run.history),
            "seconds": seconds,
        }
        rows.append(row)
        print(row, flush=True)
    result["settings"] = {**vars(args), "clients": CLIENTS, "expected_cohort": COHORT}
    result["rows"] = rows
    print(write_result("dp_accuracy", result))


if __name__ == "__main__":
    main()
