"""Robust aggregators in whole runs: from a TOML file through the CLI, refused before the
first round when the cohort breaks their assumption or secure aggregation hides the
updates, a round with too few updates aborted without moving the model, and centered
clipping's center kept as server state: the engines agree and a resumed run equals an
uninterrupted one."""

from __future__ import annotations

import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from potluck.aggregate import Bulyan
from potluck.cli import app
from potluck.config import ExperimentConfig
from potluck.engines import available_engines
from potluck.orchestrator import RunResult, resume_experiment, run_experiment
from potluck.store.sqlite import RunStore

README = Path(__file__).resolve().parents[2] / "README.md"
BASE: dict[str, Any] = {
    "data": {"dataset": "digits", "num_clients": 20, "partition": {"kind": "dirichlet"}},
    "model": {"name": "mlp"},
    "sampler": {"clients_per_round": 8},
    "client": {"epochs": 1, "batch_size": 16, "lr": 0.1},
    "evaluation": {"federated_clients": 0},
}
CLIPPING = {"name": "centered_clipping", "tau": 0.3, "byzantine": 0}


def config(aggregator: dict[str, Any], rounds: int = 3, engine: str = "inline", **extra: Any):
    run = {"engine": engine, "threads": 1}
    return ExperimentConfig.from_dict(
        {**BASE, "rounds": rounds, "run": run, "aggregator": aggregator, **extra}
    )


@cache
def clipped_run(engine: str) -> RunResult:
    return run_experiment(config(CLIPPING, engine=engine).build())


@pytest.mark.parametrize(
    "aggregator",
    [
        "name = 'trimmed_mean'\ntrim = 2",
        "name = 'multi_krum'\nbyzantine = 1\nselected = 4",
        "name = 'geometric_median'\nbyzantine = 0.25",
        "name = 'norm_bounding'\nbound = 0.5\nnoise_std = 0.001",
    ],
)
def test_each_family_runs_from_a_toml_file_with_the_cli(tmp_path: Path, aggregator: str) -> None:
    exp = tmp_path / "robust.toml"
    exp.write_text(
        "rounds = 2\n[data]\ndataset = 'digits'\nnum_clients = 10\n[model]\nname = 'mlp'\n"
        f"[sampler]\nclients_per_round = 8\n[aggregator]\n{aggregator}\n[run]\nthreads = 1\n"
    )
    result = CliRunner().invoke(app, ["run", str(exp), "--store", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert "round 2" in result.output and "done run" in result.output
    (info,) = RunStore(tmp_path / "runs").list_runs()
    assert info.config["aggregator"]["name"] in aggregator


def test_a_cohort_too_small_for_the_assumption_is_refused_before_the_first_round(
    tmp_path: Path,
) -> None:
    store = RunStore(tmp_path)
    with pytest.raises(ValueError) as err:
        run_experiment(config({"name": "bulyan", "byzantine": 2}).build(), store)
    assert str(err.value) == (
        "aggregator: Bulyan assumes n >= 4f + 3: byzantine = 2 (f = 2) needs a cohort of at "
        "least 11, but the expected cohort is 8: sample more clients per round or lower "
        "byzantine"
    )
    assert store.list_runs() == []


@pytest.mark.parametrize("name", ["krum", "median", "centered_clipping", "norm_bounding"])
def test_secure_aggregation_refuses_a_robust_aggregator_with_the_reason(name: str) -> None:
    with pytest.raises(ValueError) as err:
        config({"name": name}, algorithm={"name": "secagg_fedavg"})
    cls = type(config({"name": name}).build().algorithm.aggregator).__name__
    assert (
        f"aggregator ({cls}) needs individual updates, but transforms.0.secagg (SecAgg) gives "
        "the server only their sum" in str(err.value)
    )


def test_a_term_that_needs_weighted_updates_is_refused() -> None:
    with pytest.raises(ValueError, match=r"needs the updates' aggregation weights honoured, "):
        config({"name": "median"}, terms=[{"name": "qffl"}])


def test_the_readme_example_builds_its_aggregator() -> None:
    section = README.read_text().split("### Byzantine-robust aggregation")[1]
    block = section.split("```toml\n")[1].split("```")[0]
    cfg = ExperimentConfig.from_dict(
        {**BASE, **tomllib.loads(block), "sampler": {"clients_per_round": 11}}
    )
    assert cfg.build().algorithm.aggregator == Bulyan(byzantine=2)


def test_a_round_with_too_few_updates_is_aborted_and_the_run_goes_on() -> None:
    """Poisson sampling of rate 0.35 (7 expected) under Krum for f = 2 (n >= 7)."""
    sampler = {"name": "poisson", "rate": 0.35}
    result = run_experiment(config({"name": "krum", "byzantine": 2}, 6, sampler=sampler).build())
    history = result.history
    aborted = [m.get("aborted", 0.0) == 1.0 for m in history]
    assert any(aborted) and not all(aborted)  # (this seed's cohorts)
    for before, now, stopped in zip(history, history[1:], aborted[1:], strict=False):
        assert now["updates"] == (0 if stopped else now["cohort_size"])
        assert (now["cohort_size"] < 7) == stopped
        assert (now["test_loss"] == before["test_loss"]) == stopped  # the model did not move


@pytest.mark.parametrize("engine", [e for e in available_engines() if e not in ("ray", "inline")])
def test_the_engines_agree_under_centered_clipping(engine: str) -> None:
    ref, got = clipped_run("inline"), clipped_run(engine)
    if engine == "pool":
        assert torch.equal(got.weights, ref.weights)
    else:
        torch.testing.assert_close(got.weights, ref.weights, atol=1e-5, rtol=1e-5)


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    """The center is checkpointed with the round: stopped after round 2 and resumed, the
    run ends where the uninterrupted one does."""

    class Stop(Exception):
        pass

    def stop_after_two(rnd: int, _metrics: object) -> None:
        if rnd == 2:
            raise Stop

    store = RunStore(tmp_path)
    with pytest.raises(Stop):
        run_experiment(config(CLIPPING).build(), store, on_round=stop_after_two)
    (info,) = store.list_runs()
    found = store.latest_checkpoint(info.run_id)
    assert found is not None and found[0] == 2
    assert float(found[1].tensors["aggregator/center"].norm()) > 0  # the server state
    resumed = resume_experiment(ExperimentConfig.from_dict(info.config).build(), store, info.run_id)
    assert torch.equal(resumed.weights, clipped_run("inline").weights)
