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

from potluck.client import ClientProgram, LocalSGD
from potluck.client.program import RoundInput
from potluck.client.rules import Scaffold
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


def scaffold_program(sizes: list[int]) -> ClientProgram:
    return ClientProgram(Task(mlp), federation(sizes), LocalSGD(batch_size=4), rule=Scaffold())


def scaffold_job(p: ClientProgram, cohort: list[int]) -> RoundInput:
    w = p.initial_weights()
    d = w.numel()
    g = torch.Generator().manual_seed(1)
    states = tuple({"c": torch.randn(d, generator=g)} for _ in cohort)
    broadcast = {"c": torch.randn(d, generator=g)}
    return RoundInput(3, w, np.array(cohort), broadcast, states, np.ones(len(cohort)))


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
    expected = InlineEngine(p).train(job)
    engine = PoolEngine(p, workers=1)
    try:
        got = engine.train(job)
        again = engine.train(job)  # the grown slabs are reused
    finally:
        engine.close()
    for exp, res, res2 in zip(expected, got, again, strict=True):
        assert res.message.scalars == exp.message.scalars
        for name, arr in exp.message.arrays.items():
            assert torch.equal(res.message.arrays[name], arr), name
            assert torch.equal(res2.message.arrays[name], arr), name
        assert res.state.keys() == exp.state.keys()
        for name, t in exp.state.items():
            assert torch.equal(res.state[name], t)


def test_evaluate_matches_inline() -> None:
    p = scaffold_program([12, 8, 16])
    w, clients = p.initial_weights(), np.array([2, 0, 1])
    engine = PoolEngine(p, workers=2)
    try:
        got = engine.evaluate(clients, w, ({}, {}, {}))
    finally:
        engine.close()
    assert got == InlineEngine(p).evaluate(clients, w, ({}, {}, {}))


def test_a_raising_client_is_reported_with_its_traceback() -> None:
    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if len(y) == 3:  # only client 1 has batches of 3
            raise RuntimeError("client data is corrupt")
        return nn.functional.cross_entropy(logits, y)

    fed = Federation.from_client_data(
        [(torch.randn(n, 5), torch.zeros(n, dtype=torch.long)) for n in (8, 3)], test_fraction=0
    )
    p = ClientProgram(Task(mlp, loss_fn=loss), fed, LocalSGD(batch_size=4))
    engine = PoolEngine(p, workers=2)
    job = RoundInput(1, p.initial_weights(), np.array([0, 1]), {}, ({}, {}), np.ones(2))
    with pytest.raises(PoolError, match=r"(?s)raised:.*RuntimeError: client data is corrupt"):
        engine.train(job)
    assert all(not proc.is_alive() for proc in engine._procs)  # closed on failure


def test_a_dead_worker_is_reported_not_waited_for() -> None:
    p = scaffold_program([8, 8, 8, 8])
    engine = PoolEngine(p, workers=2)
    os.kill(engine._procs[1].pid, signal.SIGKILL)
    engine._procs[1].join()
    with pytest.raises(PoolError, match=r"pool worker 1 \(pid \d+\) exited with code -9"):
        engine.train(scaffold_job(p, [0, 1, 2, 3]))
    with pytest.raises(PoolError, match="closed"):
        engine.train(scaffold_job(p, [0, 1]))


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
    p = ClientProgram(Task(mlp), fed, LocalSGD())
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
