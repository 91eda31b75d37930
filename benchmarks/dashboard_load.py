"""The dashboard with a big store: page load and live-update latency (issue 19).

Builds two stores side by side: a *big* one of 100 finished runs, each of 1,000 rounds over a
federation of 10,000 clients (``--per-round`` of them train each round and store their
metrics), and a *single* one holding one such run. The rows are the ones ``commit_round``
writes (the store's own schema), inserted in bulk so the store builds in minutes. Then
``potluck dashboard`` serves each store (its own process) and Debian's Chromium, driven by
Playwright, loads:

- ``/`` (the runs list) and ``/runs/<id>`` (a run's charts with its 1,000 rounds and its
  per-client table and histogram) until the page says it is drawn (``window.potluck.ready``),
  each ``--repeats`` times; the run page's time in the big store over its time in the single
  one is the check that no request reads the whole store (a ratio near 1);
- a live run: one more run, held ``running`` by this process, whose page is open while this
  process commits a round every second; the latency is from before ``commit_round`` to the
  round's point on the page's chart.

The check that the work was done: the run page's charts hold 1,000 points each, its table
one row per client that trained, the live page every committed round. Start-up (the server's
first answer) is reported in its own column. Run from the repository root (a few minutes, a
~1.5 GB store under ``--dir``):
    .venv/bin/python benchmarks/dashboard_load.py
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from _common import header, summary, write_result

from potluck.store.sqlite import RunStore

ROUND_METRICS = [
    "cohort_size", "updates", "train_loss", "bytes_up", "bytes_down", "round_seconds",
    "test_loss", "test_accuracy", "fed_loss", "fed_accuracy", "train_loss_slope",
    "accuracy_slope", "plateau", "diverging", "update_norm_mean", "update_norm_max",
    "client_drift_mean", "client_drift_max", "clients_accuracy_mean", "clients_accuracy_var",
    "clients_accuracy_min", "clients_accuracy_worst10", "clients_accuracy_gini",
    "clients_accuracy_count", "label_shift_max", "feature_shift_max", "shifted_clients",
    "flagged", "bytes_total", "bytes_per_gain",
]  # fmt: skip
CLIENT_METRICS = [
    "num_examples", "train_loss", "eval_global_accuracy", "eval_global_loss", "update_norm",
    "client_drift", "label_shift", "feature_shift", "bytes_up", "bytes_down",
]  # fmt: skip
CONFIG = {
    "rounds": 1000,
    "data": {"dataset": "synthetic", "num_clients": 10_000},
    "model": {"name": "mlp"},
    "algorithm": {"name": "fedavg"},
}


def fill(store: RunStore, name: str, rounds: int, clients: int, per_round: int, rng: Any) -> str:
    """One run of ``rounds`` rounds: every round's metrics and ``per_round`` clients' metrics
    (the rows ``commit_round`` writes, in one transaction)."""
    run = store.create_run(CONFIG, name=name)
    conn = store._conn
    key = store._run_key(run)
    round_rows, metric_rows, client_rows = [], [], []
    for r in range(1, rounds + 1):
        round_rows.append((key, r, "2026-12-03T00:00:00+00:00"))
        metric_rows += [(key, r, m, rng.random()) for m in ROUND_METRICS]
        for c in rng.sample(range(clients), per_round):
            client_rows += [(key, r, c, m, rng.random()) for m in CLIENT_METRICS]
    with store._transaction():
        conn.executemany("INSERT INTO rounds VALUES (?, ?, ?)", round_rows)
        conn.executemany(
            "INSERT INTO round_metrics (run, round, name, value) VALUES (?, ?, ?, ?)", metric_rows
        )
        conn.executemany(
            "INSERT INTO client_metrics (run, round, client, name, value) VALUES (?, ?, ?, ?, ?)",
            client_rows,
        )
    store.finish(run, "finished", {"test_accuracy": rng.random()})
    return run


def build(root: Path, runs: int, args: argparse.Namespace) -> list[str]:
    rng = random.Random(runs)
    with RunStore(root) as store:
        return [
            fill(store, f"run-{i}", args.rounds, args.clients, args.per_round, rng)
            for i in range(runs)
        ]


def serve(root: Path) -> tuple[subprocess.Popen[bytes], str, float]:
    """``potluck dashboard`` over ``root`` in its own process; its URL and start-up seconds."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("potluck")
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(exe), "dashboard", "--store", str(root), "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/runs", timeout=60).read()
            return proc, url, time.perf_counter() - t0
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("the dashboard did not start") from None
            time.sleep(0.05)


def load(page: Any, url: str) -> float:
    t0 = time.perf_counter()
    page.goto(url)
    page.wait_for_function("window.potluck && window.potluck.ready", timeout=120_000)
    return time.perf_counter() - t0


def page_loads(page: Any, url: str, run: str, args: argparse.Namespace) -> dict[str, Any]:
    runs_s = [load(page, f"{url}/") for _ in range(args.repeats)]
    listed = page.evaluate("window.potluck.runs")
    run_s = [load(page, f"{url}/runs/{run}") for _ in range(args.repeats)]
    points = page.evaluate("Object.values(window.potluck.charts).map(c => c.plot.data[0].length)")
    assert points and all(n == args.rounds for n in points), points
    api = {}
    for path in ("", "/rounds", "/clients"):
        t0 = time.perf_counter()
        body = urllib.request.urlopen(f"{url}/api/runs/{run}{path}", timeout=120).read()
        api[path or "/"] = {"seconds": time.perf_counter() - t0, "bytes": len(body)}
    return {
        "runs_listed": listed,
        "runs_page_s": summary(runs_s),
        "run_page_s": summary(run_s),
        "charts": len(points),
        "points_per_chart": points[0],
        "clients_in_table": page.evaluate("window.potluck.clients"),
        "api_first_request_s": api,
    }


def live_latency(page: Any, url: str, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(7)
    with RunStore(root) as store:
        run = fill(store, "live", args.rounds, args.clients, args.per_round, rng)
        store.set_status(run, "running")
        store.hold(run)  # executing here: the page streams it
        page.goto(f"{url}/runs/{run}")
        page.wait_for_function(f"window.potluck.ready && window.potluck.rounds === {args.rounds}")
        latencies = []
        for r in range(args.rounds + 1, args.rounds + 1 + args.live_rounds):
            time.sleep(1.0)
            t0 = time.perf_counter()
            clients = [(c, {m: rng.random() for m in CLIENT_METRICS}) for c in range(20)]
            store.commit_round(run, r, {m: rng.random() for m in ROUND_METRICS}, clients)
            page.wait_for_function(f"window.potluck.rounds === {r}", timeout=30_000)
            latencies.append(time.perf_counter() - t0)
        shown = page.evaluate("window.potluck.charts['accuracy'].plot.data[0].length")
        assert shown == args.rounds + args.live_rounds, shown
        store.finish(run, "finished", {})
    return {"rounds_streamed": len(latencies), "latency_s": summary(latencies), "all": latencies}


def measure(root: Path, run: str, args: argparse.Namespace, live: bool) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    proc, url, startup = serve(root)
    try:
        with sync_playwright() as pw:
            chromium = shutil.which("chromium") or "chromium"
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            out = {"server_startup_s": startup, **page_loads(page, url, run, args)}
            if live:
                out["live"] = live_latency(page, url, root, args)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(30)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--per-round", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--live-rounds", type=int, default=10)
    parser.add_argument("--dir", type=Path, default=None, help="where the stores are built")
    args = parser.parse_args()
    started = header("dashboard_load")  # the machine's load before the work
    base = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        t0 = time.perf_counter()
        big_runs = build(base / "big", args.runs, args)
        built_s = time.perf_counter() - t0
        (single_run,) = build(base / "single", 1, args)
        db_bytes = (base / "big" / "potluck.db").stat().st_size
        single = measure(base / "single", single_run, args, live=False)
        big = measure(base / "big", big_runs[-1], args, live=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    run_page_ratio = big["run_page_s"]["median"] / single["run_page_s"]["median"]
    result = {
        **started,
        "settings": vars(args) | {"dir": str(args.dir)},
        "store": {"runs": args.runs, "build_s": built_s, "db_bytes": db_bytes},
        "single": single,
        "big": big,
        "run_page_big_over_single": run_page_ratio,
    }
    print(json.dumps({k: result[k] for k in ("store", "run_page_big_over_single")}, indent=1))
    print(f"runs page {big['runs_page_s']['median']:.3f} s, run page "
          f"{big['run_page_s']['median']:.3f} s (single store {single['run_page_s']['median']:.3f}"
          f" s), live round {statistics.median(big['live']['all']):.3f} s")  # fmt: skip
    print(f"wrote {write_result('dashboard_load', result)}")


if __name__ == "__main__":
    main()
