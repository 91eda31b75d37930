"""FetchSGD: the count sketch is linear (hypothesis) and recovers heavy coordinates; the
server's error accumulation in sketch space eventually sends what one round could not; the
clients keep no state; a run learns with a sketch five times smaller than the update, from
Python, TOML and the CLI, resumes exactly (its sketches are server state), and a non-linear
aggregator or a sketch no smaller than the update is refused with the reason."""

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
from potluck.core.message import Message
from potluck.core.params import ParamSpec
from potluck.core.parts import part_context
from potluck.orchestrator import run_experiment
from potluck.store.sqlite import RunStore
from potluck.testing import interrupted_and_resumed, learning
from potluck.updates.sketch import FetchSGD

NS = "transforms.0.fetchsgd"


def bound(d: int, **kwargs: Any) -> FetchSGD:
    return FetchSGD(**kwargs).bind(ParamSpec(("w",), ((d,),)))


def ctx(seed: int = 0, round: int = 1, client: int | None = 0) -> Any:
    return part_context(seed, round, NS, client=client)


@settings(max_examples=30, deadline=None)
@given(
    d=st.integers(50, 400),
    a=st.floats(-3, 3),
    b=st.floats(-3, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_the_count_sketch_is_linear(d: int, a: float, b: float, seed: int) -> None:
    f = bound(d, rows=3, cols=8)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(d, generator=g), torch.randn(d, generator=g)
    c = ctx(seed)
    torch.testing.assert_close(
        f.sketch(a * x + b * y, c), a * f.sketch(x, c) + b * f.sketch(y, c), atol=1e-4, rtol=1e-4
    )


def test_every_client_and_the_server_use_the_same_hashes_all_run() -> None:
    f = bound(500, rows=3, cols=50)
    x = torch.randn(500)
    sketches = {f.sketch(x, ctx(7, r, c)).sum().item() for r in (1, 5) for c in (0, 3, None)}
    assert len(sketches) == 1
    assert not torch.equal(f.sketch(x, ctx(7)), f.sketch(x, ctx(8)))  # another run, others


def test_heavy_coordinates_are_recovered_from_a_sketch_much_smaller_than_the_update() -> None:
    d, heavy = 20_000, torch.tensor([11, 2_000, 7_777, 15_000, 19_999])
    x = torch.randn(d, generator=torch.Generator().manual_seed(0)) * 0.01
    x[heavy] = torch.tensor([5.0, -4.0, 3.0, -6.0, 4.5])
    f = bound(d, rows=5, cols=400, top_k=5 / d, momentum=0.0, lr=1.0)  # 10x fewer floats
    step, _ = f.decode_aggregate(f.sketch(x, ctx()), f.server_init(x), ctx(client=None))
    assert step.nonzero().flatten().tolist() == heavy.tolist()
    torch.testing.assert_close(step[heavy], x[heavy], atol=0.1, rtol=0)


def test_what_one_round_cannot_send_accumulates_in_sketch_space_until_it_is_sent() -> None:
    """Error accumulation: a small coordinate that every round loses to a large one is
    added up in S_e until it is the largest, then sent; nothing is lost for good."""
    d = 1000
    f = bound(d, rows=5, cols=100, top_k=1 / d, momentum=0.0, lr=1.0)
    x = torch.zeros(d)
    x[10], x[20] = 1.0, 0.3
    state, sent = f.server_init(x), torch.zeros(d)
    for r in range(1, 8):
        step, state = f.decode_aggregate(
            f.sketch(x, ctx(round=r)), state, ctx(round=r, client=None)
        )
        sent += step
    assert sent[20] > 0  # sent at last, after about 1 / 0.3 rounds of accumulation
    # what was applied plus what the error sketch still holds is what came in
    total = sent + f.unsketch(state["error"], ctx())
    torch.testing.assert_close(total[[10, 20]], 7 * x[[10, 20]], atol=1e-4, rtol=1e-4)


def test_momentum_masking_zeros_the_buckets_of_what_was_sent() -> None:
    f = bound(1000, rows=3, cols=50, top_k=0.002, momentum=0.9)
    x = torch.zeros(1000)
    x[[1, 2]] = torch.tensor([3.0, -2.0])
    step, state = f.decode_aggregate(f.sketch(x, ctx()), f.server_init(x), ctx(client=None))
    index, _ = f.hashes(0, NS)
    assert step.nonzero().flatten().tolist() == [1, 2]
    assert bool((state["momentum"][index[:, [1, 2]].reshape(-1)] == 0).all())


def test_clients_keep_no_state_and_upload_rows_times_cols_floats() -> None:
    f = bound(2000, rows=3, cols=100)
    sent, state = f.encode(Message({"delta": torch.randn(2000)}), {}, ctx())
    assert state == {} and sent.arrays["delta"].shape == (300,) and sent.nbytes == 1200


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rows": 4}, "fetchsgd.rows must be odd"),
        ({"cols": 0}, "fetchsgd.cols must be >= 1"),
        ({"top_k": 0.0}, r"fetchsgd.top_k must be in \(0, 1\]"),
        ({"momentum": 1.0}, r"fetchsgd.momentum must be in \[0, 1\)"),
        ({"lr": 0.0}, "fetchsgd.lr must be > 0"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FetchSGD(**kwargs)


# ---- whole runs ----

BASE: dict[str, Any] = {
    "seed": 0,
    "rounds": 16,
    "data": {"dataset": "digits", "num_clients": 10, "partition": {"kind": "iid"}},
    "model": {"name": "mlp"},
    "sampler": {"clients_per_round": 5},
    "client": {"epochs": 1, "batch_size": 16, "lr": 0.1},
    "run": {"threads": 1},
}
# 2,000 floats for the MLP's 4,810; 48 coordinates a round, well below the 400 buckets a row
SKETCH = {"name": "fetchsgd", "rows": 5, "cols": 400, "top_k": 0.01, "momentum": 0.0, "lr": 1.0}


def config(**extra: Any) -> ExperimentConfig:
    return ExperimentConfig.from_dict({**BASE, "transforms": [SKETCH], **extra})


def test_a_sketched_run_learns_and_uploads_the_sketch() -> None:
    result = run_experiment(config().build())
    dense = run_experiment(ExperimentConfig.from_dict(BASE).build())
    for m, r in zip(result.history, dense.history, strict=True):
        per_update = 5 * 400 * 4  # the sketch's floats, and the framing
        assert 0 < m["bytes_up"] - m["updates"] * per_update < m["updates"] * 200
        assert r["bytes_up"] > 2.3 * m["bytes_up"]
    # it learns, more slowly than dense (seen: 0.74 against 0.87 after 20 rounds): a sketch
    # recovers heavy coordinates, and a small model's deltas have few
    acc = result.history[-1]["test_accuracy"]
    assert acc > 0.5 and acc > 3 * result.history[0]["test_accuracy"], acc


def test_a_resumed_sketched_run_equals_the_uninterrupted_one(tmp_path: Path) -> None:
    resumed = interrupted_and_resumed(config(), tmp_path, after=3)
    full = run_experiment(config().build())
    assert learning(resumed) == learning(full)
    assert torch.equal(resumed.weights, full.weights)


def test_a_non_linear_aggregator_and_an_oversized_sketch_are_refused(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError,
        match=r"fetchsgd.*needs a linear aggregate.*aggregator \(CoordinateMedian\).*does not give",
    ):
        config(aggregator={"name": "median"}).build()
    store = RunStore(tmp_path)
    big = ExperimentConfig.from_dict({**BASE, "transforms": [{**SKETCH, "cols": 1000}]})
    with pytest.raises(ValueError, match="is no smaller than the update"):
        run_experiment(big.build(), store)
    assert store.list_runs() == []  # refused before anything was stored
    with pytest.raises(ValueError, match=r"unsketches k = 241 .* from rows of 200 buckets"):
        bound(4810, rows=3, cols=200, top_k=0.05)


def test_the_cli_runs_a_sketched_experiment_from_toml(tmp_path: Path) -> None:
    toml = tmp_path / "s.toml"
    toml.write_text(
        "rounds = 2\n"
        '[data]\ndataset = "digits"\nnum_clients = 6\n'
        '[model]\nname = "mlp"\n'
        "[sampler]\nclients_per_round = 3\n"
        '[[transforms]]\nname = "fetchsgd"\nrows = 3\ncols = 300\ntop_k = 0.05\n'
    )
    out = CliRunner().invoke(app, ["run", str(toml), "--store", str(tmp_path / "runs")])
    assert out.exit_code == 0, out.output
    store = RunStore(tmp_path / "runs")
    (info,) = store.list_runs()
    rounds = store.rounds(info.run_id)
    assert len(rounds) == 2
    assert all(0 < r.metrics["bytes_up"] - r.metrics["updates"] * 3600 < 600 for r in rounds)
