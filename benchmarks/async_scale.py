"""Simulator speed of the asynchronous driver on the virtual clock (issue 18): a cross-device
federation of ``--clients`` clients drawing ``--examples`` distinct Fashion-MNIST training
examples each (``partition = "sampled"``, IID), with ``--concurrency`` clients in flight and a
FedBuff buffer of ``--buffer``, lognormal devices (the defaults of ``[profiles]``), McMahan's
2NN, one local epoch of batch 10.

Measured per engine, in one process each (so start-up is its own): the wall time of the
steps after the first (the first, which trains the first ``concurrency`` releases, and the
start-up before it are reported apart), the virtual seconds simulated, the client updates
landed and the releases trained, per wall second; the process's peak memory. The check that
the work was done: every step landed ``buffer`` updates, and the test accuracy moved.

Run from the repository root (a few minutes per federation size):
    .venv/bin/python benchmarks/async_scale.py --clients 100000
    .venv/bin/python benchmarks/async_scale.py --clients 1000000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

from _common import cpu_times, header, own_cpu_s, write_result


def measure(
    engine: str, clients: int, examples: int, concurrency: int, buffer: int, steps: int
) -> dict[str, Any]:
    """One run in this process; returns its timings."""
    t0 = time.perf_counter()
    from potluck.config import ExperimentConfig
    from potluck.orchestrator import run_experiment

    cfg = ExperimentConfig.from_dict(
        {
            "seed": 0,
            "rounds": steps,
            "data": {
                "dataset": "fashion_mnist",
                "num_clients": clients,
                "partition": {
                    "kind": "sampled",
                    "examples_per_client": examples,
                    "sigma": 0.0,
                    "skew": "none",
                },
            },
            "model": {"name": "mlp2nn"},
            "sampler": {"clients_per_round": buffer},
            "client": {"epochs": 1, "batch_size": 10, "lr": 0.05},
            "run": {"threads": 2, "engine": engine},
            "profiles": {},
            "evaluation": {"every": steps, "federated_clients": 0},
            "async": {"concurrency": concurrency, "buffer": buffer},
        }
    )
    exp = cfg.build()
    marks: list[float] = []
    result = run_experiment(exp, on_round=lambda r, m: marks.append(time.perf_counter()))
    start_up = marks[0] - t0 - result.history[0]["round_seconds"]
    later = marks[-1] - marks[0]
    h = result.history
    landed = sum(m["updates"] for m in h[1:])
    virtual = h[-1]["virtual_time_s"] - h[0]["virtual_time_s"]
    return {
        "engine": engine,
        "start_up_s": start_up,
        "first_step_s": h[0]["round_seconds"],
        "later_steps_s": later,
        "virtual_s_after_first": virtual,
        "updates_after_first": landed,
        "virtual_s_per_wall_s": virtual / later,
        "updates_per_wall_s": landed / later,
        "steps_with_full_buffer": sum(m["updates"] == buffer for m in h),
        "steps": len(h),
        "staleness_mean": sum(m["staleness_mean"] for m in h) / len(h),
        "test_accuracy": h[-1].get("test_accuracy"),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=100_000)
    ap.add_argument("--examples", type=int, default=20, help="examples a client")
    ap.add_argument("--concurrency", type=int, default=1_000)
    ap.add_argument("--buffer", type=int, default=100)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--engines", default="inline,vectorized")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a child process: one engine
    args = ap.parse_args()
    if args.one:
        out = measure(
            args.one, args.clients, args.examples, args.concurrency, args.buffer, args.steps
        )
        print(json.dumps(out))
        return
    result = header("async_scale")
    result["machine"]["cpu_times_at_start"] = {**cpu_times(), "own_s": own_cpu_s()}
    result["settings"] = vars(args) | {"model": "mlp2nn", "batch_size": 10, "threads": 2}
    runs = []
    for engine in args.engines.split(","):
        cmd = [sys.executable, __file__, "--one", engine, "--clients", str(args.clients),
               "--examples", str(args.examples), "--concurrency", str(args.concurrency),
               "--buffer", str(args.buffer), "--steps", str(args.steps)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        run = json.loads(done.stdout.strip().splitlines()[-1])
        runs.append(run)
        print(json.dumps(run, indent=1))
    result["runs"] = runs
    print(write_result(f"async_scale_{args.clients}", result))


if __name__ == "__main__":
    main()
