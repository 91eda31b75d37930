"""A round's aggregation on ``run.device`` beside the host's, against the device's bandwidth.

What the orchestrator does with a round's K uploads (``_Loop._aggregated``), part by part:
the host rows copied into the device's stack buffer (``StackBuffer(device)``), the
aggregator there, the anomaly scores there (norm and cosine, the defaults, and the update
norms and client drift), and the aggregate back to the host. The same stack is aggregated
on the host too (the buffer then stacks in place), and the limit is the device's fastest
single read of the stack (``stack.sum()``): ratio to the limit = that read / the
aggregator's time. Every time is the best of ``--reps`` calls after a warm-up call, the
device synchronized before the clock stops. Each device aggregate is checked against the
host's: finite, not zero, and within ``TOLERANCE`` of it relative to the host aggregate's
largest value (kernels sum in other orders). Three ways of getting the rows there are timed
too (``staging``). On a machine without an accelerator the device
is the host and only the host side is measured.

The stack: McMahan et al.'s CNN size (1,663,370 parameters), honest rows
``mu + 0.01 N(0, 1)`` and ``f = K // 5`` rows shifted by +1 (as in ``aggregators.py``).

    .venv/bin/python benchmarks/device_aggregation.py             # cuda if present, else cpu
    .venv/bin/python benchmarks/device_aggregation.py --k 1000 --device cuda
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from _common import cpu_times, header, own_cpu_s, write_result

from potluck.aggregate import (
    CenteredClipping,
    CoordinateMedian,
    GeometricMedian,
    MultiKrum,
    StackBuffer,
    TrimmedMean,
    WeightedMean,
)
from potluck.aggregate.anomaly import anomaly_scores
from potluck.core.device import HOST
from potluck.core.parts import part_context
from potluck.monitor.distances import update_distances

CNN_D = 1_663_370
TOLERANCE = 1e-4
CTX = part_context(0, 1, "aggregator")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_s(fn: Callable[[], object], device: torch.device, reps: int) -> tuple[float, Any]:
    """The best seconds of ``reps`` synchronized calls after a warm-up, and the last output."""
    out = fn()
    synchronize(device)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def uploads(k: int, d: int, f: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(k)
    mu = torch.randn(d, generator=gen) * 0.01
    rows = [torch.randn(d, generator=gen).mul_(0.01).add_(mu) for _ in range(k)]
    for row in rows[k - f :]:
        row += 1.0
    return rows, torch.randint(1, 601, (k,), generator=gen).double()


def aggregators(f: int) -> list[Any]:
    return [
        WeightedMean(),
        CoordinateMedian(byzantine=f),
        TrimmedMean(trim=f),
        MultiKrum(byzantine=f),
        GeometricMedian(byzantine=f),
        CenteredClipping(tau=1.0, byzantine=0),
    ]


def side(
    device: torch.device, rows: list[torch.Tensor], weights: torch.Tensor, reps: int
) -> dict[str, Any]:
    """Every part of the round's aggregation on ``device``: seconds, and the aggregates."""
    buffer = StackBuffer(device)
    copy_s, deltas = best_s(lambda: buffer.stack(rows), device, reps)
    read_s, _ = best_s(lambda: deltas.sum(), device, reps)
    w = weights.to(device)
    out: dict[str, Any] = {"stack_s": copy_s, "read_s": read_s, "rows": {}, "aggregates": {}}
    for agg in aggregators(len(rows) // 5):
        name = type(agg).__name__
        state = {key: v.to(device) for key, v in agg.init(rows[0]).items()}
        call = lambda a=agg, s=state: a.aggregate(deltas, w, s, CTX)  # noqa: E731
        seconds, (aggregate, _) = best_s(call, device, reps)
        scores_s, _ = best_s(lambda a=aggregate: score(deltas, a), device, reps)
        back_s, host = best_s(lambda a=aggregate: a.to(HOST), device, reps)
        out["aggregates"][name] = host
        out["rows"][name] = {
            "aggregate_s": seconds,
            "scores_s": scores_s,
            "to_host_s": back_s,
            "ratio_to_limit": read_s / seconds,
        }
        print(f"  {device} {name:18s} {seconds:8.4f} s  scores {scores_s:.4f} s", flush=True)
    return out


def staging(device: torch.device, rows: list[torch.Tensor], reps: int) -> dict[str, Any]:
    """Three ways of getting the round's rows onto ``device``, each checked equal to the
    host's stack: one by one from pageable memory (``StackBuffer(device)``, what the
    orchestrator does), stacked on the host and then copied once, and stacked into a page-
    locked host buffer (allocated once, outside the clock) and then copied once."""
    host = torch.stack(rows)
    pinned = torch.empty_like(host).pin_memory()
    paged = torch.empty_like(host)

    def once(buffer: torch.Tensor, non_blocking: bool) -> torch.Tensor:
        torch.stack(rows, out=buffer)
        return buffer.to(device, non_blocking=non_blocking)

    buffer = StackBuffer(device)  # kept across calls, as across rounds
    ways = {
        "rows_one_by_one": lambda: buffer.stack(rows),
        "host_stack_then_one_copy": lambda: once(paged, False),
        "pinned_stack_then_one_copy": lambda: once(pinned, True),
    }
    out: dict[str, Any] = {}
    for name, way in ways.items():
        seconds, stack = best_s(way, device, reps)
        out[name] = {"seconds": seconds, "equal": bool(torch.equal(stack.to(HOST), host))}
        print(f"  staging {name:28s} {seconds:.4f} s", flush=True)
    return out


def score(deltas: torch.Tensor, aggregate: torch.Tensor) -> object:
    scores = anomaly_scores(deltas, aggregate, ("norm", "cosine"))
    return update_distances(deltas, aggregate, scores["norm"])


def round_s(side: dict[str, Any], name: str) -> float:
    """The round's aggregation on one side: stack, aggregate, scores, aggregate to host."""
    row = side["rows"][name]
    return side["stack_s"] + row["aggregate_s"] + row["scores_s"] + row["to_host_s"]


def checked(got: torch.Tensor, want: torch.Tensor) -> dict[str, Any]:
    scale = float(want.abs().max())
    error = float((got - want).abs().max())
    ok = bool(torch.isfinite(got).all()) and scale > 0 and error <= TOLERANCE * scale
    return {"ok": ok, "max_abs_error": error, "host_max_abs": scale}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--k", type=int, default=100, help="updates in the round")
    parser.add_argument("--d", type=int, default=CNN_D, help="parameters per update")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    payload = header("device_aggregation")
    payload.update(device=str(device), k=args.k, d=args.d, threads=args.threads)
    if device.type == "cuda":
        payload["gpu"] = torch.cuda.get_device_name(device)
    cpu0, own0, t0 = cpu_times(), own_cpu_s(), time.perf_counter()
    rows, weights = uploads(args.k, args.d, args.k // 5)
    payload["stack_gb"] = args.k * args.d * 4 / 1e9
    host = side(HOST, rows, weights, args.reps)
    payload["host"] = {k: v for k, v in host.items() if k != "aggregates"}
    if device != HOST:
        dev = side(device, rows, weights, args.reps)
        payload["device_side"] = {k: v for k, v in dev.items() if k != "aggregates"}
        payload["staging"] = staging(device, rows, args.reps)
        for name, row in dev["rows"].items():
            row["check"] = checked(dev["aggregates"][name], host["aggregates"][name])
            row["host_over_device"] = host["rows"][name]["aggregate_s"] / row["aggregate_s"]
            row["round_host_over_device"] = round_s(host, name) / round_s(dev, name)
    busy, mine = cpu_times()["busy_s"] - cpu0["busy_s"], own_cpu_s() - own0
    wall = time.perf_counter() - t0
    payload["cpu_s"] = {"wall": wall, "this_benchmark": mine, "others": busy - mine}
    suffix = "" if device.type == "cuda" else f"_{device.type}"
    print(write_result(f"device_aggregation{suffix}", payload))
    checks = payload.get("device_side", {}).get("rows", {})
    failed = [name for name, row in checks.items() if not row["check"]["ok"]]
    if failed:
        raise SystemExit(f"device aggregates differ from the host's: {failed}")


if __name__ == "__main__":
    main()
