"""Max-pooling in channels-last memory during evaluation (``potluck.client.pooling``).

Part 1 times ``F.max_pool2d`` without gradients, NCHW against channels-last (the conversion
and the conversion back included), for the shapes that CNNs pool at, kernel 2 stride 2 and
kernel 3 stride 2 padding 1. Part 2 times W2's centralised evaluation (``small_cnn`` on all
10,000 Fashion-MNIST test images, ``ClientProgram.evaluate_test``) with the rewrite and
without it, interleaved, and checks that both give the same sums. One torch thread.

    .venv/bin/python benchmarks/pooling_layout.py
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _common import call_seconds, header, write_result

import potluck.client.program as program_module
from potluck.algorithms import fedavg
from potluck.client import ClientProgram
from potluck.core.task import Task
from potluck.data import Federation
from potluck.data.partition import Partition
from potluck.data.sources import load_source
from potluck.models.zoo import small_cnn

SHAPES = [
    (128, 1, 28, 28),
    (128, 3, 32, 32),
    (128, 8, 28, 28),
    (128, 16, 14, 14),
    (128, 32, 16, 16),
    (128, 64, 8, 8),
    (128, 256, 4, 4),
    (8, 512, 14, 14),
]


def best_ms(f: Callable[[], object], reps: int) -> float:
    return 1e3 * min(call_seconds(f, reps))


def kernels() -> list[dict[str, Any]]:
    rows = []
    for shape in SHAPES:
        x = torch.randn(shape)
        for name, args in (("k2s2", (2,)), ("k3s2p1", (3, 2, 1))):

            def plain(x: torch.Tensor = x, args: tuple[int, ...] = args) -> torch.Tensor:
                return F.max_pool2d(x, *args)

            def last(x: torch.Tensor = x, args: tuple[int, ...] = args) -> torch.Tensor:
                cl = x.contiguous(memory_format=torch.channels_last)
                return F.max_pool2d(cl, *args).contiguous()

            with torch.no_grad():
                assert torch.equal(plain(), last())
                ms = best_ms(plain, 20), best_ms(last, 20)
            rows.append(
                {
                    "shape": shape,
                    "pool": name,
                    "nchw_ms": ms[0],
                    "channels_last_ms": ms[1],
                    "speedup": ms[0] / ms[1],
                }
            )
            print(f"{shape} {name}: {ms[0]:.2f} ms -> {ms[1]:.2f} ms ({ms[0] / ms[1]:.2f}x)")
    return rows


def evaluation(reps: int) -> dict[str, Any]:
    source = load_source("fashion_mnist", seed=0)
    fed = Federation(source, Partition.from_lists([np.arange(100)]), test_fraction=0.0)
    program = ClientProgram(Task(lambda: small_cnn((1, 28, 28), 10)), fed, fedavg(), seed=0)
    w = program.initial_weights()
    test = source.test

    def run(rewrite: bool) -> tuple[float, Any]:
        mode = program_module.channels_last_pooling
        if not rewrite:
            program_module.channels_last_pooling = contextlib.nullcontext  # type: ignore[assignment]
        try:
            start = time.perf_counter()
            result = program.evaluate_arrays(w, test.features(slice(None)), test.y)
            return time.perf_counter() - start, result
        finally:
            program_module.channels_last_pooling = mode

    timings: dict[str, list[float]] = {"plain": [], "channels_last_pooling": []}
    results = {}
    run(True)
    for _ in range(reps):
        for key, rewrite in (("plain", False), ("channels_last_pooling", True)):
            seconds, results[key] = run(rewrite)
            timings[key].append(seconds)
    assert results["plain"] == results["channels_last_pooling"], results
    best = {k: min(v) for k, v in timings.items()}
    print(
        f"W2 evaluation (10,000 images): {best['plain']:.3f} s -> "
        f"{best['channels_last_pooling']:.3f} s"
    )
    return {
        "seconds": timings,
        "best_s": best,
        "speedup": best["plain"] / best["channels_last_pooling"],
        "same_sums": True,
        "accuracy": results["plain"].accuracy,
        "images": len(test.y),
    }


def main() -> None:
    torch.set_num_threads(1)
    payload = header("pooling_layout")
    payload["threads"] = 1
    payload["kernels"] = kernels()
    payload["w2_evaluation"] = evaluation(reps=5)
    print(write_result("pooling_layout", payload))


if __name__ == "__main__":
    main()
