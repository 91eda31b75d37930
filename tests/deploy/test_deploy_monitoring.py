"""Data-drift monitoring deployed over mutual TLS on loopback: the sites answer the server's
``summarize`` stage with their histograms, the server measures the same shifts as the
simulation, and a site's malformed summary is refused and logged, the run going on."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import PKI, SITES, Deployment, config

from potluck.client.program import ClientProgram
from potluck.config import ExperimentConfig
from potluck.core.message import Message
from potluck.core.records import Reply
from potluck.deployment import site_program
from potluck.orchestrator import run_experiment
from potluck.store.sqlite import RunStore

Make = Callable[..., Deployment]
DRIFT = {"start_round": 2, "fraction": 0.4, "shift": 2.0}


def monitored(store: Path, **monitoring: Any) -> ExperimentConfig:
    d = config(store).to_dict()
    d["drift"], d["monitoring"] = DRIFT, {"summaries": True, "summary_bins": 8, **monitoring}
    return ExperimentConfig.from_dict(d)


def shifts(store: Path) -> dict[tuple[int, int], tuple[float, float]]:
    runs = RunStore(store)
    (info,) = runs.list_runs()
    return {
        (rnd, c): (m["label_shift"], m["feature_shift"])
        for rnd, c, m in runs.client_metrics(info.run_id)
        if "label_shift" in m
    }


def test_deployed_shifts_equal_the_simulations(deployment: Make, pki: PKI, tmp_path: Path) -> None:
    dep = deployment(pki.server(), cfg=monitored(tmp_path / "runs"))
    for site in SITES:
        dep.site(site, pki.client(site))
    result = dep.finish()
    sim = run_experiment(monitored(tmp_path / "sim").build(), RunStore(tmp_path / "sim"))
    assert shifts(tmp_path / "runs") == shifts(tmp_path / "sim")
    assert [m["shifted_clients"] for m in result.history] == [
        m["shifted_clients"] for m in sim.history
    ]
    assert sum(m["shifted_clients"] for m in result.history) > 0


class Garbled(ClientProgram):
    """A site whose summaries do not sum to 1."""

    def summarize(self, cid: int, round: int, shared: Message) -> Reply | None:
        return Reply(Message({"labels": torch.ones(10), "features": torch.ones(9)}))


def test_a_sites_malformed_summary_is_refused_and_the_run_goes_on(
    deployment: Make, pki: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ids: list[int] = []

    def garbled(cfg: ExperimentConfig, cid: int) -> ClientProgram:
        ids.append(cid)
        program = site_program(cfg, cid)
        program.__class__ = Garbled
        return program

    dep = deployment(pki.server(), cfg=monitored(tmp_path / "runs"))
    for i, site in enumerate(SITES):
        dep.site(site, pki.client(site), **({"program_for": garbled} if i == 0 else {}))
    with caplog.at_level(logging.WARNING, logger="potluck"):
        result = dep.finish()
    assert len(result.history) == 3
    assert "sums to 10, not 1" in caplog.text
    by_client = {c for (_, c) in shifts(tmp_path / "runs")}
    assert by_client and ids and ids[0] not in by_client  # the garbled site has none
    trained = {
        c
        for _, c, m in RunStore(tmp_path / "runs").client_metrics(
            RunStore(tmp_path / "runs").list_runs()[0].run_id
        )
        if "num_examples" in m
    }
    assert ids[0] in trained  # it trained: only its summaries were refused


def test_seeded_summary_noise_is_refused_by_a_deployment(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"monitoring\.noise = 'secure'"):
        site_program(monitored(tmp_path, summary_noise=1.0), 0)
