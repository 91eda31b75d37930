"""Adaptive clipping (Andrew et al. 2021): the clip follows a quantile of the update norms,
from a private count whose noise the accounting includes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from potluck import resume_experiment, run_experiment
from potluck.config import ExperimentConfig
from potluck.core.parts import part_context
from potluck.privacy.accounting import Poisson, Round, epsilon
from potluck.privacy.adaptive import AdaptiveGaussianMean
from potluck.privacy.ledger import Ledger, PrivacyBudget
from potluck.store.sqlite import RunStore
from test_privacy import CONFIG


def updates_with_norms(norms: np.ndarray, d: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(len(norms), d, generator=g)
    directions /= directions.norm(dim=1, keepdim=True)
    return directions * torch.tensor(norms, dtype=torch.float32)[:, None]


@pytest.mark.parametrize("quantile", [0.3, 0.5, 0.9])
def test_the_clip_converges_to_the_target_quantile_of_the_norms(quantile: float) -> None:
    norms = np.exp(np.random.default_rng(1).uniform(np.log(0.01), np.log(10.0), 400))
    deltas = updates_with_norms(norms)
    agg = AdaptiveGaussianMean(clip=0.05, noise_multiplier=0.0, target_quantile=quantile)
    agg = agg.bind_cohort(400.0)
    state = agg.init(torch.zeros(8))
    for rnd in range(1, 200):
        _, state = agg.aggregate(deltas, torch.ones(400), state, part_context(0, rnd, "agg"))
    clip = float(state["clip"])
    assert abs(float(np.mean(norms <= clip)) - quantile) < 0.02, clip


def test_the_noise_is_split_between_the_sum_and_the_count() -> None:
    agg = AdaptiveGaussianMean(noise_multiplier=1.0).bind_cohort(100.0)
    assert agg.count_noise == 5.0  # the paper's m / 20
    z_delta = agg.delta_noise_multiplier()
    assert math.isclose((z_delta**-2 + (2 * 5.0) ** -2) ** -0.5, 1.0)
    assert 1.0 < z_delta < 1.01
    with pytest.raises(ValueError, match=r"count_noise 0\.4 leaves no noise for the sum"):
        AdaptiveGaussianMean(noise_multiplier=1.0, count_noise=0.4)
    d = 100_000
    agg = AdaptiveGaussianMean(clip=2.0, noise_multiplier=1.0, denominator=1.0, count_noise=1.0)
    mean, state = agg.aggregate(
        torch.zeros(0, d),
        torch.zeros(0),
        agg.init(torch.zeros(d)),
        part_context(0, 1, "aggregator"),
    )
    assert abs(float(mean.double().std()) / (2.0 * agg.delta_noise_multiplier()) - 1) < 0.01
    assert float(state["clip"]) != 2.0  # an empty cohort's count is noise too


RUN = {
    **CONFIG,
    "algorithm": {
        "name": "dp_fedavg",
        "rate": 0.25,
        "clip": 0.05,
        "target_quantile": 0.5,
        "noise_multiplier": 0.8,  # the count's noise, 10 / 20, must exceed half of it
    },
}


def test_in_a_run_the_clip_is_server_state_restored_on_resume(tmp_path: Path) -> None:
    cfg = ExperimentConfig.from_dict(RUN)
    full = run_experiment(cfg.build())
    assert full.history[-1]["epsilon"] == epsilon([Round(0.8, Poisson(0.25))] * 6, 1e-5)

    class Stop(Exception):
        pass

    def stop(rnd: int, _metrics: object) -> None:
        if rnd == 2:
            raise Stop

    store = RunStore(tmp_path)
    with pytest.raises(Stop):
        run_experiment(cfg.build(), store, on_round=stop)
    (info,) = store.list_runs()
    resumed = resume_experiment(cfg.build(), store, info.run_id)
    assert torch.equal(resumed.weights, full.weights)
    _, ckpt = store.latest_checkpoint(info.run_id)
    clip = float(ckpt.tensors["aggregator/clip"])
    assert clip > 0.05  # logreg's updates are larger than the first clip: it grew
    ledger = Ledger.stored(
        {k[8:]: v for k, v in ckpt.tensors.items() if k.startswith("privacy/")}, PrivacyBudget()
    )
    statement = ledger.statement(
        {k[8:]: v for k, v in ckpt.tensors.items() if k.startswith("privacy/")}
    )
    assert "clipped adaptively to the 0.5 quantile of their norms (from 0.05" in statement


def test_the_clients_do_not_clip_with_an_adaptive_clip() -> None:
    algo = ExperimentConfig.from_dict(RUN).algorithm_parts()
    assert algo.transforms == () and isinstance(algo.aggregator, AdaptiveGaussianMean)
