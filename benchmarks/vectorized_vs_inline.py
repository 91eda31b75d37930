"""Wall time per round of the vectorized engine against the inline engine, same cohorts.

Workloads:

- (a) digits, MLP 64-64-10, 100 clients IID, 10 per round, 5 epochs, batch 8, lr 0.1;
- (b) Fashion-MNIST logistic regression, 1,000 clients Dirichlet 0.5, 100 per round,
  1 epoch, batch 20, lr 0.1.

Each repetition is one round: the sampler draws that round's cohort and both engines train
it from the same global weights (``engine.train``: data gathering, batch drawing, local
steps, upload encoding). The two engines alternate which goes first, so drift on a shared
machine hits both alike. One warm-up round per engine precedes the timings. Before timing,
the script checks that both engines produce the same updates (largest absolute difference
of the uploaded deltas is recorded). Torch runs with ``--threads`` intra-op threads (1 by
default: with 2 threads on 2 cores shared with another process both engines slow down
erratically).

Run from the repository root:
    .venv/bin/python benchmarks/vectorized_vs_inline.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from _common import (
    FMNIST_LOGREG_1000,
    W1_DIGITS_MLP,
    cohort_of,
    header,
    summary,
    train_cohort,
    write_result,
)

from potluck.client import ClientProgram
from potluck.config import ExperimentConfig
from potluck.engines.base import Engine
from potluck.engines.inline import InlineEngine
from potluck.engines.vectorized import VectorizedEngine


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    config: dict[str, Any]
    rounds: int


WORKLOADS = (
    Workload(
        "digits_mlp",
        "(a) digits, MLP 64-64-10, 100 clients IID, 10 per round, 5 epochs, batch 8, lr 0.1",
        {**W1_DIGITS_MLP, "sampler": {"clients_per_round": 10}},
        rounds=30,
    ),
    Workload(
        "fmnist_logreg",
        "(b) Fashion-MNIST logreg, 1,000 clients Dirichlet 0.5, 100 per round, 1 epoch, "
        "batch 20, lr 0.1",
        {**FMNIST_LOGREG_1000, "sampler": {"clients_per_round": 100}},
        rounds=15,
    ),
)


def run_workload(workload: Workload) -> dict[str, Any]:
    exp = ExperimentConfig.from_dict(workload.config).build()
    algo = exp.algorithm
    program = ClientProgram(exp.task, exp.federation, algo, seed=exp.seed)
    engines: dict[str, Engine] = {
        "inline": InlineEngine(program),
        "vectorized": VectorizedEngine(program),
    }
    w, n = program.initial_weights(), exp.federation.num_clients

    def cohort(rnd: int) -> Any:
        return cohort_of(algo, n, exp.seed, rnd)

    first = {k: train_cohort(e, algo, cohort(0), w, 0) for k, e in engines.items()}  # warm-up
    max_diff = max(
        float((a.arrays["delta"] - b.arrays["delta"]).abs().max())
        for a, b in zip(first["inline"], first["vectorized"], strict=True)
    )
    times: dict[str, list[float]] = {k: [] for k in engines}
    for rnd in range(1, workload.rounds + 1):
        members = cohort(rnd)
        order = list(engines) if rnd % 2 else list(reversed(engines))
        for name in order:
            t0 = time.perf_counter()
            train_cohort(engines[name], algo, members, w, rnd)
            times[name].append(time.perf_counter() - t0)
    inline, vectorized = statistics.median(times["inline"]), statistics.median(times["vectorized"])
    return {
        "description": workload.description,
        "config": workload.config,
        "rounds_timed": workload.rounds,
        "clients_per_round": len(cohort(1)),
        "num_params": program.spec.size,
        "max_abs_delta_difference": max_diff,
        "round_seconds": {k: summary(v) for k, v in times.items()},
        "speedup_median": inline / vectorized,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--only", choices=[w.name for w in WORKLOADS], help="one workload")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    payload = header("vectorized_vs_inline")
    payload["note"] = (
        "speedup_median = median inline round time / median vectorized round time; each "
        "round's cohort is trained by both engines from the same weights"
    )
    payload["workloads"] = {}
    for workload in WORKLOADS:
        if args.only and workload.name != args.only:
            continue
        result = run_workload(workload)
        payload["workloads"][workload.name] = result
        rs = result["round_seconds"]
        print(
            f"{workload.name}: inline {rs['inline']['median'] * 1e3:.1f} ms/round, "
            f"vectorized {rs['vectorized']['median'] * 1e3:.1f} ms/round, "
            f"speedup {result['speedup_median']:.2f}x "
            f"(max |delta difference| {result['max_abs_delta_difference']:.1e})"
        )
    print(f"wrote {write_result('vectorized_vs_inline', payload)}")


if __name__ == "__main__":
    main()
