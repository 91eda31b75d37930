"""Secure aggregation in whole runs: on every engine it gives the run without it within the
fixed-point error, the engines agree with dropouts between the stages, an aborted round
leaves the model where it was and the run goes on, the clients' secrets are never stored,
and settings and compositions that cannot work are refused with the reason."""

from __future__ import annotations

import dataclasses
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from potluck.cli import app
from potluck.config import ExperimentConfig
from potluck.engines import available_engines
from potluck.engines.inline import InlineEngine
from potluck.orchestrator import TIMING_METRICS, RunResult, resume_experiment, run_experiment
from potluck.secagg import SecAgg
from potluck.store.sqlite import RunStore

ENGINES = [e for e in available_engines() if e != "ray"]
COHORT = 8
BASE: dict[str, Any] = {
    "data": {"dataset": "digits", "num_clients": 20, "partition": {"kind": "dirichlet"}},
    "model": {"name": "mlp"},
    "sampler": {"clients_per_round": COHORT},
    "client": {"epochs": 1, "batch_size": 16, "lr": 0.1},
    "evaluation": {"federated_clients": 0},
}
SECAGG = {"transforms": [{"name": "secagg"}], "aggregator": {"name": "secagg_sum"}}


def config(engine: str = "inline", rounds: int = 1, **extra: Any) -> ExperimentConfig:
    run = {"engine": engine, "threads": 1}
    return ExperimentConfig.from_dict({**BASE, "rounds": rounds, "run": run, **extra})


@cache
def run(engine: str, secure: bool, rounds: int = 1, dropout: float = 0.0) -> RunResult:
    extra: dict[str, Any] = {}
    if secure:
        extra = {"algorithm": {"name": "secagg_fedavg", "threshold": 3, "dropout": dropout}}
    return run_experiment(config(engine, rounds, **extra).build())


def fixed_point_error(exp_cfg: ExperimentConfig, mean: torch.Tensor) -> torch.Tensor:
    """The rounding error bound of potluck.secagg.encoding, per coordinate, for the
    smallest total weight any cohort of this federation can have."""
    sizes = np.sort(exp_cfg.build().federation.num_examples_all())
    total = float(sizes[:COHORT].sum())
    scale, clip, max_weight = 2.0**19, 1.0, 1000.0  # the defaults
    return COHORT * (clip + mean.abs()) / (scale * total / max_weight - COHORT)


@pytest.mark.parametrize("engine", ENGINES)
def test_secure_fedavg_equals_fedavg_within_the_fixed_point_error(engine: str) -> None:
    plain, secure = run(engine, False), run(engine, True)
    cfg = config(engine)
    exp = cfg.build()
    w0 = exp.algorithm.client_program(exp.task, exp.federation, seed=exp.seed).initial_weights()
    mean = plain.weights - w0  # server SGD at lr 1: the round's weighted mean delta
    assert float(mean.abs().max()) > 1e-3 and float(mean.abs().max()) < 1.0  # nothing clipped
    error = (secure.weights - plain.weights).abs()
    assert bool((error <= fixed_point_error(cfg, mean) + 1e-6).all())
    assert float(error.max()) > 0  # it really went through the fixed-point encoding
    assert secure.history[0]["updates"] == COHORT
    assert secure.history[0]["transforms.0.secagg/unmasked"] == COHORT


@pytest.mark.parametrize("engine", [e for e in ENGINES if e != "inline"])
def test_the_engines_agree_with_dropouts_between_the_stages(engine: str) -> None:
    ref, got = run("inline", True, 3, 0.1), run(engine, True, 3, 0.1)
    strip = [{k: v for k, v in m.items() if k not in TIMING_METRICS} for m in ref.history]
    assert any(0 < m["updates"] < m["cohort_size"] for m in ref.history)  # some left
    for r, g in zip(strip, got.history, strict=True):
        for key in r:
            if key.startswith("transforms.") or key in ("updates", "aborted", "bytes_up"):
                assert g[key] == r[key], key
    if engine == "pool":
        assert torch.equal(got.weights, ref.weights)
    else:
        torch.testing.assert_close(got.weights, ref.weights, atol=1e-5, rtol=1e-5)


def test_an_aborted_round_leaves_the_model_and_the_run_goes_on(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    algorithm = {"name": "secagg_fedavg", "neighbours": 4, "threshold": 4, "dropout": 0.03}
    result = run_experiment(config(rounds=4, algorithm=algorithm).build(), store)
    history = result.history
    aborted = [m.get("aborted", 0.0) for m in history]
    assert aborted[:2] == [1.0, 1.0] and aborted[2:] == [0.0, 0.0]  # (this seed's dropouts)
    first = history[0]
    assert first["updates"] == 0 and first["transforms.0.secagg/masked"] > 0
    assert history[1]["test_loss"] == first["test_loss"]  # the model did not move
    assert history[2]["test_loss"] != first["test_loss"] and history[3]["updates"] > 0
    clients = list(range(20))
    stored = [name for s in store.client_states(result.run_id, clients) for name in s]
    assert not any(name.startswith("transforms.0.secagg/") for name in stored)


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    """Fresh keys every round and nothing of the protocol stored: the same sums."""

    class Stop(Exception):
        pass

    def stop_after_two(rnd: int, _metrics: object) -> None:
        if rnd == 2:
            raise Stop

    store = RunStore(tmp_path)
    with pytest.raises(Stop):
        run_experiment(run_config(3).build(), store, on_round=stop_after_two)
    (info,) = store.list_runs()
    resumed = resume_experiment(ExperimentConfig.from_dict(info.config).build(), store, info.run_id)
    assert torch.equal(resumed.weights, run("inline", True, 3, 0.1).weights)


def run_config(rounds: int) -> ExperimentConfig:
    algorithm = {"name": "secagg_fedavg", "threshold": 3, "dropout": 0.1}
    return config("inline", rounds, algorithm=algorithm)


def test_the_overflow_check_stops_the_run_before_its_first_round() -> None:
    algorithm = {"name": "secagg_fedavg", "quantization_bits": 30}
    with pytest.raises(ValueError) as err:
        run_experiment(config(algorithm=algorithm).build())
    message = str(err.value)
    assert "transforms.0.secagg: 8 clients can sum to 8 * 2^29" in message
    assert "lower quantization_bits to at most 28" in message and "bits = 64" in message


def test_a_weight_above_max_weight_stops_the_run_naming_the_setting() -> None:
    algorithm = {"name": "secagg_fedavg", "max_weight": 10.0}
    with pytest.raises(ValueError, match=r"transforms.0.secagg: .* got \d+: raise max_weight"):
        run_experiment(config(algorithm=algorithm).build())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"aggregator": {"name": "my_lab.agg:Median"}},
            "aggregator (Median) needs individual updates, but transforms.0.secagg (SecAgg) "
            "gives the server only their sum",
        ),
        ({"aggregator": {"name": "mean"}}, "needs the updates summed modulo 2^bits"),
        ({"transforms": [{"name": "clip", "max_norm": 1.0}]}, "needs updates encoded as integers"),
        (
            {"transforms": [{"name": "secagg"}, {"name": "clip", "max_norm": 1.0}]},
            "needs to be the last update transform (one after it would see only its encoding), "
            "but transforms.1.clip (ClipNorm) comes after it",
        ),
        ({"terms": [{"name": "scaffold"}]}, "also uploads ['delta_c'], which it would not"),
    ],
)
def test_compositions_that_cannot_work_are_refused(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as err:
        ExperimentConfig.from_dict({**BASE, **SECAGG, **extra}).algorithm_parts()
    assert message in str(err.value)


@dataclasses.dataclass(frozen=True)
class _Curious(SecAgg):
    """A server half that tries to read a client's secrets from the round loop."""

    def after_train(self, stages: Any, state: dict[str, torch.Tensor], ctx: Any) -> Any:
        stages.state(int(stages.members[0]))
        return super().after_train(stages, state, ctx)


def test_the_server_half_cannot_read_the_clients_secret_state() -> None:
    exp = config(**SECAGG).build()
    curious = dataclasses.replace(exp.algorithm, transforms=(_Curious(),))
    with pytest.raises(PermissionError, match="keeps its client state secret from the server"):
        run_experiment(dataclasses.replace(exp, algorithm=curious))


class _Remote(InlineEngine):
    remote = True


def test_members_of_a_remote_engine_that_send_their_secret_state_are_refused() -> None:
    """A deployed site keeps its secrets (``deploy.secrets``); a remote member that sends
    them anyway is refused at its first stage, so no update is aggregated and the model
    does not move."""
    exp = config(rounds=2, **SECAGG).build()
    result = run_experiment(exp, engine=_Remote)
    assert torch.equal(result.weights, exp.algorithm.client_program(
        exp.task, exp.federation, seed=exp.seed).initial_weights())  # fmt: skip
    cohort = [m["cohort_size"] for m in result.history]
    assert [m["refused"] for m in result.history] == cohort and cohort[0] > 0
    assert all(m["transforms.0.secagg/advertised"] == 0 for m in result.history)


def test_the_preset_runs_from_a_toml_file_with_the_cli(tmp_path: Path) -> None:
    exp = tmp_path / "secure.toml"
    exp.write_text(
        "rounds = 2\n[data]\ndataset = 'digits'\nnum_clients = 10\n[model]\nname = 'mlp'\n"
        "[sampler]\nclients_per_round = 5\n"
        "[algorithm]\nname = 'secagg_fedavg'\nneighbours = 'all'\nthreshold = 0.6\n"
        "[run]\nthreads = 1\n"
    )
    result = CliRunner().invoke(app, ["run", str(exp), "--store", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert "round 2" in result.output and "done run" in result.output
