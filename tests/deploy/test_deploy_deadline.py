"""Synchronous rounds on real time, deployed over mutual TLS on loopback: ``[clock]``
over-selection keeps the first K answers as they really arrive and closes the others (not
counted as the slow sites' failures, their late answers refused); a deadline drops what has
not come by then."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from conftest import PKI, SITES, Deployment, config

from potluck.config import ExperimentConfig
from potluck.deploy.client import Site
from potluck.store.sqlite import RunStore


class Slow(Site):
    """site-3 and site-4 take ``delay`` seconds over each train task; the others none."""

    delay = 2.0

    def _work(self, program: Any, cid: int, task: Any) -> Any:
        if self.name in ("site-3", "site-4") and task.scalars.get("stage") == "train":
            time.sleep(self.delay)
        return super()._work(program, cid, task)


def real_time(store: Path, clock: dict[str, Any], per_round: int, rounds: int = 2) -> Any:
    d = config(store).to_dict()
    d["rounds"], d["clock"] = rounds, clock
    d["sampler"] = {"clients_per_round": per_round}
    d["evaluation"] = {"federated_clients": 0}
    return ExperimentConfig.from_dict(d)


def trained_by(store: Path) -> dict[int, set[int]]:
    rs = RunStore(store)
    (info,) = rs.list_runs()
    out: dict[int, set[int]] = {}
    for rnd, client, metrics in rs.client_metrics(info.run_id):
        if "train_loss" in metrics:
            out.setdefault(rnd, set()).add(client)
    return out


def health(store: Path) -> dict[str, dict[str, Any]]:
    rs = RunStore(store)
    (info,) = rs.list_runs()
    return {h["name"]: h for h in rs.health(info.run_id)}


def deploy(make: Any, pki: PKI, cfg: ExperimentConfig) -> Deployment:
    dep = make(pki.server(), cfg=cfg)
    for site in SITES:
        dep.site(site, pki.client(site), kind=Slow)
    return dep


def test_over_selection_keeps_the_first_answers_to_arrive(
    deployment: Any, pki: PKI, tmp_path: Path
) -> None:
    """3 kept of ceil(3 x 1.67) = 5 asked: every round, the three quick sites."""
    store = tmp_path / "runs"
    dep = deploy(deployment, pki, real_time(store, {"over_selection": 0.67}, 3))
    result = dep.finish()
    assert [m["cohort_size"] for m in result.history] == [5, 5]
    assert [m["updates"] for m in result.history] == [3, 3]
    assert [m["over_selected"] for m in result.history] == [2, 2]
    assert [m["failed"] for m in result.history] == [0, 0]
    assert all(m["round_seconds"] < Slow.delay for m in result.history)  # did not wait
    assert trained_by(store) == {1: {0, 1, 2}, 2: {0, 1, 2}}
    slow = health(store)["site-4"]
    assert slow["failures"] == 0 and slow["rounds_completed"] == 0
    assert dep.codes == {name: 0 for name in SITES}  # refused late answers end no site


def test_a_deadline_drops_the_answers_that_have_not_come(
    deployment: Any, pki: PKI, tmp_path: Path
) -> None:
    store = tmp_path / "runs"
    result = deploy(deployment, pki, real_time(store, {"deadline_s": 1.5}, 5)).finish()
    assert [m["updates"] for m in result.history] == [3, 3]
    assert [m["dropped_late"] for m in result.history] == [2, 2]
    assert [m["failed"] for m in result.history] == [2, 2]
    assert trained_by(store) == {1: {0, 1, 2}, 2: {0, 1, 2}}
    late = health(store)["site-3"]
    assert late["failures"] >= 1 and "missed the deadline" in late["last_error"]
