"""User-level central DP (DP-FedAvg): the accountant, the mechanism, the budget, resume."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import dp_accounting as dpa
import numpy as np
import pytest
import torch
from dp_accounting import pld, rdp
from hypothesis import given
from hypothesis import strategies as st

from potluck import resume_experiment, run_experiment
from potluck.algorithms import dp_fedavg, fedavg, qffl, scaffold
from potluck.config import ExperimentConfig
from potluck.core.parts import part_context
from potluck.engines.base import available_engines
from potluck.privacy.accounting import Poisson, Round, WithoutReplacement, calibrate, epsilon
from potluck.privacy.central import NORM_SLACK, GaussianMean, clipped, secure_gaussian
from potluck.privacy.ledger import Ledger, PrivacyBudget, sampling_of
from potluck.privacy.participation import gaussian_epsilon
from potluck.sampling.poisson import PoissonSampler
from potluck.store.sqlite import RunStore

# ---- the accountant -------------------------------------------------------------------------


def test_epsilon_equals_dp_accountings_own() -> None:
    rounds = [Round(1.1, Poisson(0.01))] * 1000
    event = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.01, dpa.GaussianDpEvent(1.1)), 1000)
    ours_rdp, ours_pld = epsilon(rounds, 1e-5), epsilon(rounds, 1e-5, "pld")
    theirs_rdp, theirs_pld = rdp.RdpAccountant(), pld.PLDAccountant()
    theirs_rdp.compose(event)
    theirs_pld.compose(event)
    assert ours_rdp == theirs_rdp.get_epsilon(1e-5) and round(ours_rdp, 4) == 1.7118
    assert ours_pld == theirs_pld.get_epsilon(1e-5) and round(ours_pld, 4) == 1.5154


def test_sampling_without_replacement_is_accounted_under_replace_one() -> None:
    """Replacing one client's data moves the clipped sum by up to 2 clips: dp-accounting's
    noise multiplier is over that sensitivity, so z = 1.1 clips is 0.55 of it."""
    ours = epsilon([Round(1.1, WithoutReplacement(1000, 10))] * 100, 1e-5)
    acc = rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    acc.compose(
        dpa.SelfComposedDpEvent(
            dpa.SampledWithoutReplacementDpEvent(1000, 10, dpa.GaussianDpEvent(0.55)), 100
        )
    )
    assert ours == acc.get_epsilon(1e-5)
    everyone = epsilon([Round(1.1, WithoutReplacement(10, 10))], 1e-5)
    # all of them: the Gaussian mechanism on a sum of sensitivity 2 clips
    assert everyone == pytest.approx(gaussian_epsilon(0.55, 1e-5), rel=1e-9)
    with pytest.raises(ValueError, match="PLD accountant cannot account sampling without"):
        epsilon([Round(1.1, WithoutReplacement(1000, 10))], 1e-5, "pld")


@pytest.mark.parametrize(
    ("target", "kind"),
    [(1.0, "rdp"), (4.0, "rdp"), pytest.param(2.0, "pld", marks=pytest.mark.slow)],
)
def test_calibration_hits_the_target_within_one_percent(target: float, kind: str) -> None:
    sampling, rounds = Poisson(0.01), (200 if kind == "rdp" else 5)
    z = calibrate(target, 1e-5, rounds, sampling, kind)
    spent = epsilon([Round(z, sampling)] * rounds, 1e-5, kind)
    assert 0.99 * target <= spent <= target


# ---- the mechanism --------------------------------------------------------------------------


@given(
    st.integers(1, 6),
    st.integers(1, 20),
    st.floats(1e-3, 1e3),
    st.integers(0, 2**31),
)
def test_clipping_bounds_every_update_and_keeps_small_ones(
    k: int, d: int, clip: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    deltas = torch.randn(k, d, generator=g) * torch.rand(k, 1, generator=g) * 10 * clip
    out = clipped(deltas, clip)
    norms = deltas.double().norm(dim=1)
    assert bool((out.norm(dim=1) <= clip * (1 + 1e-12)).all())
    small = norms * (1 + NORM_SLACK) <= clip
    assert torch.equal(out[small], deltas.double()[small])
    cos = torch.nn.functional.cosine_similarity(out, deltas.double(), dim=1)
    assert bool((cos[norms > 0] > 1 - 1e-9).all())  # the direction is kept


@pytest.mark.parametrize("noise", ["seed", "secure"])
def test_the_noise_has_the_configured_standard_deviation(noise: str) -> None:
    agg = GaussianMean(clip=0.5, noise_multiplier=1.3, denominator=4.0, noise=noise)
    d = 200_000
    mean, _ = agg.aggregate(torch.zeros(0, d), torch.zeros(0), {}, part_context(3, 1, "aggregator"))
    noise_sum = mean.double() * 4.0  # an empty cohort: the sum is pure noise
    assert abs(float(noise_sum.mean())) < 5 * 0.65 / math.sqrt(d)
    assert abs(float(noise_sum.std()) / 0.65 - 1) < 0.01  # std z * clip = 0.65


def test_secure_noise_is_not_reproducible_and_seeded_noise_is() -> None:
    assert not torch.equal(secure_gaussian(8, 1.0), secure_gaussian(8, 1.0))
    agg = GaussianMean(noise_multiplier=1.0, denominator=1.0)
    ctx = part_context(0, 2, "aggregator")
    a, _ = agg.aggregate(torch.zeros(1, 5), torch.ones(1), {}, ctx)
    b, _ = agg.aggregate(torch.zeros(1, 5), torch.ones(1), {}, ctx)
    assert torch.equal(a, b)


def test_the_mean_is_the_clipped_sum_over_the_fixed_denominator() -> None:
    agg = GaussianMean(clip=1.0, noise_multiplier=0.0, denominator=10.0)
    deltas = torch.tensor([[3.0, 4.0], [0.0, 0.5], [0.0, 0.0]])
    mean, _ = agg.aggregate(
        deltas, torch.tensor([100.0, 1.0, 7.0]), {}, part_context(0, 1, "aggregator")
    )
    assert mean.tolist() == pytest.approx([0.06, 0.13], rel=2 * NORM_SLACK)  # weights ignored


# ---- in a run ---------------------------------------------------------------------------

CONFIG: dict[str, Any] = {
    "rounds": 6,
    "data": {"dataset": "digits", "num_clients": 40, "partition": {"kind": "iid"}},
    "model": {"name": "logreg"},
    "algorithm": {"name": "dp_fedavg", "rate": 0.25, "clip": 0.5, "noise_multiplier": 1.0},
    "client": {"epochs": 1, "batch_size": 16, "lr": 0.1},
    "evaluation": {"federated_clients": 0},
    "run": {"threads": 1, "store": "none"},
}


def config(**sections: Any) -> ExperimentConfig:
    return ExperimentConfig.from_dict({**CONFIG, **sections})


def test_the_budget_stops_the_run_at_the_round_the_accountant_says() -> None:
    result = run_experiment(config(privacy={"max_epsilon": 4.5}).build())
    sampling = Poisson(0.25)
    allowed = max(t for t in range(1, 7) if epsilon([Round(1.0, sampling)] * t, 1e-5) <= 4.5)
    assert len(result.history) == allowed < 6
    assert (
        result.stopped is not None and f"round {allowed + 1} would spend epsilon" in result.stopped
    )
    fresh = [epsilon([Round(1.0, sampling)] * t, 1e-5) for t in range(1, allowed + 1)]
    assert [m["epsilon"] for m in result.history] == fresh


def test_a_target_epsilon_calibrates_the_noise_before_the_run() -> None:
    exp = config(privacy={"target_epsilon": 4.0}).build()
    z = calibrate(4.0, 1e-5, 6, Poisson(0.25))
    assert exp.algorithm.aggregator.noise_multiplier == z  # type: ignore[attr-defined]
    result = run_experiment(exp)
    assert 0.99 * 4.0 <= result.history[-1]["epsilon"] <= 4.0


def test_resume_restores_the_ledger_and_the_stored_one_gives_the_epsilon_shown(
    tmp_path: Path,
) -> None:
    cfg = config(privacy={"delta": 1e-6})
    full = run_experiment(cfg.build())

    class Stop(Exception):
        pass

    def stop(rnd: int, _metrics: object) -> None:
        if rnd == 3:
            raise Stop

    store = RunStore(tmp_path)
    with pytest.raises(Stop):
        run_experiment(cfg.build(), store, on_round=stop)
    (info,) = store.list_runs()
    resumed = resume_experiment(cfg.build(), store, info.run_id)
    assert torch.equal(resumed.weights, full.weights)
    assert [m["epsilon"] for m in resumed.history] == [m["epsilon"] for m in full.history]
    _, ckpt = store.latest_checkpoint(info.run_id)
    ledger = ckpt.tensors["privacy/z"]
    assert ledger.tolist() == [1.0] * 6
    fresh = epsilon([Round(z, Poisson(0.25)) for z in ledger.tolist()], 1e-6)
    assert fresh == resumed.history[-1]["epsilon"]


def test_an_empty_cohort_still_releases_noise_and_is_accounted() -> None:
    exp = config(rounds=3, algorithm={"name": "dp_fedavg", "rate": 0.001}).build()
    result = run_experiment(exp)
    assert [m["updates"] for m in result.history] == [0.0, 0.0, 0.0]
    assert not torch.equal(result.weights, run_initial(exp))  # moved by the noise alone
    assert result.history[-1]["epsilon"] == epsilon([Round(1.0, Poisson(0.001))] * 3, 1e-5)


def run_initial(exp: Any) -> torch.Tensor:
    return exp.algorithm.client_program(exp.task, exp.federation, seed=exp.seed).initial_weights()


ENGINES = [e for e in available_engines() if e != "ray"]


@pytest.mark.parametrize("engine", [e for e in ENGINES if e != "inline"])
def test_every_engine_gives_the_inline_run(engine: str) -> None:
    inline = run_experiment(config(run={**CONFIG["run"], "engine": "inline"}).build())
    other = run_experiment(config(run={**CONFIG["run"], "engine": engine, "workers": 2}).build())
    assert torch.equal(inline.weights, other.weights)
    assert [m["epsilon"] for m in other.history] == [m["epsilon"] for m in inline.history]


# ---- refused up front -------------------------------------------------------------------


def test_combinations_without_an_accounting_are_refused() -> None:
    with pytest.raises(
        ValueError, match=r"terms.0.scaffold \(Scaffold\) also uploads \['delta_c'\]"
    ):
        scaffold(clients_per_round=2, aggregator=GaussianMean())
    with pytest.raises(ValueError, match="counts every update alike"):
        qffl(clients_per_round=2, aggregator=GaussianMean())
    with pytest.raises(ValueError, match="a budget needs a private mechanism"):
        config(algorithm={"name": "fedavg"}, privacy={"max_epsilon": 1.0}).build()
    with pytest.raises(ValueError, match="min_updates = 2: with central DP"):
        config(deploy={"min_updates": 2}).build()


def test_a_deployment_refuses_noise_that_follows_from_the_seed() -> None:
    from potluck.engines.inline import InlineEngine

    class Remote(InlineEngine):
        remote = True

    with pytest.raises(ValueError, match=r"aggregator.noise = \"seed\": a deployment's DP noise"):
        run_experiment(config().build(), engine=Remote)
    secure = config(algorithm={**CONFIG["algorithm"], "noise": "secure"}).build()
    assert len(run_experiment(secure, engine=Remote).history) == 6


def test_a_fixed_size_cohort_is_accounted_without_replacement() -> None:
    algo = fedavg(clients_per_round=10, aggregator=GaussianMean(clip=0.5))
    sampling = sampling_of(algo.sampler, 40)
    assert sampling == WithoutReplacement(40, 10)
    ledger = Ledger(GaussianMean(clip=0.5), sampling, PrivacyBudget())
    state, eps = ledger.record({})
    assert eps == epsilon([Round(1.0, sampling)], 1e-5)
    assert "10 of 40 clients without replacement" in ledger.statement(state)
    assert sampling_of(PoissonSampler(0.1), 40) == Poisson(0.1)
    assert np.isclose(eps, epsilon([Round(1.0, WithoutReplacement(40, 10))], 1e-5))
    assert dp_fedavg(rate=0.1).sampler == PoissonSampler(0.1)


# ---- through TOML and the CLI ---------------------------------------------------------------


def test_the_cli_runs_dp_fedavg_from_toml_and_states_its_privacy(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from potluck.cli import app

    exp = tmp_path / "dp.toml"
    cfg = config(privacy={"max_epsilon": 4.5}, run={"threads": 1, "name": "dp"})
    exp.write_text(cfg.to_toml())
    runner, store = CliRunner(), str(tmp_path / "runs")
    done = runner.invoke(app, ["run", str(exp), "--store", store])
    assert done.exit_code == 0, done.output
    flat = " ".join(done.output.split())  # rich wraps lines
    assert "stopped after round 3: privacy budget: round 4 would spend epsilon" in flat
    assert "epsilon=4.421" in flat  # a progress line
    assert "Poisson sampling q=0.25 (about 10 clients/round)" in flat
    assert "central DP: clip 0.5, noise multiplier 1, epsilon at delta 1e-05 (rdp)" in flat
    stated = runner.invoke(app, ["privacy", "dp", "--store", store, "--json"])
    assert stated.exit_code == 0, stated.output
    payload = json.loads(stated.output)
    fresh = [epsilon([Round(1.0, Poisson(0.25))] * t, 1e-5) for t in (1, 2, 3)]
    assert payload["epsilon"] == fresh
    assert payload["statement"].startswith("(4.421, 1e-05)-DP at the level of one client")
    assert "Poisson sampling, q = 0.25" in payload["statement"]
    shown = json.loads(runner.invoke(app, ["show", "dp", "--store", store, "--json"]).output)
    assert [r["epsilon"] for r in shown["rounds"]] == fresh
    assert shown["summary"]["stopped"].startswith("privacy budget")
    table = runner.invoke(app, ["privacy", "dp", "--store", store])
    assert table.exit_code == 0 and "user-level" in " ".join(table.output.split())
    plain = runner.invoke(app, ["run", "--set", "rounds=1", "--set", 'data.dataset="digits"',
                                "--set", "data.num_clients=10", "--set", 'model.name="logreg"',
                                "--set", 'run.name="plain"',
                                "--store", store])  # fmt: skip
    assert plain.exit_code == 0, plain.output
    refused = runner.invoke(app, ["privacy", "plain", "--store", store])
    assert refused.exit_code == 2 and "has no privacy ledger" in refused.output


def test_the_readmes_example_is_a_valid_config() -> None:
    import re
    import tomllib

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Differential privacy", 1)[1]
    (block,) = re.findall(r"```toml\n(.*?)```", section, re.DOTALL)[:1]
    cfg = ExperimentConfig.from_dict({**CONFIG, **tomllib.loads(block)})
    algo = cfg.algorithm_parts()
    assert (algo.aggregator.noise_multiplier, cfg.privacy.max_epsilon) == (1.1, 8.0)  # type: ignore[attr-defined, union-attr]


def test_a_private_experiment_is_described_as_a_config_that_builds_it_again() -> None:
    from potluck.config import describe_experiment

    exp = config(privacy={"target_epsilon": 4.0, "max_epsilon": 5.0}).build()
    described = describe_experiment(exp)  # the task is the config's own lambda: not named
    assert described["privacy"] == {
        "delta": 1e-5, "max_epsilon": 5.0, "target_epsilon": 4.0, "accountant": "rdp"
    }  # fmt: skip
    parts = ("algorithm", "sampler", "client", "transforms", "aggregator", "server", "privacy")
    again = config(**{k: described[k] for k in parts}).build()
    assert again.algorithm == exp.algorithm and again.privacy == exp.privacy


# ---- per-layer clipping -------------------------------------------------------------------


@given(
    st.lists(st.integers(1, 6), min_size=1, max_size=5), st.floats(1e-2, 1e2), st.integers(0, 2**31)
)
def test_per_layer_clipping_bounds_each_layer_and_the_whole(
    sizes: list[int], clip: float, seed: int
) -> None:
    from potluck.core.message import Message
    from potluck.core.params import ParamSpec
    from potluck.updates import ClipNorm

    spec = ParamSpec(tuple(f"p{i}" for i in range(len(sizes))), tuple((n,) for n in sizes))
    delta = torch.randn(spec.size, generator=torch.Generator().manual_seed(seed)) * clip
    out, _ = (
        ClipNorm(clip, per_layer=True)
        .bind(spec)
        .encode(Message({"delta": delta}), {}, part_context(0, 1, "transforms.0.clip", client=0))
    )
    clipped_delta = out.arrays["delta"]
    share = clip / len(sizes) ** 0.5
    for before, after in zip(
        torch.split(delta, sizes), torch.split(clipped_delta, sizes), strict=True
    ):
        assert float(after.norm()) <= share * (1 + 1e-5)
        if float(before.norm()) <= share:
            assert torch.equal(after, before)
    assert float(clipped_delta.norm()) <= clip * (1 + 1e-5)


def test_per_layer_clipping_runs_on_every_engine() -> None:
    algorithm = {**CONFIG["algorithm"], "clip": 0.05, "per_layer": True}  # updates clipped
    runs = [
        run_experiment(
            config(algorithm=algorithm, run={**CONFIG["run"], "engine": e, "workers": 2}).build()
        )
        for e in ENGINES
    ]
    assert all(torch.equal(r.weights, runs[0].weights) for r in runs)
    plain = run_experiment(config(algorithm={**algorithm, "per_layer": False}).build())
    assert not torch.equal(plain.weights, runs[0].weights)  # the clip differs
    with pytest.raises(ValueError, match="per_layer clipping needs a fixed clip"):
        dp_fedavg(target_quantile=0.5, per_layer=True)


@given(st.integers(0, 6), st.integers(1, 30), st.floats(1e-3, 1e3), st.integers(0, 2**31))
def test_the_fused_clipped_sum_equals_the_sum_of_clipped_updates(
    k: int, d: int, clip: float, seed: int
) -> None:
    from potluck.privacy.central import clip_scales, clipped_sum, row_norms

    deltas = torch.randn(k, d, generator=torch.Generator().manual_seed(seed)) * clip
    fused = clipped_sum(deltas, clip_scales(row_norms(deltas), clip))
    assert torch.allclose(fused, clipped(deltas, clip).sum(dim=0), rtol=1e-5, atol=1e-6 * clip)
