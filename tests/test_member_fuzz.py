"""A bounded fuzz of what one certified member sends (issue 13): whatever it answers, the
server neither stops nor moves the model away from the run in which it sent nothing.

The member's honest answers (SCAFFOLD: an update, a control-variate delta, its new state;
then its evaluation sums) are packed as a deployed client packs them, corrupted as
hypothesis draws (values made NaN, Inf or huge, dtypes and shapes changed, arrays and
scalars added, dropped or replaced, weights and example counts forged, evaluation sums
made impossible; or the chunk stream damaged), and go through the server's own path:
``wire.receive`` under the size limit its task allows, the reply record, then the round
loop's checks of an untrusted engine. A member's own state is sent back only to it, so of
its contents the server checks what it stores (names, dtypes, shapes, finiteness), not its
values: a member may bias its own later updates, which are checked in turn.
Each corruption is one the server must refuse, so the
run must end with the weights of the run without that member's answers, and every answer
of it must be counted ``refused`` (or never decoded). ``FUZZ_EXAMPLES`` raises the bound
(the ``slow`` test runs 300).
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from potluck.client.program import ClientProgram
from potluck.config import ExperimentConfig
from potluck.core import records
from potluck.core.records import Reply, StageJob
from potluck.deploy import server, wire
from potluck.engines.inline import InlineEngine
from potluck.orchestrator import RunResult, run_experiment

MEMBER = 1
CONFIG = {
    "rounds": 2,
    "data": {"dataset": "digits", "num_clients": 3, "partition": {"kind": "iid"}},
    "model": {"name": "logreg"},
    "sampler": {"clients_per_round": 3},
    "client": {"epochs": 1, "batch_size": 32, "lr": 0.1},
    "algorithm": {"name": "scaffold"},
    "evaluation": {"federated_clients": 3},
    "run": {"threads": 1, "store": "none"},
    "deploy": {"max_update_norm": 1e3, "max_weight": 1e4},
}
Corrupt = Callable[[wire.Envelope], wire.Envelope | list[bytes]]


class Member(InlineEngine):
    """The inline engine; client ``MEMBER``'s answers go through ``answer`` (None: silent)."""

    remote = True

    def __init__(self, program: ClientProgram, answer: Corrupt | None) -> None:
        super().__init__(program)
        self.answer, self.sent = answer, 0

    def run_stage(self, job: StageJob) -> list[Reply | None]:
        replies = self.program.run_stage(job)
        out: list[Reply | None] = []
        for cid, reply in zip(job.clients, replies, strict=True):
            if int(cid) != MEMBER or reply is None:
                out.append(reply)
            elif self.answer is not None:
                out.append(self._through_the_server(job, reply, self.answer))
            else:
                out.append(None)
        return out

    def _through_the_server(self, job: StageJob, reply: Reply, corrupt: Corrupt) -> Reply | None:
        message = records.reply_to_message(reply)
        env = wire.Envelope(
            "reply", "run-1", job.round, bytes(16), "site-1",
            arrays=message.arrays, scalars=message.scalars,
        )  # fmt: skip
        forged = corrupt(env)
        frames = forged if isinstance(forged, list) else list(wire.send(forged, 4096))
        self.sent += 1
        k = [int(c) for c in job.clients].index(MEMBER)
        task = records.task_message(job, k)
        limit = 4 * sum(a.numel() * a.element_size() for m in task for a in m.arrays.values())
        try:  # what Coordinator._serve does, under the limit its task allows
            received = wire.receive(frames, limit + server.REPLY_SLACK_BYTES)
        except wire.WireError:
            return None  # refused on the wire
        return server._reply(received)


@cache
def silent_run() -> RunResult:
    experiment = ExperimentConfig.from_dict(CONFIG).build()
    return run_experiment(experiment, engine=lambda p: Member(p, None))


# ---- corruptions: each one the server must refuse ------------------------------------------

ARRAYS = ["0/m/delta", "0/m/terms.0.scaffold/delta_c", "0/s/terms.0.scaffold/c_i"]
BAD = [float("nan"), float("inf"), float("-inf")]


@dataclass(frozen=True)
class Values:
    """An array's element made NaN or Inf (train answers), or the delta made huge."""

    name: str
    index: int
    value: float

    def __call__(self, env: wire.Envelope) -> wire.Envelope:
        if self.name not in env.arrays:  # an evaluation answer (or one already stripped)
            if "global/n" in env.scalars:
                return EvalSums("global/correct", float("inf"))(env)
            return _with(env, scalars={**env.scalars, "num_steps": -1})
        a = env.arrays[self.name].clone()
        own = "/s/" in self.name and math.isfinite(self.value)  # its own business: see above
        a[self.index % a.numel()] = math.nan if own else self.value
        return _with(env, arrays={**env.arrays, self.name: a})


@dataclass(frozen=True)
class Retyped:
    """An array in another dtype, or another shape (cut, grown or reshaped)."""

    name: str
    dtype: str | None
    shape: str

    def __call__(self, env: wire.Envelope) -> wire.Envelope:
        if self.name not in env.arrays:
            return Extra("global/correct2", "float32")(env)
        a, dtype = env.arrays[self.name], self.dtype
        if dtype is not None and dtype != "float32":
            a = a.to(getattr(torch, dtype))
        elif self.shape == "cut":
            a = a[:-1]
        elif self.shape == "grown":
            a = torch.cat([a, a[:1]])
        else:
            a = a.reshape(2, -1)
        return _with(env, arrays={**env.arrays, self.name: a})


@dataclass(frozen=True)
class Extra:
    """An array the run has no use for, under a real or an invented name."""

    name: str
    dtype: str

    def __call__(self, env: wire.Envelope) -> wire.Envelope:
        extra = torch.ones(3).to(getattr(torch, self.dtype))
        return _with(env, arrays={**env.arrays, self.name: extra})


@dataclass(frozen=True)
class Dropped:
    """An array or a scalar the answer needs, left out."""

    index: int

    def __call__(self, env: wire.Envelope) -> wire.Envelope:
        needed = ("num_examples", "num_steps", "weight", "global/n", "global/correct")
        names = [n for n in env.arrays if "/m/" in n] + [n for n in env.scalars if n in needed]
        gone = names[self.index % len(names)]
        arrays = {k: v for k, v in env.arrays.items() if k != gone}
        scalars = {k: v for k, v in env.scalars.items() if k != gone}
        return _with(env, arrays=arrays, scalars=scalars)


@dataclass(frozen=True)
class Scalar:
    """A training scalar forged: example count, steps, weight or loss."""

    name: str
    value: int | float | str

    def __call__(self, env: wire.Envelope) -> wire.Envelope:
        if "num_examples" not in env.scalars:
            return EvalSums("global/n", -1)(env)
        return _with(env, scalars={**env.scalars, self.name: self.value})


@dataclass(frozen=True)
class EvalSums:
    """Impossible evaluation sums (evaluation answers; a train answer gets a NaN delta)."""

    name: str
    value: int | float | str

    def __call__(self, env: wire.Envelope) -> wire.Envelope:
        if "global/n" not in env.scalars:  # a train answer
            return _with(env, scalars={**env.scalars, "num_steps": -1})
        return _with(env, scalars={**env.scalars, self.name: self.value})


@dataclass(frozen=True)
class Damaged:
    """The chunk stream damaged: a byte flipped, cut short, or random bytes."""

    how: str
    at: int
    noise: bytes

    def __call__(self, env: wire.Envelope) -> list[bytes]:
        frames = list(wire.send(env, 4096))
        if self.how == "random":
            return [self.noise]
        if self.how == "cut":
            return frames[: self.at % len(frames)] or [frames[0][: len(frames[0]) // 2]]
        i = self.at % len(frames)
        frame = bytearray(frames[i])
        frame[(self.at // 7) % len(frame)] ^= 1 << (self.at % 8)
        return [*frames[:i], bytes(frame), *frames[i + 1 :]]


def _with(env: wire.Envelope, **fields: object) -> wire.Envelope:
    return wire.Envelope(
        env.kind, env.run_id, env.round, env.task_id, env.client,
        arrays=fields.get("arrays", env.arrays),  # type: ignore[arg-type]
        scalars=fields.get("scalars", env.scalars),  # type: ignore[arg-type]
    )  # fmt: skip


names = st.sampled_from(ARRAYS)
corruptions = st.one_of(
    st.builds(Values, names, st.integers(0, 10_000), st.sampled_from([*BAD, 1e30, -1e30])),
    st.builds(
        Retyped,
        names,
        st.sampled_from([None, "float64", "float16", "bfloat16", "int64", "int32", "uint8"]),
        st.sampled_from(["cut", "grown", "reshaped"]),
    ),
    st.builds(
        Extra,
        st.sampled_from(["0/s/terms.0.scaffold/x", "0/s/x", "0/m/evil", "1/m/delta", "delta"]),
        st.sampled_from(["float32", "int64", "bool"]),
    ),
    st.builds(Dropped, st.integers(0, 100)),
    st.builds(
        Scalar,
        st.sampled_from(["num_examples", "weight", "num_steps"]),
        st.sampled_from([*BAD, -1, -5.0, "many"]),
    ),
    st.builds(Scalar, st.just("weight"), st.sampled_from([1e4 + 1, 10**12])),  # > max_weight
    st.builds(Scalar, st.just("train_loss"), st.sampled_from(BAD)),
    st.builds(EvalSums, st.just("global/correct"), st.sampled_from([*BAD, -1, 0.5, "x", 10**9])),
    st.builds(EvalSums, st.just("global/n"), st.sampled_from([*BAD, -1, 0, 0.5, "x"])),
    st.builds(EvalSums, st.just("global/loss_sum"), st.sampled_from([*BAD, "x"])),
    st.builds(
        Damaged, st.sampled_from(["flip", "cut", "random"]), st.integers(0, 10**6), st.binary()
    ),
)


def check(corrupt: Corrupt) -> None:
    engines: list[Member] = []

    def engine(program: ClientProgram) -> Member:
        engines.append(Member(program, corrupt))
        return engines[-1]

    result = run_experiment(ExperimentConfig.from_dict(CONFIG).build(), engine=engine)
    silent = silent_run()
    assert torch.equal(result.weights, silent.weights), corrupt
    assert [m["test_loss"] for m in result.history] == [m["test_loss"] for m in silent.history]
    assert engines[0].sent == 4  # a train and an evaluation answer in each of two rounds
    for key in ("updates", "fed_loss", "fed_accuracy"):  # none of them counted
        assert [m[key] for m in result.history] == [m[key] for m in silent.history], key


FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corruptions)
def test_a_members_forged_answers_never_stop_the_server_nor_move_the_model(
    corrupt: Corrupt,
) -> None:
    check(corrupt)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(corruptions, min_size=2, max_size=4))
def test_many_corruptions_at_once(corrupts: list[Corrupt]) -> None:
    def all_of(env: wire.Envelope) -> wire.Envelope | list[bytes]:
        out: wire.Envelope | list[bytes] = env
        for c in corrupts:
            if isinstance(out, list):
                break
            out = c(out)
        return out

    check(all_of)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed")
def test_atheris_harness_runs_clean(tmp_path: Path) -> None:
    """A short run of the coverage-guided fuzz of the member's answers (``fuzz_member.py``)."""
    harness = Path(__file__).with_name("fuzz_member.py")
    done = subprocess.run(
        [sys.executable, str(harness), "-runs=120", "-seed=1", "-max_len=256"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,  # where a crash input would be written
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_members_finite_but_huge_reports_keep_the_rounds_metrics_finite() -> None:
    """Found by ``fuzz_member.py``: a train loss of -1.8e308 made the round's weighted mean
    -inf. Means over members are computed so that they stay finite; an evaluation with no
    examples but a loss is refused."""
    huge = -1.7976931348623157e308

    def report(env: wire.Envelope) -> wire.Envelope:
        if "num_examples" in env.scalars:
            return _with(env, scalars={**env.scalars, "train_loss": huge, "weight": 1e4})
        return _with(env, scalars={**env.scalars, "global/loss_sum": -huge})

    result = run_experiment(
        ExperimentConfig.from_dict(CONFIG).build(), engine=lambda p: Member(p, report)
    )
    assert all(math.isfinite(v) for m in result.history for v in m.values()), result.history
    assert all(m["updates"] == 3 for m in result.history)  # accepted: claims, not the model
    assert result.history[0]["train_loss"] < -1e307 and result.history[0]["fed_loss"] > 1e305
    zero = parse_evaluation_of({"global/loss_sum": 1.0, "global/correct": 0, "global/n": 0})
    assert zero == "evaluation from client 1: global sums out of range (loss 1.0, 0 correct of 0)"


def parse_evaluation_of(scalars: dict[str, int | float | str]) -> str:
    from potluck.client.program import parse_evaluation
    from potluck.core.message import Message, MessageError

    with pytest.raises(MessageError) as info:
        parse_evaluation(Message(scalars=scalars), "client 1")
    return str(info.value)
