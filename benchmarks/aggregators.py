"""Robust aggregators' throughput against the memory bandwidth (issue 16): every aggregator
of ``potluck.aggregate`` on one stack of K updates of McMahan et al.'s CNN (1,663,370
parameters, read from the model zoo), K = 100 and 1,000, beside the memory-bandwidth limit
measured in the same run on the same stack.

The limit is the fastest pass that reads the whole stack once: ``stack.sum(0)`` or
``stack.sum()``, best of 5 repeats, taken before and after the aggregators (the faster of
the two counts); ``torch.mean(stack, 0)`` is reported beside it. An aggregator's time is
the best of up to 5 calls after one warm-up call, whose excess over the best is reported as
start-up; a call that takes longer than ``SLOW_S`` is made once, warm-up and measurement
alike (no start-up then: every call of that size pays the first touch of its temporaries
again, as glibc returns blocks that large to the system). Effective GB/s = bytes of the
stack / time; ratio to the limit = limit time / aggregator time (1.0 = at the limit). On a
shared machine the limit drifts with the others' load, so each aggregator is also compared
with the fastest ``stack.sum()`` read just before its first call and after each of its calls
(``ratio_to_limit_beside``), and each K records the CPU seconds others used meanwhile.

The stack: honest rows ``mu + 0.01 N(0, 1)`` around a common random ``mu``, and
``f = K // 5`` Byzantine rows shifted by +1 in every coordinate (the last f rows); FedAvg's
weights are random example counts in [1, 600]. Each aggregator's output is checked: a (d,)
float32 vector, finite, not zero, and against a float64 NumPy reference on 4,096
coordinates spread over the vector where the rule has one per coordinate (mean, median,
trimmed mean, norm bounding, centred clipping from zero), equal to one honest row (Krum),
to the honest rows' mean (Multi-Krum with m = n - f keeps exactly those), or near the
honest mean and far from the Byzantine one (Bulyan, geometric median). Two torch threads
(the machine has 2 cores). If the machine lacks the memory for a stack it is skipped and
said so; the process's address space is capped at what is free, so an aggregator whose
temporaries do not fit fails with an error that is recorded, not with the kernel's OOM
killer.

Beside them, the kernels that this issue replaced (``previous_kernels``): FedAvg's
``w @ deltas`` (MKL's vector-matrix product, which reads the stack on one thread) and the
coordinate median's sort of the whole stack along the clients (its values and int64
indices: three times the stack).

Run from the repository root (about 14 minutes, 10 of them the robust rules at K = 1,000, one
call each; ``--quick`` uses d = 50,000):
    .venv/bin/python benchmarks/aggregators.py --k 100,1000
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import call_seconds, cpu_times, header, own_cpu_s, write_result

from potluck.aggregate import (
    Bulyan,
    CenteredClipping,
    CoordinateMedian,
    GeometricMedian,
    Krum,
    MultiKrum,
    NormBounding,
    TrimmedMean,
    WeightedMean,
)
from potluck.core.parts import part_context
from potluck.models.zoo import build_model

THREADS = 2
REPEATS = 5
SLOW_S = 10.0  # a first call longer than this is the only one
QUICK_D = 50_000
CHECKED = 4096  # coordinates compared against the references
SPREAD, SHIFT = 0.01, 1.0  # honest rows' spread; the Byzantine rows' shift
RESERVE = 2**30  # bytes left free under the address-space cap
CTX = part_context(0, 1, "aggregator")


def cnn_size() -> int:
    model = build_model("cnn", input_shape=(1, 28, 28), num_classes=10)
    return sum(p.numel() for p in model.parameters())


def meminfo(field: str) -> int:
    """A /proc/meminfo (or, for ``Vm*``, /proc/self/status) field in bytes."""
    source = "/proc/self/status" if field.startswith("Vm") else "/proc/meminfo"
    for line in Path(source).read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def cap_address_space() -> int:
    """Cap this process's address space at its current size plus the memory available now
    (less ``RESERVE``), so that an allocation beyond it raises; the cap in bytes."""
    cap = meminfo("VmSize") + meminfo("MemAvailable") - RESERVE
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    return cap


def make_stack(k: int, d: int, f: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, d) float32 updates (the last ``f`` Byzantine) and (K,) float64 example counts."""
    gen = torch.Generator().manual_seed(k)
    mu = torch.randn(d, generator=gen) * SPREAD
    deltas = torch.randn(k, d, generator=gen).mul_(SPREAD).add_(mu)
    deltas[k - f :] += SHIFT
    weights = torch.randint(1, 601, (k,), generator=gen).double()
    return deltas, weights


def bandwidth(deltas: torch.Tensor) -> dict[str, Any]:
    """The single passes over the stack: best seconds and GB/s of each."""
    out = {}
    for name, fn in (
        ("sum0", lambda: deltas.sum(0)),
        ("sum_all", lambda: deltas.sum()),
        ("mean0", lambda: torch.mean(deltas, 0)),
    ):
        times = call_seconds(fn, REPEATS)
        out[name] = {"best_s": min(times), "times_s": times, "gbps": gb(deltas) / min(times)}
    return out


def previous_kernels(deltas: torch.Tensor, weights: torch.Tensor) -> dict[str, Any]:
    """The kernels this benchmark replaced, timed on the same stack: ``WeightedMean``'s
    ``w @ deltas`` (best of ``REPEATS``) and the coordinate median's sort of the whole stack
    along the clients (once; it needs three times the stack)."""
    w = (weights / weights.sum()).float()
    times = call_seconds(lambda: w @ deltas, REPEATS)
    out: dict[str, Any] = {"w_at_deltas": {"best_s": min(times), "times_s": times}}
    try:
        (once,) = call_seconds(lambda: deltas.sort(dim=0).values, 1, warm_up=False)
        out["sort_median"] = {"best_s": once}
    except RuntimeError as err:  # an allocation over the address-space cap
        out["sort_median"] = {"error": str(err).splitlines()[0][:300]}
    gc.collect()
    return out


def gb(deltas: torch.Tensor) -> float:
    return deltas.numel() * deltas.element_size() / 1e9


def aggregators(k: int, f: int, bound: float) -> list[Any]:
    return [
        WeightedMean(),
        CoordinateMedian(byzantine=f),
        TrimmedMean(trim=0.1),
        Krum(byzantine=f),
        MultiKrum(byzantine=f),
        Bulyan(byzantine=f),
        GeometricMedian(byzantine=f),
        CenteredClipping(tau=bound, byzantine=k // 10),
        NormBounding(bound=bound),
    ]


class Reference:
    """Float64 references on ``CHECKED`` coordinates of the stack, and the checks."""

    def __init__(self, deltas: torch.Tensor, weights: torch.Tensor, f: int) -> None:
        k, d = deltas.shape
        self.f, self.k = f, k
        self.idx = torch.linspace(0, d - 1, min(CHECKED, d)).long()
        self.x = deltas[:, self.idx].double().numpy()
        self.w = weights.numpy()
        self.norms = torch.linalg.vector_norm(deltas, dim=1).double().numpy()
        self.honest = self.x[: k - f].mean(0)
        self.byzantine = self.x[k - f :].mean(0) if f else self.honest

    def clipped_mean(self, bound: float) -> np.ndarray:
        scales = np.minimum(1.0, bound / self.norms)
        return (scales[:, None] * self.x).sum(0) / self.k

    def exact(self, agg: Any) -> np.ndarray | None:
        """The per-coordinate reference of ``agg`` on the checked coordinates, if any."""
        x, k = self.x, self.k
        if isinstance(agg, WeightedMean):
            return (self.w / self.w.sum()) @ x
        if isinstance(agg, CoordinateMedian):
            return np.median(x, axis=0)
        if isinstance(agg, TrimmedMean):
            b = int(agg.trim * k) if isinstance(agg.trim, float) else agg.trim
            return np.sort(x, axis=0)[b : k - b].mean(0)
        if isinstance(agg, MultiKrum) and agg.selected is None:
            return self.honest
        if isinstance(agg, NormBounding):
            return self.clipped_mean(agg.bound)
        if isinstance(agg, CenteredClipping) and agg.iterations == 1:
            return self.clipped_mean(agg.tau)
        return None

    def check(self, agg: Any, out: torch.Tensor, deltas: torch.Tensor) -> dict[str, Any]:
        got = out[self.idx].double().numpy()
        off = float(np.linalg.norm(got - self.honest))
        shift = float(np.linalg.norm(self.byzantine - self.honest))
        result: dict[str, Any] = {
            "shape_dtype_ok": tuple(out.shape) == (deltas.shape[1],) and out.dtype == deltas.dtype,
            "finite": bool(torch.isfinite(out).all()),
            "nonzero": bool(out.abs().max() > 0),
            "distance_to_honest_mean": off,
            "byzantine_mean_distance": shift,
        }
        want = self.exact(agg)
        if want is not None:
            err = float(np.abs(got - want).max())
            tol = 1e-5 * (1 + float(np.abs(want).max()))
            result.update(kind="reference on the checked coordinates", max_abs_err=err, tol=tol)
            ok = err <= tol
        elif isinstance(agg, Krum):
            rows = np.flatnonzero((self.x == got).all(axis=1))
            row = int(rows[0]) if rows.size else -1
            ok = 0 <= row < self.k - self.f and torch.equal(out, deltas[row])
            result.update(kind="equals one honest row", row=row)
        else:
            ok = off < 0.05 * shift
            result["kind"] = "nearer the honest mean than 5% of the Byzantine mean's distance"
        basic = result["shape_dtype_ok"] and result["finite"] and result["nonzero"]
        result["ok"] = bool(ok and basic)
        return result


def read_pass(deltas: torch.Tensor) -> float:
    """Seconds of one ``deltas.sum()``: the limit, read again beside each call."""
    t0 = time.perf_counter()
    deltas.sum()
    return time.perf_counter() - t0


def time_aggregator(agg: Any, deltas: torch.Tensor, weights: torch.Tensor) -> dict[str, Any]:
    """The calls' times, with a read of the stack before the first and after each call."""
    state = agg.init(torch.zeros(deltas.shape[1]))
    beside = [read_pass(deltas)]
    t0 = time.perf_counter()
    out, _ = agg.aggregate(deltas, weights, state, CTX)
    first = time.perf_counter() - t0
    beside.append(read_pass(deltas))
    row: dict[str, Any] = {"first_call_s": first}
    if first > SLOW_S:
        row.update(times_s=[first], best_s=first, startup_s=None, repeats=1, warmup=False)
        return {**row, "limit_beside_s": min(beside), "out": out}
    repeats = max(1, min(REPEATS, int(SLOW_S / first)))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out, _ = agg.aggregate(deltas, weights, state, CTX)
        times.append(time.perf_counter() - t0)
        beside.append(read_pass(deltas))
    best = min(times)
    row.update(times_s=times, best_s=best, startup_s=first - best, repeats=repeats, warmup=True)
    return {**row, "limit_beside_s": min(beside), "out": out}


def run_k(k: int, d: int, names: set[str] | None) -> dict[str, Any]:
    f = k // 5
    need = k * d * 4
    free = meminfo("MemAvailable")
    run: dict[str, Any] = {"k": k, "d": d, "f": f, "stack_gb": need / 1e9}
    run["mem_available_gb_before"] = free / 1e9
    if need > free - RESERVE:
        run["skipped"] = f"the stack needs {need / 1e9:.2f} GB, {free / 1e9:.2f} GB are free"
        print(f"K={k}: {run['skipped']}", flush=True)
        return run
    cpu0, own0 = cpu_times(), own_cpu_s()
    t0 = time.perf_counter()
    deltas, weights = make_stack(k, d, f)
    ref = Reference(deltas, weights, f)
    bound = float(np.median(ref.norms[: k - f]))
    run.update(make_stack_s=time.perf_counter() - t0, clip_bound=bound)
    before = bandwidth(deltas)
    print(f"K={k} d={d}: limit {limit_of(before)[1]:.2f} GB/s", flush=True)
    rows = []
    for agg in aggregators(k, f, bound):
        name = type(agg).__name__
        if names and name not in names:
            continue
        row: dict[str, Any] = {"aggregator": name, "config": dataclasses.asdict(agg)}
        try:
            timed = time_aggregator(agg, deltas, weights)
        except RuntimeError as err:  # an allocation over the address-space cap
            row["error"] = str(err).splitlines()[0][:300]
            print(f"  {name}: {row['error']}", flush=True)
            rows.append(row)
            gc.collect()
            continue
        row["check"] = ref.check(agg, timed.pop("out"), deltas)
        row.update(timed)
        rows.append(row)
        print(f"  {name:18s} {row['best_s']:9.3f} s  x{row['repeats']}  check {row['check']['ok']}",
              flush=True)  # fmt: skip
    previous = previous_kernels(deltas, weights)
    after = bandwidth(deltas)
    limit_s = min(limit_of(before)[0], limit_of(after)[0])
    for row in rows:
        if "best_s" in row:
            row["gbps"] = gb(deltas) / row["best_s"]
            row["ratio_to_limit"] = limit_s / row["best_s"]
            row["ratio_to_limit_beside"] = row["limit_beside_s"] / row["best_s"]
    run.update(
        limit_s=limit_s,
        limit_gbps=gb(deltas) / limit_s,
        passes_before=before,
        passes_after=after,
        previous_kernels=previous,
        rows=rows,
        mem_available_gb_with_stack=meminfo("MemAvailable") / 1e9,
    )
    busy = cpu_times()["busy_s"] - cpu0["busy_s"]
    mine = own_cpu_s() - own0
    run["cpu_s"] = {"wall": time.perf_counter() - t0, "this_benchmark": mine, "others": busy - mine}
    return run


def limit_of(passes: dict[str, Any]) -> tuple[float, float]:
    """The fastest single read of the stack: (seconds, GB/s)."""
    best = min(passes["sum0"]["best_s"], passes["sum_all"]["best_s"])
    gbps = max(passes["sum0"]["gbps"], passes["sum_all"]["gbps"])
    return best, gbps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", default="100,1000", help="cohort sizes, comma-separated")
    parser.add_argument("--quick", action="store_true", help=f"d = {QUICK_D:,}")
    parser.add_argument("--aggregators", default="", help="class names, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    torch.set_num_interop_threads(1)
    result = header("aggregators")
    d = QUICK_D if args.quick else cnn_size()
    names = set(filter(None, args.aggregators.split(",")))
    result["settings"] = {
        "d": d,
        "model": "McMahan CNN" if not args.quick else "quick",
        "threads": THREADS,
        "repeats": REPEATS,
        "slow_s": SLOW_S,
        "checked_coordinates": CHECKED,
        "honest_spread": SPREAD,
        "byzantine_shift": SHIFT,
        "address_space_cap_gb": cap_address_space() / 1e9,
    }
    result["runs"] = []
    name = "aggregators_quick" if args.quick else "aggregators"
    for k in (int(v) for v in args.k.split(",")):
        result["runs"].append(run_k(k, d, names or None))
        gc.collect()
        path = write_result(name, copy.deepcopy(result))  # what is done so far
    print(path)
    failed = [
        (run["k"], row["aggregator"])
        for run in result["runs"]
        for row in run.get("rows", [])
        if not row.get("check", {}).get("ok", False)
    ]
    if failed:
        raise SystemExit(f"failed or unchecked: {failed}")


if __name__ == "__main__":
    main()
