"""A malicious deployed client (``potluck client --attack``): over mutual TLS on loopback its
crafted updates and poisoned data reach the server exactly as the simulation's attacker's
do, a robust aggregator and the anomaly scores see them, and a colluding attack, which
needs the other clients' updates, is refused by the client before it joins."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import PKI, SITES, Deployment, config
from test_deploy import learning
from typer.testing import CliRunner

from potluck.attacks.poisoning import Attack, LabelFlip, SignFlip
from potluck.cli import app
from potluck.config import ExperimentConfig
from potluck.deployment import site_program
from potluck.engines.inline import InlineEngine
from potluck.orchestrator import run_experiment

Make = Callable[..., Deployment]
MALICIOUS = "site-3"


def robust(store: Path) -> ExperimentConfig:
    """Five sites, all in every round, under the coordinate-wise median."""
    d = config(store).to_dict()
    d["algorithm"], d["sampler"] = {"name": "fedavg"}, {"clients_per_round": 5}
    d["aggregator"], d["terms"], d["transforms"] = {"name": "median", "byzantine": 1}, None, None
    d["detection"] = {"scores": ["norm", "cosine", "krum"]}
    return ExperimentConfig.from_dict(d)


@pytest.mark.parametrize("attack", [SignFlip(scale=5.0), LabelFlip()], ids=["sign", "labels"])
def test_a_malicious_site_equals_the_simulated_attacker(
    deployment: Make, pki: PKI, tmp_path: Path, attack: Attack
) -> None:
    joined: dict[str, int] = {}

    def malicious(cfg: Any, cid: int) -> Any:
        joined[MALICIOUS] = cid
        return site_program(cfg, cid, attack=attack)

    dep = deployment(pki.server(), cfg=robust(tmp_path / "runs"))
    for name in SITES:
        kw = {"program_for": malicious} if name == MALICIOUS else {}
        dep.site(name, pki.client(name), **kw)
    result = dep.finish()
    cid = joined[MALICIOUS]

    def attacked(program: Any) -> InlineEngine:  # the simulation with that one attacker
        exp = robust(tmp_path / "sim").build()
        return InlineEngine(exp.algorithm.client_program(
            exp.task, exp.federation, seed=exp.seed, attack=attack, attackers=[cid]))  # fmt: skip

    sim = run_experiment(robust(tmp_path / "sim").build(), engine=attacked)
    assert torch.equal(result.weights, sim.weights)
    assert learning(result) == learning(sim)
    honest = run_experiment(robust(tmp_path / "honest").build())
    assert not torch.equal(honest.weights, sim.weights)  # the attacker did change something


def test_the_client_refuses_a_colluding_attack_before_it_joins() -> None:
    out = CliRunner().invoke(
        app, ["client", "--server", "127.0.0.1:1", "--insecure", "--name", "x", "--attack",
              "alie", "--max-failures", "1"],
    )  # fmt: skip
    assert out.exit_code != 0
    said = " ".join(out.output.split())  # rich folds long lines
    assert "ALIE crafts with the other clients' updates (colluders)" in said
    bad = CliRunner().invoke(
        app, ["client", "--server", "127.0.0.1:1", "--insecure", "--name", "x", "--attack",
              "sign_flip", "--attack-param", "scale"],
    )  # fmt: skip
    assert bad.exit_code != 0 and "expected key=value" in bad.output
