"""A/B evaluation: the paired per-client comparison and its Wilcoxon signed-rank test."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from scipy import stats

from potluck import Experiment, Federation, Task
from potluck.algorithms import fedavg
from potluck.monitor.ab import ab_personal, ab_test, paired_test

GOOD = torch.tensor([-5.0, 0.0, 5.0, 0.0, 0.0, 0.0])  # Linear(2, 2) predicting x[0] > 0


def experiment(clients: int = 12) -> Experiment:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60 * clients, 2, generator=g)
    y = (x[:, 0] > 0).long()
    data = [(x[i::clients], y[i::clients]) for i in range(clients)]
    fed = Federation.from_client_data(data, test_fraction=0.5)
    return Experiment(Task(lambda: torch.nn.Linear(2, 2)), fed, fedavg(clients_per_round=2), 1)


def test_the_better_model_wins_whichever_side_it_is_on() -> None:
    exp, noisy = experiment(), GOOD + torch.tensor([0.0, 4.0, 0.0, -4.0, 0.0, 0.0])
    ab = ab_test(exp, noisy, GOOD)
    assert ab.winner == "b" and ab.p_value < 0.01 and ab.mean_difference > 0
    ba = ab_test(exp, GOOD, noisy)
    assert ba.winner == "a" and ba.p_value == pytest.approx(ab.p_value)
    assert ba.mean_difference == pytest.approx(-ab.mean_difference)
    assert ab.ci95[0] > 0  # the interval excludes no difference
    assert ab.accuracy_b == pytest.approx(sum(r[2] for r in ab.per_client) / ab.clients)


def test_equal_models_show_no_difference() -> None:
    ab = ab_test(experiment(), GOOD, GOOD.clone())
    assert (ab.winner, ab.p_value, ab.mean_difference, ab.ci95) == ("none", 1.0, 0.0, (0.0, 0.0))


def test_a_hand_computed_case() -> None:
    rows = [(0, 0.5, 0.6), (1, 0.4, 0.6), (2, 0.7, 0.65), (3, 0.2, 0.5)]
    result = paired_test(rows, alpha=0.05)
    diffs = [0.1, 0.2, -0.05, 0.3]
    mean, sd = sum(diffs) / 4, math.sqrt(sum((d - 0.1375) ** 2 for d in diffs) / 3)
    half = 3.182446305284263 * sd / 2  # t(0.975, 3) * sd / sqrt(4)
    assert result.mean_difference == pytest.approx(0.1375)
    assert result.ci95 == pytest.approx((mean - half, mean + half))
    # ranks of |d|: 0.05 -> 1, 0.1 -> 2, 0.2 -> 3, 0.3 -> 4; W- = 1: exact two-sided p = 4/16
    assert result.p_value == pytest.approx(0.25)
    assert result.p_value == pytest.approx(stats.wilcoxon(diffs).pvalue)
    assert result.winner == "none"  # four clients cannot reach 5 %


def test_bad_requests_are_refused() -> None:
    exp = experiment()
    with pytest.raises(ValueError, match=r"model a has shape \(3,\)"):
        ab_test(exp, torch.zeros(3), GOOD)
    with pytest.raises(ValueError, match="alpha"):
        ab_test(exp, GOOD, GOOD, alpha=1.5)
    with pytest.raises(ValueError, match="at least two clients"):
        ab_test(exp, GOOD, GOOD, clients=[0])


def test_personal_models_against_the_global_one_from_a_ditto_run(tmp_path: Path) -> None:
    """A Ditto run on a label-skewed federation: the stored personal models beat the global
    one on their own clients, each client's pair measured as its program measures it."""
    from potluck.config import ExperimentConfig
    from potluck.core.records import by_namespace
    from potluck.orchestrator import run_experiment
    from potluck.store.sqlite import RunStore

    cfg = ExperimentConfig.from_dict({
        "rounds": 2, "seed": 1,
        "data": {"dataset": "digits", "num_clients": 8,
                 "partition": {"kind": "shards", "shards_per_client": 1}},
        "model": {"name": "logreg"}, "algorithm": {"name": "ditto", "lam": 0.01},
        "sampler": {"clients_per_round": 3}, "client": {"epochs": 2, "lr": 0.1},
        "run": {"threads": 1},
    })  # fmt: skip
    exp = cfg.build()
    store = RunStore(tmp_path)
    run = run_experiment(exp, store, progress=False).run_id
    w = store.resume_point(run).checkpoint.tensors["global"]  # type: ignore[union-attr]
    trained = store.clients_with_state(run)
    assert 0 < len(trained) < 8  # some clients were never sampled: they have no personal model
    states = dict(zip(trained, map(by_namespace, store.client_states(run, trained)), strict=True))
    never = next(c for c in range(8) if c not in states)
    result = ab_personal(exp, w, {**states, never: {}}, alpha=0.05)
    assert [c for c, _, _ in result.per_client] == trained
    program = exp.algorithm.client_program(exp.task, exp.federation, seed=exp.seed)
    for cid, acc_global, acc_personal in result.per_client:
        got = program.evaluate(cid, w, states[cid])
        assert (acc_global, acc_personal) == (got["global"].accuracy, got["personal"].accuracy)
    assert result.mean_difference > 0.2 and result.accuracy_b > result.accuracy_a
    with pytest.raises(ValueError, match="keeps no personal models"):
        ab_personal(experiment(), GOOD, {})
