"""The asynchronous driver deployed over mutual TLS on loopback: the server hands releases
out as tasks and aggregates the answers in the order they arrive, with no round barrier; a
slow site's update lands late, weighed by its staleness, while the others go on."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import PKI, SITES, Deployment, config

from potluck.config import ExperimentConfig
from potluck.deploy.client import Site
from potluck.store.sqlite import RunStore

Make = Callable[..., Deployment]


def asynchronous(store: Path, steps: int = 6) -> ExperimentConfig:
    d = config(store).to_dict()
    d["algorithm"], d["terms"], d["rounds"] = {"name": "fedavg"}, None, steps
    d["async"] = {"concurrency": 5, "buffer": 2}
    d["evaluation"] = {"federated_clients": 0}
    return ExperimentConfig.from_dict(d)


def committed(store: Path) -> int:
    try:
        rs = RunStore(store)
        runs = rs.list_runs()
        return len(rs.rounds(runs[0].run_id)) if runs else 0
    except Exception:  # the store is being created
        return 0


class Slow(Site):
    """site-4 holds its first answer until the server has committed three steps; the others
    take 0.2 s over each task, so the run is still going when site-4's answer comes."""

    store: Path
    held = False

    def _work(self, program: Any, cid: int, task: Any) -> Any:
        if self.name != "site-4":
            time.sleep(0.2)
        elif not self.held:
            self.held = True
            deadline = time.monotonic() + 60
            while committed(self.store) < 3 and time.monotonic() < deadline:
                time.sleep(0.02)
        return super()._work(program, cid, task)


def test_a_deployed_async_run_aggregates_the_updates_as_they_arrive(
    deployment: Make, pki: PKI, tmp_path: Path
) -> None:
    store = tmp_path / "runs"
    Slow.store = store
    dep = deployment(pki.server(), cfg=asynchronous(store, steps=8))
    for site in SITES:
        dep.site(site, pki.client(site), kind=Slow)
    result = dep.finish()
    assert [m["updates"] for m in result.history] == [2] * 8
    elapsed = [m["elapsed_s"] for m in result.history]
    assert elapsed == sorted(elapsed) and "virtual_time_s" not in result.history[0]
    rs = RunStore(store)
    (info,) = rs.list_runs()
    late = [
        m["staleness"] for _, c, m in rs.client_metrics(info.run_id) if c == 4 and "staleness" in m
    ]
    assert late and late[0] >= 3, late  # trained from version 0, landed after step 3
    assert all(m["staleness_max"] >= 0 for m in result.history)
