"""Cross-device scale from the CLI (issue 20): synchronous FedAvg over a federation of
``--clients`` phones (``partition = "sampled"``: each draws ``--examples`` distinct
Fashion-MNIST training examples, IID), ``--per-round`` clients a round for ``--rounds``
rounds, McMahan's 2NN, one local epoch of batch 10, centralised evaluation every 10 rounds.

Each engine runs as ``potluck run --set ...`` in its own process, at every federation size
of ``--sizes``, while this process samples the whole process tree's memory (RSS and PSS,
the pool's workers included: ``compare_flower.TreeSampler``). Measured: end to end, the
start-up (process start to round 1), the first round and the rounds after it (stored
``round_seconds``), rounds a wall second, peak RSS and PSS; the memory a client costs is
the difference in peak PSS between the largest and the smallest federation divided by the
difference in clients. The check that the work was done: every round trained
``--per-round`` clients with ``--examples`` examples each, and the test accuracy moved and
ended at least three times chance.

Run from the repository root (about 12 minutes for the defaults):
    .venv/bin/python benchmarks/cross_device.py
    .venv/bin/python benchmarks/cross_device.py --sizes 1000000 --engines inline --rounds 10
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import REPO, header, write_result
from compare_flower import POTLUCK, failure, spawn

CHANCE = 0.1  # ten classes, balanced test set
READ = """
import json, sys
from potluck.store.sqlite import RunStore
with RunStore(sys.argv[1]) as st:
    (info,) = st.list_runs()
    per = {}
    for rnd, _, m in st.client_metrics(info.run_id):
        n, e = per.get(rnd, (0, 0))
        per[rnd] = (n + 1, e + int(m.get("num_examples", 0)))
    rounds = st.rounds(info.run_id)
    print(json.dumps({
        "status": info.status,
        "engine": info.config["run"]["engine"],
        "round_seconds": [r.metrics["round_seconds"] for r in rounds],
        "accuracy": [r.metrics["test_accuracy"] for r in rounds if "test_accuracy" in r.metrics],
        "members": [per.get(r.round, (0, 0))[0] for r in rounds],
        "examples": [per.get(r.round, (0, 0))[1] for r in rounds],
    }))
"""


def settings(clients: int, per_round: int, rounds: int, examples: int, engine: str) -> list[str]:
    """The run's ``--set`` overrides of the default experiment."""
    partition = {"kind": "sampled", "examples_per_client": examples, "sigma": 0.0}
    values: dict[str, Any] = {
        "rounds": rounds,
        "data.dataset": "fashion_mnist",
        "data.num_clients": clients,
        "data.test_fraction": 0.0,
        "model.name": "mlp2nn",
        "sampler.clients_per_round": per_round,
        "client.epochs": 1,
        "client.batch_size": 10,
        "client.lr": 0.05,
        "evaluation.every": 10,
        "evaluation.federated_clients": 0,
        "run.engine": engine,
        "run.threads": 2,
    }
    out = [f"{k}={json.dumps(v)}" for k, v in values.items()]
    out += [f"data.partition.{k}={json.dumps(v)}" for k, v in partition.items()]
    out.append('data.partition.skew="none"')
    return out


def one(args: argparse.Namespace, clients: int, engine: str, tmp: Path) -> dict[str, Any]:
    store = tmp / f"store-{engine}-{clients}"
    cmd = [POTLUCK, "run", "--store", str(store)]
    for item in settings(clients, args.per_round, args.rounds, args.examples, engine):
        cmd += ["--set", item]
    log = tmp / f"{engine}-{clients}.log"
    proc = spawn(cmd, log, {"interval": 0.05, "pss_cpu_share": 0.05}, timeout_s=args.timeout)
    why = failure(proc, log)
    if why is not None:
        return {"engine": engine, "clients": clients, "invalid": [why]}
    read = subprocess.run([sys.executable, "-c", READ, str(store)], capture_output=True, text=True)
    stored = json.loads(read.stdout)
    secs, acc = stored["round_seconds"], stored["accuracy"]
    invalid = [
        f"round {i + 1}: {m} members, {e} examples"
        for i, (m, e) in enumerate(zip(stored["members"], stored["examples"], strict=True))
        if m != args.per_round or e != args.per_round * args.examples
    ]
    if len(set(acc)) < 2 or acc[-1] < 3 * CHANCE:
        invalid.append(f"test accuracy {acc}: not moving, or not 3x chance ({CHANCE})")
    return {
        "engine": stored["engine"],
        "clients": clients,
        "end_to_end_s": proc["wall_s"],
        "start_up_s": proc["wall_s"] - sum(secs),  # and the commits and the exit
        "first_round_s": secs[0],
        "rounds_after_first_s": sum(secs[1:]),
        "rounds_per_s_after_first": (len(secs) - 1) / sum(secs[1:]),
        "test_accuracy": acc,
        "peak_rss_mib": proc["peak_rss_mib"],
        "peak_pss_mib": proc["peak_pss_mib"],
        "peak_processes": proc["peak_processes"],
        "other_processes_cores": proc["other_processes_cores"],
        "invalid": invalid,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100000,1000000", help="federation sizes")
    ap.add_argument("--engines", default="inline,vectorized,pool")
    ap.add_argument("--per-round", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--examples", type=int, default=20, help="examples a client")
    ap.add_argument("--timeout", type=float, default=1800.0)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    result = header("cross_device")
    result["settings"] = vars(args) | {"model": "mlp2nn", "batch_size": 10, "threads": 2}
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cross-device-") as tmp:
        for engine in args.engines.split(","):
            for clients in sizes:
                run = one(args, clients, engine, Path(tmp))
                runs.append(run)
                print(json.dumps(run), flush=True)
    result["runs"] = runs
    result["bytes_per_client"] = per_client(runs, sizes)
    print(json.dumps(result["bytes_per_client"], indent=1))
    print(write_result("cross_device", result))


def per_client(runs: list[dict[str, Any]], sizes: list[int]) -> dict[str, float]:
    """Peak PSS growth per added client, per engine (largest against smallest size)."""
    out = {}
    lo, hi = min(sizes), max(sizes)
    for engine in {r["engine"] for r in runs if not r["invalid"]}:
        by = {r["clients"]: r for r in runs if r["engine"] == engine and not r["invalid"]}
        if lo in by and hi in by and hi > lo:
            grow = by[hi]["peak_pss_mib"] - by[lo]["peak_pss_mib"]
            out[engine] = grow * 2**20 / (hi - lo)
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "benchmarks"))
    main()
