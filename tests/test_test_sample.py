"""Centralised evaluation on a seeded sample of the test set (``evaluation.test_examples``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from potluck.cli import app
from potluck.config import ExperimentConfig
from potluck.orchestrator import Evaluation, run_experiment
from potluck.store.sqlite import RunStore

CFG = {
    "rounds": 2,
    "data": {"dataset": "digits", "num_clients": 10},
    "model": {"name": "mlp"},
    "sampler": {"clients_per_round": 4},
    "evaluation": {"federated_clients": 0, "test_examples": 50},
}


def test_the_sample_is_seeded_distinct_and_sorted() -> None:
    ev = Evaluation(test_examples=40)
    rows = ev.test_rows(360, seed=3)
    assert rows is not None and len(rows) == len(set(rows.tolist())) == 40
    assert rows.tolist() == sorted(rows.tolist()) and rows.min() >= 0 and rows.max() < 360
    assert np.array_equal(rows, ev.test_rows(360, seed=3))  # every round, every resume
    assert not np.array_equal(rows, ev.test_rows(360, seed=4))
    assert Evaluation().test_rows(360, seed=3) is None
    assert Evaluation(test_examples=360).test_rows(360, seed=3) is None  # all of them


def test_more_examples_than_the_test_set_is_refused() -> None:
    with pytest.raises(ValueError, match="test_examples = 400: the test set holds 360"):
        Evaluation(test_examples=400).test_rows(360, seed=0)
    with pytest.raises(ValueError, match="test_examples must be >= 1"):
        Evaluation(test_examples=0)


@pytest.mark.parametrize("engine", ["inline", "vectorized", "pool"])
def test_the_accuracy_is_the_models_on_exactly_the_sample(engine: str) -> None:
    exp = ExperimentConfig.from_dict(CFG, [f"run.engine={engine!r}"]).build()
    result = run_experiment(exp)
    rows = exp.evaluation.test_rows(len(exp.federation.source.test), exp.seed)
    assert rows is not None and len(rows) == 50
    test = exp.federation.source.test
    program = exp.algorithm.client_program(exp.task, exp.federation, seed=exp.seed)
    by_hand = program.evaluate_arrays(result.weights, test.features(rows), test.y[rows])
    final = result.history[-1]
    assert final["test_accuracy"] == pytest.approx(by_hand.accuracy, abs=1 / 50 + 1e-12)
    assert final["test_accuracy"] * 50 == pytest.approx(round(final["test_accuracy"] * 50))
    whole = program.evaluate_test(result.weights)
    assert whole.n == len(test) > 50


def test_from_the_cli_and_refused_before_anything_is_stored(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["run", "--store", str(tmp_path), "--set", "rounds=1", "--set", "data.dataset='digits'"]
    args += ["--set", "data.num_clients=10", "--set", "model.name='mlp'"]
    bad = runner.invoke(app, [*args, "--set", "evaluation.test_examples=100000"])
    assert bad.exit_code != 0 and "the test set holds" in bad.output
    assert not RunStore(tmp_path).list_runs()
    good = runner.invoke(app, [*args, "--set", "evaluation.test_examples=30"])
    assert good.exit_code == 0, good.output
    (run,) = RunStore(tmp_path).list_runs()
    accuracy = RunStore(tmp_path).rounds(run.run_id)[-1].metrics["test_accuracy"]
    assert accuracy * 30 == pytest.approx(round(accuracy * 30))
