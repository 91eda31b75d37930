"""Robust aggregators against poisoning attacks: the table every robustness paper has.

Fashion-MNIST, 100 clients, Dirichlet(0.5) label skew, McMahan's 2NN (the ``mlp``), 20
clients per round, 20 % of the federation malicious (``attack.fraction = 0.2``), every
aggregator against every attack, final test accuracy (the mean of the last three
evaluations, so one lucky round does not decide a cell) and, for the backdoor, the attack
success rate (``backdoor_accuracy``). The clean FedAvg run is the baseline; the honest
update norm it measures (the median of its per-client ``score_norm``) sets norm bounding's
bound and centered clipping's radius, as a defender tuning on clean rounds would.

Each cell checks that the attack really ran: the attacked runs' rounds hold malicious
updates (the round metric ``malicious``), and the clean runs none.

Run from the repository root (about 40 minutes for the full table on 2 CPUs):

    .venv/bin/python benchmarks/robustness.py
    .venv/bin/python benchmarks/robustness.py --aggregators fltrust,foolsgold --merge
    .venv/bin/python benchmarks/robustness.py --quick   # 3 rounds, a few cells: a try-out

Results: ``benchmarks/results/robustness.json`` (written after every cell, so ``--merge``
continues an interrupted table), plot ``benchmarks/plots/robustness.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common

from potluck.config import ExperimentConfig
from potluck.orchestrator import run_experiment

NAME = "robustness"
F = 0.2  # the malicious fraction, and the f the robust aggregators are told
AGGREGATORS: dict[str, dict[str, Any]] = {
    "mean": {"name": "mean"},
    "median": {"name": "median", "byzantine": F},
    "trimmed_mean": {"name": "trimmed_mean", "trim": F},
    "krum": {"name": "krum", "byzantine": F},
    "multi_krum": {"name": "multi_krum", "byzantine": F},
    "bulyan": {"name": "bulyan", "byzantine": F},
    "geometric_median": {"name": "geometric_median", "byzantine": F},
    # its guarantee assumes f <= 0.1 n: told 0.1 (the largest it accepts), facing 0.2
    "centered_clipping": {"name": "centered_clipping", "byzantine": 0.1, "tau": "NORM"},
    "norm_bounding": {"name": "norm_bounding", "bound": "NORM"},
    "fltrust": {"name": "fltrust"},
    "foolsgold": {"name": "foolsgold"},
}
ATTACKS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "label_flip": {"name": "label_flip"},
    "sign_flip": {"name": "sign_flip"},
    "scaling": {"name": "scaling", "factor": 10.0},
    "gaussian": {"name": "gaussian", "std": 1.0},
    "alie": {"name": "alie"},
    "ipm": {"name": "ipm", "epsilon": 0.5},
    "min_max": {"name": "min_max"},
    "min_sum": {"name": "min_sum"},
    "fang_krum": {"name": "fang_krum"},
    "fang_trimmed_mean": {"name": "fang_trimmed_mean"},
    "backdoor": {"name": "backdoor", "target": 0, "poison_fraction": 0.5, "boost": 5.0},
}


def base(rounds: int, seed: int) -> dict[str, Any]:
    return {
        "seed": seed,
        "rounds": rounds,
        "data": {
            "dataset": "fashion_mnist",
            "num_clients": 100,
            "partition": {"kind": "dirichlet", "alpha": 0.5},
        },
        "model": {"name": "mlp"},
        "sampler": {"clients_per_round": 20},
        "client": {"epochs": 1, "batch_size": 32, "lr": 0.05},
        "evaluation": {"federated_clients": 0},
        "run": {"engine": "vectorized", "threads": 2},
    }


def cell(
    aggregator: dict[str, Any], attack: dict[str, Any] | None, rounds: int, seed: int, norm: float
) -> dict[str, Any]:
    agg = {k: (norm if v == "NORM" else v) for k, v in aggregator.items()}
    data = {**base(rounds, seed), "aggregator": agg}
    if attack is not None:
        data["attack"] = {**attack, "fraction": F}
    exp = ExperimentConfig.from_dict(data).build()
    t0 = time.perf_counter()
    history = run_experiment(exp).history
    wall = time.perf_counter() - t0
    acc = [m["test_accuracy"] for m in history if "test_accuracy" in m]
    out: dict[str, Any] = {
        "aggregator": agg,
        "attack": data.get("attack"),
        "final_accuracy": statistics.fmean(acc[-3:]),
        "accuracy_curve": acc,
        "wall_s": wall,
        "round_s_median": statistics.median(m["round_seconds"] for m in history),
        "aborted_rounds": sum(m.get("aborted", 0.0) for m in history),
        "malicious_updates": sum(m.get("malicious", 0.0) for m in history),
        "updates": sum(m["updates"] for m in history),
        "flagged": sum(m.get("flagged", 0.0) for m in history),
        "flagged_malicious": sum(m.get("flagged_malicious", 0.0) for m in history),
    }
    if "backdoor_accuracy" in history[-1]:
        asr = [m["backdoor_accuracy"] for m in history if "backdoor_accuracy" in m]
        out["backdoor_accuracy"] = statistics.fmean(asr[-3:])
    # the attack really ran (and the clean run had none)
    out["attack_ran"] = (out["malicious_updates"] > 0) == (attack is not None)
    return out


def honest_norm(rounds: int, seed: int) -> tuple[float, dict[str, Any]]:
    """The clean FedAvg run, and the median norm of its updates."""
    from potluck.store.sqlite import RunStore

    with tempfile.TemporaryDirectory() as folder, RunStore(folder) as store:
        exp = ExperimentConfig.from_dict({**base(rounds, seed), "aggregator": {"name": "mean"}})
        run_id = run_experiment(exp.build(), store).run_id
        assert run_id is not None
        norms = [m["score_norm"] for _, _, m in store.client_metrics(run_id) if "score_norm" in m]
    return statistics.median(norms), {"norms_seen": len(norms), "rounds": rounds}


def plot(results: dict[str, Any]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cells = results["cells"]
    aggs = [a for a in AGGREGATORS if any(c.startswith(a + "|") for c in cells)]
    attacks = [t for t in ATTACKS if any(c.endswith("|" + t) for c in cells)]
    grid = [[cells.get(f"{a}|{t}", {}).get("final_accuracy", float("nan")) for t in attacks]
            for a in aggs]  # fmt: skip
    fig, ax = plt.subplots(figsize=(1.0 + 0.85 * len(attacks), 1.0 + 0.5 * len(aggs)))
    im = ax.imshow(grid, vmin=0.0, vmax=max(0.9, max(max(r) for r in grid)), cmap="viridis")
    ax.set_xticks(range(len(attacks)), attacks, rotation=45, ha="right")
    ax.set_yticks(range(len(aggs)), aggs)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if v < 0.5 else "black")  # fmt: skip
    fig.colorbar(im, ax=ax, label="final test accuracy")
    ax.set_title("Fashion-MNIST, 100 clients, Dirichlet 0.5, 20% malicious")
    fig.tight_layout()
    out = _common.REPO / "benchmarks" / "plots" / f"{NAME}.png"
    fig.savefig(out, dpi=110)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--aggregators", default=",".join(AGGREGATORS))
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--merge", action="store_true", help="keep the cells already measured")
    parser.add_argument("--quick", action="store_true", help="3 rounds, a few cells")
    args = parser.parse_args()
    aggs, attacks = args.aggregators.split(","), args.attacks.split(",")
    if args.quick:
        args.rounds, aggs, attacks = 3, ["mean", "median"], ["none", "alie", "backdoor"]
    for name in aggs:
        if name not in AGGREGATORS:
            parser.error(f"unknown aggregator {name!r}: one of {', '.join(AGGREGATORS)}")
    for name in attacks:
        if name not in ATTACKS:
            parser.error(f"unknown attack {name!r}: one of {', '.join(ATTACKS)}")
    path = _common.RESULTS / f"{NAME}.json"
    results: dict[str, Any] = {**_common.header(NAME), "rounds": args.rounds, "seed": args.seed}
    if args.merge and path.exists():
        old = json.loads(path.read_text())
        results["cells"] = old.get("cells", {})
        results["honest_norm"] = old.get("honest_norm")
    results.setdefault("cells", {})
    if not results.get("honest_norm"):
        norm, info = honest_norm(args.rounds, args.seed)
        results["honest_norm"], results["honest_norm_info"] = norm, info
    norm = float(results["honest_norm"])
    print(f"honest update norm (median, clean FedAvg): {norm:.4f}", flush=True)
    for agg in aggs:
        for attack in attacks:
            key = f"{agg}|{attack}"
            try:
                out = cell(AGGREGATORS[agg], ATTACKS[attack], args.rounds, args.seed, norm)
            except ValueError as exc:  # a configuration the aggregator refuses
                out = {"refused": str(exc)}
            results["cells"][key] = out
            acc = out.get("final_accuracy")
            asr = out.get("backdoor_accuracy")
            print(f"{key:40s} acc={acc} asr={asr} wall={out.get('wall_s')}", flush=True)
            out["date"] = _common.now_utc()
            # a copy: write_result consumes the header's start times, needed at every cell
            _common.write_result(NAME, json.loads(json.dumps(results)))
    plotted = plot(results)
    if plotted:
        print(f"plot: {plotted}")


if __name__ == "__main__":
    main()
