"""A deployment as separate processes: the real ``potluck server`` and ``potluck client``
commands, with certificates from ``potluck certs``.

- Across network namespaces (a server host and five client hosts, each with its own address,
  joined by veth pairs), the deployed run equals the simulation of the same experiment.
- Across the namespaces, SecAgg+ survives clients killed between each two of its stages and
  equals the simulation of the same dropouts.
- On loopback: clients killed mid-run are dropped from the later rounds and the run finishes;
  a server killed mid-run and restarted resumes the run, its clients reconnect by themselves,
  no committed round is lost and the result equals the uninterrupted simulation; a server
  whose round loop fails tells its clients it stopped (not that the run is done), and
  restarted with the config fixed it gets the same clients back and finishes the run.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from netns import NetnsUnavailable, Star

from potluck.config import ExperimentConfig
from potluck.core.records import TRAIN, Reply, StageJob
from potluck.engines.inline import InlineEngine
from potluck.orchestrator import REMOTE_METRICS, TIMING_METRICS, RunResult, run_experiment
from potluck.store.sqlite import RunStore

SITES = [f"site-{i}" for i in range(5)]
RUN = "deployed"
NOT_LEARNING = TIMING_METRICS | REMOTE_METRICS
_bin = Path(sys.prefix) / "bin" / "potluck"
POTLUCK = [str(_bin)] if _bin.exists() else [sys.executable, "-m", "potluck.cli"]
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"  # the user's parts (my_lab)
HERE = Path(__file__).resolve().parent  # test-only parts (server_faults)
ENV = {
    **os.environ,
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "1",
    "COLUMNS": "200",
    "PYTHONPATH": os.pathsep.join(
        p for p in (str(EXAMPLES), str(HERE), os.environ.get("PYTHONPATH")) if p
    ),
}
# parts a user wrote, named by import path: a stateful transform, a median, a term with a
# server half, and a part with two stages of its own (with dropouts between them)
USER_PARTS: dict[str, Any] = {
    "terms": [{"name": "my_lab.feddyn:FedDyn", "alpha": 0.01}],
    "transforms": [
        {"name": "my_lab.compress:SignEF"},
        {"name": "my_lab.beacon:Beacon", "drop": 0.3},
    ],
    "aggregator": {"name": "my_lab.agg:Median"},
}


def _fashion_mnist() -> str | None:
    from potluck.data.sources import find_fashion_mnist

    try:
        find_fashion_mnist()
    except (OSError, ValueError) as exc:
        return f"Fashion-MNIST not found ({exc}); install the Debian package"
    return None


pytestmark = pytest.mark.skipif(
    (why := _fashion_mnist()) is not None, reason=why or "Fashion-MNIST not found"
)


def experiment(
    store: Path,
    rounds: int = 3,
    federated_clients: int = 5,
    parts: dict[str, Any] | None = None,
    **deploy: Any,
) -> ExperimentConfig:
    """FedAvg on Fashion-MNIST: 5 clients (Dirichlet), logistic regression, one epoch;
    ``parts`` replace some of FedAvg's."""
    return ExperimentConfig.from_dict(
        {
            **(parts or {}),
            "seed": 7,
            "rounds": rounds,
            "data": {
                "dataset": "fashion_mnist",
                "num_clients": 5,
                "partition": {"kind": "dirichlet", "alpha": 1.0},
            },
            "model": {"name": "logreg"},
            "sampler": {"clients_per_round": 5},
            "client": {"epochs": 1, "batch_size": 64, "lr": 0.1},
            "evaluation": {"federated_clients": federated_clients},
            "run": {"threads": 1, "store": str(store), "name": RUN, "checkpoint_every": 1},
            "deploy": {
                "listen": "127.0.0.1:0",
                "min_clients": 5,
                "round_timeout_s": 60,
                "poll_timeout_s": 1,
                "join_timeout_s": 120,
                "admit": SITES,
                **deploy,
            },
        }
    )


# ---- processes ----------------------------------------------------------------------------


@dataclass
class Proc:
    """A started command with its stdout and stderr in files."""

    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    out: Path
    err: Path

    def text(self) -> str:
        return self.out.read_text(errors="replace") + self.err.read_text(errors="replace")

    def tail(self, n: int = 25) -> str:
        return f"--- {self.name} (rc {self.popen.poll()}):\n" + "\n".join(
            self.text().splitlines()[-n:]
        )

    def wait_for(self, pattern: str, timeout: float = 90) -> re.Match[str]:
        """The first match of ``pattern`` in the output; fails if the process ends first."""
        deadline = time.monotonic() + timeout
        while True:
            ended = self.popen.poll() is not None
            if m := re.search(pattern, self.text(), re.MULTILINE):
                return m
            if ended or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not seen\n{self.tail()}")

    def port(self) -> int:
        """The port a server listens on (from its log line)."""
        return int(self.wait_for(r"listening on \S+ \(port (\d+)\)").group(1))

    def finish(self, timeout: float = 120) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            message = f"{self.name} still running after {timeout} s\n{self.tail()}"
            raise AssertionError(message) from None

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(30)


@dataclass
class Procs:
    """Every process a test starts; all killed at teardown."""

    logs: Path
    started: list[Proc] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str]) -> Proc:
        n = len(self.started)
        out, err = self.logs / f"{n:02d}-{name}.out", self.logs / f"{n:02d}-{name}.err"
        with out.open("wb") as o, err.open("wb") as e:
            popen = subprocess.Popen(list(argv), stdout=o, stderr=e, env=ENV)
        proc = Proc(name, list(argv), popen, out, err)
        self.started.append(proc)
        return proc

    def server(
        self, toml: Path, store: Path, pki: Path, *, listen: str, prefix: Sequence[str] = ()
    ) -> Proc:
        return self.start(
            "server",
            [*prefix, *POTLUCK, "server", str(toml), "--store", str(store), "--listen", listen,
             "--cert", str(pki / "server-hub.pem"), "--key", str(pki / "server-hub.key"),
             "--client-ca", str(pki / "ca.pem"), "--revoked", str(pki / "revoked.txt")],
        )  # fmt: skip

    def client(
        self,
        name: str,
        server: str,
        pki: Path,
        *,
        server_name: str | None = None,
        prefix: Sequence[str] = (),
    ) -> Proc:
        named = ["--server-name", server_name] if server_name else []
        return self.start(
            name,
            [*prefix, *POTLUCK, "client", "--server", server, "--data", "federation",
             "--cert", str(pki / f"client-{name}.pem"), "--key", str(pki / f"client-{name}.key"),
             "--ca", str(pki / "ca.pem"), *named],
        )  # fmt: skip

    def tails(self) -> str:
        return "\n".join(p.tail() for p in self.started)

    def close(self) -> None:
        for proc in self.started:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                proc.kill()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    logs = tmp_path / "logs"
    logs.mkdir()
    running = Procs(logs)
    try:
        yield running
    finally:
        running.close()
        print(running.tails())  # shown when the test failed


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A federation CA (``potluck certs``): the server's certificate names loopback and every
    hub address of the namespaces; one client certificate per site."""
    ca = tmp_path_factory.mktemp("pki") / "ca"
    hosts = [a for h in ["localhost", "127.0.0.1", *Star.hub_addresses(5)] for a in ("--host", h)]
    for args in (
        ["init"],
        ["issue", "server", "hub", *hosts],
        *(["issue", "client", name] for name in SITES),
    ):
        done = subprocess.run(
            [*POTLUCK, "certs", *args, "--dir", str(ca)], capture_output=True, text=True, env=ENV
        )
        assert done.returncode == 0, done.stderr
    (ca / "revoked.txt").touch()
    return ca


@pytest.fixture
def star() -> Iterator[Star]:
    """Six network namespaces: a server host and five client hosts."""
    net = Star(spokes=len(SITES))
    try:
        net.create()
    except NetnsUnavailable as exc:
        pytest.skip(f"network namespaces are not available here: {exc}")
    try:
        yield net
    finally:
        net.destroy()


# ---- what the deployed run stored, and what the simulation computes -------------------------


@dataclass
class Stored:
    rounds: list[int]
    history: list[dict[str, float]]
    weights: torch.Tensor
    trained: dict[int, set[int]]  # round -> clients whose update was accepted
    runs: int
    status: str
    health: dict[str, dict[str, Any]]


def stored(store: Path) -> Stored:
    with RunStore(store) as st:
        run_id = st.resolve(RUN)
        records = st.rounds(run_id)
        found = st.latest_checkpoint(run_id)
        assert found is not None and found[0] == records[-1].round
        trained: dict[int, set[int]] = {}
        for rnd, cid, metrics in st.client_metrics(run_id):
            if "train_loss" in metrics:
                trained.setdefault(rnd, set()).add(cid)
        return Stored(
            [r.round for r in records],
            [r.metrics for r in records],
            found[1].tensors["global"],
            trained,
            sum(r.name == RUN for r in st.list_runs()),
            st.get_run(run_id).status,
            {h["name"]: h for h in st.health(run_id)},
        )


def learning(history: Sequence[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in m.items() if k not in NOT_LEARNING} for m in history]


class Dropping(InlineEngine):
    """The simulation in which only the given clients report their update in each round."""

    remote = True

    def __init__(self, program: Any, reporting: dict[int, set[int]]) -> None:
        super().__init__(program)
        self.reporting = reporting

    def run_stage(self, job: StageJob) -> list[Reply | None]:
        replies = self.program.run_stage(job)
        if job.stage != TRAIN:
            return replies
        keep = self.reporting.get(job.round, set())
        return [r if int(c) in keep else None for c, r in zip(job.clients, replies, strict=True)]


def simulate(cfg: ExperimentConfig, engine: Callable[[Any], Any] | None = None) -> RunResult:
    """The same experiment, simulated in this process with the inline engine."""
    run = cfg.run.model_copy(update={"engine": "inline"})
    return run_experiment(cfg.model_copy(update={"run": run}).build(), engine=engine)


def write(cfg: ExperimentConfig, path: Path) -> Path:
    path.write_text(cfg.to_toml())
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def committed(server: Proc, rnd: int, timeout: float = 90) -> None:
    """Wait until the server has committed round ``rnd`` (its per-round progress line)."""
    server.wait_for(rf"^round {rnd} ", timeout)


# ---- tests --------------------------------------------------------------------------------


def test_server_and_clients_on_separate_hosts_reproduce_the_simulation(
    star: Star, procs: Procs, pki: Path, tmp_path: Path
) -> None:  # star first: its namespaces go after the processes in them were killed
    store = tmp_path / "runs"
    cfg = experiment(store, rounds=3, listen="0.0.0.0:0")
    toml = write(cfg, tmp_path / "exp.toml")
    route = ["ip", "-n", star.spoke(0), "route", "get", star.hub_address(1)]
    assert subprocess.run(route, capture_output=True).returncode != 0  # only its own link
    server = procs.server(toml, store, pki, listen="0.0.0.0:0", prefix=star.exec(star.hub))
    port = server.port()
    clients = [
        procs.client(name, f"{star.hub_address(i)}:{port}", pki, prefix=star.exec(star.spoke(i)))
        for i, name in enumerate(SITES)
    ]
    assert server.finish() == 0, procs.tails()
    assert [c.finish(30) for c in clients] == [0] * 5, procs.tails()
    for i, name in enumerate(SITES):
        server.wait_for(rf"client '{name}' joined as client {i}$", 0)
    sim = simulate(cfg)
    run = stored(store)
    assert run.rounds == [1, 2, 3] and run.status == "finished"
    assert learning(run.history) == learning(sim.history)
    assert [m["test_accuracy"] for m in run.history] == [m["test_accuracy"] for m in sim.history]
    gap = (run.weights - sim.weights).abs().max().item()
    assert torch.equal(run.weights, sim.weights), gap  # the same code on the same bits
    assert all(m["failed"] == 0 and m["refused"] == 0 for m in run.history)
    assert sorted(run.health) == SITES
    assert all(h["rounds_completed"] == 3 and h["failures"] == 0 for h in run.health.values())


def test_user_parts_named_by_import_path_deploy_across_hosts(
    star: Star, procs: Procs, pki: Path, tmp_path: Path
) -> None:
    """The user's parts run in the deployment as in the simulation: the sites rebuild them
    from the config the server sends, client state (the error-feedback residual, FedDyn's
    h_k, the beacon's secret) travels with the tasks, and the beacon's two extra stages, with
    clients declining between them, go over the network."""
    store = tmp_path / "runs"
    cfg = experiment(store, rounds=3, parts=USER_PARTS, listen="0.0.0.0:0")
    toml = write(cfg, tmp_path / "exp.toml")
    server = procs.server(toml, store, pki, listen="0.0.0.0:0", prefix=star.exec(star.hub))
    port = server.port()
    clients = [
        procs.client(name, f"{star.hub_address(i)}:{port}", pki, prefix=star.exec(star.spoke(i)))
        for i, name in enumerate(SITES)
    ]
    assert server.finish() == 0, procs.tails()
    assert [c.finish(30) for c in clients] == [0] * 5, procs.tails()
    sim = simulate(cfg)
    run = stored(store)
    assert run.rounds == [1, 2, 3] and run.status == "finished"
    assert learning(run.history) == learning(sim.history)
    assert torch.equal(run.weights, sim.weights)
    dropped = sum(m["transforms.1.Beacon/dropped"] for m in run.history)
    assert dropped > 0 and all(m["transforms.1.Beacon/committed"] == 5 for m in run.history)
    assert all(m["failed"] == 0 and m["refused"] == 0 for m in run.history)


@pytest.mark.slow  # the SecAgg+ test kills clients mid-run too
def test_clients_killed_mid_run_are_dropped_and_the_run_finishes(
    procs: Procs, pki: Path, tmp_path: Path
) -> None:
    store = tmp_path / "runs"
    cfg = experiment(store, rounds=3, round_timeout_s=4, federated_clients=0)
    toml = write(cfg, tmp_path / "exp.toml")
    server = procs.server(toml, store, pki, listen="127.0.0.1:0")
    address = f"127.0.0.1:{server.port()}"
    clients = [procs.client(name, address, pki, server_name="localhost") for name in SITES]
    committed(server, 1)
    for victim in clients[3:]:
        victim.kill()
    assert server.finish() == 0, procs.tails()
    assert [c.finish(30) for c in clients[:3]] == [0] * 3, procs.tails()
    run = stored(store)
    assert run.rounds == [1, 2, 3] and run.status == "finished"
    failed = [m["failed"] for m in run.history]
    assert failed[0] == 0 and failed[-1] == 2 and failed == sorted(failed), failed
    assert all(m["updates"] == 5 - m["failed"] and m["refused"] == 0 for m in run.history)
    assert run.trained[3] == {0, 1, 2}
    for name in SITES[3:]:
        assert run.health[name]["failures"] > 0 and run.health[name]["last_error"]
    # the model is the simulation's in which exactly the clients that reported did
    sim = simulate(cfg, lambda p: Dropping(p, run.trained))
    assert learning(run.history) == learning(sim.history)
    assert torch.equal(run.weights, sim.weights)


def test_a_killed_and_restarted_server_resumes_and_its_clients_reconnect(
    procs: Procs, pki: Path, tmp_path: Path
) -> None:
    store = tmp_path / "runs"
    cfg = experiment(store, rounds=4, round_timeout_s=4)
    toml = write(cfg, tmp_path / "exp.toml")
    address = f"127.0.0.1:{free_port()}"
    first = procs.server(toml, store, pki, listen=address)
    first.port()
    clients = [procs.client(name, address, pki, server_name="localhost") for name in SITES]
    committed(first, 1)
    away = clients[3:]  # unreachable while the server restarts, back after a round's deadline
    for site in away:
        site.popen.send_signal(signal.SIGSTOP)
    first.kill()
    assert not re.search(r"^round 4 ", first.text(), re.MULTILINE), "killed too late"
    second = procs.server(toml, store, pki, listen=address)  # the same command
    second.port()
    time.sleep(cfg.deploy.round_timeout_s + 1)  # the restarted server waits for all five
    for site in away:
        site.popen.send_signal(signal.SIGCONT)
    second.wait_for(r"resuming run")
    assert second.finish() == 0, procs.tails()
    assert [c.finish(30) for c in clients] == [0] * 5, procs.tails()
    run = stored(store)
    assert run.rounds == [1, 2, 3, 4] and run.runs == 1 and run.status == "finished"
    assert all(m["failed"] == 0 for m in run.history), [m["failed"] for m in run.history]
    sim = simulate(cfg)  # uninterrupted
    assert learning(run.history) == learning(sim.history)
    assert torch.equal(run.weights, sim.weights)


@pytest.mark.slow  # test_deploy's in-process version runs by default
def test_a_failed_server_restarted_with_a_fixed_config_gets_its_clients_back(
    procs: Procs, pki: Path, tmp_path: Path
) -> None:
    """The server's aggregator (a user part) raises in round 2: the server exits non-zero and
    its clients, told that it stopped (not that the run is done), keep reconnecting; the
    server restarted with the part fixed resumes after round 1, the same clients finish the
    run, and the result is the simulation of the fixed config."""
    store = tmp_path / "runs"

    def failing(fail_round: int) -> ExperimentConfig:
        part = {"aggregator": {"name": "server_faults:FailingMean", "fail_round": fail_round}}
        return experiment(store, rounds=3, parts=part, round_timeout_s=4)

    fixed = failing(0)
    address = f"127.0.0.1:{free_port()}"
    first = procs.server(write(failing(2), tmp_path / "broken.toml"), store, pki, listen=address)
    first.port()
    clients = [procs.client(name, address, pki, server_name="localhost") for name in SITES]
    committed(first, 1)
    assert first.finish() != 0, procs.tails()
    first.wait_for(r"ServerFault: the aggregator fails in round 2", 0)
    first.wait_for(r"stopping run \w+ before it finished: the server failed \(ServerFault\)", 0)
    assert stored(store).status == "failed" and stored(store).rounds == [1]
    stopped = r"the server stopped run \w+ \(the server failed \(ServerFault\)\); reconnecting"
    for site in clients:
        site.wait_for(stopped, 30)
        assert "the server finished run" not in site.text(), site.tail()
    time.sleep(2)  # the server is gone: the clients keep retrying, none has ended
    assert [c.popen.poll() for c in clients] == [None] * 5, procs.tails()
    second = procs.server(write(fixed, tmp_path / "fixed.toml"), store, pki, listen=address)
    second.wait_for(r"resuming run")
    assert second.finish() == 0, procs.tails()
    assert [c.finish(30) for c in clients] == [0] * 5, procs.tails()
    run = stored(store)
    assert run.rounds == [1, 2, 3] and run.runs == 1 and run.status == "finished"
    assert all(m["failed"] == 0 and m["refused"] == 0 for m in run.history)
    sim = simulate(fixed)  # the fixed config, uninterrupted
    assert learning(run.history) == learning(sim.history)
    assert torch.equal(run.weights, sim.weights)


class Killed(InlineEngine):
    """The simulation in which client ``c`` answers nothing after stage ``stage`` of round
    ``round`` (``killed[c] = (round, stage)``); a simulation engine (not remote), so the
    parts' secret state stays with the clients."""

    ORDER = ("advertise", "share", "train", "unmask")

    def __init__(self, program: Any, killed: dict[int, tuple[int, str]]) -> None:
        super().__init__(program)
        self.killed = {c: (r, self.ORDER.index(s)) for c, (r, s) in killed.items()}

    def run_stage(self, job: StageJob) -> list[Reply | None]:
        replies = self.program.run_stage(job)
        now = (job.round, self.ORDER.index(job.stage.rpartition(":")[2]))
        pairs = zip(job.clients, replies, strict=True)
        return [None if self.killed.get(int(c), now) < now else r for c, r in pairs]


def test_secagg_across_hosts_survives_clients_killed_between_its_stages(
    star: Star, procs: Procs, pki: Path, tmp_path: Path
) -> None:
    """SecAgg+ on five hosts, its four stages real exchanges over the network: in round 2
    site-4 is killed after advertising its keys and site-3 after sharing them (before its
    masked input); in round 3 site-2 after its masked input (before unmasking), while site-1
    is held up (``slow_parts:Pause``) so the unmask stage cannot start first. Every round
    completes (the dropped clients' masks are rebuilt from the survivors' shares) and the
    model is, bit for bit, the simulation's in which exactly the masked inputs that arrived
    were summed."""
    store = tmp_path / "runs"

    def secure(seconds: float) -> ExperimentConfig:
        pause = {"name": "slow_parts:Pause", "rounds_of": [0, 3, 0, 2, 0], "seconds": seconds}
        secagg = {"name": "secagg", "max_weight": 20000.0}  # weights: up to 12,000 examples
        parts = {"transforms": [pause, secagg], "aggregator": {"name": "secagg_sum"}}
        return experiment(
            store, rounds=4, federated_clients=0, parts=parts, listen="0.0.0.0:0",
            round_timeout_s=4,
        )  # fmt: skip

    cfg = secure(3.0)
    toml = write(cfg, tmp_path / "exp.toml")
    server = procs.server(toml, store, pki, listen="0.0.0.0:0", prefix=star.exec(star.hub))
    port = server.port()
    clients = [
        procs.client(name, f"{star.hub_address(i)}:{port}", pki, prefix=star.exec(star.spoke(i)))
        for i, name in enumerate(SITES)
    ]
    ns = "transforms.1.secagg"
    for victim, rnd, stage in [(4, 2, f"{ns}:advertise"), (3, 2, f"{ns}:share"), (2, 3, "train")]:
        clients[victim].wait_for(rf"round {rnd}: {stage} done", 120)
        clients[victim].kill()
    assert server.finish() == 0, procs.tails()
    assert [c.finish(30) for c in clients[:2]] == [0] * 2, procs.tails()
    run = stored(store)
    assert run.rounds == [1, 2, 3, 4] and run.status == "finished"
    assert all("aborted" not in m for m in run.history), procs.tails()
    masked = [int(m[f"{ns}/masked"]) for m in run.history]
    unmasked = [int(m[f"{ns}/unmasked"]) for m in run.history]
    assert masked[:2] == [5, 3] and masked[2] in (2, 3) and masked[3] == 2, masked
    assert unmasked == [5, 3, 2, 2], unmasked  # site-2 never unmasked in round 3
    killed = {4: (2, "advertise"), 3: (2, "share"), 2: (3, "train" if masked[2] == 3 else "share")}
    sim = simulate(secure(0.0), lambda p: Killed(p, killed))  # the pause is the identity
    assert [m[f"{ns}/masked"] for m in sim.history] == masked
    assert torch.equal(run.weights, sim.weights)


def test_a_killed_asynchronous_server_resumes_with_nothing_lost(
    procs: Procs, pki: Path, tmp_path: Path
) -> None:
    """FedBuff deployed: the server is killed after a committed step, with clients in
    flight; restarted with the same command it resumes from that step, sends the in-flight
    clients' tasks again from the versions in its checkpoint, and finishes every step."""
    store = tmp_path / "runs"
    async_parts = {"async": {"concurrency": 5, "buffer": 2}}
    cfg = experiment(store, rounds=8, federated_clients=0, parts=async_parts, round_timeout_s=8)
    toml = write(cfg, tmp_path / "exp.toml")
    address = f"127.0.0.1:{free_port()}"
    first = procs.server(toml, store, pki, listen=address)
    first.port()
    clients = [procs.client(name, address, pki, server_name="localhost") for name in SITES]
    committed(first, 2)
    first.kill()
    before = stored(store)
    assert 2 <= len(before.rounds) < 8, "killed too late"
    second = procs.server(toml, store, pki, listen=address)
    second.wait_for(r"resuming run")
    assert second.finish() == 0, procs.tails()
    assert [c.finish(30) for c in clients] == [0] * 5, procs.tails()
    run = stored(store)
    assert run.rounds == list(range(1, 9)) and run.runs == 1 and run.status == "finished"
    assert run.history[: len(before.rounds)] == before.history  # the committed steps kept
    assert all(m["updates"] == 2 for m in run.history)
    assert any(m["staleness_max"] > 0 for m in run.history)
