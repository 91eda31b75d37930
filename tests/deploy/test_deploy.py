"""A deployment on loopback, in this process: a gRPC server (mutual TLS) and five sites.

The deployed run equals the simulation of the same experiment; a client that never answers
hits the deadline; malformed, replayed, impersonating and poisoned messages, and replies
that do not fit the run (unexpected arrays, state for a part the run does not have, records
of another form, answers of another kind), are refused with a logged reason while the run
goes on, as are a certified member's forged evaluation sums and client state; the only update
of a round, with no weight, leaves the model where it was; bad certificates are refused at the
handshake. A server whose round loop fails tells its sites it stopped, not that the run is
done: they keep reconnecting, and finish the run on a restarted server.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import torch
from conftest import PKI, SITES, Deployment, config, self_signed
from server_faults import ServerFault

from potluck.client.program import ClientProgram
from potluck.config import ExperimentConfig
from potluck.core import records
from potluck.core.message import Message
from potluck.core.records import Reply, StageJob
from potluck.deploy import wire
from potluck.deploy.client import ClientTLS
from potluck.deploy.server import MAX_SENDS
from potluck.deployment import rounds_done, site_program
from potluck.engines.inline import InlineEngine
from potluck.orchestrator import REMOTE_METRICS, TIMING_METRICS, RunResult, run_experiment
from potluck.store.sqlite import RunStore

Make = Callable[..., Deployment]
NOT_LEARNING = TIMING_METRICS | REMOTE_METRICS
# what a rogue's refused uploads add to: the bytes it sent count, though nothing was used
UPLOADED = {"bytes_up", "bytes_total", "bytes_per_gain"}


def learning(result: RunResult) -> list[dict[str, float]]:
    return [{k: v for k, v in m.items() if k not in NOT_LEARNING} for m in result.history]


class Without(InlineEngine):
    """The simulation in which some clients never report."""

    remote = True

    def __init__(self, program, missing: set[int]) -> None:  # type: ignore[no-untyped-def]
        super().__init__(program)
        self.missing = missing

    def run_stage(self, job: StageJob) -> list[Reply | None]:
        replies = self.program.run_stage(job)
        pairs = zip(job.clients, replies, strict=True)
        return [None if int(c) in self.missing else r for c, r in pairs]


def simulate(store: Path, missing: set[int] = frozenset(), **deploy: object) -> RunResult:  # type: ignore[assignment]
    exp = config(store, **deploy).build()
    return run_experiment(exp, engine=lambda p: Without(p, set(missing)))


def stub(port: int, tls: ClientTLS | None) -> Callable[..., Iterator[bytes]]:
    target = f"127.0.0.1:{port}"
    if tls is None:
        return wire.caller(grpc.insecure_channel(target))
    options = [("grpc.ssl_target_name_override", "localhost")]
    channel = grpc.secure_channel(target, tls.credentials(), options=options)
    return wire.caller(channel)


def call(s: Callable[..., Iterator[bytes]], env: wire.Envelope) -> wire.Envelope:
    return wire.receive(s(wire.send(env), timeout=30))


def health(store: Path) -> dict[str, dict[str, object]]:
    with RunStore(store) as st:
        return {h["name"]: h for h in st.health(st.resolve("deployed"))}


def answer(task: wire.Envelope, reply: Reply, kind: str = "reply") -> wire.Envelope:
    """``reply`` to ``task`` from site-4, packed as a deployed client packs it."""
    message = records.reply_to_message(reply)
    return wire.Envelope(
        kind, task.run_id, task.round, task.task_id, "site-4",
        arrays=message.arrays, scalars=message.scalars,
    )  # fmt: skip


def upload(
    delta: torch.Tensor, delta_c: torch.Tensor | None = None, **arrays: torch.Tensor
) -> Message:
    """A SCAFFOLD upload (the run's algorithm) with every scalar the round loop checks."""
    scaffold = {"terms.0.scaffold/delta_c": torch.zeros_like(delta) if delta_c is None else delta_c}
    scalars = {"num_examples": 10, "num_steps": 1, "weight": 10.0, "train_loss": 1.0}
    return Message({"delta": delta, **scaffold, **arrays}, scalars)


def test_deployment_over_mutual_tls_equals_the_simulation(
    deployment: Make, pki: PKI, tmp_path: Path
) -> None:
    dep = deployment(pki.server())
    for name in SITES:
        dep.site(name, pki.client(name))
    result = dep.finish()
    sim = simulate(tmp_path / "sim")
    assert learning(result) == learning(sim)
    assert torch.equal(result.weights, sim.weights)  # the same code on the same bits
    assert all(m["failed"] == 0 and m["refused"] == 0 for m in result.history)
    rows = health(tmp_path / "runs")
    assert sorted(rows) == SITES
    for name, row in rows.items():
        assert row["client"] == SITES.index(name)
        assert row["failures"] == 0 and row["bytes_sent"] > 0 and row["last_seen"]
    assert sum(r["rounds_completed"] for r in rows.values()) == 3 * 4  # type: ignore[misc]


def test_a_client_that_never_answers_hits_the_deadline(
    deployment: Make, pki: PKI, tmp_path: Path
) -> None:
    dep = deployment(pki.server(), round_timeout_s=1.5)
    for name in SITES[:4]:
        dep.site(name, pki.client(name))
    silent = stub(dep.port, pki.client("site-4"))
    welcome = call(silent, wire.Envelope("join", client="site-4"))
    assert welcome.kind == "welcome" and welcome.scalars["client_id"] == 4
    taken: dict[bytes, int] = {}
    while True:  # take every task, answer none
        reply = call(silent, wire.Envelope("poll", welcome.run_id, client="site-4"))
        if reply.kind == "done":
            break
        if reply.kind == "task":
            taken[reply.task_id] = taken.get(reply.task_id, 0) + 1
    result = dep.finish()
    assert taken and max(taken.values()) == MAX_SENDS  # sent again, as if lost, then no more
    assert set(taken.values()) <= set(range(1, MAX_SENDS + 1))  # (a deadline may come first)
    sim = simulate(tmp_path / "sim", missing={4}, round_timeout_s=1.5)
    assert torch.equal(result.weights, sim.weights)
    assert [m["failed"] for m in result.history] == [m["failed"] for m in sim.history]
    assert sum(m["failed"] for m in result.history) > 0
    row = health(tmp_path / "runs")["site-4"]
    assert row["failures"] == len(taken) and "missed the deadline" in str(row["last_error"])


def test_bad_messages_are_refused_and_leave_the_model_untouched(
    deployment: Make, pki: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="potluck")
    dep = deployment(pki.server(), round_timeout_s=3)
    for name in SITES[:4]:
        dep.site(name, pki.client(name))
    rogue = stub(dep.port, pki.client("site-4"))
    run_id = call(rogue, wire.Envelope("join", client="site-4")).run_id
    replies, previous, stages = [], None, set()
    while (task := call(rogue, wire.Envelope("poll", run_id, client="site-4"))).kind != "done":
        if task.kind != "task":
            continue
        garbage = wire.Chunk(total=10, offset=0, data=b"0123456789", sha256=b"x" * 32)
        replies.append(wire.receive(rogue(iter([wire.frame(garbage)]), timeout=30)))
        if previous is not None:  # replay the answer to an earlier task
            replies.append(call(rogue, previous))
        stages.add(task.scalars["stage"])
        w = task.arrays["b/w"]
        if task.scalars["stage"] == "evaluate":
            sums = {"global/loss_sum": 1.0, "global/correct": 99, "global/n": 3}
            forged = answer(task, Reply(Message(scalars=sums)))
        elif task.round % 2:
            forged = answer(task, Reply(upload(torch.full_like(w, float("nan")))))
        else:
            forged = answer(task, Reply(upload(torch.zeros(len(w) - 1), torch.zeros_like(w))))
        impostor = wire.Envelope(forged.kind, run_id, task.round, task.task_id, "site-0")
        replies.append(call(rogue, impostor))
        replies.append(call(rogue, forged))
        previous = forged
    result = dep.finish()
    reasons = [r.scalars.get("reason", "") for r in replies if r.kind == "refused"]
    assert any("malformed message" in str(r) for r in reasons)
    assert any("already answered" in str(r) for r in reasons)
    assert any("claims to be 'site-0'" in str(r) for r in reasons)
    log = caplog.text
    assert "malformed message" in log and "claims to be" in log
    assert "contains NaN or Inf" in log and "expected (" in log
    assert stages == {"train", "evaluate"} and "refused evaluation" in log
    # the rogue's updates and evaluations left no trace: as if it had never answered
    sim = simulate(tmp_path / "sim", missing={4}, round_timeout_s=3)
    assert torch.equal(result.weights, sim.weights)
    received = [{k: v for k, v in m.items() if k not in UPLOADED} for m in learning(result)]
    assert received == [{k: v for k, v in m.items() if k not in UPLOADED} for m in learning(sim)]
    sampled = [m["cohort_size"] - m["updates"] for m in result.history]
    assert sum(m["refused"] for m in result.history) == sum(sampled) > 0


def test_replies_that_do_not_fit_the_run_are_refused(
    deployment: Make, pki: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="potluck")
    dep = deployment(pki.server(), round_timeout_s=3)
    for name in SITES[:4]:
        dep.site(name, pki.client(name))
    rogue = stub(dep.port, pki.client("site-4"))
    run_id = call(rogue, wire.Envelope("join", client="site-4")).run_id
    replies, trained, tasks = [], [], 0
    while (task := call(rogue, wire.Envelope("poll", run_id, client="site-4"))).kind != "done":
        if task.kind != "task":
            continue
        tasks += 1
        w = task.arrays["b/w"]
        good = upload(torch.zeros_like(w))
        # an answer of revision 1's kinds and names: refused, the task stays open
        legacy = {"m/delta": torch.zeros_like(w)}
        old = wire.Envelope(
            "evaluation" if task.scalars["stage"] == "evaluate" else "update", run_id,
            task.round, task.task_id, "site-4", arrays=legacy, scalars={"num_examples": 10},
        )  # fmt: skip
        replies.append(call(rogue, old))
        if task.scalars["stage"] == "evaluate":
            replies.append(call(rogue, wire.Envelope(
                "declined", run_id, task.round, task.task_id, "site-4"
            )))  # fmt: skip
            continue
        trained.append(task.round)
        if len(trained) == 1:  # an array the algorithm does not upload
            extra = Message({**good.arrays, "extra": torch.zeros_like(w)}, good.scalars)
            forged = answer(task, Reply(extra))
        elif len(trained) == 2:  # client state for a part this run does not have
            foreign = {"terms.1.fedprox": {"w_prev": torch.zeros_like(w)}}
            forged = answer(task, Reply(good, foreign))
        else:  # the update under revision 1's names, in a reply
            forged = wire.Envelope(
                "reply", run_id, task.round, task.task_id, "site-4", arrays=legacy,
                scalars=dict(good.scalars),
            )  # fmt: skip
        replies.append(call(rogue, forged))
    result = dep.finish()
    assert trained == [1, 2, 3]  # site-4 is in every round's cohort: each forgery was sent
    kinds = [r.kind for r in replies]
    assert kinds.count("refused") == kinds.count("ack") == tasks > len(trained)
    reasons = [str(r.scalars.get("reason", "")) for r in replies if r.kind == "refused"]
    assert all("unknown request kind" in r for r in reasons), reasons
    assert {"unknown request kind 'update'", "unknown request kind 'evaluation'"} <= set(reasons)
    log = caplog.text
    assert "update from client 4: unexpected arrays ['extra']" in log
    assert "client 4 sent state for 'terms.1.fedprox'" in log
    assert "refused the answer of client 'site-4'" in log and "'m/delta'" in log
    # none of it left a trace: as if site-4 had never answered
    sim = simulate(tmp_path / "sim", missing={4}, round_timeout_s=3)
    assert torch.equal(result.weights, sim.weights)
    received = [{k: v for k, v in m.items() if k not in UPLOADED} for m in learning(result)]
    assert received == [{k: v for k, v in m.items() if k not in UPLOADED} for m in learning(sim)]
    assert result.history[0]["refused"] == 1  # a bad update (the unexpected array)
    left_out = [m["failed"] + m["refused"] for m in result.history]
    assert left_out == [m["failed"] for m in sim.history] == [1, 1, 1]


def _self_signed(tmp: Path, name: str) -> ClientTLS:
    pem, key = self_signed(name)
    (tmp / "self.pem").write_bytes(pem)
    (tmp / "self.key").write_bytes(key)
    return ClientTLS(tmp / "self.pem", tmp / "self.key", Path())


def test_only_admitted_clients_with_valid_certificates_get_in(
    deployment: Make, pki: PKI, tmp_path: Path
) -> None:
    dep = deployment(pki.server(), pki.ca_dir / "revoked.txt")
    ca = pki.ca_dir / "ca.pem"
    join = wire.Envelope("join")
    plain_tls = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    no_cert = wire.caller(
        grpc.secure_channel(
            f"127.0.0.1:{dep.port}", plain_tls, [("grpc.ssl_target_name_override", "localhost")]
        )
    )
    self_signed = _self_signed(tmp_path, "site-0")
    refused_at_handshake = {
        "no certificate": no_cert,
        "self-signed": stub(dep.port, ClientTLS(self_signed.cert, self_signed.key, ca)),
        "another CA": stub(dep.port, pki.client("site-0", pki.other_dir)),
        "expired": stub(dep.port, pki.client("expired")),
        "plaintext": stub(dep.port, None),
    }
    for what, s in refused_at_handshake.items():
        with pytest.raises(grpc.RpcError) as err:
            call(s, join)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, what
    for name, reason in (("revoked-site", "is revoked"), ("intruder", "admission list")):
        reply = call(stub(dep.port, pki.client(name)), join)
        assert reply.kind == "refused" and reason in str(reply.scalars["reason"]), name
    for name in SITES:  # the server kept going: the run completes with the real sites
        dep.site(name, pki.client(name))
    assert len(dep.finish().history) == 3
    assert sorted(health(tmp_path / "runs")) == SITES


def test_oversized_messages_are_refused(
    deployment: Make, pki: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="potluck")
    dep = deployment(pki.server(), max_message_mb=0.01, round_timeout_s=2)  # 10 KB < a model
    for name in SITES:
        dep.site(name, pki.client(name))
    result = dep.finish()
    assert all(m["updates"] == 0 for m in result.history)
    assert torch.equal(result.weights, simulate(tmp_path / "sim", missing=set(range(5))).weights)
    for name, row in health(tmp_path / "runs").items():
        assert f"refused message from {name}" in caplog.text
        assert row["failures"] > 0 and row["bytes_received"] == 0


def test_show_prints_client_health(deployment: Make, pki: PKI, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from potluck.cli import app

    dep = deployment(pki.server())
    for name in SITES:
        dep.site(name, pki.client(name))
    dep.finish()
    out = CliRunner().invoke(app, ["show", "deployed", "--store", str(tmp_path / "runs")])
    assert out.exit_code == 0, out.output
    assert "clients (deployment)" in out.output and "site-4" in out.output
    js = CliRunner().invoke(app, ["show", "deployed", "--store", str(tmp_path / "runs"), "--json"])
    assert [h["name"] for h in json.loads(js.output)["client_health"]] == SITES


def test_rounds_done_is_what_a_restarted_server_resumes_from(tmp_path: Path) -> None:
    cfg = config(tmp_path / "store")
    assert rounds_done(cfg) == 0  # no store yet

    class Stop(Exception):
        pass

    def stop_after_two(rnd: int, _metrics: object) -> None:
        if rnd == 2:
            raise Stop

    with RunStore(cfg.run.store) as store, pytest.raises(Stop):
        run_experiment(cfg.build(), store, on_round=stop_after_two)
    assert rounds_done(cfg) == 2
    other = cfg.run.model_copy(update={"name": "another-run"})
    assert rounds_done(cfg.model_copy(update={"run": other})) == 0


def test_a_site_builds_the_task_the_config_names() -> None:
    """A config naming the user's model by import path (as a Python experiment's stored
    config does) gives every site that model, over the site's own data."""
    import numpy as np
    from my_lab.task import TumourNet

    from potluck.config import ExperimentConfig
    from potluck.deployment import site_program

    cfg = ExperimentConfig.from_dict(
        {
            "data": {"dataset": "digits", "num_clients": 3},
            "task": {"model": "my_lab.task:TumourNet"},
            "sampler": {"clients_per_round": 2},
        }
    )
    x = np.random.default_rng(0).normal(size=(12, 30)).astype(np.float32)
    program = site_program(cfg, 1, data=(x, np.arange(12) % 2))
    assert isinstance(program.model, TumourNet)
    assert program.federation.num_examples(1) == 10  # 12 less the 20 % local test split


# ---- a member of the federation forging what the round loop checks (issue 13, finding 1) ----


def honest_answer(program: ClientProgram, task: wire.Envelope) -> tuple[Reply, Message]:
    """What an honest site-4 answers ``task`` with: the reply and its packed message."""
    stage = str(task.scalars["stage"])
    reply = program.run_stage(records.job_from_task(stage, task.round, 4, task.message()))[0]
    assert reply is not None
    return reply, records.reply_to_message(reply)


def forging_member(
    dep: Deployment, pki: PKI, forge: Callable[[wire.Envelope, Reply, Message], Message]
) -> tuple[list[wire.Envelope], list[wire.Envelope]]:
    """site-4, certified, answers every task with ``forge(task, honest reply, its message)``
    until the server says it is done (or stopped); the tasks it got and the server's answers
    to its forgeries."""
    member = stub(dep.port, pki.client("site-4"))
    welcome = call(member, wire.Envelope("join", client="site-4"))
    assert welcome.kind == "welcome", welcome
    program = site_program(json.loads(str(welcome.scalars["config"])), 4)
    tasks, acks = [], []
    while True:
        task = call(member, wire.Envelope("poll", welcome.run_id, client="site-4"))
        if task.kind == "wait":
            continue
        if task.kind != "task":
            break
        tasks.append(task)
        reply, message = honest_answer(program, task)
        forged = forge(task, reply, message)
        acks.append(call(member, wire.Envelope(
            "reply", task.run_id, task.round, task.task_id, "site-4",
            arrays=forged.arrays, scalars=forged.scalars,
        )))  # fmt: skip
    assert task.kind in ("done", "stopped"), task
    return tasks, acks


def int64_state(ns: str, state: dict[str, torch.Tensor], rnd: int) -> dict[str, torch.Tensor]:
    """Int64 client state under the run's namespace ``ns``: an extra array (odd rounds), or
    the real arrays cast to int64 (even rounds)."""
    if rnd % 2:
        return {f"0/s/{ns}/x": torch.zeros(3, dtype=torch.int64)}
    return {f"0/s/{ns}/{name}": t.to(torch.int64) for name, t in state.items()}


def test_a_member_forging_evaluation_sums_or_nameless_state_is_refused(
    deployment: Make, pki: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A certified site-4 sends, through the real mTLS path, evaluations whose
    ``global/correct`` is ``inf`` (a float) and honest updates plus an int64 state array
    ``0/s/x`` (no part namespace). Each is refused with a log line naming the client, the
    server stays up, and the run is the one in which site-4 sent nothing."""
    caplog.set_level(logging.WARNING, logger="potluck")
    dep = deployment(pki.server(), round_timeout_s=5)
    for name in SITES[:4]:
        dep.site(name, pki.client(name))
    trained, evaluated = [], []

    def forge(task: wire.Envelope, reply: Reply, message: Message) -> Message:
        arrays, scalars = dict(message.arrays), dict(message.scalars)
        if task.scalars["stage"] == "evaluate":
            evaluated.append(task.round)
            scalars["global/correct"] = float("inf")
        else:
            trained.append(task.round)
            arrays["0/s/x"] = torch.zeros(3, dtype=torch.int64)
        return Message(arrays, scalars)

    tasks, acks = forging_member(dep, pki, forge)
    result = dep.finish()
    assert trained == [1, 2, 3] and evaluated  # site-4 is in every round's cohort
    assert [a.kind for a in acks] == ["ack"] * len(tasks)  # taken in, then refused by the loop
    lines = caplog.text.splitlines()
    refused_sums = "refused evaluation from client 4: missing or non-numeric global sums"
    nameless = "refused the answer of client 'site-4': state name '0/s/x' is not"
    assert sum(refused_sums in line for line in lines) == len(evaluated)
    assert sum(nameless in line for line in lines) == len(trained)
    sim = simulate(tmp_path / "sim", missing={4}, round_timeout_s=5)
    assert torch.equal(result.weights, sim.weights)
    received = [{k: v for k, v in m.items() if k not in UPLOADED} for m in learning(result)]
    assert received == [{k: v for k, v in m.items() if k not in UPLOADED} for m in learning(sim)]
    assert [(m["refused"], m["failed"]) for m in result.history] == [(1, 0)] * 3
    assert [m["failed"] for m in sim.history] == [1, 1, 1]


def test_a_member_sending_int64_state_under_a_real_namespace_is_refused(
    deployment: Make, pki: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A certified site-4 sends honest updates plus int64 SCAFFOLD state (an extra array,
    or its ``c_i`` cast to int64): refused naming the client, as if it had sent nothing."""
    caplog.set_level(logging.WARNING, logger="potluck")
    dep = deployment(pki.server(), round_timeout_s=5)
    for name in SITES[:4]:
        dep.site(name, pki.client(name))
    trained = []

    def forge(task: wire.Envelope, reply: Reply, message: Message) -> Message:
        if task.scalars["stage"] == "evaluate":
            return message  # honest
        trained.append(task.round)
        (ns,) = reply.state  # SCAFFOLD's c_i
        return Message({**message.arrays, **int64_state(ns, reply.state[ns], task.round)},
                       dict(message.scalars))  # fmt: skip

    forging_member(dep, pki, forge)
    result = dep.finish()
    assert trained == [1, 2, 3]
    refusals = [line for line in caplog.text.splitlines() if "refused" in line]
    assert len(refusals) == 3 and all("client 4" in line for line in refusals), refusals
    sim = simulate(tmp_path / "sim", missing={4}, round_timeout_s=5)
    assert torch.equal(result.weights, sim.weights)


def test_the_only_update_of_a_round_with_no_weight_does_not_move_the_model(
    deployment: Make, pki: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """site-4, the only member connected, sends its honest update with ``num_examples = 0``
    and ``weight = 0``: the server stays up, logs that the model is not moved, and the run
    finishes with the initial model."""
    caplog.set_level(logging.WARNING, logger="potluck")
    dep = deployment(pki.server(), min_clients=1, round_timeout_s=5)

    def forge(task: wire.Envelope, reply: Reply, message: Message) -> Message:
        if task.scalars["stage"] != "train":
            return message
        return Message(dict(message.arrays), {**message.scalars, "num_examples": 0, "weight": 0.0})

    tasks, acks = forging_member(dep, pki, forge)
    result = dep.finish()
    rounds = sorted({t.round for t in tasks if t.scalars["stage"] == "train"})
    assert rounds and all(a.kind == "ack" for a in acks)
    for rnd in rounds:  # the only update of the round, accepted with no weight
        assert result.history[rnd - 1]["updates"] == 1
        assert (
            f"round {rnd}: 1 updates with total weight 0 (need at least 1, with a positive "
            "weight); the model is not moved"
        ) in caplog.text
    assert len(result.history) == 3
    unmoved = simulate(tmp_path / "sim", missing=set(range(5))).weights
    assert torch.equal(result.weights, unmoved)  # the initial model


# ---- a server that fails stops its sites; they come back to a restarted one (finding 2) ----


def failing(cfg: ExperimentConfig, fail_round: int, **deploy: object) -> ExperimentConfig:
    """``cfg`` with its weighted mean replaced by one that raises on the server in round
    ``fail_round``; 0 (never) is the fixed config, which computes what ``cfg`` does."""
    d = cfg.to_dict()
    d["aggregator"] = {"name": "server_faults:FailingMean", "fail_round": fail_round}
    d["deploy"] = {**d["deploy"], **deploy}
    return ExperimentConfig.from_dict(d)


def said_by(caplog: pytest.LogCaptureFixture, thread: str, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records if r.threadName == thread)


def test_sites_of_a_failed_server_keep_reconnecting_and_finish_on_its_restart(
    deployment: Make, pki: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="potluck")
    store = tmp_path / "runs"
    first = deployment(pki.server(), cfg=failing(config(store), fail_round=1))
    for name in SITES:
        first.site(name, pki.client(name))
    first.threads[0].join(60)
    assert isinstance(first.error, ServerFault), first.error  # its round loop raised
    assert "stopping run" in caplog.text and "the server failed (ServerFault)" in caplog.text
    with RunStore(store) as st:
        assert st.get_run(st.resolve("deployed")).status == "failed"
    # the server is gone; no site ended (none was told "done"), each heard why and retries
    assert first.codes == {} and all(t.is_alive() for t in first.threads[1:])
    stopped = re.compile(r"the server stopped run \w+ \(the server failed \(ServerFault\)\); rec")
    for name in SITES:
        assert any(
            stopped.search(r.getMessage()) for r in caplog.records if r.threadName == name
        ), name
        assert not said_by(caplog, name, "the server finished run")
    fixed = failing(config(store, listen=f"127.0.0.1:{first.port}"), fail_round=0)
    second = deployment(pki.server(), cfg=fixed)  # the same address, the config fixed
    result = second.finish()
    for t in first.threads[1:]:
        t.join(30)
    assert first.codes == {name: 0 for name in SITES}  # the same sites finished the run
    assert "resuming run" in caplog.text
    with RunStore(store) as st:
        runs = [r for r in st.list_runs() if r.name == "deployed"]
        assert [r.status for r in runs] == ["finished"]
    sim = run_experiment(fixed.build(), engine=lambda p: Without(p, set()))
    assert learning(result) == learning(sim)
    assert torch.equal(result.weights, sim.weights)


def test_a_site_of_a_failed_server_gives_up_only_after_max_failures_in_a_row(
    deployment: Make, pki: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="potluck")
    dep = deployment(pki.server(), cfg=failing(config(tmp_path / "runs"), fail_round=1))
    for name in SITES:
        dep.site(name, pki.client(name), max_failures=4)
    dep.threads[0].join(60)
    assert isinstance(dep.error, ServerFault)
    for t in dep.threads[1:]:
        t.join(30)
    assert dep.codes == {name: 1 for name in SITES}  # never 0: the run did not finish
    for name in SITES:
        assert said_by(caplog, name, "the server stopped run")
        assert said_by(caplog, name, "giving up after 4 failed attempts")
        assert not said_by(caplog, name, "the server finished run")


def test_int64_personal_state_from_a_member_does_not_crash_the_server(
    deployment: Make, pki: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """site-4 sends FedPer's head cast to int64: refused as the part keeps a float32 head,
    so the server's personal models at the end of the run never see it."""
    caplog.set_level(logging.WARNING, logger="potluck")
    d = config(tmp_path / "runs", round_timeout_s=5).to_dict()
    d.update(rounds=1, algorithm={"name": "fedavg"}, terms=[{"name": "fedper"}])
    dep = deployment(pki.server(), cfg=ExperimentConfig.from_dict(d))
    for name in SITES[:4]:
        dep.site(name, pki.client(name))

    def forge(task: wire.Envelope, reply: Reply, message: Message) -> Message:
        if task.scalars["stage"] == "evaluate" or not reply.state:
            return message
        (ns,) = reply.state  # FedPer's head
        return Message({**message.arrays, **int64_state(ns, reply.state[ns], 2)},
                       dict(message.scalars))  # fmt: skip

    forging_member(dep, pki, forge)
    result = dep.finish()  # the server stays up and the run finishes
    assert "client 4: state terms.0.fedper/head is torch.int64, the part keeps float32" in (
        caplog.text
    )
    assert 4 not in result.personal and len(result.personal) >= 1


def test_a_member_scaling_its_update_is_refused_and_its_claimed_weight_capped(
    deployment: Make, pki: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the real mTLS path, site-4 sends its update scaled 1,000 times (round 1), then
    honest updates claiming a weight of 1e9 (rounds 2 and 3). With no fixed bound set, the
    round's own scale refuses the first (logged, as if it had sent nothing) and caps the
    others at 10 times the round's median weight, which the store records."""
    caplog.set_level(logging.WARNING, logger="potluck")
    dep = deployment(pki.server(), round_timeout_s=5)
    for name in SITES[:4]:
        dep.site(name, pki.client(name))

    def forge(task: wire.Envelope, reply: Reply, message: Message) -> Message:
        arrays, scalars = dict(message.arrays), dict(message.scalars)
        if task.scalars["stage"] == "train" and task.round == 1:
            arrays["0/m/delta"] = arrays["0/m/delta"] * 1000
        elif task.scalars["stage"] == "train":
            scalars["weight"] = 1e9
        return Message(arrays, scalars)

    forging_member(dep, pki, forge)
    result = dep.finish()
    assert [(m["refused"], m["capped"]) for m in result.history] == [(1, 0), (0, 1), (0, 1)]
    assert "refused update from client 4 in round 1: 'delta' has L2 norm" in caplog.text
    with RunStore(tmp_path / "runs") as st:
        run_id = st.resolve("deployed")
        for rnd in (2, 3):
            trained = {c: m for _, c, m in st.client_metrics(run_id, rnd) if "num_examples" in m}
            assert trained[4]["claimed_weight"] == 1e9
            honest = [m.get("weight", m["num_examples"]) for c, m in trained.items() if c != 4]
            claims = sorted([*honest, 1e9])
            assert trained[4]["weight"] == 10 * claims[(len(claims) - 1) // 2]


def test_only_a_plaintext_server_requires_the_payload_checksum(
    deployment: Make, pki: PKI, tmp_path: Path
) -> None:
    """Over mutual TLS the records are authenticated, so a message without its SHA-256 is
    taken (the sites send none); a plaintext server refuses one, and takes it with one."""
    join = wire.Envelope("join", client=SITES[0])
    secure = deployment(pki.server())
    got = wire.receive(stub(secure.port, pki.client(SITES[0]))(wire.send(join, checksum=False),
                                                               timeout=30))  # fmt: skip
    assert got.kind == "welcome"
    plain = deployment(None, cfg=config(tmp_path / "plain", listen="127.0.0.1:0"))
    welcomed = call(stub(plain.port, None), replace(join, client=SITES[1]))
    assert welcomed.kind == "welcome"
    s = stub(plain.port, None)
    bare = wire.receive(s(wire.send(replace(join, client=SITES[2]), checksum=False), timeout=30))
    assert bare.kind == "refused" and "no sha256 checksum" in str(bare.scalars["reason"])
