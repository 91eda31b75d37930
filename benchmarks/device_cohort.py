"""Cohort training throughput on ``run.device`` against the device's measured matmul peak.

One cohort's local training (a ``train`` stage of K clients) on the inline and the
vectorized engine, placed on the device (``EngineOptions(device=...)``), timed after one
warm-up stage; the rate is examples trained per second and FLOP/s (a training step's FLOPs
per example counted by ``FlopCounterMode`` on a real step, times the examples), as a share
of the best float32 ``torch.mm`` rate measured on the same device in the same run. Data are
random images and labels of Fashion-MNIST's shapes (the rate does not depend on the values,
and a GPU machine need not have the dataset). Each stage is checked: every member answered
with a finite, non-zero update over all of its examples.

    .venv/bin/python benchmarks/device_cohort.py                # cuda if present, else cpu
    .venv/bin/python benchmarks/device_cohort.py --device cpu --threads 2
    python3 benchmarks/device_cohort.py --models small_cnn --engines vectorized \
        --cudnn-benchmark --name device_cohort_cudnn_benchmark   # cuDNN autotuned
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch
from _common import header, write_result
from torch.utils.flop_counter import FlopCounterMode

from potluck.algorithms import fedavg
from potluck.client import ClientProgram
from potluck.core.message import Message
from potluck.core.records import TRAIN, StageJob
from potluck.core.task import Task
from potluck.data import Federation
from potluck.engines.base import EngineOptions, make_engine
from potluck.models.zoo import mlp2nn, small_cnn

WORKLOADS = {  # model, examples a client, batch size: W2's CNN and W4's 2NN
    "small_cnn": (small_cnn, 60, 20),
    "mlp2nn": (mlp2nn, 200, 32),
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, size: int, reps: int = 10) -> float:
    """Best float32 ``torch.mm`` FLOP/s on ``device``."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    for _ in range(3):
        torch.mm(a, b)
    synchronize(device)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def federation(clients: int, examples: int, seed: int = 0) -> Federation:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(clients * examples, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (clients * examples,), generator=g)
    parts = [
        (x[c * examples : (c + 1) * examples], y[c * examples : (c + 1) * examples])
        for c in range(clients)
    ]
    return Federation.from_client_data(parts, test_fraction=0.0)


def step_flops(task: Task, batch: int) -> float:
    """FLOPs of one training step (forward and backward) per example, counted as it runs."""
    model = task.build_model()
    x = torch.randn(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() / batch


def measure(model_name: str, engine: str, clients: int, device: str, reps: int) -> dict[str, Any]:
    make, examples, batch = WORKLOADS[model_name]
    task = Task(lambda: make((1, 28, 28), 10))
    algo = fedavg(epochs=1, batch_size=batch, lr=0.05)
    program = ClientProgram(task, federation(clients, examples), algo, seed=0)
    flops_per_example = step_flops(task, batch)
    eng = make_engine(engine, program, EngineOptions(device=device))
    w = program.initial_weights()
    payloads = tuple(Message() for _ in range(clients))
    job = StageJob(TRAIN, 1, Message({"w": w}), np.arange(clients), payloads, ({},) * clients)
    times = []
    for rep in range(reps + 1):
        start = time.perf_counter()
        replies = eng.run_stage(job)  # the uploads come back to CPU: the device is done
        seconds = time.perf_counter() - start
        trained = [r for r in replies if r is not None]
        assert len(trained) == clients, "every member must answer"
        assert sum(int(r.message.scalars["num_examples"]) for r in trained) == clients * examples
        for r in trained:
            delta = r.message.arrays["delta"]
            assert bool(torch.isfinite(delta).all()) and float(delta.abs().sum()) > 0
        if rep:  # the first stage warms up (torch.func, cuDNN autotuning)
            times.append(seconds)
    eng.close()
    best = min(times)
    rate = clients * examples / best
    return {
        "model": model_name,
        "engine": engine,
        "clients": clients,
        "examples_per_client": examples,
        "batch_size": batch,
        "seconds": times,
        "best_s": best,
        "examples_per_s": rate,
        "flops_per_example": flops_per_example,
        "flops_per_s": rate * flops_per_example,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--clients", default="50,200", help="cohort sizes, comma-separated")
    parser.add_argument("--engines", default="inline,vectorized")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--models", default=",".join(WORKLOADS), help="comma-separated")
    parser.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="let cuDNN time its algorithms for each shape (torch.backends.cudnn.benchmark)",
    )
    parser.add_argument("--name", help="benchmarks/results/NAME.json (default: device_cohort)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    device = torch.device(args.device)
    payload = header("device_cohort")
    payload.update(device=str(device), threads=args.threads, torch=torch.__version__)
    payload["cudnn"] = {
        "benchmark": torch.backends.cudnn.benchmark,
        "allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    if device.type == "cuda":
        payload["gpu"] = torch.cuda.get_device_name(device)
    peak = matmul_peak(device, 8192 if device.type == "cuda" else 2048)
    rows = []
    for model_name in args.models.split(","):
        for clients in (int(c) for c in args.clients.split(",")):
            for engine in args.engines.split(","):
                row = measure(model_name, engine, clients, args.device, args.reps)
                row["share_of_peak"] = row["flops_per_s"] / peak
                rows.append(row)
                print(
                    f"{model_name} K={clients} {engine} on {device}: "
                    f"{row['examples_per_s']:,.0f} examples/s, "
                    f"{row['flops_per_s'] / 1e9:.1f} GFLOP/s = "
                    f"{100 * row['share_of_peak']:.1f} % of {peak / 1e9:.0f}"
                )
    payload["matmul_peak_flops_per_s_before"] = peak
    payload["matmul_peak_flops_per_s_after"] = matmul_peak(
        device, 8192 if device.type == "cuda" else 2048
    )
    payload["rows"] = rows
    suffix = "" if device.type == "cuda" else f"_{device.type}"
    print(write_result(args.name or f"device_cohort{suffix}", payload))


if __name__ == "__main__":
    main()
