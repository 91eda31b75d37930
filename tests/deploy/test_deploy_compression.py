"""Compressed uploads deployed over mutual TLS on loopback: the sites send the encoded
payloads (packed codes, indices, sketches, factors), not decoded floats; the server decodes
them as the simulation does, so the deployed run equals the simulated one bit for bit,
``bytes_up`` included; the stateful schemes' client state (error-feedback residuals, DGC's
momentum, PowerSGD's warm start) stays on each site (it never travels, so the bytes counted
are all that moves) and FetchSGD's server state is kept as in simulation. The delta
downlink's last models stay on the sites too."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import PKI, SITES, Deployment, config
from test_deploy import learning

from potluck.config import ExperimentConfig
from potluck.orchestrator import run_experiment
from potluck.store.sqlite import RunStore

Make = Callable[..., Deployment]
SCHEMES: dict[str, dict[str, Any]] = {
    "top_k_dgc": {"name": "top_k", "fraction": 0.05, "momentum": 0.9},
    "qsgd_rotated": {"name": "qsgd", "bits": 4, "block": 256, "rotate": True},
    "fetchsgd": {"name": "fetchsgd", "rows": 3, "cols": 400, "top_k": 0.02},
    "powersgd": {"name": "powersgd", "rank": 2},
}
DOWNLINK = {"qsgd_rotated": [{"name": "quantize", "bits": 8}]}  # and a quantised broadcast


def compressed(
    store: Path, scheme: dict[str, Any], downlink: list[dict[str, Any]] | None = None
) -> ExperimentConfig:
    d = config(store).to_dict()
    d["algorithm"], d["terms"], d["transforms"] = {"name": "fedavg"}, None, [scheme]
    d["downlink"] = downlink
    return ExperimentConfig.from_dict(d)


@pytest.mark.parametrize("name", SCHEMES)
def test_a_compressed_deployment_equals_its_simulation_byte_for_byte(
    deployment: Make, pki: PKI, tmp_path: Path, name: str
) -> None:
    down = DOWNLINK.get(name)
    dep = deployment(pki.server(), cfg=compressed(tmp_path / "runs", SCHEMES[name], down))
    for site in SITES:
        dep.site(site, pki.client(site))
    result = dep.finish()
    sim = run_experiment(compressed(tmp_path / "sim", SCHEMES[name], down).build())
    assert all(m["updates"] > 0 for m in result.history)  # the encodings were accepted
    assert learning(result) == learning(sim)  # bytes_up included: the encoded messages
    assert torch.equal(result.weights, sim.weights)
    # residuals and warm starts stay on the sites: the server neither stores nor sends them
    store = RunStore(tmp_path / "runs")
    (info,) = store.list_runs()
    kept = store.client_states(info.run_id, list(range(5)))
    assert all(not any(k.startswith("transforms.") for k in s) for s in kept)
    dense = run_experiment(
        compressed(tmp_path / "dense", {"name": "clip", "max_norm": 1e9}).build()
    )
    assert all(
        c["bytes_up"] < d["bytes_up"] / 3
        for c, d in zip(result.history, dense.history, strict=True)
    )


def test_the_delta_downlink_deployed_equals_its_simulation_and_the_sites_keep_their_models(
    deployment: Make, pki: PKI, tmp_path: Path
) -> None:
    """Each site rebuilds the weights from the changes since its last model, which it keeps
    to itself across rounds: the server's store holds none of them, and the bytes down are
    the simulation's."""
    sparse = {"name": "top_k", "fraction": 0.02}

    def cfg(store: Path) -> ExperimentConfig:
        d = compressed(store, sparse, [{"name": "delta"}]).to_dict()
        d["rounds"], d["server"] = 4, {"name": "sgd", "lr": 1.0}
        return ExperimentConfig.from_dict(d)

    dep = deployment(pki.server(), cfg=cfg(tmp_path / "runs"))
    for site in SITES:
        dep.site(site, pki.client(site))
    result = dep.finish()
    sim = run_experiment(cfg(tmp_path / "sim").build())
    assert all(m["updates"] == 4 for m in result.history)
    assert learning(result) == learning(sim)  # bytes_down included
    assert torch.equal(result.weights, sim.weights)
    down = [m["bytes_down"] for m in result.history]
    assert all(b < down[0] / 2 for b in down[2:]), down  # changes, not whole models
    store = RunStore(tmp_path / "runs")
    (info,) = store.list_runs()
    kept = store.client_states(info.run_id, list(range(5)))
    assert all(not any(k.startswith("downlink.") for k in s) for s in kept)
