"""The round loop with a remote engine (clients across a network): members that fail to
report, bad updates refused without stopping the run, and ``min_updates``."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from potluck.client.program import ClientProgram
from potluck.config import ExperimentConfig
from potluck.core.message import Message, MessageError
from potluck.core.parts import Context
from potluck.core.records import TRAIN, Reply, StageJob
from potluck.engines.inline import InlineEngine
from potluck.orchestrator import REMOTE_METRICS, TIMING_METRICS, Experiment, run_experiment

BASE = {
    "rounds": 3,
    "data": {"dataset": "digits", "num_clients": 6, "partition": {"kind": "iid"}},
    "model": {"name": "mlp"},
    "sampler": {"clients_per_round": 3},
    "client": {"epochs": 1, "batch_size": 16, "lr": 0.1},
    "evaluation": {"federated_clients": 3},
    "run": {"threads": 1},
}


def experiment(**changes: object) -> Experiment:
    return replace(ExperimentConfig.from_dict(BASE).build(), **changes)  # type: ignore[arg-type]


class Flaky(InlineEngine):
    """The inline engine, but some clients fail (None) or send a corrupted update."""

    remote = True

    def __init__(self, program: ClientProgram, fail: set[int], corrupt: dict[int, str]) -> None:
        super().__init__(program)
        self.fail, self.corrupt = fail, corrupt

    def run_stage(self, job: StageJob) -> list[Reply | None]:
        out: list[Reply | None] = []
        for cid, reply in zip(job.clients, self.program.run_stage(job), strict=True):
            if int(cid) in self.fail or reply is None:
                out.append(None)
            elif job.stage == TRAIN:
                out.append(_corrupted(reply, self.corrupt.get(int(cid))))
            else:
                out.append(reply)
        return out


def _corrupted(reply: Reply, how: str | None) -> Reply:
    arrays = dict(reply.message.arrays)
    scalars = dict(reply.message.scalars)
    if how == "nan":
        arrays["delta"] = arrays["delta"].clone()
        arrays["delta"][0] = float("nan")
    elif how == "shape":
        arrays["delta"] = arrays["delta"][:-1]
    elif how == "weight":
        scalars["weight"] = -5.0
    return Reply(Message(arrays=arrays, scalars=scalars), reply.state)


def cohorts(exp: Experiment) -> list[list[int]]:
    sampler, n = exp.algorithm.sampler, exp.federation.num_clients
    state = sampler.init(n)
    out = []
    for r in range(1, exp.rounds + 1):
        cohort, state = sampler.sample(n, state, Context(exp.seed, r, ("sampling", r)))
        out.append(cohort.tolist())
    return out


def test_failed_and_refused_clients_are_left_out_and_counted() -> None:
    exp = experiment()
    rounds = cohorts(exp)
    bad = rounds[0][0]
    failed = rounds[0][1]
    result = run_experiment(exp, engine=lambda p: Flaky(p, fail={failed}, corrupt={bad: "nan"}))
    first = result.history[0]
    assert (first["failed"], first["refused"], first["updates"]) == (1.0, 1.0, 1.0)
    # the same round with only the good member: the refused and failed ones left no trace
    alone = run_experiment(exp, engine=lambda p: Flaky(p, fail={bad, failed}, corrupt={}))
    torch.testing.assert_close(result.weights, alone.weights, rtol=0, atol=0)
    assert [m["updates"] for m in result.history] == [m["updates"] for m in alone.history]


@pytest.mark.parametrize("how", ["nan", "shape", "weight"])
def test_a_local_engine_stops_on_a_bad_update(how: str) -> None:
    exp = experiment()
    bad = cohorts(exp)[0][0]

    class Local(Flaky):
        remote = False

    with pytest.raises(MessageError, match=f"update from client {bad}"):
        run_experiment(exp, engine=lambda p: Local(p, fail=set(), corrupt={bad: how}))


def test_too_few_updates_leave_the_model_where_it_was() -> None:
    exp = experiment(min_updates=3)
    first = cohorts(exp)[0]
    result = run_experiment(exp, engine=lambda p: Flaky(p, fail={first[0]}, corrupt={}))
    initial = run_experiment(replace(exp, rounds=1), engine=lambda p: Flaky(p, set(), {}))
    assert result.history[0]["updates"] == 2.0
    # round 1 did not move the model: its test accuracy is that of the initial weights
    program = exp.algorithm.client_program(exp.task, exp.federation, seed=exp.seed)
    at_init = program.evaluate_test(program.initial_weights()).accuracy
    assert result.history[0]["test_accuracy"] == at_init
    assert initial.history[0]["test_accuracy"] != at_init


def test_learning_metrics_equal_a_local_run_when_nobody_fails() -> None:
    exp = experiment()
    remote = run_experiment(exp, engine=lambda p: Flaky(p, set(), {}))
    local = run_experiment(exp)
    strip = lambda h: [  # noqa: E731
        {k: v for k, v in m.items() if k not in TIMING_METRICS | REMOTE_METRICS} for m in h
    ]
    assert strip(remote.history) == strip(local.history)
    assert all(m["failed"] == 0 and m["refused"] == 0 for m in remote.history)
