"""Secure aggregation over mutual TLS on loopback (issue 15): SecAgg+, distributed DP and
CKKS deployed compute what their simulations do, the four SecAgg+ stages are real exchanges,
each site's secrets stay on the site (the server never receives one), a member that sends
its secret state anyway is refused, and a site that loses its secrets mid-round (restarted)
drops out of that round, which the protocol survives."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import PKI, SITES, Deployment, config
from test_deploy import learning

from potluck.config import ExperimentConfig
from potluck.core.records import Reply, StageJob
from potluck.deploy import server as server_module
from potluck.deploy import wire
from potluck.deploy.client import Site
from potluck.deploy.secrets import RoundSecrets
from potluck.engines.inline import InlineEngine
from potluck.orchestrator import run_experiment

Make = Callable[..., Deployment]
SECRET = "0/s/transforms.0."  # how a reply would carry a transform's client state


def secure(store: Path, **algorithm: Any) -> ExperimentConfig:
    """Five sites, all five in every round, with ``algorithm`` (SecAgg+ by default)."""
    d = config(store, round_timeout_s=10).to_dict()
    d["algorithm"] = algorithm or {"name": "secagg_fedavg", "threshold": 3}
    d["sampler"], d["aggregator"], d["transforms"] = {"clients_per_round": 5}, {}, None
    d["terms"] = None
    d["evaluation"] = {"federated_clients": 0}
    return ExperimentConfig.from_dict(d)


@pytest.fixture
def received(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[wire.Envelope]]:
    """Every answer the deployed server's hub took in."""
    seen: list[wire.Envelope] = []
    answer = server_module.Hub.answer

    def spy(hub: server_module.Hub, name: str, env: wire.Envelope) -> None:
        seen.append(env)
        answer(hub, name, env)

    monkeypatch.setattr(server_module.Hub, "answer", spy)
    yield seen


class Dropping(InlineEngine):
    """The simulation in which ``client`` never answers (``round`` None) or drops out of
    ``round`` before its masked input (the train stage)."""

    def __init__(self, program: Any, client: int = -1, round: int | None = None) -> None:
        super().__init__(program)
        self.client, self.round = client, round

    def run_stage(self, job: StageJob) -> list[Reply | None]:
        replies = self.program.run_stage(job)
        if self.round is not None and (job.stage, job.round) != ("train", self.round):
            return replies
        pairs = zip(job.clients, replies, strict=True)
        return [None if int(c) == self.client else r for c, r in pairs]


def deploy(deployment: Make, pki: PKI, cfg: ExperimentConfig, kind: type[Site] = Site) -> Any:
    dep = deployment(pki.server(), cfg=cfg)
    for name in SITES:
        dep.site(name, pki.client(name), kind=kind)
    return dep.finish()


@pytest.mark.parametrize(
    ("algorithm", "ns"),
    [
        ({}, "transforms.0.secagg"),
        ({"name": "ddp_secagg_fedavg", "clip": 0.5, "noise_multiplier": 0.0, "noise": "secure",
          "threshold": 3}, "transforms.0.dskellam"),
        ({"name": "dp_secagg_fedavg", "clip": 0.5, "noise_multiplier": 0.0, "noise": "secure",
          "threshold": 3}, "transforms.1.secagg"),
    ],
    ids=["secagg", "dskellam", "central_dp"],
)  # fmt: skip
def test_secure_aggregation_deployed_equals_its_simulation_and_no_secret_leaves_a_site(
    deployment: Make,
    pki: PKI,
    tmp_path: Path,
    received: list[wire.Envelope],
    algorithm: Any,
    ns: str,
) -> None:
    result = deploy(deployment, pki, secure(tmp_path / "runs", **algorithm))
    sim = run_experiment(secure(tmp_path / "sim", **algorithm).build(), engine=Dropping)
    assert torch.equal(result.weights, sim.weights)  # the masks cancel: the same bits
    assert learning(result) == learning(sim)
    for m in result.history:
        assert "aborted" not in m and m[f"{ns}/masked"] == 5 and m[f"{ns}/unmasked"] == 5
    answers = [env for env in received if env.kind == "reply"]
    assert len(answers) == 3 * 5 * 4  # rounds x sites x (advertise, share, train, unmask)
    leaked = [k for env in answers for k in env.arrays if k.startswith(SECRET)]
    assert not leaked  # keys, seeds and received shares stayed on the sites


class Leaky(Site):
    """site-4 keeps no secrets: it answers with its secret state, as a careless client
    would."""

    def _ensure_program(self, welcome: wire.Envelope) -> tuple[Any, int]:
        found = super()._ensure_program(welcome)
        if self.name == "site-4":
            self._secrets = RoundSecrets(())
        return found


def test_a_site_that_sends_its_secret_state_is_refused_and_the_round_goes_on(
    deployment: Make, pki: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """site-4 keeps no secrets and sends its keys with its answer: the server refuses the
    answer (it must never hold a site's secret), so site-4 drops out after advertising, in
    every round, and the others' rounds complete."""
    caplog.set_level("WARNING", logger="potluck")
    result = deploy(deployment, pki, secure(tmp_path / "runs"), kind=Leaky)
    refused = "client 4 sent the state of 'transforms.0.secagg', which a site keeps"
    assert sum(refused in line for line in caplog.text.splitlines()) == 3
    for m in result.history:
        assert "aborted" not in m and (m["refused"], m["failed"]) == (1, 0)
        assert m["transforms.0.secagg/advertised"] == 4
        assert m["transforms.0.secagg/masked"] == 4
    sim = run_experiment(secure(tmp_path / "sim").build(), engine=lambda p: Dropping(p, client=4))
    assert torch.equal(result.weights, sim.weights)


class Restarted(Site):
    """site-2 loses its secrets after its share stage of round 2 (as a site restarted there
    would): it must decline the round's masked input."""

    def _work(self, program: Any, cid: int, task: wire.Envelope) -> wire.Envelope:
        answer = super()._work(program, cid, task)
        if self.name == "site-2" and task.round == 2 and "share" in str(task.scalars["stage"]):
            self._secrets.forget()
        return answer


def test_a_site_that_lost_its_secrets_mid_round_drops_out_and_the_round_completes(
    deployment: Make, pki: PKI, tmp_path: Path
) -> None:
    result = deploy(deployment, pki, secure(tmp_path / "runs"), kind=Restarted)
    masked = [m["transforms.0.secagg/masked"] for m in result.history]
    shared = [m["transforms.0.secagg/shared"] for m in result.history]
    assert shared == [5, 5, 5] and masked == [5, 4, 5]
    assert all("aborted" not in m for m in result.history)
    sim = run_experiment(
        secure(tmp_path / "sim").build(), engine=lambda p: Dropping(p, client=2, round=2)
    )
    assert torch.equal(result.weights, sim.weights)  # the dropout's pairwise masks removed


def test_ckks_deployed_equals_its_simulation_within_the_error(
    deployment: Make, pki: PKI, tmp_path: Path, received: list[wire.Envelope]
) -> None:
    pytest.importorskip("tenseal")
    he = {"name": "he_fedavg"}
    result = deploy(deployment, pki, secure(tmp_path / "runs", **he))
    sim = run_experiment(secure(tmp_path / "sim", **he).build(), engine=Dropping)
    gap = (result.weights - sim.weights).abs().max().item()
    assert gap < 1e-5, gap  # CKKS's and the flooding noise's error, not a masking error
    assert all("aborted" not in m for m in result.history)
    leaked = [k for env in received for k in env.arrays if k.startswith(SECRET)]
    assert not leaked  # the key holder's secret key stayed on it
    assert np.isfinite(result.weights.numpy()).all()


def test_secagg_deployed_equals_fedavg_without_it_within_the_fixed_point_error(
    deployment: Make, pki: PKI, tmp_path: Path
) -> None:
    result = deploy(deployment, pki, secure(tmp_path / "runs"))
    plain = run_experiment(secure(tmp_path / "sim", name="fedavg").build(), engine=Dropping)
    gap = (result.weights - plain.weights).abs().max().item()
    # three rounds of rounding to 2^-19 of the clip range, over a summed weight of 1.15
    # (1,152 examples over max_weight 1000)
    assert 0 < gap < 1e-4, gap
