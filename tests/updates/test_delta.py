"""The delta downlink: each client rebuilds the server's weights bit for bit from the
coordinates that changed since the model it last received, whatever rounds it missed
(hypothesis); a client whose model is not the one the server assumed declines instead of
training on wrong weights, and gets the whole model next time; a run with it equals the run
without it on every engine and after resume, with fewer bytes down where few coordinates
move, from Python, TOML and the CLI; a downlink after it is refused."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from potluck.cli import app
from potluck.config import ExperimentConfig
from potluck.core.message import Message, MessageError
from potluck.core.parts import part_context
from potluck.core.records import TRAIN, StageJob
from potluck.engines.inline import InlineEngine
from potluck.orchestrator import run_experiment
from potluck.store.sqlite import RunStore
from potluck.testing import interrupted_and_resumed, learning
from potluck.updates.delta import DIGEST, DeltaDownlink

NS = "downlink.0.delta"


class Federation:
    """The delta downlink's two halves driven by hand: the server's state and every
    client's cache, one round at a time."""

    def __init__(self, clients: int) -> None:
        self.down, self.clients = DeltaDownlink(), clients
        self.server: dict[str, torch.Tensor] = {}
        self.caches: dict[int, dict[str, torch.Tensor]] = {}

    def round(self, rnd: int, w: torch.Tensor, members: list[int]) -> dict[int, Message]:
        """Send ``w`` to ``members``; each rebuilds it; the messages they got."""
        ctx = part_context(0, rnd, NS, num_clients=self.clients)
        shared, sent, self.server = self.down.encode_members(
            Message({"w": w}), members, self.server, ctx
        )
        assert "w" not in shared.arrays
        for c in members:
            got = part_context(0, rnd, NS, client=c, inbox=sent[c])
            opened, self.caches[c] = self.down.decode_member(shared, self.caches.get(c, {}), got)
            assert torch.equal(opened.arrays["w"].view(torch.uint8), w.view(torch.uint8))
        view = type("Stages", (), {"members": members})()
        self.server = self.down.after_train(view, self.server, ctx)
        return sent


@settings(max_examples=40, deadline=None)
@given(
    d=st.integers(1, 300),
    rounds=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_every_client_rebuilds_the_weights_exactly_whatever_rounds_it_missed(
    d: int, rounds: int, seed: int, dtype: torch.dtype
) -> None:
    g = torch.Generator().manual_seed(seed)
    fed, w = Federation(clients=5), torch.randn(d, generator=g).to(dtype)
    for rnd in range(1, rounds + 1):
        moved = torch.rand(d, generator=g) < 0.1
        w = torch.where(moved, torch.randn(d, generator=g).to(dtype), w)
        w[0] = -w[0] if rnd % 3 == 0 else w[0]  # a sign flip, -0.0 included, is a change
        members = torch.randperm(5, generator=g)[: int(torch.randint(0, 6, (), generator=g))]
        fed.round(rnd, w, sorted(members.tolist()))


def test_only_what_changed_since_a_clients_model_travels_and_a_newcomer_gets_it_whole() -> None:
    fed, w = Federation(clients=3), torch.zeros(10_000)
    first = fed.round(1, w, [0, 1])
    assert sorted(first[0].arrays) == ["w"]
    w = w.clone()
    w[[5, 77]] = 1.0
    fed.round(2, w, [0])  # client 1 misses round 2
    w = w.clone()
    w[9_000] = 2.0
    sent = fed.round(3, w, [0, 1, 2])
    assert sent[0].scalars["count"] == 1 and sent[0].scalars["base"] == 2
    assert sent[1].scalars["count"] == 3 and sent[1].scalars["base"] == 1
    assert sorted(sent[2].arrays) == ["w"]  # a newcomer
    assert sent[1].wire_bytes < 100 < 40_000 < sent[2].wire_bytes
    dense = torch.randn(10_000)  # every coordinate moves: the whole model is smaller
    assert sorted(fed.round(4, dense, [0])[0].arrays) == ["w"]


def test_a_client_whose_model_is_not_the_assumed_one_is_refused_with_the_reason() -> None:
    down, w = DeltaDownlink(), torch.zeros(100)
    fed = Federation(clients=1)
    fed.round(1, w, [0])
    w2 = w.clone()
    w2[3] = 1.0
    ctx = part_context(0, 2, NS, num_clients=1)
    shared, sent, _ = down.encode_members(Message({"w": w2}), [0], fed.server, ctx)

    def opened(cache: dict[str, Any], message: Message | None = None) -> Any:
        got = part_context(0, 2, NS, client=0, inbox=message or sent[0])
        return down.decode_member(shared, cache, got)

    with pytest.raises(MessageError, match="holds no model"):
        opened({})  # a site that lost its model
    stale = {**fed.caches[0], "w": torch.ones(100)}
    with pytest.raises(MessageError, match="do not match the server's SHA-256"):
        opened(stale)
    older = {**fed.caches[0], "round": torch.tensor(0)}
    with pytest.raises(MessageError, match="changes since round 1, but this client holds round 0"):
        opened(older)
    bad = Message({**sent[0].arrays, "values": torch.ones(1, dtype=torch.float64)}, sent[0].scalars)
    with pytest.raises(MessageError, match=r"values must be 1 of torch\.float32"):
        opened(fed.caches[0], bad)
    cut = Message({**sent[0].arrays, "index": torch.ones(1)}, sent[0].scalars)
    with pytest.raises(MessageError, match="index coding: must be a 1-D uint8 array"):
        opened(fed.caches[0], cut)
    with pytest.raises(MessageError, match="carries no 'w/sha256'"):
        down.decode_member(Message(), fed.caches[0], part_context(0, 2, NS, client=0))
    assert DIGEST in shared.scalars


# ---- whole runs ----

BASE: dict[str, Any] = {
    "seed": 0,
    "rounds": 8,
    "data": {"dataset": "digits", "num_clients": 6, "partition": {"kind": "iid"}},
    "model": {"name": "mlp"},
    "sampler": {"clients_per_round": 3},
    "client": {"epochs": 1, "batch_size": 16, "lr": 0.1},
    "run": {"threads": 1},
    # FetchSGD with plain server SGD moves at most 48 of the MLP's 4,810 weights a round
    "transforms": [
        {"name": "fetchsgd", "rows": 5, "cols": 400, "top_k": 0.01, "momentum": 0.0, "lr": 1.0}
    ],
}
DELTA = [{"name": "delta"}]


def config(**extra: Any) -> ExperimentConfig:
    return ExperimentConfig.from_dict({**BASE, **extra})


def test_a_run_with_the_delta_downlink_equals_the_run_without_with_fewer_bytes_down() -> None:
    plain = run_experiment(config().build())
    delta = run_experiment(config(downlink=DELTA).build())
    assert torch.equal(plain.weights, delta.weights)
    downlink = {"bytes_down", "bytes_total", "bytes_per_gain"}  # what the downlink changes
    strip = [{k: v for k, v in m.items() if k not in downlink} for m in learning(plain)]
    assert [{k: v for k, v in m.items() if k not in downlink} for m in learning(delta)] == strip
    dense = 4 * 4810
    first, later = delta.history[0], delta.history[3:]
    assert first["bytes_down"] > 3 * dense  # round 1: everyone gets the whole model
    for m, p in zip(later, plain.history[3:], strict=True):
        assert p["bytes_down"] > 3 * dense
        assert m["bytes_down"] < 0.75 * p["bytes_down"], (m["bytes_down"], p["bytes_down"])


@pytest.mark.parametrize("engine", ["vectorized", "pool"])
def test_every_engine_gives_the_inline_run(engine: str) -> None:
    """The pool bitwise; the vectorized engine within its float32 rounding (as in
    tests/contract/test_engines.py), with the same bytes each way."""
    run = {"threads": 1, "engine": engine, **({"workers": 2} if engine == "pool" else {})}
    other = run_experiment(config(downlink=DELTA, run=run).build())
    inline = run_experiment(config(downlink=DELTA).build())
    if engine == "pool":
        assert learning(other) == learning(inline)
        assert torch.equal(other.weights, inline.weights)
    torch.testing.assert_close(other.weights, inline.weights, atol=1e-5, rtol=1e-5)
    for key in ("bytes_down", "bytes_up", "updates"):
        assert [m[key] for m in other.history] == [m[key] for m in inline.history]


def test_a_resumed_run_equals_the_uninterrupted_one(tmp_path: Path) -> None:
    """The server's per-coordinate rounds and per-client rounds are server state, each
    client's last model client state: a resume rebuilds both."""
    resumed = interrupted_and_resumed(config(downlink=DELTA), tmp_path, after=4)
    full = run_experiment(config(downlink=DELTA).build())
    assert learning(resumed) == learning(full)
    assert torch.equal(resumed.weights, full.weights)


class Forgetful(InlineEngine):
    """Every member of round 3 has lost its last model (a site that restarted)."""

    def run_stage(self, job: StageJob) -> list[Any]:
        if job.stage == TRAIN and job.round == 3:
            states = tuple({ns: s for ns, s in st.items() if ns != NS} for st in job.states)
            job = replace(job, states=states)
        return super().run_stage(job)


def test_members_that_lost_their_model_decline_and_get_it_whole_next_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("WARNING", logger="potluck")
    exp = config(downlink=DELTA, sampler={"clients_per_round": 6}, rounds=5).build()
    result = run_experiment(exp, engine=Forgetful)
    updates = [m["updates"] for m in result.history]
    assert updates == [6, 6, 0, 6, 6]  # round 3: nobody could rebuild the model
    assert caplog.text.count("a delta arrived, but this client holds no model") == 6
    down = [m["bytes_down"] for m in result.history]
    assert down[3] > 6 * 4 * 4810 > 4 * max(down[1], down[4])  # round 4: whole models


def test_after_a_cast_it_sends_the_changed_bfloat16_values_and_nothing_may_follow_it() -> None:
    cast = run_experiment(config(downlink=[{"name": "cast"}]).build())
    both = run_experiment(config(downlink=[{"name": "cast"}, *DELTA]).build())
    assert torch.equal(cast.weights, both.weights)
    assert both.history[-1]["bytes_down"] < cast.history[-1]["bytes_down"]
    with pytest.raises(ValueError, match=r"delta.*needs to be the last downlink transform"):
        config(downlink=[*DELTA, {"name": "cast"}]).build()


def test_the_cli_runs_it_from_toml(tmp_path: Path) -> None:
    toml = tmp_path / "d.toml"
    toml.write_text(
        "rounds = 3\n"
        '[data]\ndataset = "digits"\nnum_clients = 4\n'
        '[model]\nname = "mlp"\n'
        "[sampler]\nclients_per_round = 4\n"
        '[[transforms]]\nname = "top_k"\nfraction = 0.01\n'
        '[[downlink]]\nname = "delta"\n'
    )
    out = CliRunner().invoke(app, ["run", str(toml), "--store", str(tmp_path / "runs")])
    assert out.exit_code == 0, out.output
    store = RunStore(tmp_path / "runs")
    (info,) = store.list_runs()
    down = [r.metrics["bytes_down"] for r in store.rounds(info.run_id)]
    assert down[0] > 4 * 4 * 4810 and all(0 < b < down[0] for b in down[1:]), down
