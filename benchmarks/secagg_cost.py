"""The cost of secure aggregation (issue 15, part 1): SecAgg+ with about log2 n neighbours and
SecAgg (the complete graph) in simulation, each stage timed on the client and on the server,
with the bytes each client sends and receives, against plaintext aggregation (FedAvg's
``WeightedMean``) of the same cohort. Each timing is the median of 3 rounds.

One round of the real ``SecAgg`` part and ``SecureSum`` aggregator over in-memory messages
(the stages as the round loop drives them, without training): each client's update is
``d`` uniform values in [-0.5, 0.5] with a weight of 1 to 600. Dropouts: none, or 10% of
the cohort after sending its masked input (their mask keys are then rebuilt from shares).
Client time is the mean over the cohort of that client's own work in a stage; server time
is the server half's own work (routing, reconstruction, mask expansion, the modular sum,
the decoding). One thread.

Run from the repository root (about 3 minutes):
    .venv/bin/python benchmarks/secagg_cost.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from _common import header, write_result

from potluck.aggregate.mean import WeightedMean
from potluck.core.message import Message
from potluck.core.params import ParamSpec
from potluck.core.parts import Context, State, part_context
from potluck.secagg import SecAgg, SecureSum
from potluck.secagg.graph import degree

NS = "transforms.0.secagg"
REPEATS = 3
SETTINGS = [  # (n, d, neighbours, dropout after masked input)
    (100, 100_000, "log", 0.0),
    (100, 100_000, "log", 0.1),
    (100, 100_000, "all", 0.0),
    (100, 100_000, "all", 0.1),
    (100, 1_000_000, "log", 0.0),
    (100, 1_000_000, "log", 0.1),
    (300, 10_000, "log", 0.1),
    (1000, 10_000, "log", 0.1),
    (300, 10_000, "all", 0.1),
]


class Stages:
    """The round loop's ``PartStages`` over in-memory clients, timing each client's work."""

    def __init__(self, part: SecAgg, members: list[int], drop_before_unmask: set[int]) -> None:
        self.part, self.round = part, 1
        self.members = np.array(members, dtype=np.int64)
        self.states: dict[int, State] = {}
        self.inbox: dict[int, Message] = {}
        self.client_s: dict[str, float] = {}
        self.up: dict[int, int] = {c: 0 for c in members}
        self.down: dict[int, int] = {c: 0 for c in members}
        self.drop = drop_before_unmask

    def ctx(self, client: int, inbox: Message | None = None) -> Context:
        return part_context(0, self.round, NS, client, inbox=inbox)

    def run(
        self,
        stage: str,
        shared: Message | None = None,
        payloads: Mapping[int, Message] | None = None,
    ) -> dict[int, Message]:
        shared, payloads = shared or Message(), payloads or {}
        out, spent = {}, 0.0
        for c in self.members.tolist():
            own = payloads.get(c, Message())
            self.down[c] += shared.nbytes + own.nbytes
            if stage == "unmask" and c in self.drop:
                continue
            t0 = time.perf_counter()
            answer, new = self.part.client_stage(
                stage, shared, self.states.get(c, {}), self.ctx(c, own)
            )
            spent += time.perf_counter() - t0
            if new:
                self.states[c] = new
            if answer is not None:
                out[c] = answer
                self.up[c] += answer.nbytes
        self.client_s[stage] = spent
        self.members = np.array(sorted(out), dtype=np.int64)
        return out

    def leave(self, client: int, message: Message) -> None:
        self.inbox[client] = message
        self.down[client] += message.nbytes

    def report(self, name: str, value: float) -> None:
        pass


def one_round(n: int, d: int, neighbours: str, dropout: float) -> dict[str, Any]:
    part = SecAgg(neighbours=neighbours, max_weight=1000.0).bind(ParamSpec(("w",), ((d,),)))
    rng = np.random.default_rng(0)
    members = list(range(n))
    updates = {c: rng.uniform(-0.5, 0.5, d).astype(np.float32) for c in members}
    weights = {c: float(rng.integers(1, 601)) for c in members}
    dropped = set(rng.choice(n, size=int(dropout * n), replace=False).tolist())
    stages = Stages(part, members, dropped)
    ctx = part_context(0, 1, NS)
    t0 = time.perf_counter()
    state = part.before_train(stages, {}, ctx)
    before_s = time.perf_counter() - t0 - stages.client_s["advertise"] - stages.client_s["share"]
    uploads, masking = {}, 0.0
    for c in stages.members.tolist():
        message = Message({"delta": torch.from_numpy(updates[c])}, {"weight": weights[c]})
        t0 = time.perf_counter()
        upload, stages.states[c] = part.encode(
            message, stages.states[c], stages.ctx(c, stages.inbox[c])
        )
        masking += time.perf_counter() - t0
        assert upload is not None
        uploads[c] = upload
        stages.up[c] += upload.nbytes
    stack = torch.stack([uploads[c].arrays["delta"] for c in sorted(uploads)])
    t0 = time.perf_counter()
    state = part.after_train(stages, state, ctx)
    after_s = time.perf_counter() - t0 - stages.client_s["unmask"]
    t0 = time.perf_counter()
    total, _ = SecureSum().aggregate(stack, torch.ones(n), {}, ctx)
    sum_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    mean, _ = part.decode_aggregate(total, state, ctx)
    decode_s = time.perf_counter() - t0
    plain_stack = torch.stack([torch.from_numpy(updates[c]) for c in members])
    w = torch.tensor([weights[c] for c in members], dtype=torch.float64)
    t0 = time.perf_counter()
    plain, _ = WeightedMean().aggregate(plain_stack, w, {}, ctx)
    plain_s = time.perf_counter() - t0
    error = float((mean - plain).abs().max())
    server_s = before_s + after_s + sum_s + decode_s
    client_ms = {
        "advertise": 1e3 * stages.client_s["advertise"] / n,
        "share": 1e3 * stages.client_s["share"] / n,
        "masked_input": 1e3 * masking / n,
        "unmask": 1e3 * stages.client_s["unmask"] / max(1, n - len(dropped)),
    }
    return {
        "n": n,
        "d": d,
        "neighbours": neighbours,
        "k": degree(n, neighbours),
        "dropout_after_masked_input": dropout,
        "client_ms": client_ms,
        "client_total_ms": sum(client_ms.values()),
        "server_s": {
            "route_keys_and_shares": before_s,
            "unmask_and_reconstruct": after_s,
            "modular_sum": sum_s,
            "decode": decode_s,
            "total": server_s,
        },
        "plaintext_weighted_mean_s": plain_s,
        "server_over_plaintext": server_s / plain_s,
        "bytes_up_per_client": float(np.mean(list(stages.up.values()))),
        "bytes_down_per_client": float(np.mean(list(stages.down.values()))),
        "plaintext_bytes_up_per_client": 4 * d,
        "max_error_against_plaintext_mean": error,
    }


def median_row(rows: list[dict[str, Any]], timings: bool = False) -> dict[str, Any]:
    """Each timing the median over the repeats (the other fields are the same in all)."""
    out: dict[str, Any] = {}
    for key, value in rows[0].items():
        timing = timings or key.endswith(("_s", "_ms")) or key == "server_over_plaintext"
        if isinstance(value, dict):
            out[key] = median_row([r[key] for r in rows], timing)
        elif timing:
            out[key] = statistics.median(r[key] for r in rows)
        else:
            out[key] = value
    return out


def main() -> None:
    torch.set_num_threads(1)
    result = header("secagg_cost")
    rows = []
    for n, d, neighbours, dropout in SETTINGS:
        r = median_row([one_round(n, d, neighbours, dropout) for _ in range(REPEATS)])
        rows.append(r)
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["client_ms"].items())
        print(
            f"n={n} d={d} {neighbours} (k={r['k']}) drop={dropout}: client "
            f"{r['client_total_ms']:.1f} ms ({stages}), server {r['server_s']['total']:.3f} s "
            f"({r['server_over_plaintext']:.0f}x plaintext), up "
            f"{r['bytes_up_per_client'] / 1e3:.0f} kB, error "
            f"{r['max_error_against_plaintext_mean']:.1e}"
        )
    result["settings"] = {
        "threads": 1, "repeats": REPEATS, "max_weight": 1000.0,
        "defaults": "bits 32, quantization_bits 20, threshold 0.5, clip_range 1",
    }  # fmt: skip
    result["rows"] = rows
    print(write_result("secagg_cost", result))


if __name__ == "__main__":
    main()
