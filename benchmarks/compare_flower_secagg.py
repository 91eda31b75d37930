"""potluck's SecAgg+ against Flower 1.42's SecAgg+ workflow (issue 15's benchmark): the same
cohort of ``n`` clients, the same vectors of length ``d``, the same dropouts, side by side on
the same machine, each side in its own process and virtual environment.

- **potluck**: the real ``SecAgg`` part and ``SecureSum`` aggregator (``neighbours`` ``k`` =
  ``ceil(log2 n)`` made even, threshold ``t = ceil(k / 2)``, 20 quantisation bits, modulus
  ``2^32``, clipping range 1, ``max_weight`` 1000), the four stages driven over in-memory
  messages as the round loop drives them (``secagg_cost.Stages``), one thread; this script
  with ``--side potluck`` in ``.venv``.
- **Flower**: ``SecAggPlusWorkflow`` + ``secaggplus_mod`` in Flower's Ray simulation
  (``benchmarks/flower/secagg_app.py`` in ``.venv-flower``, 1 Ray CPU: one ClientApp actor,
  clients one after another as on potluck's side), with the same Harary graph degree
  (``num_shares = k + 1``: Flower counts a client among its own share holders), the same
  threshold count and the same fixed point (``clipping_range`` 1, ``quantization_range``
  ``2^20``, ``modulus_range`` ``2^32``, ``max_weight`` 1000).

Client ``i`` holds ``d`` values uniform in [-0.5, 0.5] (float32) and a weight of 1 to 600,
drawn from ``default_rng([seed, i])`` on both sides; no training. Each process runs a schedule
of rounds: two warm-up rounds (plaintext, SecAgg+), then ``--repeats`` times (fewer where
``n * d`` times them passes ``--budget``: 1 at ``n = 200, d = 10^6``) a plaintext round and a
SecAgg+ round with no dropout, with 10% of the cohort dropping after sending its masked input
(they do not answer the unmask stage: their self-mask seeds are rebuilt from their neighbours'
shares) and with 10% dropping after sharing keys (no masked input: their mask keys are rebuilt and
their pairwise masks with the survivors removed); the same clients drop on both sides
(``default_rng([seed, n, round])``). Every round's aggregate is checked against the float64
weighted mean of the same vectors (of the clients whose input counts), within the fixed-point
bound ``m (c + 0.5) / (2^19 sum(w) / max_weight)``, and the driver checks that both sides
aggregated the same clients and the same plaintext mean.

Measured per round (the median over the repeats): the protocol's wall time (potluck: from the
first stage to the decoded mean; Flower: ``SecAggPlusWorkflow.__call__``, which includes its
simulation engine's message passing); the server's own compute (the wall time less the clients'
work; Flower: each stage less the time inside ``grid.send_and_receive``); each client's own
compute per stage (the mean over the clients that ran it, summed over the four stages); the
payload bytes per client, up and down (array data and values, no names or framing); the
plaintext round on the same side (potluck: stacking the uploads and FedAvg's ``WeightedMean``;
Flower: ``default_fit_workflow`` with FedAvg) and the overhead over it. Flower's FedAvg
re-averages ``n`` copies of the unmasked mean after the workflow; that time is reported apart
and left out of Flower's protocol time. Start-up is its own column: process start to the first
round, plus what the first (plaintext) round took beyond a measured one (Flower starts Ray and
its ClientApp actor inside it); so is the first SecAgg+ round's extra time (first use of the
cryptography); the peak memory of each process tree is sampled. Ratios are potluck / Flower
(below 1: potluck faster or smaller).

A potluck-only curve shows the per-client cost against ``n`` up to 1,000 clients (``--curve``).

Both sides run as ``unshare -n sh -c 'ip link set lo up && exec ...'`` (a fresh network
namespace with only loopback); Flower with its own ``RAY_TMPDIR``.

Run from the repository root (``bash scripts/setup_flower.sh`` first):
    .venv/bin/python benchmarks/compare_flower_secagg.py                 # full grid, ~40 min
    .venv/bin/python benchmarks/compare_flower_secagg.py --sizes 10,50 --dims 100000 \\
        --repeats 1 --curve 10,100                                       # quick, ~3 min
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import REPO, RESULTS, cpu_times, header, now_utc, own_cpu_s, write_result
from flower.secagg_inputs import client_input, dropouts  # the Flower side imports the same

FLOWER_PY = REPO / ".venv-flower" / "bin" / "python"
FLOWER_APP = REPO / "benchmarks" / "flower" / "secagg_app.py"
SEED = 0
CLIP, QBITS, BITS, MAX_WEIGHT = 1.0, 20, 32, 1000.0
RATE = 0.1
VARIANTS = ("none", "after_masked_input", "after_share_keys")
FLOWER_STAGES = {  # Flower's stage names -> potluck's
    "setup": "advertise",
    "share_keys": "share",
    "collect_masked_vectors": "masked_input",
    "unmask": "unmask",
    "train": "train",
}
NS = "transforms.0.secagg"


# -- inputs shared by both sides (benchmarks/flower/secagg_inputs.py) ------------------------


def expected_mean(seed: int, clients: list[int], d: int) -> tuple[np.ndarray, int]:
    """The float64 weighted mean of ``clients``' vectors and their summed weight."""
    total, weights = np.zeros(d), 0
    for c in clients:
        x, w = client_input(seed, c, d)
        total += w * x.astype(np.float64)
        weights += w
    return total / weights, weights


def fingerprint(mean: np.ndarray) -> list[float]:
    return [float(mean.sum()), *map(float, mean[:3])]


def schedule(repeats: int) -> list[dict[str, Any]]:
    """Warm-up rounds, then ``repeats`` x (plaintext, SecAgg+ under each dropout variant)."""
    rounds = [{"kind": "plain", "warmup": True}, {"kind": "secagg", "warmup": True}]
    for _ in range(repeats):
        rounds.append({"kind": "plain"})
        for variant in VARIANTS:
            drop = {} if variant == "none" else {"dropout": variant, "rate": RATE}
            rounds.append({"kind": "secagg", **drop})
    return rounds


def make_spec(n: int, d: int, rounds: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    from potluck.secagg.graph import degree

    k = degree(n, "log")
    t = max(2, math.ceil(0.5 * k))
    return {
        "n": n,
        "d": d,
        "seed": SEED,
        "k": k,
        "threshold": t,
        "server_out": str(out),
        "schedule": rounds,
        "secagg": {
            "num_shares": k + 1,
            "reconstruction_threshold": t,
            "max_weight": MAX_WEIGHT,
            "clipping_range": CLIP,
            "quantization_range": 2**QBITS,
            "modulus_range": 2**BITS,
        },
    }


# -- potluck side (this script with --side potluck, in its own process) ---------------------


def potluck_side(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from potluck.core.params import ParamSpec
    from potluck.core.parts import RoundAborted
    from potluck.secagg import SecAgg

    torch.set_num_threads(1)
    n, d = int(spec["n"]), int(spec["d"])
    part = SecAgg(
        neighbours=int(spec["k"]),
        threshold=int(spec["threshold"]),
        clip_range=CLIP,
        quantization_bits=QBITS,
        bits=BITS,
        max_weight=MAX_WEIGHT,
    ).bind(ParamSpec(("w",), ((d,),)))
    rounds, first = [], 0.0
    for rnd, entry in enumerate(spec["schedule"], start=1):
        if rnd == 1:
            first = time.time()
        start = time.time()
        one = plain_round if entry["kind"] == "plain" else secagg_round
        try:
            result = one(part, n, d, rnd, entry)
        except RoundAborted as exc:  # too few share holders left: reported, as Flower's halts
            result = {"aborted": str(exc)}
        rounds.append({"round": rnd, **entry, "start_epoch": start, **result})
    return {"first_round_epoch": first, "rounds": rounds}


def _draw(n: int, d: int, clients: list[int]) -> dict[int, Any]:
    """The clients' upload messages (vector and weight), drawn outside every timing."""
    import torch

    from potluck.core.message import Message

    out = {}
    for c in clients:
        x, w = client_input(SEED, c, d)
        out[c] = Message({"delta": torch.from_numpy(x)}, {"weight": float(w)})
    return out


def plain_round(part: Any, n: int, d: int, rnd: int, entry: dict[str, Any]) -> dict[str, Any]:
    """Plaintext aggregation: the uploads stacked and FedAvg's weighted mean."""
    import torch

    from potluck.aggregate.mean import WeightedMean
    from potluck.core.parts import part_context

    members = list(range(n))
    messages = _draw(n, d, members)
    t0 = time.perf_counter()
    stack = torch.stack([messages[c].arrays["delta"] for c in members])
    w = torch.tensor([float(messages[c].scalars["weight"]) for c in members], dtype=torch.float64)
    mean, _ = WeightedMean().aggregate(stack, w, {}, part_context(0, rnd, "aggregator"))
    wall = time.perf_counter() - t0
    up = messages[0].nbytes
    return {
        "wall_s": wall,
        "server_s": wall,
        "client_ms": {},
        **_checked(mean.numpy(), members, d),
        "bytes_up_per_client": float(up),
        "bytes_down_per_client": 0.0,
    }


def secagg_round(part: Any, n: int, d: int, rnd: int, entry: dict[str, Any]) -> dict[str, Any]:
    """One SecAgg+ round; the chosen clients drop out after their masked input (no unmask
    answer) or after sharing keys (no masked input)."""
    import torch
    from secagg_cost import Stages

    from potluck.core.parts import part_context
    from potluck.secagg import SecureSum

    variant = entry.get("dropout")
    drop = dropouts(SEED, n, rnd, float(entry["rate"])) if variant else set()
    stages = Stages(part, list(range(n)), drop if variant == "after_masked_input" else set())
    stages.round = rnd
    ctx = part_context(0, rnd, NS)
    t0 = time.perf_counter()
    state = part.before_train(stages, {}, ctx)
    shared = stages.members.tolist()
    maskers = [c for c in shared if not (variant == "after_share_keys" and c in drop)]
    uploads, masked_s, draw_s = {}, 0.0, 0.0
    for c in maskers:
        t = time.perf_counter()
        message = _draw(n, d, [c])[c]
        draw_s += time.perf_counter() - t
        t = time.perf_counter()
        upload, stages.states[c] = part.encode(
            message, stages.states[c], stages.ctx(c, stages.inbox[c])
        )
        masked_s += time.perf_counter() - t
        assert upload is not None, f"client {c} did not mask its input"
        uploads[c] = upload
        stages.up[c] += upload.nbytes
    aggregated = sorted(uploads)  # the masked inputs in the sum
    stages.members = np.array(aggregated, dtype=np.int64)
    stack = torch.stack([uploads.pop(c).arrays["delta"] for c in aggregated])
    state = part.after_train(stages, state, ctx)
    total, _ = SecureSum().aggregate(stack, torch.ones(len(stack)), {}, ctx)
    mean, _ = part.decode_aggregate(total, state, ctx)
    wall = time.perf_counter() - t0 - draw_s
    unmaskers = len(maskers) - len(stages.drop)
    client_ms = {
        "advertise": 1e3 * stages.client_s["advertise"] / n,
        "share": 1e3 * stages.client_s["share"] / n,
        "masked_input": 1e3 * masked_s / len(maskers),
        "unmask": 1e3 * stages.client_s["unmask"] / unmaskers,
    }
    client_total_s = sum(stages.client_s.values()) + masked_s
    return {
        "wall_s": wall,
        "server_s": wall - client_total_s,
        "client_ms": client_ms,
        **_checked(mean.numpy(), aggregated, d),
        "bytes_up_per_client": float(np.mean(list(stages.up.values()))),
        "bytes_down_per_client": float(np.mean(list(stages.down.values()))),
    }


def _checked(mean: np.ndarray, clients: list[int], d: int) -> dict[str, Any]:
    expected, _ = expected_mean(SEED, clients, d)
    return {
        "aggregated": clients,
        "max_error": float(np.abs(mean.astype(np.float64) - expected).max()),
        "expected_fingerprint": fingerprint(expected),
    }


# -- Flower side: its raw records summarised like potluck's ---------------------------------


def flower_round(raw: dict[str, Any], n: int) -> dict[str, Any]:
    """One Flower round in the potluck side's terms (stages renamed, means per client)."""
    stages, clients = raw.pop("stages"), raw.pop("clients")
    excluded = raw.get("check_s", 0.0) + (
        raw.get("strategy_fedavg_s", 0.0) if raw["kind"] == "secagg" else 0.0
    )
    wait = sum(s["wait_s"] for s in stages.values())
    wall = raw.pop("wall_s") - excluded
    by_stage: dict[str, list[float]] = {}
    up, down = [0.0] * n, [0.0] * n
    for c in clients:
        down[c["pid"]] += c["down_b"]
        up[c["pid"]] += c.get("up_b", 0)
        if not c.get("dropped"):
            by_stage.setdefault(FLOWER_STAGES[c["stage"]], []).append(c["client_s"])
    client_ms = {s: 1e3 * statistics.fmean(v) for s, v in by_stage.items()}
    client_sum_s = sum(sum(v) for v in by_stage.values())
    out = {
        **raw,
        "wall_s": wall,
        "server_s": wall - wait,
        "client_ms": {} if raw["kind"] == "plain" else client_ms,
        "bytes_up_per_client": float(np.mean(up)),
        "bytes_down_per_client": float(np.mean(down)),
        "wait_s": wait,
        "engine_s": wait - client_sum_s,
        "stage_wall_s": {FLOWER_STAGES[k]: v["wall_s"] for k, v in stages.items()},
        "stage_server_s": {FLOWER_STAGES[k]: v["wall_s"] - v["wait_s"] for k, v in stages.items()},
    }
    if raw["kind"] == "plain":
        out["client_app_ms"] = client_ms.get("train", 0.0)
    return out


# -- running the sides ----------------------------------------------------------------------


def run_side(
    side: str, spec: dict[str, Any], workdir: Path, timeout_s: float, tries: int = 4
) -> dict[str, Any]:
    """Run one side in its own process (network namespace), retrying a run that failed (Ray's
    start-up times out after 30 s on a loaded machine); its result and process numbers."""
    spec_path, out = workdir / f"{side}-spec.json", workdir / f"{side}-out.json"
    spec = {**spec, "server_out": str(workdir / f"{side}-server.json")}
    spec_path.write_text(json.dumps(spec))
    if side == "flower":
        cmd = [str(FLOWER_PY), str(FLOWER_APP), "--spec", str(spec_path), "--out", str(out)]
    else:
        cmd = [sys.executable, __file__, "--side", "potluck", "--spec", str(spec_path)]
        cmd += ["--out", str(out)]
    failures: list[str] = []
    cpu0, own0, load0 = cpu_times(), own_cpu_s(), load()
    for attempt in range(tries):
        log = workdir / f"{side}-{attempt}.log"
        try:
            proc = _spawn_side(side, cmd, log, timeout_s)
            break
        except RuntimeError:
            lines = log.read_text(errors="replace").splitlines()
            why = next((x for x in reversed(lines) if "Exception" in x or "Error" in x), "?")
            failures.append(why[-300:])
            print(f"  {side} attempt {attempt + 1} failed: {why[-200:]}", flush=True)
            time.sleep(30.0 * (attempt + 1))  # let the machine's load pass
    else:
        raise RuntimeError(f"{side} failed {tries} times: {failures}")
    res = json.loads(out.read_text())
    cpu1, own = cpu_times(), own_cpu_s() - own0
    busy = cpu1["busy_s"] - cpu0["busy_s"]
    proc["machine"] = {  # the other agents' work on the machine while this side ran
        "loadavg_before": load0,
        "loadavg_after": load(),
        "busy_cpu_s": busy,
        "this_side_cpu_s": own,
        "other_processes_cpu_s": busy - own,
    }
    return {**res, "process": proc, "failed_attempts": failures}


def _spawn_side(side: str, cmd: list[str], log: Path, timeout_s: float) -> dict[str, Any]:
    """One run of a side's process, Flower's with a fresh ``RAY_TMPDIR``; a timeout or a
    failed exit raises ``RuntimeError``."""
    from compare_flower import failure, flower_env, in_netns, spawn

    sampler = {"interval": 0.1, "pss_cpu_share": 0.02}
    with contextlib.ExitStack() as stack:
        env = dict(os.environ)
        if side == "flower":
            env = stack.enter_context(flower_env(FLOWER_APP.parent))
        proc = spawn(in_netns(cmd), log, sampler, env, timeout_s)
    why = failure(proc, log)
    if why is not None:
        raise RuntimeError(f"{shlex.join(cmd)}: {why}")
    return proc


def summarise(side: str, res: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """Median over the measured rounds, per round kind (plain, and SecAgg+ per variant)."""
    n = int(spec["n"])
    rounds = res["rounds"]
    if side == "flower":
        rounds = [flower_round(r, n) for r in rounds]
    halted = [r for r in rounds if "aggregated" not in r]  # SecAgg+ stopped before the sum
    rounds = [r for r in rounds if "aggregated" in r]
    for r in rounds:
        bound = error_bound(spec, r["aggregated"])
        if not r["max_error"] <= bound:
            raise RuntimeError(f"{side} round {r['round']}: error {r['max_error']} > {bound}")
        r["error_bound"] = bound
    measured = [r for r in rounds if not r.get("warmup")]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in measured:
        key = "plain" if r["kind"] == "plain" else r.get("dropout") or "none"
        groups.setdefault(key, []).append(r)
    out = {key: median_rounds(rs) for key, rs in groups.items()}
    proc = res["process"]
    warm = {r["kind"]: r["wall_s"] for r in rounds if r.get("warmup")}
    # process start to the first round, plus what the first (plaintext) round took beyond a
    # measured one: Flower starts Ray and its ClientApp actor inside its first round
    before = res["first_round_epoch"] - proc["start_epoch"]
    out["startup_s"] = before + max(0.0, warm["plain"] - out["plain"]["wall_s"])
    out["first_secagg_round_extra_s"] = warm["secagg"] - out["none"]["wall_s"]
    keys = ("wall_s", "peak_pss_mib", "peak_rss_mib", "peak_processes", "machine")
    out["process"] = {k: proc[k] for k in keys}
    out["failed_attempts"] = res["failed_attempts"]
    out["halted_rounds"] = [
        {k: r.get(k) for k in ("round", "dropout", "completed", "aborted")} for r in halted
    ]
    out["rounds"] = rounds
    return out


def error_bound(spec: dict[str, Any], clients: list[int]) -> float:
    """The fixed-point bound: ``m`` stochastic roundings of at most one step ``c / 2^19`` of
    a weighted value, over the summed weight ratio (values within [-0.5, 0.5])."""
    weights = sum(client_input_weight(c) for c in clients)
    return len(clients) * (CLIP + 0.5) / (2 ** (QBITS - 1) * weights / MAX_WEIGHT)


def client_input_weight(client: int) -> int:
    return int(np.random.default_rng([SEED, client]).integers(1, 601))


def median_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each timing over ``rounds``; other fields from the first."""
    out: dict[str, Any] = {"rounds": [r["round"] for r in rounds]}
    for key, value in rounds[0].items():
        if key in ("round", "aggregated", "start_epoch", "rounds"):
            continue
        if isinstance(value, dict) and value and all(isinstance(v, float) for v in value.values()):
            out[key] = {k: statistics.median(r[key][k] for r in rounds) for k in value}
        elif key == "max_error":
            out[key] = max(r[key] for r in rounds)
        elif isinstance(value, float) and key not in ("rate", "error_bound"):
            out[key] = statistics.median(r[key] for r in rounds)
        else:
            out[key] = value
    if out.get("client_ms"):
        out["client_total_ms"] = sum(out["client_ms"].values())
    return out


def check_same_work(pot: dict[str, Any], flo: dict[str, Any]) -> None:
    """Both sides aggregated the same clients and the same plaintext mean every round
    (that both completed)."""
    done = {r["round"]: r for r in flo["rounds"]}
    for a in pot["rounds"]:
        if a["round"] not in done:
            continue
        b = done[a["round"]]
        if a["aggregated"] != b["aggregated"]:
            raise RuntimeError(f"round {a['round']}: the sides aggregated different clients")
        if not np.allclose(a["expected_fingerprint"], b["expected_fingerprint"], rtol=1e-9):
            raise RuntimeError(f"round {a['round']}: the sides' plaintext means differ")


def ratios(pot: dict[str, Any], flo: dict[str, Any]) -> dict[str, Any]:
    """potluck / Flower per SecAgg+ variant (below 1: potluck faster or smaller)."""
    out = {}
    for v in VARIANTS:
        a, b = pot[v], flo[v]
        out[v] = {
            "wall": a["wall_s"] / b["wall_s"],
            "server": a["server_s"] / b["server_s"],
            "client": a["client_total_ms"] / b["client_total_ms"],
            "bytes_up": a["bytes_up_per_client"] / b["bytes_up_per_client"],
            "bytes_down": a["bytes_down_per_client"] / b["bytes_down_per_client"],
        }
        a["overhead_over_plain"] = a["wall_s"] / pot["plain"]["wall_s"]
        b["overhead_over_plain"] = b["wall_s"] / flo["plain"]["wall_s"]
    out["startup"] = pot["startup_s"] / flo["startup_s"]
    return out


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def compare(
    n: int, d: int, repeats: int, tmp: Path, timeout_s: float, skip_flower: bool
) -> dict[str, Any]:
    rounds = schedule(repeats)
    spec = make_spec(n, d, rounds, tmp / "unused")
    workdir = tmp / f"n{n}-d{d}"
    workdir.mkdir()
    entry: dict[str, Any] = {"n": n, "d": d, "k": spec["k"], "threshold": spec["threshold"]}
    entry["measured_at"] = now_utc()
    entry["repeats"] = repeats
    entry["loadavg_before"] = load()
    pot = summarise("potluck", run_side("potluck", spec, workdir, timeout_s), spec)
    entry["potluck"] = pot
    if not skip_flower:
        flo = summarise("flower", run_side("flower", spec, workdir, timeout_s), spec)
        check_same_work(pot, flo)
        entry["flower"] = flo
        entry["potluck_over_flower"] = ratios(pot, flo)
    entry["loadavg_after"] = load()
    for side in ("potluck", "flower"):
        if side in entry:
            for v in (*VARIANTS, "plain"):
                r = entry[side][v]
                print(
                    f"n={n} d={d} {side:7s} {v:18s} wall {r['wall_s']:.3f} s, server "
                    f"{r['server_s']:.3f} s, client {r.get('client_total_ms', 0):.1f} ms, up "
                    f"{r['bytes_up_per_client'] / 1e3:.0f} kB, err {r['max_error']:.1e}",
                    flush=True,
                )
    return entry


def curve(sizes: list[int], d: int, repeats: int, tmp: Path, timeout_s: float) -> list[Any]:
    """potluck alone: the per-client cost against ``n`` (SecAgg+, 10% dropping after the
    masked input)."""
    rows = []
    for n in sizes:
        rounds = [{"kind": "secagg", "warmup": True}]
        rounds += [{"kind": "secagg", "dropout": "after_masked_input", "rate": RATE}] * repeats
        spec = make_spec(n, d, rounds, tmp / "unused")
        workdir = tmp / f"curve-n{n}"
        workdir.mkdir()
        res = run_side("potluck", spec, workdir, timeout_s)
        measured = [r for r in res["rounds"] if not r.get("warmup")]
        done = [r for r in measured if "aborted" not in r]
        if not done:
            raise RuntimeError(f"curve n={n}: every round aborted ({measured[0]['aborted']})")
        row = {
            "n": n,
            "d": d,
            "k": spec["k"],
            "threshold": spec["threshold"],
            **median_rounds(done),
        }
        row["aborted_rounds"] = [
            {"round": r["round"], "why": r["aborted"]} for r in measured if r not in done
        ]
        rows.append(row)
        print(
            f"curve n={n} (k={spec['k']}): client {row['client_total_ms']:.1f} ms, server "
            f"{row['server_s']:.3f} s, wall {row['wall_s']:.3f} s",
            flush=True,
        )
    return rows


def repeats_for(n: int, d: int, args: argparse.Namespace) -> int:
    """``--repeats``, fewer where the cohort's coordinates times the repeats pass the budget
    (Flower takes about 2 minutes per SecAgg+ round at n = 200, d = 10^6 here)."""
    return max(1, min(args.repeats, int(args.budget // (n * d))))


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10,50,100,200", help="cohort sizes n")
    parser.add_argument("--dims", default="100000,1000000", help="vector lengths d")
    parser.add_argument("--repeats", type=int, default=3, help="measured rounds per variant")
    parser.add_argument(
        "--budget",
        type=float,
        default=2e8,
        help="fewer repeats where n * d * repeats would exceed this (at least 1)",
    )
    parser.add_argument("--curve", default="10,50,100,200,500,1000", help="potluck-only n")
    parser.add_argument("--curve-d", type=int, default=100_000)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per process")
    parser.add_argument("--skip-flower", action="store_true")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="replace only the (n, d) entries measured now (and the curve, if --curve) in the "
        "existing results file, keeping the others",
    )
    parser.add_argument("--side", choices=("potluck",), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        spec = json.loads(Path(args.spec).read_text())
        Path(args.out).write_text(json.dumps(potluck_side(spec)))
        return
    if not args.skip_flower and not FLOWER_PY.exists():
        parser.error(f"{FLOWER_PY} missing: run bash scripts/setup_flower.sh")
    from compare_flower import become_subreaper

    become_subreaper()
    payload = header("compare_flower_secagg")
    payload["settings"] = {
        "repeats": args.repeats,
        "budget": args.budget,
        "seed": SEED,
        "clip_range": CLIP,
        "quantization_bits": QBITS,
        "bits": BITS,
        "max_weight": MAX_WEIGHT,
        "dropout_rate": RATE,
        "flower_ray_cpus": 1,
        "potluck_threads": 1,
    }
    payload["note"] = (
        "ratios are potluck / Flower; timings are medians over the measured rounds; Flower's "
        "protocol time leaves out its FedAvg re-average (strategy_fedavg_s) and the check"
    )
    tmp = Path(tempfile.mkdtemp(prefix="compare-flower-secagg-"))
    payload["grid"], payload["curve"] = [], []
    try:
        for d in ints(args.dims):
            for n in ints(args.sizes):
                try:
                    entry = compare(
                        n, d, repeats_for(n, d, args), tmp, args.timeout, args.skip_flower
                    )
                except Exception as exc:  # recorded; re-measure it later with --merge
                    print(f"n={n} d={d} failed: {exc}", flush=True)
                    entry = {"n": n, "d": d, "error": str(exc)[-2000:], "measured_at": now_utc()}
                payload["grid"].append(entry)
                save(payload, args.merge)  # after every setting: a later failure loses nothing
        payload["curve"] = curve(ints(args.curve), args.curve_d, args.repeats, tmp, args.timeout)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(save(payload, args.merge)["grid"])


def save(payload: dict[str, Any], merge: bool) -> dict[str, Any]:
    """Write the results so far (merged into the existing file with ``merge``)."""
    out = merged(copy.deepcopy(payload)) if merge else copy.deepcopy(payload)
    print(f"wrote {write_result('compare_flower_secagg', out)}", flush=True)
    return out


def merged(new: dict[str, Any]) -> dict[str, Any]:
    """The existing results with the entries measured in ``new`` replaced; every run that
    contributed is listed in ``runs``."""
    old = json.loads((RESULTS / "compare_flower_secagg.json").read_text())
    runs = old.pop("runs", [{k: old[k] for k in ("command", "date", "source")}])
    fresh = {(e["n"], e["d"]) for e in new["grid"]}
    grid = [e for e in old["grid"] if (e["n"], e["d"]) not in fresh] + new["grid"]
    new["grid"] = sorted(grid, key=lambda e: (e["d"], e["n"]))
    if not new["curve"]:
        new["curve"] = old.get("curve", [])
    this = {k: new[k] for k in ("command", "date", "source")}
    new["runs"] = [*(r for r in runs if r != this), this]
    return new


def print_table(grid: list[dict[str, Any]]) -> None:
    """The comparison as a Markdown table: one row per n, d and dropout variant."""
    print(
        "| n | d | dropout | wall s potluck / Flower | server s | client ms | up kB "
        "| down kB | overhead over plain | potluck / Flower: wall, server, client |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for e in grid:
        if "flower" not in e:
            continue
        for v in VARIANTS:
            a, b, r = e["potluck"][v], e["flower"][v], e["potluck_over_flower"][v]
            print(
                f"| {e['n']} | {e['d']:,} | {v} | {a['wall_s']:.3f} / {b['wall_s']:.3f} | "
                f"{a['server_s']:.3f} / {b['server_s']:.3f} | {a['client_total_ms']:.1f} / "
                f"{b['client_total_ms']:.1f} | {a['bytes_up_per_client'] / 1e3:.0f} / "
                f"{b['bytes_up_per_client'] / 1e3:.0f} | {a['bytes_down_per_client'] / 1e3:.1f} "
                f"/ {b['bytes_down_per_client'] / 1e3:.1f} | {a['overhead_over_plain']:.1f}x / "
                f"{b['overhead_over_plain']:.1f}x | {r['wall']:.2f}, {r['server']:.2f}, "
                f"{r['client']:.2f} |"
            )


if __name__ == "__main__":
    main()
