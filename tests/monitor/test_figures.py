"""The monitoring figures against hand-computed cases, and their properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from potluck.monitor import Monitoring, round_figures
from potluck.monitor.figures import (
    cost_per_gain,
    diverging,
    fairness,
    gini,
    group_means,
    plateaued,
    slope,
    worst_share,
)

accuracies = st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=60)


def test_fairness_by_hand() -> None:
    acc = [0.9, 0.7, 0.4, 0.8, 0.6, 0.5, 0.3, 1.0, 0.2, 0.6]
    f = fairness(acc)
    mean = sum(acc) / 10  # 0.6
    assert f["mean"] == pytest.approx(0.6)
    assert f["var"] == pytest.approx(sum((a - mean) ** 2 for a in acc) / 10)
    assert f["var"] == pytest.approx(0.06)
    assert f["min"] == 0.2 and f["worst10"] == pytest.approx(0.2)  # one of ten
    pairs = sum(abs(a - b) for a in acc for b in acc)
    assert f["gini"] == pytest.approx(pairs / (2 * 10 * 10 * mean))
    assert f["count"] == 10.0
    assert worst_share([0.9, 0.1, 0.5, 0.3, 0.2], share=0.3) == pytest.approx(0.15)  # 2 of 5


@given(accuracies)
def test_gini_lies_in_its_range_and_ignores_scale(acc: list[float]) -> None:
    g = gini(acc)
    if sum(acc) == 0:
        assert math.isnan(g)
        return
    assert -1e-12 <= g <= 1 - 1 / len(acc) + 1e-12
    assert gini([2.0 * a for a in acc]) == pytest.approx(g, abs=1e-9)
    assert gini(sorted(acc, reverse=True)) == pytest.approx(g, abs=1e-12)  # order-free


@given(accuracies)
def test_worst_share_is_between_the_min_and_the_mean(acc: list[float]) -> None:
    f = fairness(acc)
    assert f["min"] - 1e-12 <= f["worst10"] <= f["mean"] + 1e-12
    assert f["var"] == pytest.approx(float(np.var(acc)), abs=1e-12)


def test_gini_refuses_negative_values() -> None:
    with pytest.raises(ValueError, match="negative"):
        gini([-0.1, 0.5])


def test_group_means_and_slopes_by_hand() -> None:
    assert group_means({0: 0.2, 3: 0.6, 4: 1.0}, {"a": [0, 3], "b": [4], "c": [9]}) == {
        "a": pytest.approx(0.4),
        "b": 1.0,
    }
    assert slope([3.0, 2.0, 1.0, 0.0]) == -1.0
    assert slope([1.0, 2.0, 4.0]) == pytest.approx(1.5)  # least squares over t = 0, 1, 2
    assert math.isnan(slope([1.0])) and math.isnan(slope([math.nan, 2.0]))


def test_plateau_and_divergence() -> None:
    flat = [2.0, 1.0, 0.8, 0.8, 0.8001, 0.7995]
    assert plateaued(flat, window=3, tol=1e-3, lower=True)  # 0.7995 is 0.06 % below 0.8
    assert not plateaued(flat, window=3, tol=1e-4, lower=True)
    assert not plateaued([1.0, 0.9], window=3, tol=1e-3, lower=True)  # too few rounds
    assert plateaued([0.5, 0.6, 0.6], window=1, tol=0.0, lower=False)
    assert diverging([1.0, 0.4, 0.81], factor=2.0) and not diverging([1.0, 0.4, 0.8], 2.0)
    assert diverging([1.0, math.nan], 2.0) and not diverging([], 2.0)


def test_cost_per_gain() -> None:
    assert cost_per_gain(5e6, 0.35, 0.1) == pytest.approx(2e5)  # 5 MB for 25 points
    assert math.isnan(cost_per_gain(5e6, 0.08, 0.1))  # below a uniform guess: no gain


def test_round_figures_by_hand() -> None:
    options = Monitoring(window=3, groups={"north": [1, 2], "south": [3]})
    history = [
        {"train_loss": 2.0, "test_loss": 2.1, "test_accuracy": 0.2, "bytes_total": 300.0},
        {"train_loss": 1.0, "test_loss": 1.1, "test_accuracy": 0.5, "bytes_total": 600.0},
    ]
    metrics = {"train_loss": 0.9, "test_loss": 1.0, "test_accuracy": 0.6}
    metrics |= {"bytes_up": 100.0, "bytes_down": 200.0}
    clients = [
        (1, {"eval_global_accuracy": 0.5, "update_norm": 3.0, "client_drift": 1.0}),
        (2, {"eval_global_accuracy": 0.7, "update_norm": 5.0, "client_drift": 2.0}),
        (3, {"eval_global_accuracy": 0.9}),
    ]
    figs = round_figures(options, history, metrics, clients, classes=10)
    assert figs["train_loss_slope"] == pytest.approx(-0.55)  # 2.0, 1.0, 0.9
    assert figs["accuracy_slope"] == pytest.approx(0.2)  # 0.2, 0.5, 0.6
    assert figs["plateau"] == 0.0 and figs["diverging"] == 0.0
    assert figs["update_norm_mean"] == 4.0 and figs["update_norm_max"] == 5.0
    assert figs["client_drift_mean"] == 1.5 and figs["client_drift_max"] == 2.0
    assert figs["clients_accuracy_mean"] == pytest.approx(0.7)
    assert figs["clients_accuracy_var"] == pytest.approx(0.08 / 3)
    assert figs["clients_accuracy_worst10"] == 0.5
    assert figs["group_north_accuracy"] == pytest.approx(0.6)
    assert figs["group_south_accuracy"] == 0.9
    assert figs["bytes_total"] == 900.0
    assert figs["bytes_per_gain"] == pytest.approx(900.0 / 50.0)  # 60 % - 10 % guess
    assert "label_shift_max" not in figs  # no summaries asked for
    first = round_figures(options, [], {"train_loss": 2.0, "test_accuracy": 0.05}, [], classes=10)
    assert "train_loss_slope" not in first and "bytes_per_gain" not in first  # undefined


def test_monitoring_options_are_checked() -> None:
    with pytest.raises(ValueError, match="group name 'a b'"):
        Monitoring(groups={"a b": [1]})
    with pytest.raises(ValueError, match=r"groups\.g: a non-empty list"):
        Monitoring(groups={"g": []})
    with pytest.raises(ValueError, match="shift_threshold"):
        Monitoring(shift_threshold=0.0)
    with pytest.raises(ValueError, match=r"clients \[12\] outside the federation of 10"):
        Monitoring(groups={"g": [1, 12]}).check_clients(10)
    with pytest.raises(ValueError, match=r"monitoring\.noise = 'secure'"):
        Monitoring(summaries=True, summary_noise=1.0).check_deployable()


@given(
    st.integers(1, 9),
    st.integers(1, 300),
    st.integers(1, 20),
    st.sampled_from([0.0, 1e-6, 1e-3, 0.1, 1.0, 1e3]),
)
@settings(max_examples=60, deadline=None)
def test_update_distances_equal_the_direct_distances(
    k: int, d: int, block: int, spread: float
) -> None:
    """Rows ``aggregate + spread * noise`` (every row near the aggregate for small spreads,
    where the expansion would lose its digits): the norms are exact, every drift is within
    float32 rounding of the float64 distance, and the near rows are the direct float32
    distance, whatever the block size."""
    from potluck.monitor import distances

    g = torch.Generator().manual_seed(k * 1000 + d)
    aggregate = torch.randn(d, generator=g)
    deltas = aggregate + spread * torch.randn(k, d, generator=g)
    saved, distances.BLOCK_ELEMENTS = distances.BLOCK_ELEMENTS, block
    try:
        norms, drifts = distances.update_distances(deltas, aggregate)
    finally:
        distances.BLOCK_ELEMENTS = saved
    assert norms == torch.linalg.vector_norm(deltas, dim=1).double().tolist()
    want = torch.linalg.vector_norm(deltas.double() - aggregate.double(), dim=1)
    direct = torch.linalg.vector_norm(deltas - aggregate, dim=1).double()
    scale = torch.maximum(torch.tensor(norms, dtype=torch.float64), aggregate.double().norm())
    got = torch.tensor(drifts, dtype=torch.float64)
    assert bool(((got - want).abs() <= 1e-5 * want + 1e-6 * scale).all())
    near = want**2 < distances.WELL_CONDITIONED * (scale**2)
    assert torch.equal(got[near], direct[near])
