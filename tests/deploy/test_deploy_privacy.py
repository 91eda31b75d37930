"""Central DP over mutual TLS on loopback (issue 14): DP-FedAvg deployed with secure noise
computes what its simulation does apart from the noise, accounts every round it released,
and a deployment refuses noise that follows from the config's seed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import PKI, SITES, Deployment, config
from test_deploy import Without, learning

from potluck.config import ExperimentConfig
from potluck.orchestrator import run_experiment
from potluck.privacy.accounting import Poisson, Round, epsilon
from potluck.store.sqlite import RunStore

Make = Callable[..., Deployment]


def private(store: Path, **algorithm: Any) -> ExperimentConfig:
    d = config(store).to_dict()
    d["algorithm"] = {"name": "dp_fedavg", "rate": 0.8, "clip": 0.5, "noise": "secure", **algorithm}
    d["sampler"], d["aggregator"], d["transforms"] = {}, {}, None
    d["terms"] = None  # SCAFFOLD's delta_c would reach the server unnoised
    d["privacy"] = {"delta": 1e-5}
    return ExperimentConfig.from_dict(d)


def deploy(deployment: Make, pki: PKI, cfg: ExperimentConfig) -> Any:
    dep = deployment(pki.server(), cfg=cfg)
    for name in SITES:
        dep.site(name, pki.client(name))
    return dep.finish()


def test_dp_fedavg_deployed_equals_its_simulation_but_for_the_noise(
    deployment: Make, pki: PKI, tmp_path: Path
) -> None:
    noiseless = private(tmp_path / "runs", noise_multiplier=0.0)
    result = deploy(deployment, pki, noiseless)
    sim_cfg = private(tmp_path / "sim", noise_multiplier=0.0)  # no noise is drawn
    sim = run_experiment(sim_cfg.build(), engine=lambda p: Without(p, set()))
    assert torch.equal(result.weights, sim.weights)
    assert learning(result) == learning(sim)
    assert all(m["epsilon"] == float("inf") for m in result.history)  # no noise, no privacy


def test_secure_noise_is_accounted_round_by_round_and_differs_between_runs(
    deployment: Make, pki: PKI, tmp_path: Path
) -> None:
    first = deploy(deployment, pki, private(tmp_path / "a", noise_multiplier=1.0))
    second = deploy(deployment, pki, private(tmp_path / "b", noise_multiplier=1.0))
    assert not torch.equal(first.weights, second.weights)  # not from the seed
    fresh = [epsilon([Round(1.0, Poisson(0.8))] * t, 1e-5) for t in (1, 2, 3)]
    assert [m["epsilon"] for m in first.history] == fresh
    with RunStore(tmp_path / "a") as st:
        _, ckpt = st.latest_checkpoint(st.resolve("deployed"))
    assert ckpt.tensors["privacy/z"].tolist() == [1.0, 1.0, 1.0]


def test_a_deployment_refuses_noise_from_the_seed(
    deployment: Make, pki: PKI, tmp_path: Path
) -> None:
    dep = deployment(pki.server(), cfg=private(tmp_path / "runs", noise="seed"))
    with pytest.raises(ValueError, match=r"aggregator.noise = \"seed\": a deployment's DP noise"):
        dep.finish()


def per_client(store: Path, name: str, **algorithm: Any) -> ExperimentConfig:
    """DP-FTRL (2 of the 5 sites a round, shuffled epochs) or local-DP FedAvg, secure noise."""
    d = private(store).to_dict()
    d["algorithm"] = {"name": name, "clip": 0.5, "noise": "secure", **algorithm}
    d["sampler"], d["aggregator"], d["transforms"] = {"clients_per_round": 2}, {}, None
    return ExperimentConfig.from_dict(d)


@pytest.mark.parametrize("name", ["dp_ftrl", "ldp_fedavg"])
def test_tree_and_local_dp_deployed_equal_their_simulation_but_for_the_noise(
    deployment: Make, pki: PKI, tmp_path: Path, name: str
) -> None:
    from potluck.privacy.ledger import PrivacyBudget, stored_ledger

    result = deploy(deployment, pki, per_client(tmp_path / "runs", name, noise_multiplier=0.0))
    sim_cfg = per_client(tmp_path / "sim", name, noise_multiplier=0.0)
    sim = run_experiment(sim_cfg.build(), engine=lambda p: Without(p, set()))
    assert torch.equal(result.weights, sim.weights)  # clip, tree, withheld scalars alike
    noised = deploy(deployment, pki, per_client(tmp_path / "z", name, noise_multiplier=2.0))
    with RunStore(tmp_path / "z") as st:
        _, ckpt = st.latest_checkpoint(st.resolve("deployed"))
    slot = {k.split("/", 1)[1]: v for k, v in ckpt.tensors.items() if k.startswith("privacy/")}
    fresh = stored_ledger(slot, PrivacyBudget()).per_round(slot)
    assert [m["epsilon"] for m in noised.history] == fresh and fresh[-1] > 0


def test_dp_sgd_deployed_equals_its_simulation_and_accounts_each_sites_steps(
    deployment: Make, pki: PKI, tmp_path: Path
) -> None:
    """Example-level DP-SGD at the sites: the Poisson samples of examples and the clip are
    the simulation's (no noise drawn at z = 0); with noise, epsilon is the largest over the
    sites' stored step counts."""
    from potluck.privacy.example import largest_epsilon

    def cfg(store: Path, z: float) -> ExperimentConfig:
        d = config(store).to_dict()
        d["algorithm"], d["aggregator"], d["transforms"] = {"name": "fedavg"}, {}, None
        d["terms"] = [{"name": "dp_sgd", "clip": 1.0, "noise_multiplier": z, "noise": "secure"}]
        return ExperimentConfig.from_dict(d)

    result = deploy(deployment, pki, cfg(tmp_path / "runs", 0.0))
    sim = run_experiment(cfg(tmp_path / "sim", 0.0).build(), engine=lambda p: Without(p, set()))
    assert torch.equal(result.weights, sim.weights)
    noised = deploy(deployment, pki, cfg(tmp_path / "z", 1.0))
    with RunStore(tmp_path / "z") as st:
        run_id = st.resolve("deployed")
        states = st.client_states(run_id, st.clients_with_state(run_id))
    pairs = [(float(s["terms.0.dp_sgd/rate"]), int(s["terms.0.dp_sgd/steps"])) for s in states if s]
    assert pairs and noised.history[-1]["terms.0.dp_sgd/epsilon"] == largest_epsilon(
        pairs, 1.0, 1e-5
    )


@pytest.mark.parametrize("name", ["ldp_fedavg", "ddp_secagg_fedavg"])
def test_a_sites_noise_is_the_one_the_server_calibrated_and_accounts(
    tmp_path: Path, name: str
) -> None:
    """With a ``target_epsilon`` the server calibrates the noise multiplier; a site builds
    its program from the same config and must add exactly that noise (and bind the same
    cohort), else the accountant would describe noise no site added."""
    from potluck.deployment import site_program

    d = per_client(tmp_path, name).to_dict()
    d["sampler"] = {"clients_per_round": 5}
    d["privacy"] = {"delta": 1e-5, "target_epsilon": 4.0, "accountant": "rdp"}
    cfg = ExperimentConfig.from_dict(d)
    server = cfg.build().algorithm.transforms[0]
    site = site_program(cfg.to_dict(), 2).algorithm.transforms[0]
    assert site.noise_multiplier == server.noise_multiplier != 1.0
    assert site == server
