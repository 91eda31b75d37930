"""Asynchronous FL and synchronous round policies on virtual time (issue 18).

Fashion-MNIST, 100 clients, Dirichlet(0.5) label skew, McMahan's 2NN (``mlp2nn``), 1 local
epoch (batch 32, lr 0.05), 10 clients a round, vectorized engine, as BENCHMARKS §23 but for
the cohort. Every client is a device drawn from the run seed (``data.profiles``): lognormal
compute speeds (median 5 local steps a second, sigma 1.0 of the logarithm: the middle half
spans a factor 3.9, the slowest tenth is 3.6x below the median), download and upload
bandwidths (medians 20 and 5 Mbit/s, sigma 0.8) and latencies (50 ms, sigma 0.5), always
online, no failures. An answer arrives after its download, its local steps at its speed and
its upload of the bytes really sent.

1. **FedBuff against synchronous FedAvg(M).** Synchronous FedAvg with 10 clients a round
   (server SGD lr 1), FedAvgM (server momentum 0.9) and FedBuff (Nguyen et al. 2022: buffer
   K = 10, staleness weight 1 / sqrt(1 + tau)) with 30 clients in flight, and with the tuned
   server at 10 in flight (the synchronous runs' parallelism). The server learning rates
   (FedAvgM: momentum 0.9; FedBuff: momentum 0.9 as in the paper, or none) are tuned on a
   small grid on the first seed by the virtual time to the higher target, and the tuned
   methods rerun on the other seeds (which change the partition, the devices and the
   cohorts). A FedBuff step is 10 updates like a synchronous round, but takes far less
   virtual time, so FedBuff runs 3x the rounds. Per run: the virtual time, server steps,
   aggregated updates and client trainings (released work, including dropped and in-flight
   clients) to reach each target test accuracy, and the speed-up, synchronous time / FedBuff
   time, per seed and its median.
2. **Deadline and over-selection** for synchronous FedAvg rounds: none; a deadline at the
   70th percentile of the members' response times in the run without one, late members
   dropped, or given the partial work that fits (FedProx); over-selection of 30 % (keep the
   first 10 of 13). The deadline runs get as many rounds as cover the virtual time of the
   run without one. Per policy: accuracy against virtual time, and the bias: each device
   class's (speed tercile: slow, medium, fast) share of the sampled members and of the kept
   updates, and its clients' mean local test accuracy (federated evaluation of the final
   models on every client's local test split, the mean of the last three evaluations). On
   the first seed.

Run from the repository root (about 12 minutes alone on 2 CPUs; ``--quick`` 20 seconds):

    .venv/bin/python benchmarks/async_vs_sync.py
    .venv/bin/python benchmarks/async_vs_sync.py --quick   # a few rounds of each: a try-out

Results: ``benchmarks/results/async_vs_sync.json``, plot ``benchmarks/plots/async_vs_sync.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common

import potluck
from potluck.config import ExperimentConfig
from potluck.orchestrator import run_experiment
from potluck.store.sqlite import RunStore

NAME = "async_vs_sync"
TARGETS = (0.70, 0.75)
CLASSES = ("slow", "medium", "fast")
PROFILES: dict[str, Any] = {
    "speed": 5.0,
    "speed_sigma": 1.0,
    "down_mbps": 20.0,
    "up_mbps": 5.0,
    "bandwidth_sigma": 0.8,
    "latency_ms": 50.0,
    "latency_sigma": 0.5,
}
# server (learning rate, momentum) grids, tuned on the first seed
FEDAVGM_GRID = ((0.3, 0.9), (1.0, 0.9))
FEDBUFF_GRID = ((0.03, 0.9), (0.1, 0.9), (0.3, 0.9), (1.0, 0.0))
ASYNC_STEPS = 3  # FedBuff runs this many times the synchronous rounds (its steps are shorter)
BUFFER = 10
CONCURRENCY = 30
DEADLINE_QUANTILE = 0.7
OVER_SELECTION = 0.3


def base(rounds: int, seed: int) -> dict[str, Any]:
    return {
        "seed": seed,
        "rounds": rounds,
        "data": {
            "dataset": "fashion_mnist",
            "num_clients": 100,
            "partition": {"kind": "dirichlet", "alpha": 0.5},
        },
        "model": {"name": "mlp2nn"},
        "sampler": {"clients_per_round": 10},
        "client": {"epochs": 1, "batch_size": 32, "lr": 0.05},
        "evaluation": {"federated_clients": 0},
        "profiles": PROFILES,
        "run": {"engine": "vectorized", "threads": 2},
    }


def server(lr: float, momentum: float) -> dict[str, Any]:
    return {"server": {"name": "sgd", "lr": lr, "momentum": momentum}}


def fedbuff(concurrency: int, lr: float, momentum: float) -> dict[str, Any]:
    return {"async": {"concurrency": concurrency, "buffer": BUFFER}, **server(lr, momentum)}


# -- one run ---------------------------------------------------------------------------------


def execute(cfg: dict[str, Any], store: Path | None = None) -> dict[str, Any]:
    """Run ``cfg``; its per-step curve (virtual time, accuracy, cumulative work)."""
    exp = ExperimentConfig.from_dict(cfg).build()
    t0 = time.perf_counter()
    result = run_experiment(exp, store)
    wall = time.perf_counter() - t0
    h = result.history
    updates = np.cumsum([m["updates"] for m in h])
    out: dict[str, Any] = {
        "rounds": len(h),
        "wall_s": wall,
        "virtual_time_s": [m["virtual_time_s"] for m in h],
        "accuracy_curve": [m["test_accuracy"] for m in h],
        "updates_cumulative": updates.tolist(),
        "trainings_cumulative": trainings(h).tolist(),
        "final_accuracy": statistics.fmean(m["test_accuracy"] for m in h[-3:]),
        "round_virtual_s_median": statistics.median(m["round_virtual_s"] for m in h),
        "did_the_work": all(m["updates"] > 0 for m in h),
    }
    if "staleness_mean" in h[0]:
        out["staleness_mean"] = statistics.fmean(m["staleness_mean"] for m in h)
        out["staleness_max"] = max(m["staleness_max"] for m in h)
    if "dropped_late" in h[0]:
        out["dropped_late"] = sum(m["dropped_late"] for m in h)
        out["over_selected"] = sum(m["over_selected"] for m in h)
    out["to_target"] = {str(t): reach(out, t) for t in TARGETS}
    if store is not None:
        out["run_id"] = result.run_id
    return out


def trainings(history: Sequence[dict[str, float]]) -> np.ndarray:
    """Client trainings started by each step: a synchronous round's whole cohort (dropped
    members trained too); for FedBuff the aggregated, dropped and still in-flight clients."""
    if "in_flight" not in history[0]:
        return np.cumsum([m["cohort_size"] for m in history])
    done = np.cumsum(
        [m["updates"] + m["dropped_failed"] + m["dropped_offline"] + m["dropped_stale"]
         for m in history]
    )  # fmt: skip
    return done + np.array([m["in_flight"] for m in history])


def reach(cell: dict[str, Any], target: float) -> dict[str, float] | None:
    """The first step at or above ``target``: its virtual time and the work done by then."""
    for i, acc in enumerate(cell["accuracy_curve"]):
        if acc >= target:
            return {
                "step": i + 1,
                "virtual_s": cell["virtual_time_s"][i],
                "updates": cell["updates_cumulative"][i],
                "trainings": cell["trainings_cumulative"][i],
            }
    return None


def time_to(cell: dict[str, Any], target: float) -> float:
    got = cell["to_target"][str(target)]
    return got["virtual_s"] if got else math.inf


def best(cells: dict[str, dict[str, Any]], prefix: str) -> str:
    """The tuned cell of ``prefix``: the earliest to the highest target, then the most
    accurate at the end."""
    names = [n for n in cells if n.startswith(prefix)]
    return min(names, key=lambda n: (time_to(cells[n], TARGETS[-1]), -cells[n]["final_accuracy"]))


# -- part 1: FedBuff against FedAvg(M) -------------------------------------------------------


def part_fedbuff(
    rounds: int,
    seeds: Sequence[int],
    results: dict[str, Any],
    grids: tuple[Sequence[tuple[float, float]], Sequence[tuple[float, float]]],
) -> None:
    """Tune on ``seeds[0]`` (every grid point), rerun the tuned cells on the other seeds."""
    part = results.setdefault("fedbuff", {})
    cells: dict[str, dict[str, Any]] = part.setdefault("cells", {})
    plan: dict[str, dict[str, Any]] = {"fedavg": {}}
    plan.update({f"fedavgm_lr{lr:g}": server(lr, m) for lr, m in grids[0]})
    plan.update({buff_name(CONCURRENCY, lr, m): fedbuff(CONCURRENCY, lr, m) for lr, m in grids[1]})
    for name, extra in plan.items():
        measured(cells, name, rounds, seeds[0], extra, results)
    tuned = cells[best(cells, f"fedbuff_c{CONCURRENCY}_")]["overrides"]["server"]
    lr, m = tuned["lr"], tuned["momentum"]
    measured(cells, buff_name(BUFFER, lr, m), rounds, seeds[0], fedbuff(BUFFER, lr, m), results)
    part["tuned"] = tuned_cells(cells)
    part["seeds"] = {str(seeds[0]): {label: cells[n] for label, n in part["tuned"].items()}}
    for seed in seeds[1:]:
        runs: dict[str, dict[str, Any]] = {}
        part["seeds"][str(seed)] = runs
        for label, name in part["tuned"].items():
            measured(runs, label, rounds, seed, cells[name]["overrides"], results)
    part["speedup"] = speedups(part)


def buff_name(concurrency: int, lr: float, momentum: float) -> str:
    return f"fedbuff_c{concurrency}_lr{lr:g}" + (f"_m{momentum:g}" if momentum else "")


def measured(
    cells: dict[str, Any],
    name: str,
    rounds: int,
    seed: int,
    overrides: dict[str, Any],
    results: dict[str, Any],
) -> None:
    steps = rounds * ASYNC_STEPS if "async" in overrides else rounds
    cfg = {**base(steps, seed), **overrides}
    out = cells[name] = {"seed": seed, "overrides": overrides, **execute(cfg)}
    out["date"] = _common.now_utc()
    line = " ".join(
        f"t({t})={v['virtual_s']:.0f}s" if v else f"t({t})=never"
        for t, v in out["to_target"].items()
    )
    print(f"seed {seed} {name:27s} acc={out['final_accuracy']:.4f} {line} "
          f"wall={out['wall_s']:.1f}s", flush=True)  # fmt: skip
    checkpoint(results)


def tuned_cells(cells: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Each compared method's cell: FedAvg, the tuned FedAvgM and FedBuff, and FedBuff with
    the tuned server at the synchronous runs' parallelism."""
    out = {
        "fedavg": "fedavg",
        "fedavgm": best(cells, "fedavgm_"),
        "fedbuff": best(cells, f"fedbuff_c{CONCURRENCY}_"),
    }
    equal = [n for n in cells if n.startswith(f"fedbuff_c{BUFFER}_")]
    if equal:
        out["fedbuff_equal_parallelism"] = equal[0]
    return out


def speedups(part: dict[str, Any]) -> dict[str, Any]:
    """Per synchronous / asynchronous pair and target: each seed's time ratio and the median
    (``None`` where one of the two never reached it)."""
    out: dict[str, Any] = {}
    for s in ("fedavg", "fedavgm"):
        for b in ("fedbuff", "fedbuff_equal_parallelism"):
            if b not in part["tuned"]:
                continue
            row: dict[str, Any] = {}
            for t in TARGETS:
                ratios: list[float | None] = []
                for runs in part["seeds"].values():
                    ts, tb = time_to(runs[s], t), time_to(runs[b], t)
                    ratios.append(ts / tb if math.isfinite(ts) and math.isfinite(tb) else None)
                known = [r for r in ratios if r is not None]
                median = statistics.median(known) if known else None
                row[str(t)] = {"per_seed": ratios, "median": median}
            out[f"{s} / {b}"] = row
    return out


# -- part 2: deadline and over-selection ------------------------------------------------------


def part_policies(rounds: int, seed: int, results: dict[str, Any]) -> None:
    part = results.setdefault("policies", {})
    cells: dict[str, dict[str, Any]] = part.setdefault("cells", {})
    classes = device_classes(seed)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp)
        policy_cell(cells, "none", rounds, seed, {}, store, classes, results)
        deadline = float(np.quantile(response_times(store, cells["none"]["run_id"]),
                                     DEADLINE_QUANTILE))  # fmt: skip
        part["deadline_s"] = deadline
        horizon = cells["none"]["virtual_time_s"][-1]
        timed = min(3 * rounds, math.ceil(horizon / deadline))
        for name, clock, n in (
            ("deadline_drop", {"deadline_s": deadline, "late": "drop"}, timed),
            ("deadline_partial", {"deadline_s": deadline, "late": "partial"}, timed),
            ("over_selection_30", {"over_selection": OVER_SELECTION}, rounds),
        ):
            policy_cell(cells, name, n, seed, clock, store, classes, results)
    part["population_share"] = {c: classes.count(c) / len(classes) for c in CLASSES}
    ends = [c["virtual_time_s"][-1] for c in cells.values()]
    part["common_horizon_s"] = min(ends)
    for c in cells.values():
        c["accuracy_at_common_horizon"] = at_time(c, part["common_horizon_s"])


def device_classes(seed: int) -> list[str]:
    """Each client's device class, as the run draws its devices."""
    exp = ExperimentConfig.from_dict(base(1, seed)).build()
    assert exp.profiles is not None
    return list(exp.profiles.draw(100, exp.seed).classes)


def policy_cell(
    cells: dict[str, Any],
    name: str,
    rounds: int,
    seed: int,
    clock: dict[str, Any],
    store: Path,
    classes: list[str],
    results: dict[str, Any],
) -> None:
    cfg = {**base(rounds, seed), "evaluation": {"federated_clients": -1}}
    if clock:
        cfg["clock"] = clock
    out = cells[name] = {"clock": clock or None, **execute(cfg, store)}
    out.update(bias(store, out["run_id"], classes))
    out["date"] = _common.now_utc()
    shares = " ".join(f"{c}={out['kept_share'][c]:.2f}" for c in CLASSES)
    accs = " ".join(f"{c}={out['class_accuracy'][c]:.3f}" for c in CLASSES)
    print(f"{name:18s} rounds={rounds} acc={out['final_accuracy']:.4f} "
          f"T={out['virtual_time_s'][-1]:.0f}s kept {shares} acc {accs} "
          f"wall={out['wall_s']:.1f}s", flush=True)  # fmt: skip
    checkpoint(results)


def response_times(store: Path, run_id: str) -> np.ndarray:
    """Every timed member's download + compute + upload seconds in the stored run."""
    rows = RunStore(store).client_metrics(run_id)
    return np.array(
        [m["download_s"] + m["compute_s"] + m["upload_s"] for _, _, m in rows if "compute_s" in m]
    )


def bias(store: Path, run_id: str, classes: list[str]) -> dict[str, Any]:
    """Per device class: its share of the sampled members and of the kept updates, and its
    clients' mean local test accuracy over the last three federated evaluations."""
    rows = RunStore(store).client_metrics(run_id)
    sampled = {c: 0 for c in CLASSES}
    kept = {c: 0 for c in CLASSES}
    evals: dict[int, dict[int, float]] = {}
    for rnd, client, m in rows:
        if "compute_s" in m:
            sampled[classes[client]] += 1
            kept[classes[client]] += int(m["kept"])
        if "eval_global_accuracy" in m:
            evals.setdefault(rnd, {})[client] = m["eval_global_accuracy"]
    last = sorted(evals)[-3:]
    per_client = {c: statistics.fmean(evals[r][c] for r in last) for c in evals[last[-1]]}
    accuracy = {
        k: statistics.fmean(a for c, a in per_client.items() if classes[c] == k) for k in CLASSES
    }
    total_s, total_k = sum(sampled.values()), sum(kept.values())
    return {
        "sampled_share": {k: sampled[k] / total_s for k in CLASSES},
        "kept_share": {k: kept[k] / total_k for k in CLASSES},
        "kept_rate": {k: kept[k] / sampled[k] if sampled[k] else 0.0 for k in CLASSES},
        "class_accuracy": accuracy,
        "class_accuracy_rounds": last,
    }


def at_time(cell: dict[str, Any], t: float) -> float:
    """The accuracy of the last evaluation at or before virtual time ``t``."""
    got = [a for a, v in zip(cell["accuracy_curve"], cell["virtual_time_s"], strict=True) if v <= t]
    return got[-1] if got else math.nan


# -- output ----------------------------------------------------------------------------------


def checkpoint(results: dict[str, Any]) -> None:
    """Write the results so far (a copy: write_result consumes the header's start times)."""
    _common.write_result(NAME, json.loads(json.dumps(results)))


def plot(results: dict[str, Any]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
    if "fedbuff" in results:
        part = results["fedbuff"]
        for label, name in part["tuned"].items():
            c = part["cells"][name]
            axes[0].plot(c["virtual_time_s"], c["accuracy_curve"], label=f"{label} ({name})")
        axes[0].set_xscale("log")
        axes[0].set_title("FedBuff against synchronous FedAvg(M), 10 updates a step")
    if "policies" in results:
        part = results["policies"]
        for name, c in part["cells"].items():
            axes[1].plot(c["virtual_time_s"], c["accuracy_curve"], label=name)
        axes[1].set_title(f"synchronous round policies (deadline {part['deadline_s']:.1f} s)")
        names = list(part["cells"])
        width = 0.8 / len(names)
        x = np.arange(len(CLASSES))
        for i, name in enumerate(names):
            c = part["cells"][name]
            share = [c["kept_share"][k] for k in CLASSES]
            bars = axes[2].bar(x + i * width, share, width, label=name)
            for b, k in zip(bars, CLASSES, strict=True):
                axes[2].text(b.get_x() + b.get_width() / 2, b.get_height() + 0.005,
                             f"{c['class_accuracy'][k]:.2f}", ha="center", fontsize=7)  # fmt: skip
        axes[2].axhline(1 / 3, color="grey", lw=0.8, ls="--")
        axes[2].set_xticks(x + 0.4 - width / 2, CLASSES)
        axes[2].set_ylabel("share of the kept updates")
        axes[2].set_title("participation by device class (labels: local test accuracy)")
        axes[2].legend(fontsize=8)
    for ax in axes[:2]:
        for t in TARGETS:
            ax.axhline(t, color="grey", lw=0.6, ls=":")
        ax.set_xlabel("virtual seconds")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0.4, 0.85)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Fashion-MNIST, 2NN, 100 clients, Dirichlet 0.5, lognormal devices")
    fig.tight_layout()
    out = _common.REPO / "benchmarks" / "plots" / f"{NAME}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=40, help="synchronous rounds a run")
    parser.add_argument("--seeds", default="0,1,2", help="part 1: tuned on the first")
    parser.add_argument("--parts", default="fedbuff,policies")
    parser.add_argument("--quick", action="store_true", help="3 rounds, one grid point, 1 seed")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    grids: tuple[Sequence[tuple[float, float]], Sequence[tuple[float, float]]]
    grids = (FEDAVGM_GRID, FEDBUFF_GRID)
    if args.quick:
        args.rounds, seeds, grids = 3, seeds[:1], (FEDAVGM_GRID[-1:], FEDBUFF_GRID[-1:])
    parts = args.parts.split(",")
    results: dict[str, Any] = {**_common.header(NAME), "rounds": args.rounds, "seeds": seeds}
    results["potluck_imported_from"] = str(Path(potluck.__file__).resolve().parent)  # a snapshot?
    results["settings"] = {
        "profiles": PROFILES,
        "targets": TARGETS,
        "fedavgm_grid": grids[0],
        "fedbuff_grid": grids[1],
        "async_steps": ASYNC_STEPS * args.rounds,
        "buffer": BUFFER,
        "concurrency": CONCURRENCY,
        "deadline_quantile": DEADLINE_QUANTILE,
        "over_selection": OVER_SELECTION,
    }
    if "fedbuff" in parts:
        part_fedbuff(args.rounds, seeds, results, grids)
    if "policies" in parts:
        part_policies(args.rounds, seeds[0], results)
    checkpoint(results)
    print(f"plot: {plot(results)}")


if __name__ == "__main__":
    main()
