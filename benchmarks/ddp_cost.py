"""The cost and the accounting of distributed DP on secure aggregation (issue 15): the
distributed Skellam mechanism (``DistributedSkellam``) beside plain SecAgg+ (``SecAgg``) at the
same cohort and model size, and what its accountant says for a cross-device setting.

Cost: one round of the real part and ``SecureSum`` over in-memory messages, driven as the
round loop drives the stages (``secagg_cost.Stages``), without training: each client's
update is ``d`` uniform values in [-0.5, 0.5] (so every update is clipped, to ``clip = 1``),
noise multiplier 1, ``min_survivors`` 0.8 of the cohort, ``neighbours = "log"``, 32 bits,
``quantization_bits`` 20, seeded noise; no dropouts. Client time is the mean over the cohort
of one client's masked input (the encoding and SecAgg+'s masks), and of the encoding alone:
SecAgg's fixed point, and distributed DP's with seeded and with secure (ChaCha20) noise.
Server time is the server half's own work, the decoding (inverse rotation) broken out. The
error is the RMS difference per coordinate from the mean of the clipped updates, against the
noise's own standard deviation there (``sqrt(n v) / (2^19 n)`` per clip for ``n`` survivors
of share variance ``v``). One thread; each timing the median of 3 rounds.

Accounting: ``epsilon`` (for anyone who sees the models) and ``epsilon_server`` (against the
server, for a client in ``k`` rounds) at delta 1e-5 for 100 of 3,000 clients per round.

Run from the repository root (about 2 minutes):
    .venv/bin/python benchmarks/ddp_cost.py
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import numpy as np
import torch
from _common import header, write_result
from secagg_cost import NS, Stages, one_round

from potluck.core.message import Message
from potluck.core.params import ParamSpec
from potluck.core.parts import part_context
from potluck.privacy.accounting import WithoutReplacement
from potluck.privacy.distributed import calibrate, epsilon_of, sampled_rdp
from potluck.privacy.skellam import secure_bytes, seeded_bytes
from potluck.secagg import DistributedSkellam, SecAgg, SecureSum

REPEATS = 3
SETTINGS = [(100, 100_000), (20, 1_000_000)]  # (n, d); a client's cost does not grow with n
POPULATION, COHORT, DELTA = 3000, 100, 1e-5


def ddp_round(n: int, d: int) -> dict[str, Any]:
    spec = ParamSpec(("w",), ((d,),))
    part = DistributedSkellam(noise_multiplier=1.0).bind_cohort(n).bind(spec)
    rng = np.random.default_rng(0)
    members = list(range(n))
    updates = {c: rng.uniform(-0.5, 0.5, d).astype(np.float32) for c in members}
    stages = Stages(part, members, set())
    ctx = part_context(0, 1, NS)
    t0 = time.perf_counter()
    state = part.before_train(stages, {}, ctx)
    before_s = time.perf_counter() - t0 - stages.client_s["advertise"] - stages.client_s["share"]
    uploads, masking = {}, 0.0
    for c in members:
        message = Message({"delta": torch.from_numpy(updates[c])}, {"weight": 1.0})
        t0 = time.perf_counter()
        upload, stages.states[c] = part.encode(
            message, stages.states[c], stages.ctx(c, stages.inbox[c])
        )
        masking += time.perf_counter() - t0
        assert upload is not None
        uploads[c] = upload
        stages.up[c] += upload.nbytes
    stack = torch.stack([uploads[c].arrays["delta"] for c in members])
    t0 = time.perf_counter()
    state = part.after_train(stages, state, ctx)
    after_s = time.perf_counter() - t0 - stages.client_s["unmask"]
    t0 = time.perf_counter()
    total, _ = SecureSum().aggregate(stack, torch.ones(n), {}, ctx)
    sum_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    mean, _ = part.decode_aggregate(total, state, ctx)
    decode_s = time.perf_counter() - t0
    clipped = [u / max(1.0, float(np.linalg.norm(u))) for u in updates.values()]
    rms = float(np.sqrt(np.mean((mean.numpy() - np.mean(clipped, axis=0)) ** 2)))
    encoding = part.encoding(NS)
    noise_std = math.sqrt(n * encoding.variance) / (encoding.unit * n)
    return {
        "n": n,
        "d": d,
        "padded": encoding.padded,
        "masked_input_ms": 1e3 * masking / n,
        "encoding_ms": encoding_times(part, updates[0]),
        "server_s": {
            "route_keys_and_shares": before_s,
            "unmask_and_reconstruct": after_s,
            "modular_sum": sum_s,
            "decode": decode_s,
            "total": before_s + after_s + sum_s + decode_s,
        },
        "bytes_up_per_client": float(np.mean(list(stages.up.values()))),
        "plaintext_bytes_up_per_client": 4 * d,
        "rms_error": rms,
        "noise_std": noise_std,
    }


def encoding_times(part: DistributedSkellam, delta: np.ndarray) -> dict[str, float]:
    """One client's encoding alone, in ms: SecAgg's fixed point and distributed DP's with
    seeded and secure noise."""
    rng = np.random.default_rng(1)
    fixed = SecAgg(max_weight=1000.0).encoding(NS)
    out = {}
    t0 = time.perf_counter()
    fixed.encode(delta, 10.0, rng)
    out["fixed_point"] = 1e3 * (time.perf_counter() - t0)
    for name, source in (("seeded", seeded_bytes(rng)), ("secure", secure_bytes())):
        enc = part.encoding(NS).for_round(0, 1, source)
        t0 = time.perf_counter()
        enc.encode(delta, 1.0, rng)
        out[f"skellam_{name}"] = 1e3 * (time.perf_counter() - t0)
    return out


def median(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each float the median over the repeats."""
    out: dict[str, Any] = {}
    for key, value in rows[0].items():
        if isinstance(value, dict):
            out[key] = median([r[key] for r in rows])
        elif isinstance(value, float):  # the timings (the rest is the same in every round)
            out[key] = statistics.median(r[key] for r in rows)
        else:
            out[key] = value
    return out


def accounting() -> list[dict[str, Any]]:
    part = DistributedSkellam().bind_cohort(COHORT)
    sampling = WithoutReplacement(POPULATION, COHORT)
    rows = []
    for rounds in (200, 1000):
        for z in (0.8, 1.0, 1.5, 2.0):
            release = part.release_at(z)
            base = release.rdp()
            sampled = rounds * sampled_rdp(release, COHORT / POPULATION)
            rows.append(
                {
                    "rounds": rounds,
                    "noise_multiplier": z,
                    "epsilon": epsilon_of(np.minimum(sampled, rounds * base), DELTA),
                    "epsilon_server": {
                        k: epsilon_of(k * base, DELTA)
                        for k in (1, 10, rounds * COHORT // POPULATION)
                    },
                }
            )
        target = calibrate(8.0, DELTA, rounds, sampling, part.release_at)
        rows.append({"rounds": rounds, "target_epsilon": 8.0, "calibrated_z": target})
    return rows


def main() -> None:
    torch.set_num_threads(1)
    result = header("ddp_cost")
    rows = []
    for n, d in SETTINGS:
        r = median([ddp_round(n, d) for _ in range(REPEATS)])
        plain = statistics.median(
            one_round(n, d, "log", 0.0)["client_ms"]["masked_input"] for _ in range(REPEATS)
        )
        r["secagg_masked_input_ms"] = plain
        rows.append(r)
        enc = ", ".join(f"{k} {v:.1f}" for k, v in r["encoding_ms"].items())
        print(
            f"n={n} d={d}: masked input {r['masked_input_ms']:.1f} ms (SecAgg+ {plain:.1f}), "
            f"encoding {enc} ms; server {r['server_s']['total']:.3f} s (decode "
            f"{1e3 * r['server_s']['decode']:.1f} ms); up {r['bytes_up_per_client'] / 1e3:.0f} "
            f"kB ({r['bytes_up_per_client'] / r['plaintext_bytes_up_per_client']:.2f}x); "
            f"rms error {r['rms_error']:.3g} (noise std {r['noise_std']:.3g})"
        )
    table = accounting()
    for row in table:
        print(row)
    result["cost"] = rows
    result["accounting"] = table
    write_result("ddp_cost", result)


if __name__ == "__main__":
    main()
