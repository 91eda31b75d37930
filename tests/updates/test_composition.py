"""Compression composed with privacy: with local DP the client clips, noises, then
compresses (post-processing: the accountant's epsilon is unchanged); with central DP the
server decodes, clips and noises (epsilon unchanged); with secure aggregation, which masks
integers itself, a compressor is refused with the reason, either way round, and so is a
sketch under a non-linear aggregator."""

from __future__ import annotations

from typing import Any

import pytest

from potluck.config import ExperimentConfig
from potluck.orchestrator import run_experiment

BASE: dict[str, Any] = {
    "seed": 0,
    "rounds": 3,
    "data": {"dataset": "digits", "num_clients": 20, "partition": {"kind": "iid"}},
    "model": {"name": "mlp"},
    "client": {"epochs": 1, "batch_size": 16, "lr": 0.1},
    "run": {"threads": 1},
}
TOP_K = {"name": "top_k", "fraction": 0.05}
QSGD = {"name": "qsgd", "bits": 4}


def run(**sections: Any) -> Any:
    return run_experiment(ExperimentConfig.from_dict({**BASE, **sections}).build())


@pytest.mark.parametrize("compressor", [TOP_K, QSGD], ids=["top_k", "qsgd"])
def test_local_dp_then_compression_keeps_the_accountants_epsilon(compressor: dict) -> None:
    ldp, five = {"name": "ldp_fedavg"}, {"clients_per_round": 5}
    noise = {"name": "local_dp", "clip": 1.0, "noise_multiplier": 1.0}
    plain = run(algorithm=ldp, sampler=five)
    both = run(algorithm=ldp, sampler=five, transforms=[noise, compressor])
    eps = [m["epsilon"] for m in plain.history]
    assert eps and all(e > 0 for e in eps)
    assert [m["epsilon"] for m in both.history] == eps  # computed by the accountant, per round
    assert all(
        b["bytes_up"] < p["bytes_up"] / 4 for b, p in zip(both.history, plain.history, strict=True)
    )


def test_central_dp_on_decoded_updates_keeps_the_accountants_epsilon() -> None:
    dp, rate = {"name": "dp_fedavg"}, {"rate": 0.25}
    plain = run(algorithm=dp, sampler=rate)
    both = run(algorithm=dp, sampler=rate, transforms=[{"name": "clip", "max_norm": 1.0}, QSGD])
    assert [m["epsilon"] for m in both.history] == [m["epsilon"] for m in plain.history]
    assert both.history[-1]["epsilon"] > 0


@pytest.mark.parametrize("order", ["compress_first", "secagg_first"])
def test_secure_aggregation_with_a_compressor_is_refused_with_the_reason(order: str) -> None:
    secagg = {"name": "secagg"}
    chain = [QSGD, secagg] if order == "compress_first" else [secagg, QSGD]
    first = "qsgd (QSGD)" if order == "compress_first" else "secagg (SecAgg)"
    with pytest.raises(ValueError, match=rf"{first[:4]}.*needs to be the last update transform"):
        ExperimentConfig.from_dict(
            {**BASE, "algorithm": {"name": "secagg_fedavg"}, "transforms": chain}
        ).build()
