"""A/B evaluation: the paired per-client comparison and its Wilcoxon signed-rank test."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from potluck import Experiment, Federation, Task
from potluck.algorithms import fedavg
from potluck.monitor.ab import ab_test, paired_test

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
