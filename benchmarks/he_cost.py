"""The cost of homomorphic aggregation (issue 15): CKKS through TenSEAL at its default
parameters (``N = 8192``, primes of 60 and 60 bits, scale ``2^50``; 128-bit secure) beside
SecAgg+ (about log2 n neighbours, ``secagg_cost.one_round``) and plaintext FedAvg
(``WeightedMean``) at the same cohort and vector length, no dropouts. Each timing is the
median of 3 rounds.

One round of the real ``CKKS`` transform and ``CKKSSum`` aggregator over in-memory messages
(the stages as the round loop drives them, without training): each client's update is ``d``
uniform values in [-0.5, 0.5] with a weight of 1 to 600. Client time: the key holder's key
generation and its decryption (with the flooding noise), and the mean over the cohort of a
client's encryption (loading the public context, packing ``d + 2`` values into ``N / 2``
slots per ciphertext). Server time: the server half's own work (checking the key holder's
public context, checking each row's key fingerprint, decoding the mean) and the aggregator's
homomorphic sum (loading every ciphertext and adding). Bytes are the protocol's messages per
client (the key holder's public context and decrypted sum included, averaged over the
cohort; the model's download, the same as without encryption, is not). The error is the
largest difference from the plaintext weighted mean. One thread.

Run from the repository root (about 3 minutes; needs ``potluck[he]``):
    .venv/bin/python benchmarks/he_cost.py
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from _common import header, write_result
from secagg_cost import median_row
from secagg_cost import one_round as secagg_round

from potluck.aggregate.mean import WeightedMean
from potluck.core.message import Message
from potluck.core.params import ParamSpec
from potluck.core.parts import Context, State, part_context
from potluck.secagg.homomorphic import CKKS, CKKSSum

NS = "transforms.0.ckks"
REPEATS = 3
SETTINGS = [(10, 100_000), (50, 100_000), (10, 1_000_000)]  # (n, d)


class Stages:
    """The round loop's ``PartStages`` over in-memory clients, timing each client's work."""

    def __init__(self, part: CKKS, members: list[int]) -> None:
        self.part, self.round = part, 1
        self.members = np.array(members, dtype=np.int64)
        self.states: dict[int, State] = {}
        self.inbox: dict[int, Message] = {}
        self.told: Message | None = None
        self.client_s: dict[str, float] = {}
        self.up: dict[int, int] = {c: 0 for c in members}
        self.down: dict[int, int] = {c: 0 for c in members}

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

    def tell_aggregator(self, message: Message) -> None:
        self.told = message

    def report(self, name: str, value: float) -> None:
        pass


def one_round(n: int, d: int) -> dict[str, Any]:
    part = CKKS(max_weight=1000.0).bind(ParamSpec(("w",), ((d,),)))
    rng = np.random.default_rng(0)
    members = list(range(n))
    updates = {c: rng.uniform(-0.5, 0.5, d).astype(np.float32) for c in members}
    weights = {c: float(rng.integers(1, 601)) for c in members}
    stages = Stages(part, members)
    ctx = part_context(0, 1, NS)
    t0 = time.perf_counter()
    state = part.before_train(stages, {}, ctx)
    keys_s = time.perf_counter() - t0 - stages.client_s["keys"]
    uploads, encrypting = {}, 0.0
    for c in members:
        message = Message({"delta": torch.from_numpy(updates[c])}, {"weight": weights[c]})
        t0 = time.perf_counter()
        upload, stages.states[c] = part.encode(
            message, stages.states.get(c, {}), stages.ctx(c, stages.inbox[c])
        )
        encrypting += time.perf_counter() - t0
        assert upload is not None
        uploads[c] = upload
        stages.up[c] += upload.nbytes
    t0 = time.perf_counter()
    for c in members:
        part.decode(uploads[c], stages.ctx(c, stages.inbox[c]))
    check_s = time.perf_counter() - t0
    state = part.after_train(stages, state, ctx)
    stack = torch.stack([uploads[c].arrays["delta"] for c in members])
    t0 = time.perf_counter()
    total, _ = CKKSSum().aggregate(
        stack, torch.ones(n), {}, part_context(0, 1, "aggregator", inbox=stages.told)
    )
    sum_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    state = part.after_aggregate(stages, total, state, ctx)
    decrypt_round_s = time.perf_counter() - t0 - stages.client_s["decrypt"]
    t0 = time.perf_counter()
    mean, _ = part.decode_aggregate(total, state, ctx)
    decode_s = time.perf_counter() - t0
    plain_stack = torch.stack([torch.from_numpy(updates[c]) for c in members])
    w = torch.tensor([weights[c] for c in members], dtype=torch.float64)
    t0 = time.perf_counter()
    plain, _ = WeightedMean().aggregate(plain_stack, w, {}, ctx)
    plain_s = time.perf_counter() - t0
    server_s = keys_s + check_s + sum_s + decrypt_round_s + decode_s
    row = uploads[0].arrays["delta"].numel()
    return {
        "n": n,
        "d": d,
        "ciphertexts_per_client": part.parameters().ciphertexts(d + 2),
        "client_ms": {
            "encrypt_mean": 1e3 * encrypting / n,
            "key_holder_keygen": 1e3 * stages.client_s["keys"],
            "key_holder_decrypt": 1e3 * stages.client_s["decrypt"],
        },
        "server_s": {
            "keys_and_routing": keys_s,
            "fingerprint_checks": check_s,
            "homomorphic_sum": sum_s,
            "decryption_stage": decrypt_round_s,
            "decode": decode_s,
            "total": server_s,
        },
        "plaintext_weighted_mean_s": plain_s,
        "server_over_plaintext": server_s / plain_s,
        "ciphertext_bytes_per_client": row,
        "public_context_bytes": int(stages.inbox[0].arrays["public_context"].numel()),
        "bytes_up_per_client": float(np.mean(list(stages.up.values()))),
        "bytes_down_per_client": float(np.mean(list(stages.down.values()))),
        "plaintext_bytes_up_per_client": 4 * d,
        "max_error_against_plaintext_mean": float((mean - plain).abs().max()),
    }


def main() -> None:
    torch.set_num_threads(1)
    result = header("he_cost")
    rows = []
    for n, d in SETTINGS:
        he = median_row([one_round(n, d) for _ in range(REPEATS)])
        sa = median_row([secagg_round(n, d, "log", 0.0) for _ in range(REPEATS)])
        rows.append({"n": n, "d": d, "ckks": he, "secagg_plus": sa})
        print(
            f"n={n} d={d}: CKKS client {he['client_ms']['encrypt_mean']:.0f} ms (key holder "
            f"+{he['client_ms']['key_holder_keygen']:.0f} keygen, "
            f"+{he['client_ms']['key_holder_decrypt']:.0f} decrypt), server "
            f"{he['server_s']['total']:.3f} s, up {he['bytes_up_per_client'] / 1e3:.0f} kB, "
            f"error {he['max_error_against_plaintext_mean']:.1e} | SecAgg+ client "
            f"{sa['client_total_ms']:.1f} ms, server {sa['server_s']['total']:.3f} s, up "
            f"{sa['bytes_up_per_client'] / 1e3:.0f} kB, error "
            f"{sa['max_error_against_plaintext_mean']:.1e}"
        )
    result["settings"] = {
        "threads": 1, "repeats": REPEATS, "max_weight": 1000.0,
        "ckks": "poly_modulus_degree 8192, coeff_mod_bit_sizes (60, 60), scale 2^50, "
        "flooding 2^-24",
        "secagg_plus": "neighbours log, bits 32, quantization_bits 20, threshold 0.5",
    }  # fmt: skip
    result["rows"] = rows
    print(write_result("he_cost", result))


if __name__ == "__main__":
    main()
