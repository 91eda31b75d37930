"""Pool-engine specifics: shared-memory slabs, shards, growth, worker failures, shutdown.

That the pool gives every client exactly what the inline engine gives it, for every
algorithm, is the contract test's job (tests/contract/test_engines.py).
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from potluck.algorithms import Algorithm
from potluck.client import ClientProgram, LocalSGD, Scaffold
from potluck.client.program import EvalResult, parse_evaluation
from potluck.core.message import Message
from potluck.core.records import EVALUATE, TRAIN, ClientState, Reply, StageJob
from potluck.core.task import Task
from potluck.data import Federation
from potluck.engines.inline import InlineEngine
from potluck.engines.pool import PoolEngine, PoolError, Slab
from potluck.engines.worker import assign, gather


def federation(sizes: list[int]) -> Federation:
    g = torch.Generator().manual_seed(0)
    clients = [
        (torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in sizes
    ]
    return Federation.from_client_data(clients, test_fraction=0.25)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


SCAFFOLD = "terms.0.scaffold"  # the term's namespace: its state and broadcast names


def scaffold_program(sizes: list[int]) -> ClientProgram:
    algo = Algorithm(local=LocalSGD(batch_size=4), terms=(Scaffold(),))
    return ClientProgram(Task(mlp), federation(sizes), algo)


def train_job(
    p: ClientProgram,
    cohort: list[int],
    round: int = 1,
    broadcast: dict[str, torch.Tensor] | None = None,
    states: tuple[ClientState, ...] | None = None,
) -> StageJob:
    """A train stage for ``cohort`` from the initial weights, every member doing all its work."""
    shared = Message({"w": p.initial_weights(), **(broadcast or {})})
    payloads = tuple(Message(scalars={"work": 1.0}) for _ in cohort)
    return StageJob(
        TRAIN, round, shared, np.array(cohort), payloads, states or tuple({} for _ in cohort)
    )


def scaffold_job(p: ClientProgram, cohort: list[int]) -> StageJob:
    d = p.spec.size
    g = torch.Generator().manual_seed(1)
    states = tuple({SCAFFOLD: {"c_i": torch.randn(d, generator=g)}} for _ in cohort)
    broadcast = {f"{SCAFFOLD}/c": torch.randn(d, generator=g)}
    return train_job(p, cohort, 3, broadcast, states)


def replies(got: list[Reply | None]) -> list[Reply]:
    assert all(r is not None for r in got)
    return [r for r in got if r is not None]


@given(st.lists(st.integers(1, 50), max_size=30), st.integers(1, 6))
def test_assign_is_a_balanced_partition(costs: list[int], workers: int) -> None:
    shards = assign(costs, workers)
    assert len(shards) == workers
    assert sorted(int(p) for s in shards for p in s) == list(range(len(costs)))
    loads = [sum(costs[int(p)] for p in s) for s in shards]
    if costs:  # Graham's bound for longest-processing-time-first
        assert max(loads) <= sum(costs) / workers + max(costs)
    assert gather([[int(p) for p in s] for s in shards], shards, len(costs)) == list(
        range(len(costs))
    )


@given(
    st.lists(
        st.tuples(
            st.sampled_from([torch.float32, torch.float64, torch.int64, torch.uint8, torch.bool]),
            st.lists(st.integers(0, 4), max_size=3),
        ),
        max_size=5,
    )
)
def test_slab_round_trips_any_tensors(specs: list[tuple[torch.dtype, list[int]]]) -> None:
    tensors = {f"t{i}": torch.ones(shape).to(dtype) for i, (dtype, shape) in enumerate(specs)}
    slab = Slab(Slab.required(tensors) + 64)
    layout = slab.write(tensors)
    assert layout is not None
    back = slab.read(layout)
    assert list(back) == list(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)


def test_matches_inline_exactly_with_state_and_slab_growth() -> None:
    """One worker, eight SCAFFOLD clients: the input slab (8 control variates) and the output
    slab (8 deltas, control deltas and states) both outgrow their first size."""
    p = scaffold_program([9, 4, 13, 7, 5, 11, 6, 8])
    job = scaffold_job(p, [7, 0, 3, 5, 1, 6, 2, 4])
    expected = replies(InlineEngine(p).run_stage(job))
    engine = PoolEngine(p, workers=1)
    try:
        got = replies(engine.run_stage(job))
        again = replies(engine.run_stage(job))  # the grown slabs are reused
    finally:
        engine.close()
    assert len(got) == len(again) == len(expected) == 8
    for exp, res, res2 in zip(expected, got, again, strict=True):
        assert res.message.scalars == res2.message.scalars == exp.message.scalars
        assert res.message.arrays.keys() == res2.message.arrays.keys() == exp.message.arrays.keys()
        assert {"delta", f"{SCAFFOLD}/delta_c"} <= exp.message.arrays.keys()
        for name, arr in exp.message.arrays.items():
            assert torch.equal(res.message.arrays[name], arr), name
            assert torch.equal(res2.message.arrays[name], arr), name
        assert res.state.keys() == res2.state.keys() == exp.state.keys() == {SCAFFOLD}
        for ns, tensors in exp.state.items():
            assert res.state[ns].keys() == res2.state[ns].keys() == tensors.keys()
            for name, t in tensors.items():
                assert torch.equal(res.state[ns][name], t), (ns, name)
                assert torch.equal(res2.state[ns][name], t), (ns, name)


def test_evaluate_matches_inline() -> None:
    p = scaffold_program([12, 8, 16])
    clients = np.array([2, 0, 1])
    job = StageJob(
        EVALUATE, 1, Message({"w": p.initial_weights()}), clients, (Message(),) * 3, ({},) * 3
    )
    engine = PoolEngine(p, workers=2)
    try:
        got = replies(engine.run_stage(job))
    finally:
        engine.close()
    expected = replies(InlineEngine(p).run_stage(job))

    def parsed(answers: list[Reply]) -> list[dict[str, EvalResult]]:
        pairs = zip(answers, clients, strict=True)
        return [parse_evaluation(r.message, f"client {c}") for r, c in pairs]

    assert parsed(got) == parsed(expected)
    sizes = [len(p.federation.client(int(c)).y_test) for c in clients]
    assert [r["global"].n for r in parsed(got)] == sizes and min(sizes) > 0


def test_a_raising_client_is_reported_with_its_traceback() -> None:
    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if len(y) == 3:  # only client 1 has batches of 3
            raise RuntimeError("client data is corrupt")
        return nn.functional.cross_entropy(logits, y)

    fed = Federation.from_client_data(
        [(torch.randn(n, 5), torch.zeros(n, dtype=torch.long)) for n in (8, 3)], test_fraction=0
    )
    p = ClientProgram(Task(mlp, loss_fn=loss), fed, Algorithm(local=LocalSGD(batch_size=4)))
    engine = PoolEngine(p, workers=2)
    with pytest.raises(PoolError, match=r"(?s)raised:.*RuntimeError: client data is corrupt"):
        engine.run_stage(train_job(p, [0, 1]))
    assert all(not proc.is_alive() for proc in engine._procs)  # closed on failure


def test_a_dead_worker_is_reported_not_waited_for() -> None:
    p = scaffold_program([8, 8, 8, 8])
    engine = PoolEngine(p, workers=2)
    os.kill(engine._procs[1].pid, signal.SIGKILL)
    engine._procs[1].join()
    with pytest.raises(PoolError, match=r"pool worker 1 \(pid \d+\) exited with code -9"):
        engine.run_stage(scaffold_job(p, [0, 1, 2, 3]))
    with pytest.raises(PoolError, match="closed"):
        engine.run_stage(scaffold_job(p, [0, 1]))


def test_close_stops_every_worker_and_is_idempotent() -> None:
    engine = PoolEngine(scaffold_program([4, 4]), workers=2)
    procs = list(engine._procs)
    assert all(proc.is_alive() for proc in procs)
    engine.close()
    engine.close()
    assert all(proc.exitcode == 0 for proc in procs)


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="workers and threads must be >= 1"):
        PoolEngine(scaffold_program([4]), workers=2, threads=0)


def test_centralised_evaluation_is_split_over_the_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows split at multiples of the evaluation batch: the same batches, the same counts."""
    monkeypatch.setattr("potluck.client.program.EVAL_BATCH", 4)
    monkeypatch.setattr("potluck.engines.pool.EVAL_BATCH", 4)
    g = torch.Generator().manual_seed(3)
    test = (torch.randn(23, 5, generator=g), torch.randint(0, 3, (23,), generator=g))
    fed = Federation.from_client_data([(torch.randn(8, 5), torch.arange(8) % 3)] * 2, test=test)
    p = ClientProgram(Task(mlp), fed, Algorithm())
    w = p.initial_weights() + 0.3
    expected = p.evaluate_test(w)
    for workers in (1, 2, 3, 7):  # 7 workers, 6 batches: one idle
        engine = PoolEngine(p, workers=workers)
        try:
            got = engine.evaluate_test(w)
        finally:
            engine.close()
        assert (got.correct, got.n) == (expected.correct, expected.n) == (got.correct, 23)
        assert got.loss_sum == pytest.approx(expected.loss_sum, rel=1e-12)
    rows = np.array([0, 2, 3, 5, 8, 9, 13, 14, 17, 21, 22])  # a sample of the test set
    expected = p.evaluate_test(w, rows)
    assert expected.n == len(rows)
    for workers in (1, 2, 5):
        engine = PoolEngine(p, workers=workers)
        try:
            got = engine.evaluate_test(w, rows)
        finally:
            engine.close()
        assert (got.correct, got.n) == (expected.correct, expected.n)
        assert got.loss_sum == pytest.approx(expected.loss_sum, rel=1e-12)
