"""Vectorized-engine specifics: padding and masking, chunking, term state, refusals."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from potluck.algorithms import Algorithm
from potluck.client import ClientProgram, Ditto, FedProx, LocalSGD, Scaffold
from potluck.client.program import parse_evaluation
from potluck.config import ExperimentConfig
from potluck.core.message import Message
from potluck.core.parts import GradientTerm
from potluck.core.records import EVALUATE, TRAIN, ClientState, Reply, StageJob
from potluck.core.task import Task
from potluck.data import Federation
from potluck.engines import available_engines, make_engine
from potluck.engines.inline import InlineEngine
from potluck.engines.vectorized import VectorizedEngine

TOL = 1e-6  # one round: a few float32 ulps (see tests/contract/test_engines.py)
REFUSAL = (
    r"vectorized engine cannot batch this model's training step.*engine = \"pool\" or \"inline\""
)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


class SequenceNet(nn.Module):
    """A two-layer LSTM over the 5 features as a sequence of 5 steps (dropout between its
    layers), then a linear head on the last step."""

    def __init__(self, dropout: float = 0.2) -> None:
        super().__init__()
        self.lstm = nn.LSTM(1, 8, num_layers=2, dropout=dropout, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x.unsqueeze(-1))
        return self.head(out[:, -1])


def federation(sizes: list[int], seed: int = 0, test_fraction: float = 0.0) -> Federation:
    g = torch.Generator().manual_seed(seed)
    clients = [
        (torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in sizes
    ]
    return Federation.from_client_data(clients, test_fraction=test_fraction)


def program(
    sizes: list[int],
    term: GradientTerm | None = None,
    model: Callable[[], nn.Module] = mlp,
    test_fraction: float = 0.0,
    **sgd: float,
) -> ClientProgram:
    opt = LocalSGD(**{"epochs": 2, "batch_size": 4, "lr": 0.1, **sgd})  # type: ignore[arg-type]
    algo = Algorithm(local=opt, terms=() if term is None else (term,))
    return ClientProgram(Task(model), federation(sizes, test_fraction=test_fraction), algo, seed=3)


def job(
    p: ClientProgram,
    work: list[float],
    states: tuple[ClientState, ...] | None = None,
    broadcast: dict[str, torch.Tensor] | None = None,
    w: torch.Tensor | None = None,
    round: int = 2,
) -> StageJob:
    """A train stage of clients 0..k-1 doing ``work`` of their epochs; ``broadcast``: the
    terms' entries of the shared message (``"<namespace>/<name>"``)."""
    k = len(work)
    shared = Message({"w": p.initial_weights() if w is None else w, **(broadcast or {})})
    payloads = tuple(Message(scalars={"work": float(share)}) for share in work)
    states = states or tuple({} for _ in range(k))
    return StageJob(TRAIN, round, shared, np.arange(k), payloads, states)


def done(replies: list[Reply | None]) -> list[Reply]:
    assert all(r is not None for r in replies)
    return [r for r in replies if r is not None]


def assert_same(got: list[Reply | None], ref: list[Reply | None], exact: bool = False) -> None:
    """Same scalars (train_loss and weight to ``TOL`` unless ``exact``), arrays and states."""
    assert len(got) == len(ref)
    for g, r in zip(done(got), done(ref), strict=True):
        assert g.message.scalars.keys() == r.message.scalars.keys()
        for key, value in r.message.scalars.items():
            if key in ("train_loss", "weight") and isinstance(value, float) and not exact:
                assert g.message.scalars[key] == pytest.approx(value, rel=TOL), key
            else:
                assert g.message.scalars[key] == value, key
        pairs = [(g.message.arrays, r.message.arrays)]
        assert g.state.keys() == r.state.keys()
        pairs += [(g.state[ns], r.state[ns]) for ns in r.state]
        for a, b in pairs:
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
    works = [float(m.scalars["work"]) for m in j.payloads]
    assert [p.steps_for(c, w) for c, w in enumerate(works)] == [2, 1, 6, 8]
    got = VectorizedEngine(p).run_stage(j)
    assert [r.message.scalars["num_steps"] for r in done(got)] == [2, 1, 6, 8]
    assert_same(got, InlineEngine(p).run_stage(j))


def test_scaffold_state_and_broadcast_match_inline() -> None:
    p = program([7, 12, 5], Scaffold())
    ns = "terms.0.scaffold"
    d = p.spec.size
    g = torch.Generator().manual_seed(1)
    states = (
        {ns: {"c_i": torch.randn(d, generator=g)}},
        {},
        {ns: {"c_i": torch.randn(d, generator=g)}},
    )
    j = job(p, [1.0, 1.0, 0.5], states, {f"{ns}/c": torch.randn(d, generator=g)})
    got, ref = VectorizedEngine(p).run_stage(j), InlineEngine(p).run_stage(j)
    assert all(f"{ns}/delta_c" in r.message.arrays and ns in r.state for r in done(ref))
    assert_same(got, ref)


def test_chunked_equals_unchunked() -> None:
    p = program([3, 9, 22, 14, 6, 11, 30, 4, 8, 17], FedProx(mu=0.1), momentum=0.5)
    j = job(p, [1.0, 0.5, 0.2, 1.0, 1.0, 0.7, 0.4, 1.0, 1.0, 0.9])
    whole = VectorizedEngine(p).run_stage(j)
    chunked = VectorizedEngine(p, max_clients=3)
    assert chunked.chunk_size == 3
    assert_same(chunked.run_stage(j), whole, exact=True)
    tiny = VectorizedEngine(p, memory_budget_bytes=1)  # one client per chunk
    assert tiny.chunk_size == 1
    assert_same(tiny.run_stage(j), whole, exact=True)


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
    j = job(p, [1.0, 1.0], round=1)
    results = VectorizedEngine(p).run_stage(j)
    assert [r.message.scalars["num_steps"] for r in done(results)] == [4, 10]
    assert_same(results, InlineEngine(p).run_stage(j))


def test_ditto_personal_models_and_accuracy_match_inline() -> None:
    """Two rounds of Ditto (the second from the first's personal models): the same uploads,
    personal models and personal accuracy on every client's local test set."""
    p = program([12, 30, 8, 20], Ditto(lam=0.1), test_fraction=0.25, momentum=0.5)
    ns = "terms.0.ditto"
    vectorized, inline = VectorizedEngine(p), InlineEngine(p)
    w = p.initial_weights()
    states: dict[str, tuple[ClientState, ...]] = {"v": ({},) * 4, "i": ({},) * 4}
    for rnd in (1, 2):
        replies = {
            key: done(engine.run_stage(job(p, [1.0, 0.5, 1.0, 1.0], states[key], w=w, round=rnd)))
            for key, engine in (("v", vectorized), ("i", inline))
        }
        assert_same(list(replies["v"]), list(replies["i"]))
        for key in replies:
            assert all(set(r.state) == {ns} and "personal" in r.state[ns] for r in replies[key])
            states[key] = tuple(r.state for r in replies[key])
        deltas = torch.stack([r.message.arrays["delta"] for r in replies["i"]])
        w = w + deltas.mean(0)
    clients = np.arange(4)
    evaluations = {}
    for key, engine in (("v", vectorized), ("i", inline)):
        ev = StageJob(EVALUATE, 2, Message({"w": w}), clients, (Message(),) * 4, states[key])
        evaluations[key] = [
            parse_evaluation(r.message, f"client {c}")["personal"]
            for c, r in zip(clients, done(engine.run_stage(ev)), strict=True)
        ]
    assert min(e.n for e in evaluations["i"]) > 0
    for got, ref in zip(evaluations["v"], evaluations["i"], strict=True):
        assert got.n == ref.n
        assert abs(got.correct - ref.correct) <= 1  # a tie may flip at float32 rounding
        assert got.loss_sum == pytest.approx(ref.loss_sum, rel=1e-5)
    accuracy = {
        k: sum(e.correct for e in evs) / sum(e.n for e in evs) for k, evs in evaluations.items()
    }
    assert accuracy["v"] == pytest.approx(accuracy["i"], abs=1 / sum(e.n for e in evaluations["i"]))


def test_refuses_dropout_and_batch_statistics_before_training() -> None:
    def dropout() -> nn.Module:
        return nn.Sequential(nn.Linear(5, 3), nn.Dropout(0.2))

    with pytest.raises(ValueError, match=rf"(?s){REFUSAL}"):
        VectorizedEngine(program([4], model=dropout))

    def batch_stats() -> nn.Module:
        return nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3, track_running_stats=False))

    with pytest.raises(ValueError, match=r"batch statistics.*BatchNorm1d.*\"inline\""):
        VectorizedEngine(program([4], model=batch_stats))


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # LSTM under vmap
def test_refuses_an_lstm_with_dropout_that_inline_trains() -> None:
    p = program([6, 9], model=SequenceNet)
    with pytest.raises(ValueError, match=rf"(?s){REFUSAL}"):
        VectorizedEngine(p)
    trained = done(InlineEngine(p).run_stage(job(p, [1.0, 1.0])))  # the model itself is fine
    assert [r.message.scalars["num_steps"] for r in trained] == [4, 6]
    assert all(bool(r.message.arrays["delta"].abs().sum() > 0) for r in trained)


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="max_clients"):
        VectorizedEngine(program([4]), max_clients=0)
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        VectorizedEngine(program([4]), memory_budget_bytes=0)


def test_registered_by_name_and_in_the_config() -> None:
    assert available_engines()[:3] == ["inline", "vectorized", "pool"]
    assert isinstance(make_engine("vectorized", program([4])), VectorizedEngine)
    with pytest.raises(ValueError, match="unknown engine 'gpu'; registered: inline, pool"):
        make_engine("gpu", program([4]))
    cfg = ExperimentConfig.from_dict({"run": {"engine": "vectorized"}})
    assert cfg.run.engine == "vectorized"


def test_evaluate_matches_inline() -> None:
    p = ClientProgram(
        Task(mlp),
        Federation.from_client_data(
            [(torch.randn(20, 5), torch.arange(20) % 3)] * 3, test_fraction=0.25
        ),
        Algorithm(),
    )
    clients = np.array([0, 2])
    ev = StageJob(
        EVALUATE, 1, Message({"w": p.initial_weights()}), clients, (Message(),) * 2, ({}, {})
    )
    got = [parse_evaluation(r.message, "v") for r in done(VectorizedEngine(p).run_stage(ev))]
    ref = [parse_evaluation(r.message, "i") for r in done(InlineEngine(p).run_stage(ev))]
    assert got == ref and all(r["global"].n == 5 for r in ref)
