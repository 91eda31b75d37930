"""Membership inference: the loss threshold and LiRA's Gaussian tests, the population and its
shadows, and the attack against an overfit run and a noised one."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm
from victims import (
    TASK,
    digit_clients,
    one_thread,  # noqa: F401  (autouse)
)

from potluck import Experiment
from potluck.algorithms import dp_fedavg, fedavg
from potluck.attacks.membership import (
    Population,
    attack_membership,
    lira_offline,
    lira_online,
    loss_threshold,
    shadow_assignment,
)
from potluck.attacks.metrics import auc, roc_curve
from potluck.orchestrator import run_experiment


def test_lira_online_is_the_log_likelihood_ratio_of_the_fitted_gaussians() -> None:
    # one example: IN shadows at 2 and 4 (mean 3, std 1), OUT at -1 and 1 (mean 0, std 1)
    shadow = np.array([[2.0], [4.0], [-1.0], [1.0]])
    inside = np.array([[True], [True], [False], [False]])
    for phi in (-2.0, 0.5, 3.0):
        expected = -0.5 * (phi - 3) ** 2 + 0.5 * phi**2  # equal variances: the rest cancels
        assert lira_online(np.array([phi]), shadow, inside)[0] == pytest.approx(expected)
    # offline: the one-sided test against the OUT Gaussian only, log Phi((phi - 0) / 1)
    assert lira_offline(np.array([0.0]), shadow, inside)[0] == pytest.approx(np.log(0.5))


def test_a_fixed_variance_is_pooled_and_a_free_one_is_each_examples_own() -> None:
    # IN: example 0 at +-1, example 1 at +-10 (means 0); OUT: 3 and 5, 4 and 6 (std 1)
    shadow = np.array([[1.0, 10.0], [-1.0, -10.0], [5.0, 6.0], [3.0, 4.0]])
    inside = np.array([[True, True], [True, True], [False, False], [False, False]])
    target = np.zeros(2)
    free = lira_online(target, shadow, inside, fixed_variance=False)
    expected = norm.logpdf(0, 0, [1, 10]) - norm.logpdf(0, [4, 5], 1)
    np.testing.assert_allclose(free, expected)
    fixed = lira_online(target, shadow, inside, fixed_variance=True)
    pooled = np.sqrt((1 + 1 + 100 + 100) / 4)  # the IN residuals of both examples
    np.testing.assert_allclose(fixed, norm.logpdf(0, 0, pooled) - norm.logpdf(0, [4, 5], 1))
    with pytest.raises(ValueError, match="every example in some shadows and out of others"):
        lira_online(target, shadow, np.ones_like(inside))
    with pytest.raises(ValueError, match="out of some shadows"):
        lira_offline(target, shadow, np.ones_like(inside))


def test_the_loss_threshold_ranks_lower_losses_as_members() -> None:
    members = np.array([True, True, False, False])
    fpr, tpr = roc_curve(loss_threshold(np.array([0.1, 0.2, 0.9, 1.5])), members)
    assert auc(fpr, tpr) == 1.0


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 40), st.integers(2, 12), st.data())
def test_shadow_assignment_fills_every_shadow_and_balances_users(
    users: int, shadows: int, data: st.DataObject
) -> None:
    size = data.draw(st.integers(1, users))
    keep = shadow_assignment(users, shadows, size, np.random.default_rng(users * shadows))
    assert keep.shape == (shadows, users) and (keep.sum(1) == size).all()
    counts = keep.sum(0)
    assert counts.max() - counts.min() <= 1
    assert counts.min() == (shadows * size) // users


def test_the_population_is_the_clients_then_disjoint_held_out_users() -> None:
    fed = digit_clients(4, each=10)
    pop = Population.of(fed)
    assert pop.num_clients == 4 and len(pop.users) == 8  # held-out users capped at 4
    rows = np.concatenate(pop.users)
    assert len(np.unique(rows)) == len(rows) == 80 and all(len(u) == 10 for u in pop.users)
    for cid in range(4):  # a client's user is its training data, in order
        np.testing.assert_array_equal(pop.source.train.x[pop.users[cid]], fed.client(cid).x_train)
    test_x = {r.tobytes() for r in fed.source.test.x}
    assert all(pop.source.train.x[r].tobytes() in test_x for r in np.concatenate(pop.users[4:]))
    shadow = pop.federation(np.array([0, 5]), seed=1)
    assert shadow.num_clients == 2 and shadow.num_examples_all().tolist() == [10, 10]


def _overfit(algorithm: object, rounds: int = 4) -> tuple[Experiment, np.ndarray]:
    exp = Experiment(TASK, digit_clients(4, each=16), algorithm, rounds)  # type: ignore[arg-type]
    return exp, run_experiment(exp).weights


def test_attacks_find_the_members_of_an_overfit_run() -> None:
    exp, w = _overfit(fedavg(clients_per_round=4, epochs=5, batch_size=16, lr=0.5))
    report = attack_membership(exp, w, shadows=4)
    summary = report.summary()
    assert report.target["member_loss"] < report.target["nonmember_loss"]
    assert (int(report.is_member.sum()), int((~report.is_member).sum())) == (64, 64)
    assert summary["loss"]["auc"] > 0.65 and summary["lira_offline"]["auc"] > 0.65
    assert summary["lira_online"]["auc"] > 0.55
    saved = json.loads(json.dumps(report.to_json()))
    assert saved["shadows"] == 4 and saved["users"] == 8
    roc = saved["roc"]["loss"]
    assert roc["fpr"][0] == 0.0 and roc["fpr"][-1] == 1.0 and roc["tpr"][-1] == 1.0


def test_noise_takes_the_loss_threshold_attack_to_chance() -> None:
    private = dp_fedavg(rate=1.0, clip=0.5, noise_multiplier=5.0, epochs=5, batch_size=16, lr=0.5)
    exp, w = _overfit(private)
    summary = attack_membership(exp, w, shadows=0).summary()
    assert set(summary) == {"loss"} and abs(summary["loss"]["auc"] - 0.5) < 0.15


def test_membership_refuses_a_single_shadow_and_a_population_without_non_members() -> None:
    exp, w = _overfit(fedavg(clients_per_round=4), rounds=1)
    with pytest.raises(ValueError, match="at least 2 shadow models"):
        attack_membership(exp, w, shadows=1)
    from potluck.data import Federation

    alone = Federation.from_client_data([(np.zeros((3, 2), np.float32), np.array([0, 1, 0]))])
    with pytest.raises(ValueError, match="no non-members to attack"):
        Population.of(alone)
