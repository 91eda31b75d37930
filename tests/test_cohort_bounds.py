"""The server's bounds relative to the round's cohort (issue 13, finding 4): a remote member's
update far larger than the round's median is refused, a weight far larger is capped, and
honest updates are left alone."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from potluck.aggregate.cohort import MIN_UPDATES, capped, lower_median, norm_outliers
from potluck.client.program import ClientProgram
from potluck.config import ExperimentConfig
from potluck.core.message import Message
from potluck.core.records import TRAIN, Reply, StageJob
from potluck.engines.inline import InlineEngine
from potluck.orchestrator import RunResult, run_experiment

# ---- the rules, on numbers --------------------------------------------------------------

positive = st.floats(1e-6, 1e6)


@st.composite
def rounds(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, float]:
    """Honest values within ``ratio`` of each other, fewer hostile ones (any value), mixed."""
    ratio = draw(st.floats(1.0, 100.0))
    low = draw(positive)
    honest = draw(st.lists(st.floats(low, low * ratio), min_size=2, max_size=12))
    hostile = draw(st.lists(st.floats(0.0, 1e30), max_size=len(honest) - 1))
    values = np.array(honest + hostile)
    order = np.random.default_rng(draw(st.integers(0, 2**32))).permutation(len(values))
    is_honest = np.array([True] * len(honest) + [False] * len(hostile))
    return values[order], is_honest[order], ratio


@given(rounds())
def test_with_an_honest_majority_no_honest_update_is_refused_and_no_hostile_one_dominates(
    drawn: tuple[np.ndarray, np.ndarray, float],
) -> None:
    values, honest, ratio = drawn
    reasons = norm_outliers({"delta": values}, ratio)
    assert all(r is None for r, h in zip(reasons, honest, strict=True) if h)
    kept = values[[r is None for r in reasons]]
    if len(values) >= MIN_UPDATES:
        assert kept.max() <= ratio * values[honest].max() * (1 + 1e-12)
    weights = capped(values, ratio)
    assert np.array_equal(weights[honest], values[honest])
    assert np.all(weights <= values)
    if len(values) >= MIN_UPDATES:
        assert weights.max() <= ratio * values[honest].max() * (1 + 1e-12)


@given(st.lists(st.floats(0.0, 1e30), max_size=MIN_UPDATES - 1), st.floats(1.0, 100.0))
def test_below_three_updates_only_the_fixed_bounds_hold(values: list[float], ratio: float) -> None:
    a = np.array(values)
    assert norm_outliers({"delta": a, "x": a}, ratio) == [None] * len(values)
    assert np.array_equal(capped(a, ratio), a)


def test_an_array_each_bound_on_its_own_scale_and_a_zero_median_bounds_nothing() -> None:
    norms = {"delta": np.array([1.0, 1.0, 1.0, 1.0]), "delta_c": np.array([0.1, 0.1, 0.1, 5.0])}
    reasons = norm_outliers(norms, 10.0)
    assert reasons[:3] == [None] * 3
    assert reasons[3] == "'delta_c' has L2 norm 5, above 10 times the round's median (0.1)"
    assert norm_outliers({"delta": np.array([0.0, 0.0, 0.0, 1e9])}, 10.0) == [None] * 4
    assert capped(np.array([0.0, 0.0, 0.0, 1e9]), 10.0).tolist() == [0.0, 0.0, 0.0, 1e9]
    assert lower_median(np.array([3.0, 1.0, 2.0])) == 2.0


def test_bad_ratios_and_counts_are_refused() -> None:
    with pytest.raises(ValueError, match=r"norm ratio must be >= 1, got 0\.5"):
        norm_outliers({"delta": np.ones(3)}, 0.5)
    with pytest.raises(ValueError, match="weight ratio must be >= 1"):
        capped(np.ones(3), 0.0)
    with pytest.raises(ValueError, match=r"one norm per update, got counts \[2, 3\]"):
        norm_outliers({"a": np.ones(3), "b": np.ones(2)}, 2.0)
    with pytest.raises(ValueError, match="lower median of no values"):
        lower_median(np.array([]))


# ---- in a run, against a remote member ----------------------------------------------------

MEMBER = 1
CONFIG = {
    "rounds": 3,
    "data": {"dataset": "digits", "num_clients": 4, "partition": {"kind": "iid"}},
    "model": {"name": "logreg"},
    "sampler": {"clients_per_round": 4},
    "client": {"epochs": 1, "batch_size": 32, "lr": 0.1},
    "algorithm": {"name": "scaffold"},
    "run": {"threads": 1, "store": "none"},
}
Forge = Callable[[Message, list[float]], Message]


class Forging(InlineEngine):
    """Remote clients; ``MEMBER``'s train answers become ``forge(message, the other
    members' weights)``, or nothing (``forge`` None)."""

    remote = True

    def __init__(self, program: ClientProgram, forge: Forge | None) -> None:
        super().__init__(program)
        self.forge = forge

    def run_stage(self, job: StageJob) -> list[Reply | None]:
        replies: list[Reply | None] = list(self.program.run_stage(job))
        clients = [int(c) for c in job.clients]
        if job.stage != TRAIN or MEMBER not in clients:
            return replies
        k = clients.index(MEMBER)
        others = [float(r.message.scalars["weight"]) for r in replies if r is not None]
        del others[k]
        mine = replies[k]
        assert mine is not None
        forged = (
            None if self.forge is None else replace(mine, message=self.forge(mine.message, others))
        )
        return [*replies[:k], forged, *replies[k + 1 :]]


def run(forge: Forge | None, **deploy: float) -> RunResult:
    exp = ExperimentConfig.from_dict({**CONFIG, "deploy": deploy}).build()
    return run_experiment(exp, engine=lambda p: Forging(p, forge))


def scaled(factor: float) -> Forge:
    def forge(message: Message, others: list[float]) -> Message:
        arrays = {k: v * factor if k == "delta" else v for k, v in message.arrays.items()}
        return Message(arrays, dict(message.scalars))

    return forge


def weighing(weight: Callable[[list[float]], float]) -> Forge:
    def forge(message: Message, others: list[float]) -> Message:
        return Message(dict(message.arrays), {**message.scalars, "weight": weight(others)})

    return forge


def test_an_update_a_hundred_times_the_median_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="potluck")
    silent = run(None)
    attacked = run(scaled(100.0))
    assert torch.equal(attacked.weights, silent.weights)
    assert [m["refused"] for m in attacked.history] == [1.0, 1.0, 1.0]
    assert "refused update from client 1 in round 1: 'delta' has L2 norm" in caplog.text
    assert "above 10 times the round's median" in caplog.text
    unbounded = run(scaled(100.0), max_norm_ratio=0)  # off: the attack gets through
    assert not torch.equal(unbounded.weights, silent.weights)
    assert [m["refused"] for m in unbounded.history] == [0.0, 0.0, 0.0]


def test_a_claimed_weight_is_capped_at_ten_times_the_rounds_median(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="potluck")
    attacked = run(weighing(lambda others: 1e9))
    # the median of four weights, one of them 1e9, is the second largest honest one
    expected = run(weighing(lambda others: 10 * sorted(others)[1]), max_weight_ratio=0)
    assert torch.equal(attacked.weights, expected.weights)
    assert [m["capped"] for m in attacked.history] == [1.0, 1.0, 1.0]
    assert "client 1 claims aggregation weight 1e+09; capped at" in caplog.text
    assert not torch.equal(
        run(weighing(lambda others: 1e9), max_weight_ratio=0).weights, attacked.weights
    )


def test_honest_members_are_left_alone() -> None:
    bounded, unbounded = run(scaled(1.0)), run(scaled(1.0), max_norm_ratio=0, max_weight_ratio=0)
    assert torch.equal(bounded.weights, unbounded.weights)
    assert all(m["refused"] == 0 and m["capped"] == 0 for m in bounded.history)


def test_ratios_are_validated_in_the_config() -> None:
    with pytest.raises(ValueError, match=r"must be 0 \(off\) or a number >= 1, got 0\.5"):
        ExperimentConfig.from_dict({**CONFIG, "deploy": {"max_norm_ratio": 0.5}})
    exp = ExperimentConfig.from_dict({**CONFIG, "deploy": {"max_weight_ratio": 0}}).build()
    assert (exp.max_norm_ratio, exp.max_weight_ratio) == (10.0, None)
