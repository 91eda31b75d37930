"""Per-client overhead of the inline engine over plain PyTorch on the same mini-batches.

Per-client overhead = wall time per client of ``InlineEngine.train`` minus the pure training
compute of the same batches. Five variants are timed over the same cohort. To keep drift on
a noisy machine out of the differences, the cohort is cut into chunks of clients (about 50 ms
of work each); for each chunk the five variants run back to back, in an order that rotates
from chunk to chunk, and each variant's chunk times are summed over the cohort (one
repetition). The variants:

- ``engine``: ``InlineEngine.train`` for the cohort (what a round costs).
- ``compute``: the baseline. The same mini-batches (same clients, steps, batch size, batch
  order), pre-gathered and pre-sliced, fed to a plain imperative loop on one pre-built module:
  ``opt.zero_grad(); F.cross_entropy(model(xb), yb).backward(); opt.step()`` with
  ``torch.optim.SGD(lr, momentum, weight_decay)`` as configured. Per client it copies the
  global weights into the module (a few microseconds) and clears the optimizer state.
- ``step_path``: the engine's own per-step code on the same pre-sliced batches (gradient of
  the flat vector through ``functional_call``, the functional SGD step, ``float(loss)``),
  without data gathering or batch drawing. ``step_path - compute`` is the cost of the
  functional formulation.
- ``gather``: data gathering alone, ``federation.client(cid)`` + ``torch.from_numpy``.
- ``batching``: the per-client seed derivation (batch generator, dropout seed) and the
  engine's batch drawing (``randperm`` per epoch, ``x[idx]``, ``y[idx]``) on gathered tensors.

Torch runs with 1 intra-op and 1 inter-op thread on both sides. Every variant is run once
over the whole cohort before timing (warm-up). Before the timings, a check confirms that the
baseline really trains the same batches: its final weights must match the engine's.

Run from the repository root:
    .venv/bin/python benchmarks/inline_overhead.py
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from _common import (
    FMNIST_LOGREG_1000,
    W1_DIGITS_MLP,
    header,
    summary,
    train_cohort,
    write_result,
)
from torch.nn import functional as F

from potluck.client import ClientProgram
from potluck.config import ExperimentConfig
from potluck.engines.inline import InlineEngine

Batches = list[tuple[torch.Tensor, torch.Tensor]]
ROUND = 1
VARIANTS = ("engine", "compute", "step_path", "gather", "batching")


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    config: dict[str, Any]
    cohort_size: int
    reps: int
    chunk: int  # clients per interleaving chunk (about 50 ms of work)


WORKLOADS = (
    Workload(
        "digits_mlp",
        "(a) digits, MLP 64-64-10, 100 clients IID, batch 8, 5 epochs, lr 0.1 (W1)",
        W1_DIGITS_MLP,
        cohort_size=100,
        reps=11,
        chunk=10,
    ),
    Workload(
        "fmnist_small_cnn",
        "(b) Fashion-MNIST default: small_cnn, 100 clients Dirichlet 0.5, batch 32, 2 epochs",
        {},
        cohort_size=20,
        reps=7,
        chunk=1,
    ),
    Workload(
        "fmnist_logreg",
        "(c) Fashion-MNIST logreg, 1,000 clients Dirichlet 0.5, batch 20, 1 epoch, lr 0.1",
        FMNIST_LOGREG_1000,
        cohort_size=1000,
        reps=9,
        chunk=50,
    ),
)


class Bench:
    """One workload: the engine, the baseline module and every client's pre-sliced batches."""

    def __init__(self, workload: Workload) -> None:
        self.workload = workload
        self.cfg = ExperimentConfig.from_dict(workload.config)
        exp = self.cfg.build()
        self.exp = exp
        self.fed = exp.federation
        self.opt_cfg = exp.algorithm.local
        self.program = ClientProgram(exp.task, exp.federation, exp.algorithm, seed=exp.seed)
        self.engine = InlineEngine(self.program)
        self.w = self.program.initial_weights()
        n = self.fed.num_clients
        k = min(workload.cohort_size, n)
        self.cohort = np.sort(np.random.default_rng(0).choice(n, size=k, replace=False))
        self.tensors = [self._gather(int(c)) for c in self.cohort]
        self.batches = [
            self._draw_batches(int(c), x, y)
            for c, (x, y) in zip(self.cohort, self.tensors, strict=True)
        ]
        self.steps = [len(b) for b in self.batches]
        self.model = exp.task.build_model()
        self.model.train()
        self.params = [p for _, p in self.model.named_parameters() if p.requires_grad]
        c = self.opt_cfg
        self.opt = torch.optim.SGD(
            self.params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay
        )

    # -- the pieces ----------------------------------------------------------------------------

    def _gather(self, cid: int) -> tuple[torch.Tensor, torch.Tensor]:
        data = self.fed.client(cid)
        return torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)

    def _draw_batches(self, cid: int, x: torch.Tensor, y: torch.Tensor) -> Batches:
        """The engine's batches for ``cid`` this round: its seeds, permutations and slices."""
        seeds = self.program.seeds
        gen = seeds.torch("batch", ROUND, cid)
        torch.default_generator.manual_seed(seeds.integer("dropout", ROUND, cid))
        n = len(y)
        total, b = self.opt_cfg.num_steps(n), self.opt_cfg.batch_len(n)
        out: Batches = []
        while len(out) < total:
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, b):
                idx = order[start : start + b]
                out.append((x[idx], y[idx]))
                if len(out) == total:
                    break
        return out

    def _load(self, w: torch.Tensor) -> None:
        with torch.no_grad():
            offset = 0
            for p in self.params:
                p.copy_(w[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        self.opt.state.clear()

    def _imperative(self, batches: Batches) -> None:
        self._load(self.w)
        model, opt = self.model, self.opt
        for xb, yb in batches:
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()

    def _functional(self, batches: Batches) -> torch.Tensor:
        w, state, opt = self.w, self.opt_cfg.init(self.w), self.opt_cfg
        self.program.model.train()
        for xb, yb in batches:
            g, loss = self.program._grad(w, xb, yb)
            w, state = opt.step(w, state, g)
            float(loss)
        return w

    # -- the timed variants (each over the whole cohort) -----------------------------------

    def run_engine(self, pos: range) -> None:
        cohort = self.cohort[pos.start : pos.stop]
        train_cohort(self.engine, self.exp.algorithm, cohort, self.w, ROUND)

    def run_compute(self, pos: range) -> None:
        for i in pos:
            self._imperative(self.batches[i])

    def run_step_path(self, pos: range) -> None:
        for i in pos:
            self._functional(self.batches[i])

    def run_gather(self, pos: range) -> None:
        for i in pos:
            self._gather(int(self.cohort[i]))

    def run_batching(self, pos: range) -> None:
        for i in pos:
            x, y = self.tensors[i]
            self._draw_batches(int(self.cohort[i]), x, y)

    def variant(self, name: str) -> Callable[[range], None]:
        fn: Callable[[range], None] = getattr(self, f"run_{name}")
        return fn

    # -- checks ------------------------------------------------------------------------------

    def equivalence(self, clients: int = 3) -> dict[str, float]:
        """Max |w| difference of the baseline and the step path to the engine's result."""
        k = min(clients, len(self.cohort))
        messages = train_cohort(self.engine, self.exp.algorithm, self.cohort[:k], self.w, ROUND)
        imperative = functional = 0.0
        for i, msg in enumerate(messages):
            w_engine = self.w + msg.arrays["delta"]
            self._imperative(self.batches[i])
            w_base = torch.cat([p.detach().reshape(-1) for p in self.params])
            imperative = max(imperative, float((w_base - w_engine).abs().max()))
            w_func = self._functional(self.batches[i])
            functional = max(functional, float((w_func - w_engine).abs().max()))
        return {"compute_vs_engine": imperative, "step_path_vs_engine": functional}


def _rotated(r: int) -> tuple[str, ...]:
    order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
    return tuple(reversed(order)) if (r // len(VARIANTS)) % 2 else order


def measure(workload: Workload, reps: int | None) -> dict[str, Any]:
    t_setup = time.perf_counter()
    bench = Bench(workload)
    setup_s = time.perf_counter() - t_setup
    k = len(bench.cohort)
    total_steps = sum(bench.steps)
    check = bench.equivalence()
    everyone = range(k)
    for name in VARIANTS:  # warm-up: one full pass each
        bench.variant(name)(everyone)
    chunks = [range(a, min(a + workload.chunk, k)) for a in range(0, k, workload.chunk)]
    reps = reps or workload.reps
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(reps):
        gc.collect()
        totals = dict.fromkeys(VARIANTS, 0.0)
        for j, pos in enumerate(chunks):
            for name in _rotated(r * len(chunks) + j):
                fn = bench.variant(name)
                t0 = time.perf_counter()
                fn(pos)
                totals[name] += time.perf_counter() - t0
        for name in VARIANTS:
            samples[name].append(totals[name] / k * 1e6)
        print(
            f"  rep {r + 1}/{reps}: "
            + ", ".join(f"{v} {samples[v][-1]:.0f}" for v in VARIANTS)
            + " us/client",
            file=sys.stderr,
        )

    stats = {v: summary(samples[v]) for v in VARIANTS}
    paired = [e - c for e, c in zip(samples["engine"], samples["compute"], strict=True)]
    overhead = statistics.median(paired)
    compute = stats["compute"]["median"]
    steps_per_client = total_steps / k
    step_excess = stats["step_path"]["median"] - compute
    gather, batching = stats["gather"]["median"], stats["batching"]["median"]
    c = bench.cfg
    return {
        "name": workload.name,
        "description": workload.description,
        "config_overrides": workload.config,
        "dataset": c.data.dataset,
        "model": c.model.name,
        "num_params": bench.program.spec.size,
        "num_clients": bench.fed.num_clients,
        "cohort_size": k,
        "batch_size": c.client["batch_size"],
        "epochs": c.client["epochs"],
        "examples_per_client_mean": float(np.mean([len(y) for _, y in bench.tensors])),
        "steps_per_client_mean": steps_per_client,
        "reps": reps,
        "clients_per_interleaving_chunk": workload.chunk,
        "setup_seconds": setup_s,
        "equivalence_max_abs_diff": check,
        "us_per_client": stats,
        "overhead": {
            "us_per_client_median": overhead,
            "us_per_client_from_mins": stats["engine"]["min"] - stats["compute"]["min"],
            "fraction_of_compute": overhead / compute,
            "us_per_step": overhead / steps_per_client,
            "engine_over_compute": stats["engine"]["median"] / compute,
        },
        "breakdown_us_per_client": {
            "functional_step_excess": step_excess,
            "gather": gather,
            "batching_and_seeds": batching,
            "rest": overhead - step_excess - gather - batching,
        },
        "breakdown_us_per_step": {
            "compute": compute / steps_per_client,
            "functional_step_excess": step_excess / steps_per_client,
        },
        "samples_us_per_client": samples,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default per workload)")
    parser.add_argument("--output", default="inline_overhead", help="results/NAME.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    payload = header("inline_overhead")
    payload["settings"] = {
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "round": ROUND,
        "timer": "time.perf_counter per chunk of clients, summed over the cohort, / cohort size",
        "interleaving": "per chunk of clients, all five variants back to back, order rotated",
        "overhead": "median over repetitions of (engine - compute), paired per repetition",
        "gc": "gc.collect() before each repetition; gc enabled while timing",
    }
    results = []
    for workload in WORKLOADS:
        print(f"{workload.name}: {workload.description}", file=sys.stderr)
        results.append(measure(workload, args.reps))
    payload["workloads"] = results
    path = write_result(args.output, payload)

    print(f"\nper client, median of reps (torch threads = 1); written to {path}")
    print(
        f"{'workload':18} {'steps':>6} {'engine us':>10} {'compute us':>11} {'overhead us':>12}"
        f" {'ovh/compute':>12} {'ovh/step us':>12} {'gather us':>10}"
    )
    for res in results:
        s, o = res["us_per_client"], res["overhead"]
        print(
            f"{res['name']:18} {res['steps_per_client_mean']:6.1f}"
            f" {s['engine']['median']:10.0f} {s['compute']['median']:11.0f}"
            f" {o['us_per_client_median']:12.0f} {o['fraction_of_compute']:12.2f}"
            f" {o['us_per_step']:12.1f} {s['gather']['median']:10.0f}"
        )


if __name__ == "__main__":
    main()
