"""PowerSGD: an exactly rank-r update is reconstructed exactly and warm-started power
iteration converges to the best rank-r approximation (Eckart-Young), which a cold start does
not reach; error feedback loses nothing (sent + new residual = old residual + update); the
encoding's length is r (n + m) per compressed tensor plus the raw ones, never above dense and
far below it for the McMahan CNN and the digits MLP; a hostile message is refused with the
reason; runs on digits learn close to dense at a tenth of the bytes, from Python, TOML and
the CLI, on every engine (tests/contract/test_engines.py) and after a resume."""

from __future__ import annotations

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
from potluck.core.params import ParamSpec
from potluck.core.parts import Context, part_context
from potluck.models.zoo import build_model
from potluck.orchestrator import RunResult, run_experiment
from potluck.store.sqlite import RunStore
from potluck.testing import interrupted_and_resumed, learning
from potluck.updates.lowrank import PowerSGD


def spec(*shapes: tuple[int, ...]) -> ParamSpec:
    return ParamSpec(tuple(f"p{i}" for i in range(len(shapes))), shapes)


def ctx(round: int = 1, client: int = 0) -> Context:
    return part_context(3, round, "transforms.0.powersgd", client=client)


def low_rank(n: int, m: int, r: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, r, generator=g) @ torch.randn(r, m, generator=g)


def rounds(
    ps: PowerSGD, delta: torch.Tensor, count: int, state: dict[str, torch.Tensor] | None = None
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """``count`` uploads of the same ``delta`` by client 0, its state threaded through."""
    state, out = dict(state or {}), []
    for r in range(1, count + 1):
        sent, state = ps.encode(Message({"delta": delta}), state, ctx(r))
        out.append(ps.decode(sent, ctx(r)).arrays["delta"])
    return out, state


# ---- the power iteration ----


def test_an_exactly_rank_r_update_is_reconstructed_exactly() -> None:
    w, bias = low_rank(30, 20, 3), torch.randn(20, generator=torch.Generator().manual_seed(1))
    delta = torch.cat([w.reshape(-1), bias])
    ps = PowerSGD(rank=3, error_feedback=False).bind(spec((30, 20), (20,)))
    decoded, state = rounds(ps, delta, 3)
    for out in decoded:  # from the random start and from each warm start
        torch.testing.assert_close(out, delta, atol=1e-4 * float(w.abs().max()), rtol=0)
    assert state["q"].shape == (20 * 3,)


def spectrum(n: int, m: int, singular: list[float], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(n, len(singular), generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(m, len(singular), generator=g, dtype=torch.float64)).Q
    return (u * torch.tensor(singular, dtype=torch.float64)) @ v.T


def test_warm_started_rounds_converge_to_the_best_rank_r_approximation() -> None:
    """Warm start makes the rounds subspace iteration on ``M M^T``: the error falls to the
    Eckart-Young optimum (the singular values past ``r``), at ``(s_3 / s_2)^2`` a round.
    Fresh starts each round stay one power step from random, well above it."""
    singular = [10.0, 8.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    m = spectrum(40, 30, singular).float()
    best = sum(s**2 for s in singular[2:]) ** 0.5
    errors = {}
    for warm in (True, False):
        ps = PowerSGD(rank=2, error_feedback=False, warm_start=warm).bind(spec((40, 30)))
        decoded, _ = rounds(ps, m.reshape(-1), 12)
        errors[warm] = [float(torch.linalg.norm(m.reshape(-1) - out)) for out in decoded]
    assert errors[True][-1] == pytest.approx(best, rel=1e-4), errors[True]
    assert errors[True][0] > errors[True][-1] * 1.05  # it did converge, from worse
    assert min(errors[False]) > best * 1.05, errors[False]


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(
        st.lists(st.integers(1, 12), min_size=0, max_size=4).map(tuple), min_size=1, max_size=4
    ),
    rank=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_error_feedback_loses_nothing(shapes: list[tuple[int, ...]], rank: int, seed: int) -> None:
    """``sent + new residual == old residual + update``, over rounds, for any shapes."""
    ps = PowerSGD(rank=rank).bind(spec(*shapes))
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    residual = torch.zeros(ps.size)
    for r in (1, 2, 3):
        delta = torch.randn(ps.size, generator=g)
        sent, state = ps.encode(Message({"delta": delta}), state, ctx(r))
        assert sent.arrays["delta"].shape == (ps.encoded_size,) and ps.encoded_size <= ps.size
        out = ps.decode(sent, ctx(r)).arrays["delta"]
        assert out.dtype == torch.float32 and out.shape == (ps.size,)
        torch.testing.assert_close(out + state["residual"], residual + delta, atol=1e-5, rtol=1e-5)
        residual = state["residual"]


def test_the_state_kept_follows_the_options() -> None:
    net = spec((8, 6), (6,))
    delta = low_rank(8, 6, 3).reshape(-1)
    full = torch.cat([delta, torch.zeros(6)])
    kept = {}
    for ef in (True, False):
        for warm in (True, False):
            ps = PowerSGD(1, ef, warm).bind(net)
            _, state = ps.encode(Message({"delta": full}), {}, ctx())
            kept[ef, warm] = sorted(state)
            assert sorted(ps.client_state) == kept[ef, warm]
            shapes = {k: tuple(v.shape) for k, v in state.items()}
            assert shapes == ps.client_state_shapes(net)
    assert kept == {
        (True, True): ["q", "residual"],
        (True, False): ["residual"],
        (False, True): ["q"],
        (False, False): [],
    }


def test_fresh_starts_are_drawn_per_round_and_client() -> None:
    ps = PowerSGD(rank=2, warm_start=False).bind(spec((10, 10)))
    x = torch.randn(100, generator=torch.Generator().manual_seed(5))  # full rank: start matters
    sent = {
        (r, c): tuple(ps.encode(Message({"delta": x}), {}, ctx(r, c))[0].arrays["delta"].tolist())
        for r in (1, 2)
        for c in (0, 1)
    }
    assert len(set(sent.values())) == 4
    again = ps.encode(Message({"delta": x}), {}, ctx(2, 1))[0].arrays["delta"]
    assert tuple(again.tolist()) == sent[2, 1]  # and reproducibly


# ---- the encoding's length ----


@pytest.mark.parametrize(
    ("model", "input_shape", "rank", "smaller"),
    [("cnn", (1, 28, 28), 2, 150), ("cnn", (1, 28, 28), 4, 75), ("mlp", (64,), 2, 10)],
)
def test_the_encoding_is_r_n_plus_m_per_compressed_tensor(
    model: str, input_shape: tuple[int, ...], rank: int, smaller: int
) -> None:
    net = build_model(model, input_shape=input_shape, num_classes=10)
    params = spec(*(tuple(p.shape) for p in net.parameters()))
    expected = 0
    for shape, numel in zip(params.shapes, params.numels, strict=True):
        n, m = shape[0], numel // shape[0]
        compressed = len(shape) >= 2 and min(n, m) > rank and rank * (n + m) < n * m
        expected += rank * (n + m) if compressed else n * m
    ps = PowerSGD(rank=rank).bind(params)
    assert ps.encoded_size == expected
    sent, _ = ps.encode(Message({"delta": torch.randn(params.size)}), {}, ctx())
    assert sent.nbytes == 4 * expected
    assert params.size > smaller * expected  # e.g. 1,663,370 floats down to 10,800


def test_small_matrices_and_vectors_go_raw_so_nothing_grows() -> None:
    ps = PowerSGD(rank=2).bind(spec((3, 3), (2, 50), (7,), (), (6, 6)))
    assert [b.low_rank for b in ps.layout] == [False, False, False, False, True]
    assert ps.encoded_size == 9 + 100 + 7 + 1 + 2 * 12
    x = torch.randn(ps.size, generator=torch.Generator().manual_seed(6))
    sent, state = ps.encode(Message({"delta": x}), {}, ctx())
    out = ps.decode(sent, ctx()).arrays["delta"]
    torch.testing.assert_close(out[:117], x[:117], atol=0, rtol=0)  # raw: bit for bit
    assert bool((state["residual"][:117] == 0).all())


# ---- hostile input and bad settings ----


@pytest.mark.parametrize(
    ("delta", "message"),
    [
        (None, "'delta' must be the float32 factors, got NoneType"),
        (torch.zeros(47, dtype=torch.float64), "must be the float32 factors, got torch.float64"),
        (torch.zeros(47, dtype=torch.int32), "must be the float32 factors, got torch.int32"),
        (torch.zeros(46), r"must hold 47 values .* got shape \(46,\)"),
        (torch.zeros(1, 47), r"must hold 47 values .* got shape \(1, 47\)"),
        (torch.zeros(75), r"must hold 47 values .* got shape \(75,\)"),  # dense, not factors
        (torch.tensor([float("nan")] + [0.0] * 46), "contains NaN or Inf"),
        (torch.tensor([float("inf")] + [0.0] * 46), "contains NaN or Inf"),
        (torch.full((47,), 1e30), r"the decoded delta P Q\^T overflows float32"),
    ],
)
def test_a_hostile_message_is_refused_with_the_reason(
    delta: torch.Tensor | None, message: str
) -> None:
    ps = PowerSGD(rank=2).bind(spec((10, 6), (3, 3), (6,)))
    assert ps.encoded_size == 2 * (10 + 6) + 9 + 6  # (10 x 6)'s factors, the rest raw
    arrays = {} if delta is None else {"delta": delta}
    with pytest.raises(MessageError, match=message):
        ps.decode(Message(arrays, {"num_examples": 3}), ctx())


@pytest.mark.parametrize("rank", [0, -2, 1.5, True])
def test_bad_ranks_are_refused(rank: Any) -> None:
    with pytest.raises(ValueError, match=r"powersgd\.rank must be an integer >= 1"):
        PowerSGD(rank=rank)


def test_an_unbound_or_mismatched_transform_says_so() -> None:
    with pytest.raises(RuntimeError, match="bound to the model's ParamSpec"):
        PowerSGD().encode(Message({"delta": torch.zeros(4)}), {}, ctx())
    ps = PowerSGD().bind(spec((8, 8)))
    with pytest.raises(ValueError, match=r"delta has shape \(5,\), not \(64,\)"):
        ps.encode(Message({"delta": torch.zeros(5)}), {}, ctx())
    with pytest.raises(ValueError, match=r"client state 'q' has shape \(3,\), not \(16,\)"):
        ps.encode(Message({"delta": torch.zeros(64)}), {"q": torch.zeros(3)}, ctx())


# ---- whole runs ----

FRAMING = 200  # bytes of an update's names, dtypes, shapes and scalars, at most
BASE: dict[str, Any] = {
    "seed": 0,
    "rounds": 30,
    "data": {"dataset": "digits", "num_clients": 10, "partition": {"kind": "iid"}},
    "model": {"name": "mlp"},
    "sampler": {"clients_per_round": 5},
    "client": {"epochs": 1, "batch_size": 16, "lr": 0.1},
    "run": {"threads": 1},
}
MLP = spec((64, 64), (64,), (10, 64), (10,))


def run(transforms: list[dict[str, Any]], **extra: Any) -> RunResult:
    cfg = ExperimentConfig.from_dict({**BASE, "transforms": transforms, **extra})
    return run_experiment(cfg.build())


@pytest.fixture(scope="module")
def dense() -> RunResult:
    return run([])


def test_low_rank_runs_learn_close_to_dense_at_a_fraction_of_the_bytes(dense: RunResult) -> None:
    runs = {
        "rank2": run([{"name": "powersgd", "rank": 2}]),
        "rank4": run([{"name": "powersgd", "rank": 4}]),
        "rank2_no_ef": run([{"name": "powersgd", "rank": 2, "error_feedback": False}]),
    }
    d = dense.weights.numel()
    for name, result in runs.items():
        per_update = 4 * PowerSGD(rank=int(name[4])).bind(MLP).encoded_size
        for r, m in zip(dense.history, result.history, strict=True):
            assert 0 < m["bytes_up"] - m["updates"] * per_update < m["updates"] * FRAMING
            assert 0 < r["bytes_up"] - r["updates"] * 4 * d < r["updates"] * FRAMING
            assert m["bytes_up"] < r["bytes_up"] / 5
    final = {k: r.history[-1]["test_accuracy"] for k, r in {"dense": dense, **runs}.items()}
    assert final["dense"] > 0.85, final  # learning (chance: 0.1), and the compressed runs alike
    assert final["rank2"] == pytest.approx(final["dense"], abs=0.03), final
    assert final["rank4"] == pytest.approx(final["dense"], abs=0.02), final
    assert final["rank2_no_ef"] < final["rank2"] - 0.05, final  # what error feedback buys


def test_a_transform_after_powersgd_is_refused() -> None:
    with pytest.raises(ValueError, match=r"powersgd.*needs to be the last update transform"):
        run([{"name": "powersgd"}, {"name": "clip", "max_norm": 1.0}])


def test_the_cli_runs_powersgd_from_toml_and_stores_its_state(tmp_path: Path) -> None:
    toml = tmp_path / "p.toml"
    toml.write_text(
        "rounds = 2\n"
        '[data]\ndataset = "digits"\nnum_clients = 6\n'
        '[model]\nname = "mlp"\n'
        "[sampler]\nclients_per_round = 3\n"
        '[[transforms]]\nname = "powersgd"\nrank = 3\n'
    )
    out = CliRunner().invoke(app, ["run", str(toml), "--store", str(tmp_path / "runs")])
    assert out.exit_code == 0, out.output
    store = RunStore(tmp_path / "runs")
    (info,) = store.list_runs()
    assert info.config["transforms"] == [
        {"name": "powersgd", "rank": 3, "error_feedback": True, "warm_start": True}
    ]
    per_update = 4 * PowerSGD(rank=3).bind(MLP).encoded_size
    for record in store.rounds(info.run_id):
        updates = record.metrics["updates"]
        assert 0 < record.metrics["bytes_up"] - updates * per_update < updates * FRAMING
    states = [s for s in store.client_states(info.run_id, list(range(6))) if s]
    assert states, "no client kept state"
    for s in states:
        assert s["transforms.0.powersgd/q"].shape == (3 * (64 + 64),)
        assert s["transforms.0.powersgd/residual"].shape == (MLP.size,)
        assert float(s["transforms.0.powersgd/residual"].abs().sum()) > 0


RESUMED: dict[str, Any] = {
    **BASE,
    "rounds": 4,
    "data": {"dataset": "digits", "num_clients": 8, "partition": {"kind": "dirichlet"}},
    "sampler": {"clients_per_round": 4},
    "transforms": [{"name": "powersgd", "rank": 2}],
}


def test_a_resumed_run_equals_the_uninterrupted_one(tmp_path: Path) -> None:
    """The residuals and warm-start Q's travel through the store: a run stopped after round
    2 and resumed ends bit for bit where the uninterrupted run does."""

    resumed = interrupted_and_resumed(ExperimentConfig.from_dict(RESUMED), tmp_path, after=2)
    full = run_experiment(ExperimentConfig.from_dict(RESUMED).build())

    assert learning(resumed) == learning(full)
    assert torch.equal(resumed.weights, full.weights)
    # not vacuous: without the stored state (a fresh Q and no residual) the run differs
    stateless = {**RESUMED, "transforms": [{**RESUMED["transforms"][0], "warm_start": False}]}
    cold = run_experiment(ExperimentConfig.from_dict(stateless).build())
    assert not torch.equal(cold.weights, full.weights)
