"""Vectorized-engine specifics: padding and masking, chunking, rule state, refusals."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from potluck.client import ClientProgram, LocalSGD
from potluck.client.personal import Ditto
from potluck.client.program import ClientResult, RoundInput
from potluck.client.rules import FedProx, LocalRule, Scaffold, Tensors
from potluck.config import ExperimentConfig
from potluck.core.task import Task
from potluck.data import Federation
from potluck.engines import available_engines, make_engine
from potluck.engines.inline import InlineEngine
from potluck.engines.vectorized import VectorizedEngine

TOL = 1e-6  # one round: a few float32 ulps (see tests/contract/test_engines.py)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def federation(sizes: list[int], seed: int = 0) -> Federation:
    g = torch.Generator().manual_seed(seed)
    clients = [
        (torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in sizes
    ]
    return Federation.from_client_data(clients, test_fraction=0.0)


def program(
    sizes: list[int],
    rule: LocalRule | None = None,
    model: Callable[[], nn.Module] = mlp,
    **sgd: float,
) -> ClientProgram:
    opt = LocalSGD(**{"epochs": 2, "batch_size": 4, "lr": 0.1, **sgd})  # type: ignore[arg-type]
    return ClientProgram(Task(model), federation(sizes), opt, rule=rule, seed=3)


def job(
    p: ClientProgram,
    work: list[float],
    states: tuple[Tensors, ...] | None = None,
    broadcast: Tensors | None = None,
) -> RoundInput:
    k = len(work)
    states = states or tuple({} for _ in range(k))
    return RoundInput(2, p.initial_weights(), np.arange(k), broadcast or {}, states, np.array(work))


def assert_same(got: list[ClientResult], ref: list[ClientResult], exact: bool = False) -> None:
    """Same scalars (train_loss to ``TOL`` unless ``exact``), arrays and states."""
    assert len(got) == len(ref)
    for g, r in zip(got, ref, strict=True):
        assert g.message.scalars.keys() == r.message.scalars.keys()
        for key, value in r.message.scalars.items():
            if key == "train_loss" and not exact:
                assert g.message.scalars[key] == pytest.approx(value, rel=TOL)
            else:
                assert g.message.scalars[key] == value, key
        for a, b in ((g.message.arrays, r.message.arrays), (g.state, r.state)):
            assert a.keys() == b.keys()
            for key in b:
                if exact:
                    assert torch.equal(a[key], b[key]), key
                else:
                    torch.testing.assert_close(a[key], b[key], atol=TOL, rtol=TOL)


def test_unequal_sizes_steps_and_short_batches_match_inline() -> None:
    # 3, 9 and 22 examples with batch 4: short last batches, full-batch client, 2..12 steps
    p = program([3, 9, 22, 14], FedProx(mu=0.5), momentum=0.9, weight_decay=0.01)
    j = job(p, [1.0, 0.3, 0.5, 1.0])
    assert [p.steps_for(c, w) for c, w in enumerate(j.work)] == [2, 1, 6, 8]
    assert_same(VectorizedEngine(p).train(j), InlineEngine(p).train(j))


def test_scaffold_state_and_broadcast_match_inline() -> None:
    p = program([7, 12, 5], Scaffold())
    d = p.spec.size
    g = torch.Generator().manual_seed(1)
    states = ({"c_i": torch.randn(d, generator=g)}, {}, {"c_i": torch.randn(d, generator=g)})
    j = job(p, [1.0, 1.0, 0.5], states, {"c": torch.randn(d, generator=g)})
    assert_same(VectorizedEngine(p).train(j), InlineEngine(p).train(j))


def test_chunked_equals_unchunked() -> None:
    p = program([3, 9, 22, 14, 6, 11, 30, 4, 8, 17], FedProx(mu=0.1), momentum=0.5)
    j = job(p, [1.0, 0.5, 0.2, 1.0, 1.0, 0.7, 0.4, 1.0, 1.0, 0.9])
    whole = VectorizedEngine(p).train(j)
    chunked = VectorizedEngine(p, max_clients=3)
    assert chunked.chunk_size == 3
    assert_same(chunked.train(j), whole, exact=True)
    tiny = VectorizedEngine(p, memory_budget_bytes=1)  # one client per chunk
    assert tiny.chunk_size == 1
    assert_same(tiny.train(j), whole, exact=True)


def test_masked_mean_of_a_padded_batch_is_the_unpadded_mean() -> None:
    p = program([10])
    engine = VectorizedEngine(p)
    x, y = torch.randn(1, 6, 5), torch.tensor([[0, 2, 1, 1, 0, 0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 0.0]])
    w = p.initial_weights()
    grads, loss = engine._grads(engine._params(w[None]), x, y, mask)
    ref_grad, ref_loss = p._grad(w, x[0, :3], y[0, :3])
    assert float(loss[0]) == pytest.approx(float(ref_loss), rel=1e-6)
    flat = torch.cat([grads[n].reshape(-1) for n in p.spec.names])
    torch.testing.assert_close(flat, ref_grad, atol=1e-7, rtol=1e-6)


def test_client_without_steps_is_untouched() -> None:
    p = program([5, 20])
    j = RoundInput(1, p.initial_weights(), np.array([0, 1]), {}, ({}, {}), np.ones(2))
    results = VectorizedEngine(p).train(j)
    assert [r.message.scalars["num_steps"] for r in results] == [4, 10]
    assert_same(results, InlineEngine(p).train(j))


def test_refuses_ditto_dropout_and_batch_statistics() -> None:
    with pytest.raises(ValueError, match=r"rule 'ditto'.*engine = \"inline\""):
        VectorizedEngine(program([4], Ditto(personal_lambda=0.1)))

    def dropout() -> nn.Module:
        return nn.Sequential(nn.Linear(5, 3), nn.Dropout(0.2))

    with pytest.raises(ValueError, match=r"dropout \(module '1' is Dropout\)"):
        VectorizedEngine(program([4], model=dropout))

    def batch_stats() -> nn.Module:
        return nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3, track_running_stats=False))

    with pytest.raises(ValueError, match=r"batch statistics.*BatchNorm1d"):
        VectorizedEngine(program([4], model=batch_stats))


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="max_clients"):
        VectorizedEngine(program([4]), max_clients=0)
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        VectorizedEngine(program([4]), memory_budget_bytes=0)


def test_registered_by_name_and_in_the_config() -> None:
    assert available_engines()[:3] == ["inline", "vectorized", "pool"]
    assert isinstance(make_engine("vectorized", program([4])), VectorizedEngine)
    with pytest.raises(ValueError, match="unknown engine 'gpu'; available: inline, vectorized"):
        make_engine("gpu", program([4]))
    cfg = ExperimentConfig.from_dict({"run": {"engine": "vectorized"}})
    assert cfg.run.engine == "vectorized"


def test_evaluate_matches_inline() -> None:
    p = ClientProgram(
        Task(mlp),
        Federation.from_client_data(
            [(torch.randn(20, 5), torch.arange(20) % 3)] * 3, test_fraction=0.25
        ),
        LocalSGD(),
    )
    w, clients, states = p.initial_weights(), np.array([0, 2]), ({}, {})
    assert VectorizedEngine(p).evaluate(clients, w, states) == InlineEngine(p).evaluate(
        clients, w, states
    )
