"""The round loop with a remote engine (clients across a network): members that fail to
report, bad updates refused without stopping the run, and ``min_updates``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pytest
import torch

from potluck.client.program import ClientProgram, ClientResult, EvalResult, RoundInput
from potluck.client.rules import Tensors
from potluck.config import ExperimentConfig
from potluck.core.message import Message, MessageError
from potluck.engines.inline import InlineEngine
from potluck.orchestrator import TIMING_METRICS, Experiment, run_experiment

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

    def train(self, job: RoundInput) -> Sequence[ClientResult | None]:
        out: list[ClientResult | None] = []
        for cid, res in zip(job.cohort, self.program.run_round(job), strict=True):
            how = self.corrupt.get(int(cid))
            out.append(None if int(cid) in self.fail else _corrupted(res, how))
        return out

    def evaluate(
        self, clients: np.ndarray, w: torch.Tensor, states: tuple[Tensors, ...]
    ) -> Sequence[dict[str, EvalResult] | None]:
        results = self.program.evaluate_clients(clients, w, states)
        return [None if int(c) in self.fail else r for c, r in zip(clients, results, strict=True)]


def _corrupted(res: ClientResult, how: str | None) -> ClientResult:
    delta = res.message.arrays["delta"]
    scalars = dict(res.message.scalars)
    if how == "nan":
        delta = delta.clone()
        delta[0] = float("nan")
    elif how == "shape":
        delta = delta[:-1]
    elif how == "weight":
        scalars["num_examples"] = -5
    return ClientResult(Message(arrays={"delta": delta}, scalars=scalars), res.state)


def cohorts(exp: Experiment) -> list[list[int]]:
    from potluck.core.seeding import Seeds

    seeds = Seeds(exp.seed)
    n = exp.federation.num_clients
    return [
        exp.algorithm.sampler.sample(n, seeds.numpy("sampling", r)).tolist()
        for r in range(1, exp.rounds + 1)
    ]


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
    test = exp.federation.source.test
    at_init = program.evaluate_arrays(program.initial_weights(), test.x, test.y).accuracy
    assert result.history[0]["test_accuracy"] == at_init
    assert initial.history[0]["test_accuracy"] != at_init


def test_learning_metrics_equal_a_local_run_when_nobody_fails() -> None:
    exp = experiment()
    remote = run_experiment(exp, engine=lambda p: Flaky(p, set(), {}))
    local = run_experiment(exp)
    strip = lambda h: [  # noqa: E731
        {k: v for k, v in m.items() if k not in TIMING_METRICS | {"failed", "refused"}} for m in h
    ]
    assert strip(remote.history) == strip(local.history)
    assert all(m["failed"] == 0 and m["refused"] == 0 for m in remote.history)
