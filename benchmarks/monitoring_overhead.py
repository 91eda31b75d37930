"""Monitoring's cost per round as a share of the round (issue 19; goal: under 5 %).

Runs W1 and W3 of ``compare_flower.py`` (their potluck configs, unchanged) in this process
on the engine ``auto`` picks, with the monitoring figures (always on) and again with the
clients' data summaries (``monitoring.summaries``), and times what monitoring adds inside
each round: ``_Loop._figures`` (the round's figures from its metrics and the stored
history), ``update_distances`` (each accepted update's norm and distance to the aggregate)
and, with summaries, ``_Loop._summaries`` (the ``summarize`` stage and the shift of each
summary). The share is their time over the round's own ``round_seconds`` plus
``_figures``' (which runs after ``round_seconds`` is taken); rounds after the first: the
median of the rounds' shares, and the amortised share (all their monitoring time over all
their time), which is what summaries every k-th round (``monitoring.summary_every``) cost.
``--rounds`` (default 21) replaces the workloads' round counts so that every 5th round has
four summarising rounds after the first; a round's work is unchanged. The check that the
work was done: every round stored its figures, and with summaries every accepted member of
a summarising round its shift.

Run from the repository root (about 2 minutes):
    .venv/bin/python benchmarks/monitoring_overhead.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from _common import cpu_times, header, own_cpu_s, write_result
from compare_flower import WORKLOADS

import potluck.orchestrator as orch
from potluck.config import ExperimentConfig
from potluck.orchestrator import run_experiment
from potluck.store.sqlite import RunStore

Timed = dict[str, list[float]]


def timed(spent: Timed, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, adding each call's seconds to ``spent[name]``."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent.setdefault(name, []).append(time.perf_counter() - t0)

    return wrapper


ARMS = ((False, 1), (True, 1), (True, 5))  # (summaries, summary_every)


def measure(
    workload: str, summaries: bool, every: int, rounds: int, store_dir: str
) -> dict[str, Any]:
    cfg = dict(WORKLOADS[workload].config)
    cfg["rounds"] = rounds
    cfg["monitoring"] = {"summaries": summaries, "summary_every": every}
    cfg["run"] = {"engine": "auto", "store": store_dir}
    spent: Timed = {}
    originals = (orch._Loop._figures, orch._Loop._summaries, orch.update_distances)
    orch._Loop._figures = timed(spent, "figures", originals[0])  # type: ignore[method-assign]
    orch._Loop._summaries = timed(spent, "summaries", originals[1])  # type: ignore[method-assign]
    orch.update_distances = timed(spent, "distances", originals[2])
    before, own = cpu_times(), own_cpu_s()
    try:
        exp = ExperimentConfig.from_dict(cfg).build()
        store = RunStore(store_dir)
        result = run_experiment(exp, store, progress=False)
    finally:
        orch._Loop._figures, orch._Loop._summaries, orch.update_distances = originals  # type: ignore[method-assign]
    after, own = cpu_times(), own_cpu_s() - own
    rounds = result.history
    assert all("bytes_total" in m and "update_norm_mean" in m for m in rounds), "no figures"
    n = len(rounds)
    summarising = [summaries and (r - 1) % every == 0 for r in range(1, n + 1)]
    if summaries:
        shifted = [c for _, c, m in store.client_metrics(result.run_id or "") if "label_shift" in m]
        expected = sum(int(m["updates"]) for m, on in zip(rounds, summarising, strict=True) if on)
        assert len(shifted) == expected, "a summary is missing"
    stage = iter(spent.get("summaries", []))
    spent["summaries"] = [next(stage) if on else 0.0 for on in summarising]
    calls = {k: spent.get(k, [0.0] * n) for k in ("figures", "summaries", "distances")}
    assert all(len(v) == n for v in calls.values()), {k: len(v) for k, v in calls.items()}
    per_round = []
    for i, m in enumerate(rounds[1:], start=1):
        extra = sum(v[i] for v in calls.values())
        whole = m["round_seconds"] + calls["figures"][i]  # _figures runs after the clock
        per_round.append({"round_s": whole, "monitoring_s": extra, "share": extra / whole})
    return {
        "workload": workload,
        "engine": exp.engine,
        "summaries": summaries,
        "summary_every": every,
        "rounds_after_first": len(per_round),
        "summarising_rounds_after_first": sum(summarising[1:]),
        "median_round_s": statistics.median(r["round_s"] for r in per_round),
        "median_monitoring_s": statistics.median(r["monitoring_s"] for r in per_round),
        "median_share": statistics.median(r["share"] for r in per_round),
        "max_share": max(r["share"] for r in per_round),
        "amortised_share": sum(r["monitoring_s"] for r in per_round)
        / sum(r["round_s"] for r in per_round),
        "final_test_accuracy": rounds[-1].get("test_accuracy"),
        "own_cpu_s": own,
        "other_cpu_s": after["busy_s"] - before["busy_s"] - own,  # the machine's load
        "per_round": per_round,
    }


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=["w1", "w3"])
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args()
    results = []
    for w in args.workloads:
        for summaries, every in ARMS:
            with tempfile.TemporaryDirectory() as d:
                r = measure(w, summaries, every, args.rounds, d)
            results.append(r)
            print(
                f"{w} summaries={summaries} every={every} engine={r['engine']}: "
                f"round {r['median_round_s']:.3f} s,"
                f" monitoring {r['median_monitoring_s'] * 1e3:.2f} ms = "
                f"{100 * r['median_share']:.2f} % (max {100 * r['max_share']:.2f} %, "
                f"amortised {100 * r['amortised_share']:.2f} %)"
            )
    path = write_result(
        "monitoring_overhead", {**header("monitoring_overhead"), "results": results}
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
