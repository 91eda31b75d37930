"""``engine = "auto"``: which engine it picks, why, and that the choice is recorded."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from potluck.algorithms import Algorithm, ditto, fedavg, scaffold
from potluck.cli import app
from potluck.client import ClientProgram, Term
from potluck.config import ExperimentConfig
from potluck.core.parts import Need
from potluck.core.task import Task
from potluck.data import Federation
from potluck.engines.base import EngineOptions, choose_engine
from potluck.orchestrator import resolve_engine, run_experiment
from potluck.store.sqlite import RunStore


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))


def batch_norm_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 16),
        nn.BatchNorm1d(16, track_running_stats=False),
        nn.Linear(16, 10),
    )


def dropout_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Dropout(0.2), nn.Linear(16, 10))


class LSTMNet(nn.Module):
    """An 8x8 input as a sequence of 8 rows of 8 features."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 16, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x.reshape(len(x), 8, 8))
        return self.head(out[:, -1])


INPUTS = {mlp: (64,), cnn: (1, 28, 28), batch_norm_mlp: (64,), dropout_mlp: (64,), LSTMNet: (64,)}
TWO = EngineOptions(workers=2)
ONE = EngineOptions(workers=1)


class OneAtATime(Term):
    """A term that declares it cannot be batched with other clients."""

    needs: ClassVar[frozenset[str]] = frozenset({Need.ONE_CLIENT_AT_A_TIME})


PLAIN = fedavg()


def program(model: Callable[[], nn.Module], algorithm: Algorithm) -> ClientProgram:
    g = torch.Generator().manual_seed(0)
    shape = INPUTS[model]
    clients = [(torch.randn(12, *shape, generator=g), torch.arange(12) % 10) for _ in range(3)]
    return ClientProgram(Task(model), Federation.from_client_data(clients), algorithm)


LONG, SHORT = 10**6, 4_500  # local steps in a run (SHORT: the W1 benchmark)


@pytest.mark.parametrize(
    ("model", "algorithm", "cohort", "options", "steps", "engine", "words"),
    [
        (mlp, PLAIN, 10, TWO, LONG, "vectorized", "without convolutions"),
        (mlp, scaffold(), 10, ONE, LONG, "vectorized", "one batched computation"),
        (mlp, PLAIN, 10, TWO, SHORT, "pool", "4,500 local steps in the run are too few"),
        (mlp, PLAIN, 10, ONE, SHORT, "inline", "too few to amortise"),
        (cnn, PLAIN, 10, TWO, LONG, "pool", "Conv2d layers (module '0')"),
        (cnn, PLAIN, 10, ONE, LONG, "inline", "one core"),
        (LSTMNet, PLAIN, 10, TWO, LONG, "pool", "LSTM"),
        (LSTMNet, PLAIN, 10, ONE, LONG, "inline", "LSTM"),
        (batch_norm_mlp, PLAIN, 10, TWO, LONG, "pool", "batch statistics"),
        (mlp, ditto(lam=0.1), 10, TWO, LONG, "vectorized", "one batched computation"),
        (mlp, PLAIN, 1, TWO, LONG, "inline", "one client per round"),
        (mlp, PLAIN, 10, EngineOptions(ray_address="ray://h:1"), LONG, "ray", "ray://h"),
        (dropout_mlp, PLAIN, 10, TWO, LONG, "pool", "Dropout"),
        (mlp, fedavg(terms=(OneAtATime(),)), 10, TWO, LONG, "pool", "one client at a time"),
    ],
)
def test_choice_and_reason(
    model: Callable[[], nn.Module],
    algorithm: Algorithm,
    cohort: int,
    options: EngineOptions,
    steps: int,
    engine: str,
    words: str,
) -> None:
    name, why = choose_engine(program(model, algorithm), cohort, options, steps)
    assert name == engine
    assert words in why


@pytest.fixture
def long_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    """Count any run as long enough for the vectorized engine (the tests' runs are short)."""
    monkeypatch.setattr("potluck.engines.base.VECTORIZE_MIN_STEPS", 0)


def digits(engine: str, store: str) -> ExperimentConfig:
    return ExperimentConfig.from_dict(
        {
            "rounds": 2,
            "data": {"dataset": "digits", "num_clients": 10},
            "model": {"name": "mlp"},
            "sampler": {"clients_per_round": 4},
            "run": {"engine": engine, "threads": 1, "store": store, "name": "auto"},
        }
    )


def test_resolved_engine_is_stored_so_resume_uses_it(tmp_path: Path, long_enough: None) -> None:
    exp = digits("auto", str(tmp_path)).build()
    resolved, why = resolve_engine(exp)
    assert (resolved.engine, resolved.config["run"]["engine"]) == ("vectorized", "vectorized")
    assert why.startswith("auto: ")
    run_experiment(exp, tmp_path)
    with RunStore(tmp_path) as store:
        info = store.get_run(store.resolve("auto"))
    assert info.config["run"]["engine"] == "vectorized"
    assert resolve_engine(digits("pool", str(tmp_path)).build())[0].engine == "pool"


def test_a_short_run_is_not_vectorized(tmp_path: Path) -> None:
    exp, why = resolve_engine(digits("auto", str(tmp_path)).build())  # 2 rounds x 4 x 8 steps
    assert exp.engine in ("pool", "inline") and "64 local steps in the run are too few" in why


def test_cli_says_which_engine_and_why(tmp_path: Path, long_enough: None) -> None:
    cfg = tmp_path / "exp.toml"
    cfg.write_text(digits("inline", str(tmp_path / "runs")).to_toml())
    result = CliRunner().invoke(app, ["run", str(cfg), "--engine", "auto"])
    assert result.exit_code == 0, result.output
    assert "engine vectorized (auto: 4 clients per round" in " ".join(result.output.split())
    with RunStore(tmp_path / "runs") as store:
        assert store.get_run(store.resolve("auto")).config["run"]["engine"] == "vectorized"


def test_cli_refuses_unknown_engines(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["run", "--engine", "gpu", "--store", str(tmp_path)])
    assert result.exit_code == 2
    assert "run.engine" in result.output and "'auto'" in result.output
