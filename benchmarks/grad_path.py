"""Cost of one gradient step's backward: flat-vector gradient (potluck) vs alternatives.

Making the flat float32 weight vector the leaf, feeding its views to ``functional_call`` and
calling ``torch.autograd.grad(loss, w)`` makes autograd scatter each parameter's gradient
back into a full-length buffer through the views' backward. This script times, per
mini-batch and interleaved:

- ``flat``: that flat-leaf gradient (potluck's path before commit "Per-parameter autograd
  leaves");
- ``leaves``: ``ClientProgram._grad(w, x, y)`` as shipped: the same ``functional_call`` with
  each parameter view detached as its own leaf, ``torch.autograd.grad`` over those leaves,
  then one ``torch.cat`` into a flat vector (the same numbers; checked);
- ``module``: a plain ``loss.backward()`` on the module (the imperative reference).

Torch runs with 1 thread. Each row is the median of ``--reps`` timings.

Run from the repository root:
    .venv/bin/python benchmarks/grad_path.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from _common import header, summary, write_result
from torch.func import functional_call
from torch.nn import functional as F

from potluck.algorithms import Algorithm
from potluck.client import ClientProgram
from potluck.core.task import Task
from potluck.data import Federation
from potluck.models import build_model

# (model, input shape, batch): the three workloads of inline_overhead.py, plus McMahan et
# al.'s 2NN and CNN at their batch size 10.
CASES = (
    ("mlp", (64,), 8),
    ("logreg", (1, 28, 28), 20),
    ("small_cnn", (1, 28, 28), 32),
    ("mlp2nn", (1, 28, 28), 10),
    ("cnn", (1, 28, 28), 10),
)
VARIANTS = ("flat", "leaves", "module")


def measure(name: str, shape: tuple[int, ...], batch: int, reps: int) -> dict[str, object]:
    def factory() -> torch.nn.Module:
        return build_model(name, input_shape=shape, num_classes=10)

    fed = Federation.from_client_data([(torch.zeros(4, *shape), torch.arange(4) % 2)])
    program = ClientProgram(Task(factory), fed, Algorithm(), seed=0)
    spec, model = program.spec, program.model
    model.train()
    w = program.initial_weights()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    reference = factory()
    spec.load_into(reference, w)
    params = list(reference.parameters())

    def flat() -> torch.Tensor:
        leaf = w.detach().requires_grad_(True)
        loss = F.cross_entropy(functional_call(model, spec.unflatten(leaf), (x,)), y)
        return torch.autograd.grad(loss, leaf)[0]

    def leaves() -> torch.Tensor:
        return program._grad(w, x, y)[0]

    def module() -> torch.Tensor:
        for p in params:
            p.grad = None
        F.cross_entropy(reference(x), y).backward()
        return params[0]

    diff = float((flat() - leaves()).abs().max())
    fns: dict[str, Callable[[], torch.Tensor]] = {"flat": flat, "leaves": leaves, "module": module}
    for fn in fns.values():
        for _ in range(3):
            fn()
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(reps):
        for v in VARIANTS[r % 3 :] + VARIANTS[: r % 3]:
            t0 = time.perf_counter()
            fns[v]()
            samples[v].append((time.perf_counter() - t0) * 1e6)
    med = {v: statistics.median(samples[v]) for v in VARIANTS}
    return {
        "model": name,
        "batch": batch,
        "num_params": spec.size,
        "num_tensors": len(spec.names),
        "max_abs_diff_flat_vs_leaves": diff,
        "us_per_step": {v: summary(samples[v]) for v in VARIANTS},
        "flat_over_leaves": med["flat"] / med["leaves"],
        "flat_over_module": med["flat"] / med["module"],
        "leaves_over_module": med["leaves"] / med["module"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--output", default="grad_path", help="results/NAME.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    payload = header("grad_path")
    payload["settings"] = {"torch_threads": 1, "reps": args.reps}
    rows = []
    for name, shape, batch in CASES:
        print(f"{name} ...", file=sys.stderr)
        rows.append(measure(name, shape, batch, args.reps))
    payload["cases"] = rows
    path = write_result(args.output, payload)
    print(f"\nus per step, median (torch threads = 1); written to {path}")
    print(
        f"{'model':10} {'batch':>5} {'params':>9} {'tensors':>7} {'flat':>8} {'leaves':>8}"
        f" {'module':>8} {'flat/leaves':>11} {'flat/module':>11}"
    )
    for row in rows:
        us = row["us_per_step"]
        assert isinstance(us, dict)
        print(
            f"{row['model']:10} {row['batch']:5} {row['num_params']:9} {row['num_tensors']:7}"
            f" {us['flat']['median']:8.0f} {us['leaves']['median']:8.0f}"
            f" {us['module']['median']:8.0f} {row['flat_over_leaves']:11.2f}"
            f" {row['flat_over_module']:11.2f}"
        )


if __name__ == "__main__":
    main()
