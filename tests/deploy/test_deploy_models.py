"""Serving registered models to deployed sites over mutual TLS on loopback
(``potluck.rollout.serving``): production installed on every site, a canary with an
injected regression rolled back by itself on the sites' own evaluation, a better one
promoted and installed everywhere, a promotion made elsewhere followed, and hostile or
unwilling sites refused without stopping the server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import PKI, SITES, config

from potluck.config import ExperimentConfig
from potluck.core.message import Message, MessageError
from potluck.core.records import by_namespace
from potluck.deploy.client import Site
from potluck.deploy.installed import check_install, read_installed, weights_digest
from potluck.deployment import site_program
from potluck.monitor.ab import ab_personal, ab_test
from potluck.orchestrator import run_experiment
from potluck.rollout.registry import ModelRegistry
from potluck.rollout.serving import CanaryPlan, ServeResult, serve_models
from potluck.store.checkpoint import Checkpoint
from potluck.store.sqlite import RunStore


@dataclass
class Served:
    """A model server thread and its sites' threads, each site keeping its model in a file."""

    root: Path
    port: int = 0
    result: ServeResult | None = None
    error: BaseException | None = None
    codes: dict[str, int] = field(default_factory=dict)
    threads: list[threading.Thread] = field(default_factory=list)
    sites: list[Site] = field(default_factory=list)

    def model(self, site: str) -> Path:
        return self.root / f"{site}.safetensors"

    def spawn(self, target: object, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)  # type: ignore[arg-type]
        t.start()
        self.threads.append(t)

    def site(self, name: str, pki: PKI, kind: type[Site] = Site, keep: bool = True) -> None:
        site = kind(f"127.0.0.1:{self.port}", name=name, tls=pki.client(name),
                    program_for=site_program, server_name="localhost", backoff=(0.1, 0.5),
                    model_out=self.model(name) if keep else None)  # fmt: skip
        self.sites.append(site)
        self.spawn(lambda: self.codes.__setitem__(name, site.run()), name)

    def finish(self, timeout: float = 120) -> ServeResult:
        self.threads[0].join(timeout)
        if self.error is not None:
            raise self.error
        for t in self.threads[1:]:
            t.join(10)
        assert self.result is not None, "the model server did not finish"
        return self.result


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[ModelRegistry]:
    """Model ``digits``: v1 (production) a trained run's last checkpoint; v2 the same
    weights scrambled (an injected regression); v3 the trained weights again."""
    root = tmp_path / "runs"
    cfg = config(root)
    store = RunStore(root)
    trained = run_experiment(cfg.build(), store).run_id
    reg = ModelRegistry(store)
    reg.register("digits", trained)
    reg.promote("digits", 1)
    w = reg.get("digits", 1).load().tensors["global"]
    broken = store.create_run(cfg.build().config, name="broken")
    scrambled = w[torch.randperm(len(w), generator=torch.Generator().manual_seed(0))]
    store.commit_round(broken, 1, {}, checkpoint=Checkpoint({"global": scrambled}, {}))
    reg.register("digits", broken, note="injected regression")
    reg.register("digits", trained)
    yield reg
    store.close()


def _serve(
    reg: ModelRegistry,
    pki: PKI,
    root: Path,
    canary: CanaryPlan | None = None,
    follow: threading.Event | None = None,
    min_clients: int = 5,
    ab: int | str | None = None,
    name: str = "digits",
) -> Served:
    served = Served(root)
    listening = threading.Event()
    overrides = ['deploy.listen="127.0.0.1:0"', f"deploy.min_clients={min_clients}",
                 "deploy.poll_timeout_s=0.5", "deploy.round_timeout_s=30"]  # fmt: skip

    def run() -> None:  # its own connection to the store, as another process has
        try:
            with RunStore(reg.store.root) as store:
                served.result = serve_models(
                    ModelRegistry(store), name, tls=pki.server(), overrides=overrides,
                    canary=canary, follow=follow, ab=ab,  # type: ignore[arg-type]
                    on_listening=lambda p: (setattr(served, "port", p), listening.set()),
                )  # fmt: skip
        except BaseException as exc:  # reported by finish()
            served.error = exc
            listening.set()

    served.spawn(run, "model-server")
    assert listening.wait(60), "the model server did not start"
    return served


def _runs(served: Served, site: str) -> int:
    return read_installed(served.model(site)).version


def test_a_regressed_canary_is_rolled_back_on_the_sites_own_evaluation(
    registry: ModelRegistry, pki: PKI, tmp_path: Path
) -> None:
    served = _serve(registry, pki, tmp_path, CanaryPlan(2, fraction=0.4, threshold=0.02))
    for site in SITES:
        served.site(site, pki)
    result = served.finish()
    assert result.canary is not None and not result.canary.promoted
    assert result.canary.comparison.clients == 2  # 40 % of 5 sites
    assert result.canary.comparison.mean_difference < -0.02
    assert registry.get("digits", 2).stage == "archived"
    assert registry.production("digits").version == 1  # type: ignore[union-attr]
    # every site runs production again, the canary's two included, byte for byte
    assert result.installed == dict.fromkeys(SITES, 1) and not result.failed
    v1 = registry.get("digits", 1).load().tensors["global"]
    for site in SITES:
        kept = read_installed(served.model(site))
        assert kept.version == 1 and torch.equal(kept.weights, v1)
    assert served.codes == dict.fromkeys(SITES, 0)  # told done
    actions = [e.action for e in registry.audit("digits") if e.version == 2]
    assert actions == ["register", "canary", "serve", "canary_rollback"]
    rollback = registry.audit("digits")[-2]
    assert rollback.action == "canary_rollback" and rollback.detail["deployed_sites"] == 2
    serves = [e for e in registry.audit("digits") if e.action == "serve"]
    assert [(e.version, e.detail["sites"]) for e in serves] == [(1, 3), (2, 2), (1, 2)]


def test_a_canary_that_holds_up_is_promoted_and_installed_everywhere(
    registry: ModelRegistry, pki: PKI, tmp_path: Path
) -> None:
    served = _serve(registry, pki, tmp_path, CanaryPlan(3, fraction=0.4, threshold=0.02))
    for site in SITES:
        served.site(site, pki)
    result = served.finish()
    assert result.canary is not None and result.canary.promoted
    assert result.canary.comparison.mean_difference == 0.0  # the same weights
    assert registry.production("digits").version == 3  # type: ignore[union-attr]
    assert registry.get("digits", 1).stage == "archived"
    assert {site: _runs(served, site) for site in SITES} == dict.fromkeys(SITES, 3)


def test_following_serves_a_promotion_made_elsewhere_and_a_late_site(
    registry: ModelRegistry, pki: PKI, tmp_path: Path
) -> None:
    stop = threading.Event()
    served = _serve(registry, pki, tmp_path, follow=stop, min_clients=4)
    for site in SITES[:4]:
        served.site(site, pki)
    _until(lambda: all(served.model(s).exists() for s in SITES[:4]))
    assert {_runs(served, s) for s in SITES[:4]} == {1}
    registry.promote("digits", 3, reason="promoted from the shell")
    served.site(SITES[4], pki)  # joins late
    _until(lambda: served.model(SITES[4]).exists() and
           all(_runs(served, s) == 3 for s in SITES))  # fmt: skip
    stop.set()
    result = served.finish()
    assert result.installed == dict.fromkeys(SITES, 3)


def test_deployed_ab_tests_equal_the_simulated_ones(
    registry: ModelRegistry, pki: PKI, tmp_path: Path
) -> None:
    """Production against v2 on every site's own data, as ``ab_test`` measures it."""
    served = _serve(registry, pki, tmp_path, ab=2)
    for site in SITES:
        served.site(site, pki)
    result = served.finish()
    exp = config(registry.store.root).build()
    v1, v2 = (registry.get("digits", v).load().tensors["global"] for v in (1, 2))
    assert result.ab is not None and result.ab.per_client == ab_test(exp, v1, v2).per_client
    entry = next(e for e in registry.audit("digits") if e.action == "ab")
    assert (entry.version, entry.detail["against"], entry.detail["deployed_sites"]) == (2, 1, 5)


def test_a_deployed_personal_ab_sends_each_site_its_state(pki: PKI, tmp_path: Path) -> None:
    """Ditto: the global model against each site's personal model (its state in the run,
    sent with the evaluation task), equal to ``ab_personal`` in simulation."""
    d = config(tmp_path / "runs").to_dict()
    for written in ("terms", "transforms", "aggregator", "server"):  # scaffold's, in full
        d.pop(written, None)
    d["algorithm"], d["rounds"] = {"name": "ditto", "lam": 0.01}, 2
    d["sampler"] = {"clients_per_round": 3}
    cfg = ExperimentConfig.from_dict(d)
    with RunStore(tmp_path / "runs") as store:
        run = run_experiment(cfg.build(), store, progress=False).run_id
        reg = ModelRegistry(store)
        reg.register("pers", run)
        reg.promote("pers", 1)
        trained = store.clients_with_state(run)
        states = dict(zip(trained, map(by_namespace, store.client_states(run, trained)),
                          strict=True))  # fmt: skip
        served = _serve(reg, pki, tmp_path, ab="personal", name="pers")
        for site in SITES:
            served.site(site, pki)
        result = served.finish()
        w = reg.get("pers", 1).load().tensors["global"]
        simulated = ab_personal(cfg.build(), w, states)
    assert result.ab is not None and result.ab.per_client == simulated.per_client
    assert [c for c, _, _ in result.ab.per_client] == trained and len(trained) < 5


class Liar(Site):
    """A site that claims to have installed whatever it is sent, with a made-up digest."""

    def _install(self, program, task):  # type: ignore[no-untyped-def]
        answer = super()._install(program, task)
        return type(answer)(answer.kind, answer.run_id, round=answer.round,
                            task_id=answer.task_id, client=answer.client,
                            scalars={**answer.scalars, "digest": "0" * 64})  # fmt: skip


def test_a_lying_site_and_a_site_that_keeps_no_model_are_not_counted(
    registry: ModelRegistry, pki: PKI, tmp_path: Path
) -> None:
    served = _serve(registry, pki, tmp_path)
    for i, site in enumerate(SITES):
        served.site(site, pki, kind=Liar if i == 0 else Site, keep=i != 1)
    result = served.finish()
    assert result.installed == dict.fromkeys(SITES[2:], 1)
    assert "another digest" in result.failed[SITES[0]]
    assert "declined" in result.failed[SITES[1]]
    assert not served.model(SITES[1]).exists()


def test_a_site_refuses_a_served_model_that_does_not_check() -> None:
    w = torch.ones(4)
    good = {"model": "m", "version": 2, "digest": weights_digest(w)}
    assert check_install(Message({"w": w}, good), 4).version == 2
    bad = [
        (Message({"w": w}, good), 5, "needs float32"),
        (Message({"w": w * float("nan")}, {**good, "digest": weights_digest(w * 0)}), 4, "NaN"),
        (Message({"w": w + 1}, good), 4, "do not match their digest"),
        (Message({"w": w}, {**good, "version": 0}), 4, "positive integer"),
        (Message({"w": w}, {**good, "digest": "beef"}), 4, "64 hex"),
        (Message({"w": w, "x": w}, good), 4, "one array"),
    ]
    for message, size, why in bad:
        with pytest.raises(MessageError, match=why):
            check_install(message, size)


def test_the_serve_and_client_commands_roll_a_regressed_canary_back(
    registry: ModelRegistry, pki: PKI, tmp_path: Path
) -> None:
    """``potluck models serve`` and ``potluck client --model-out`` as processes."""
    exe = Path(sys.prefix) / "bin" / "potluck"
    potluck = [str(exe)] if exe.exists() else [sys.executable, "-m", "potluck.cli"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    ca = pki.ca_dir
    logs = {n: (tmp_path / f"{n}.out", tmp_path / f"{n}.err") for n in ("server", "client")}

    def start(name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        out, err = logs[name]
        with out.open("wb") as o, err.open("wb") as e:
            return subprocess.Popen([*potluck, *argv], stdout=o, stderr=e, env=env)

    server = start("server", [
        "models", "serve", "digits", "--ab", "3", "--canary", "2", "--fraction", "0.4",
        "--threshold", "0.02", "--listen", "127.0.0.1:0", "--set", "deploy.poll_timeout_s=0.5",
        "--store", str(registry.store.root), "--cert", str(ca / "server-hub.pem"),
        "--key", str(ca / "server-hub.key"), "--client-ca", str(ca / "ca.pem"),
    ])  # fmt: skip
    try:
        port = _port(logs["server"][1], server)
        served = Served(tmp_path, port=port)
        client = start("client", [
            "client", "--server", f"127.0.0.1:{port}", "--server-name", "localhost",
            "--cert", str(ca / f"client-{SITES[0]}.pem"), "--key",
            str(ca / f"client-{SITES[0]}.key"), "--ca", str(ca / "ca.pem"),
            "--model-out", str(served.model(SITES[0])),
        ])  # fmt: skip
        for site in SITES[1:]:
            served.site(site, pki)
        assert server.wait(120) == 0, logs["server"][1].read_text()[-3000:]
        assert client.wait(60) == 0, logs["client"][1].read_text()[-3000:]
    finally:
        for proc in (server, *([client] if "client" in locals() else [])):
            if proc.poll() is None:
                proc.kill()
    printed = logs["server"][0].read_text()
    assert "canary - production" in printed and "digits v2: rolled back (archived)" in printed
    assert "digits: v1 on 5 sites" in printed, printed
    assert "digits A/B: 5 clients: production" in printed and "v3 - production +0.0000" in printed
    assert {_runs(served, s) for s in SITES} == {1}
    assert registry.production("digits").version == 1  # type: ignore[union-attr]
    assert registry.get("digits", 2).stage == "archived"


def _port(log: Path, proc: subprocess.Popen[bytes], timeout: float = 90) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if m := re.search(r"serving model \S+ on \S+ \(port (\d+)\)", log.read_text()):
            return int(m.group(1))
        time.sleep(0.05)
    raise AssertionError(f"the model server did not start:\n{log.read_text()[-3000:]}")


def _until(ok: object, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ok():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_site_keeps_the_client_id_it_had_in_the_run(
    registry: ModelRegistry, pki: PKI, tmp_path: Path
) -> None:
    """The ids come from the run's stored health (a deployed run's sites, by name), so a
    site's stored client state is its own, whatever order the sites join in."""
    run = registry.get("digits", 1).run_id
    ids = {site: len(SITES) - 1 - i for i, site in enumerate(SITES)}
    registry.store.update_health(run, [{"name": s, "client": c} for s, c in ids.items()])
    served = _serve(registry, pki, tmp_path)
    for site in SITES:
        served.site(site, pki)
    served.finish()
    assert {s.name: s._program[1] for s in served.sites} == ids  # type: ignore[index]
