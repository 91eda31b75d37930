"""Compressed uploads on Fashion-MNIST: accuracy against the cumulative uploaded bytes for
every scheme, against dense FedAvg, in one run.

Fashion-MNIST, 100 clients, Dirichlet(0.5) label skew, 20 clients per round, 1 local epoch
(batch 32, lr 0.05), seed 0, vectorized engine; McMahan et al.'s 2NN (``mlp2nn``, 199,210
parameters) and CNN (``cnn``, 1,663,370). Each scheme is one update transform; the bytes are
the round metrics ``bytes_up`` and ``bytes_down`` (``Message.wire_bytes``: what the deployment
sends). Each cell records the accuracy curve, the final accuracy (the mean of the last three
evaluations), the cumulative bytes, and the bytes to first reach the target accuracy (dense
FedAvg's final accuracy less 2 points). Each run is checked to have done the work: every
round aggregated updates, and a compressed run uploaded fewer bytes than dense.

Run from the repository root (the 2NN's 13 schemes: about 5 minutes on 2 CPUs; a CNN cell
of 20 rounds about 5 to 6 minutes):

    .venv/bin/python benchmarks/compression.py --models mlp2nn
    .venv/bin/python benchmarks/compression.py --models mlp2nn --schemes dense,top_k_1pc --merge
    .venv/bin/python benchmarks/compression.py --quick   # 3 rounds, a few schemes

Results: ``benchmarks/results/compression.json`` (written after every cell, so ``--merge``
continues an interrupted run), plot ``benchmarks/plots/compression.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common

from potluck.config import ExperimentConfig
from potluck.orchestrator import run_experiment

NAME = "compression"
# FetchSGD's sketch per model: about a sixth of the update, with cols well above the k
SKETCH = {"mlp2nn": {"cols": 6_000, "top_k": 0.005}, "cnn": {"cols": 50_000, "top_k": 0.005}}
SCHEMES: dict[str, list[dict[str, Any]]] = {
    "dense": [],
    "cast_bf16": [{"name": "cast", "dtype": "bfloat16"}],
    "qsgd_8": [{"name": "qsgd", "bits": 8}],
    "qsgd_4": [{"name": "qsgd", "bits": 4}],
    "qsgd_4_rotated": [{"name": "qsgd", "bits": 4, "rotate": True}],
    "qsgd_2_rotated": [{"name": "qsgd", "bits": 2, "rotate": True}],
    "top_k_1pc": [{"name": "top_k", "fraction": 0.01}],
    "top_k_1pc_no_ef": [{"name": "top_k", "fraction": 0.01, "error_feedback": False}],
    "top_k_1pc_dgc": [{"name": "top_k", "fraction": 0.01, "momentum": 0.5}],
    "random_k_10pc": [{"name": "random_k", "fraction": 0.1}],
    "sign_ef": [{"name": "sign_ef"}],
    "fetchsgd": [{"name": "fetchsgd", "rows": 5, "momentum": 0.9, "lr": 0.1}],
    "powersgd_4": [{"name": "powersgd", "rank": 4}],
}
MODELS = ("mlp2nn", "cnn")


def base(model: str, rounds: int, seed: int) -> dict[str, Any]:
    return {
        "seed": seed,
        "rounds": rounds,
        "data": {
            "dataset": "fashion_mnist",
            "num_clients": 100,
            "partition": {"kind": "dirichlet", "alpha": 0.5},
        },
        "model": {"name": model},
        "sampler": {"clients_per_round": 20},
        "client": {"epochs": 1, "batch_size": 32, "lr": 0.05},
        "evaluation": {"federated_clients": 0},
        "run": {"engine": "vectorized", "threads": 2},
    }


def transforms(model: str, scheme: str) -> list[dict[str, Any]]:
    chain = [dict(t) for t in SCHEMES[scheme]]
    for t in chain:
        if t["name"] == "fetchsgd":
            t.update(SKETCH[model])
    return chain


def cell(model: str, scheme: str, rounds: int, seed: int) -> dict[str, Any]:
    chain = transforms(model, scheme)
    exp = ExperimentConfig.from_dict({**base(model, rounds, seed), "transforms": chain}).build()
    t0 = time.perf_counter()
    history = run_experiment(exp).history
    wall = time.perf_counter() - t0
    acc = [m["test_accuracy"] for m in history]
    up, down, total_up, total_down = [], [], 0.0, 0.0
    for m in history:
        total_up += m["bytes_up"]
        total_down += m["bytes_down"]
        up.append(total_up)
        down.append(total_down)
    return {
        "transforms": chain,
        "rounds": rounds,
        "final_accuracy": statistics.fmean(acc[-3:]),
        "accuracy_curve": acc,
        "bytes_up_cumulative": up,
        "bytes_down_cumulative": down,
        "updates": sum(m["updates"] for m in history),
        "rounds_without_updates": sum(1 for m in history if m["updates"] == 0),
        "bytes_up_per_update": total_up / max(1.0, sum(m["updates"] for m in history)),
        "wall_s": wall,
        "round_s_median": statistics.median(m["round_seconds"] for m in history),
    }


def reached(c: dict[str, Any], target: float) -> dict[str, float] | None:
    """The round and cumulative bytes at which ``c`` first reached ``target``."""
    for i, a in enumerate(c["accuracy_curve"]):
        if a >= target:
            up, down = c["bytes_up_cumulative"][i], c["bytes_down_cumulative"][i]
            return {"round": i + 1, "bytes_up": up, "bytes_down": down}
    return None


def summarise(results: dict[str, Any]) -> None:
    """Per model: the target (dense final less 2 points), each cell's bytes to reach it,
    its compression against dense and the check that the work was done."""
    for model, cells in results["cells"].items():
        dense = cells.get("dense")
        if dense is None:
            continue
        target = round(dense["final_accuracy"] - 0.02, 3)
        results.setdefault("targets", {})[model] = target
        for name, c in cells.items():
            c["to_target"] = reached(c, target)
            c["compression"] = dense["bytes_up_per_update"] / c["bytes_up_per_update"]
            c["did_the_work"] = c["rounds_without_updates"] == 0 and (
                name == "dense" or c["bytes_up_per_update"] < dense["bytes_up_per_update"]
            )


def plot(results: dict[str, Any]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    models = [m for m in MODELS if m in results["cells"]]
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.6), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        colours = plt.get_cmap("tab20").colors
        for i, (name, c) in enumerate(results["cells"][model].items()):
            mb = [b / 1e6 for b in c["bytes_up_cumulative"]]
            style = {"lw": 2.2, "color": "black"} if name == "dense" else {"lw": 1.2}
            ax.plot(mb, c["accuracy_curve"], label=name, **({"color": colours[i]} | style))
        ax.set_xscale("log")
        ax.set_xlabel("MB uploaded (cumulative, log scale)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"Fashion-MNIST, {model}, 100 clients, Dirichlet 0.5")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out = _common.REPO / "benchmarks" / "plots" / f"{NAME}.png"
    fig.savefig(out, dpi=110)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--merge", action="store_true", help="keep the cells already measured")
    parser.add_argument("--quick", action="store_true", help="3 rounds, a few schemes")
    args = parser.parse_args()
    models, schemes = args.models.split(","), args.schemes.split(",")
    if args.quick:
        args.rounds, models, schemes = 3, ["mlp2nn"], ["dense", "qsgd_8", "top_k_1pc", "fetchsgd"]
    for name in schemes:
        if name not in SCHEMES:
            parser.error(f"unknown scheme {name!r}: one of {', '.join(SCHEMES)}")
    path = _common.RESULTS / f"{NAME}.json"
    results: dict[str, Any] = {**_common.header(NAME), "rounds": args.rounds, "seed": args.seed}
    results["cells"] = (
        json.loads(path.read_text()).get("cells", {}) if args.merge and path.exists() else {}
    )
    for model in models:
        for scheme in schemes:
            out = cell(model, scheme, args.rounds, args.seed)
            results["cells"].setdefault(model, {})[scheme] = out
            print(
                f"{model:7s} {scheme:17s} acc={out['final_accuracy']:.4f} "
                f"MB/update={out['bytes_up_per_update'] / 1e6:.4f} wall={out['wall_s']:.1f}s",
                flush=True,
            )
            out["date"] = _common.now_utc()
            summarise(results)
            # a copy: write_result consumes the header's start times, needed at every cell
            _common.write_result(NAME, json.loads(json.dumps(results)))
    print(f"plot: {plot(results)}")


if __name__ == "__main__":
    main()
