"""Central DP on a secure sum (``central_dp``, preset ``dp_secagg_fedavg``): the clients clip,
SecAgg+ sums, the server noises the sum with std ``z clip`` (``z clip / m`` on the mean);
without noise it is ``dp_mean``'s clipped mean within the fixed-point error, its epsilon is
``dp_mean``'s on the same sampler, every engine and a resumed run agree, and what it cannot
be accounted under is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from potluck.cli import app
from potluck.config import ConfigError, ExperimentConfig
from potluck.core.parts import part_context
from potluck.engines import available_engines
from potluck.engines.inline import InlineEngine
from potluck.orchestrator import resume_experiment, run_experiment
from potluck.privacy.secure_central import SecureCentralGaussian
from potluck.store.sqlite import RunStore

ENGINES = [e for e in available_engines() if e != "ray"]
BASE: dict[str, Any] = {
    "seed": 1,
    "data": {"dataset": "digits", "num_clients": 20, "partition": {"kind": "dirichlet"}},
    "model": {"name": "logreg"},
    "sampler": {"clients_per_round": 10},
    "client": {"epochs": 1, "batch_size": 16, "lr": 0.1},
    "evaluation": {"federated_clients": 0},
}
CENTRAL = {"name": "dp_secagg_fedavg", "clip": 0.5, "noise_multiplier": 1.0}


def config(engine: str = "inline", rounds: int = 3, **extra: Any) -> ExperimentConfig:
    run = {"engine": engine, "threads": 1}
    return ExperimentConfig.from_dict({**BASE, "rounds": rounds, "run": run, **extra})


def test_the_server_adds_z_clip_over_m_to_the_mean_of_the_m_contributors() -> None:
    part = SecureCentralGaussian(clip=0.5, noise_multiplier=2.0)
    ctx = part_context(0, 1, "transforms.0.central_dp")
    mean = torch.full((200_000,), 0.25)
    released, _ = part.decode_aggregate(mean, {"contributors": torch.tensor(4)}, ctx)
    noise = (released - mean).double()
    assert abs(noise.mean().item()) < 3 * 0.25 / 200_000**0.5
    assert noise.std().item() == pytest.approx(2.0 * 0.5 / 4, rel=0.01)


def test_each_client_clips_and_sends_weight_one_only() -> None:
    from potluck.core.message import Message

    part = SecureCentralGaussian(clip=1.0, noise_multiplier=1.0)
    ctx = part_context(0, 1, "transforms.0.central_dp", client=3)
    message = Message({"delta": torch.tensor([6.0, 8.0])}, {"num_examples": 70, "weight": 70.0})
    out, _ = part.encode(message, {}, ctx)
    assert out.arrays["delta"].tolist() == pytest.approx([0.6, 0.8], rel=1e-4)  # norm slack
    assert dict(out.scalars) == {"num_examples": 1, "num_steps": 0, "weight": 1.0}


def test_without_noise_it_is_dp_means_clipped_mean_within_the_fixed_point_error() -> None:
    secure = run_experiment(config(algorithm={**CENTRAL, "noise_multiplier": 0.0}).build())
    plain = {"algorithm": {"name": "fedavg"}}
    aggregator = {"name": "dp_mean", "clip": 0.5, "noise_multiplier": 0.0}
    central = run_experiment(config(aggregator=aggregator, **plain).build())
    gap = (secure.weights - central.weights).abs().max().item()
    assert 0 < gap < 1e-5, gap  # the fixed point's rounding, three rounds of it
    assert all(m["epsilon"] == float("inf") for m in secure.history)


def test_its_epsilon_is_dp_means_on_the_same_sampler_and_the_noise_is_real() -> None:
    secure = run_experiment(config(algorithm=CENTRAL).build())
    aggregator = {"name": "dp_mean", "clip": 0.5, "noise_multiplier": 1.0}
    central = run_experiment(config(aggregator=aggregator, algorithm={"name": "fedavg"}).build())
    assert [m["epsilon"] for m in secure.history] == [m["epsilon"] for m in central.history]
    quiet = run_experiment(config(algorithm={**CENTRAL, "noise_multiplier": 0.0}).build())
    assert (secure.weights - quiet.weights).abs().max().item() > 1e-3


@pytest.mark.parametrize("engine", [e for e in ENGINES if e != "inline"])
def test_every_engine_gives_the_inline_run(engine: str) -> None:
    inline = run_experiment(config(algorithm=CENTRAL).build())
    other = run_experiment(config(engine, algorithm=CENTRAL).build())
    assert torch.equal(inline.weights, other.weights)


def test_a_resumed_run_equals_the_uninterrupted_one(tmp_path: Path) -> None:
    class Stop(Exception):
        pass

    def stop_after_two(rnd: int, _metrics: object) -> None:
        if rnd == 2:
            raise Stop

    full = run_experiment(config(algorithm=CENTRAL, rounds=4).build())
    store = RunStore(tmp_path / "runs")
    with pytest.raises(Stop):
        run_experiment(config(algorithm=CENTRAL, rounds=4).build(), store, on_round=stop_after_two)
    (info,) = store.list_runs()
    resumed = resume_experiment(ExperimentConfig.from_dict(info.config).build(), store, info.run_id)
    assert torch.equal(resumed.weights, full.weights)
    assert [m["epsilon"] for m in resumed.history] == [m["epsilon"] for m in full.history]


class _Remote(InlineEngine):
    remote = True


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"sampler": {"name": "poisson", "rate": 0.5}}, "not Poisson sampling: the released"),
        ({"algorithm": {"name": "fedavg"}, "transforms": [{"name": "central_dp"}]},
         "needs only the sum of the updates"),
    ],
)  # fmt: skip
def test_what_it_cannot_be_accounted_under_is_refused(extra: dict[str, Any], match: str) -> None:
    cfg = {"algorithm": CENTRAL, **extra}
    with pytest.raises((ValueError, ConfigError), match=match):
        run_experiment(config(**cfg).build())


def test_a_deployment_refuses_noise_from_the_seed() -> None:
    with pytest.raises(ValueError, match=r'transforms.0.noise = "seed": a deployment'):
        run_experiment(config(algorithm=CENTRAL).build(), engine=_Remote)


def test_the_preset_runs_from_a_toml_file_with_the_cli_and_states_its_privacy(
    tmp_path: Path,
) -> None:
    exp = tmp_path / "central.toml"
    exp.write_text(
        "rounds = 2\n[data]\ndataset = 'digits'\nnum_clients = 10\n[model]\nname = 'logreg'\n"
        "[sampler]\nclients_per_round = 5\n[algorithm]\nname = 'dp_secagg_fedavg'\nclip = 0.5\n"
        "[privacy]\ntarget_epsilon = 8.0\n[run]\nthreads = 1\nname = 'central'\n"
    )
    runs = str(tmp_path / "runs")
    result = CliRunner().invoke(app, ["run", str(exp), "--store", runs])
    assert result.exit_code == 0, result.output
    stated = CliRunner().invoke(app, ["privacy", "central", "--store", runs])
    assert stated.exit_code == 0, stated.output
    assert "-DP at the level of one client" in stated.output
    assert "clipped to L2 norm 0.5" in stated.output
