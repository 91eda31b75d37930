"""The Byzantine-robust aggregators: each equals a plain per-client reference (loops and
NumPy) on random stacks, is permutation invariant, refuses a cohort that breaks its
assumption, and stays near the honest mean however large the Byzantine updates grow,
while the mean diverges."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from potluck.aggregate import (
    Bulyan,
    CenteredClipping,
    CoordinateMedian,
    GeometricMedian,
    Krum,
    MultiKrum,
    NormBounding,
    TrimmedMean,
    WeightedMean,
)
from potluck.core.parts import Need, RoundAborted, gives, needs, part_context

CTX = part_context(0, 1, "aggregator")
FAST = settings(max_examples=25, deadline=None, derandomize=True)
NEAR_TIE = 1e-4  # a relative gap below which float32 rounding may decide a selection


def aggregate(agg: Any, x: np.ndarray, state: dict[str, torch.Tensor] | None = None) -> Any:
    """``agg`` on stack ``x`` with equal weights (robust aggregators ignore them)."""
    deltas = torch.from_numpy(x.astype(np.float32))
    state = agg.init(torch.zeros(x.shape[1])) if state is None else state
    out, new_state = agg.aggregate(deltas, torch.ones(x.shape[0]), state, CTX)
    return out.double().numpy(), new_state


def stack(seed: int, k: int, d: int) -> np.ndarray:
    """Rows from a few scales, so that distances and norms differ widely."""
    rng = np.random.default_rng(seed)
    scales = rng.choice([0.1, 1.0, 10.0], size=(k, 1))
    return (rng.normal(size=(k, d)) * scales).astype(np.float32).astype(np.float64)


# ---- plain references ------------------------------------------------------------------


def ref_trimmed(x: np.ndarray, b: int) -> np.ndarray:
    k, d = x.shape
    return np.array([np.mean(sorted(x[:, j])[b : k - b]) for j in range(d)])


def ref_scores(x: np.ndarray, rows: list[int], neighbours: int) -> list[float]:
    scores = []
    for i in rows:
        dists = sorted(float(np.sum((x[i] - x[j]) ** 2)) for j in rows if j != i)
        scores.append(sum(dists[:neighbours]))
    return scores


def gap(scores: list[float]) -> float:
    """The relative gap between the best score and the next."""
    best, second = sorted(scores)[:2]
    return (second - best) / max(abs(second), 1e-12)


def ref_multi_krum(x: np.ndarray, f: int, m: int) -> tuple[np.ndarray, float]:
    k = x.shape[0]
    scores = ref_scores(x, list(range(k)), k - f - 2)
    order = sorted(range(k), key=lambda i: scores[i])
    ranked = sorted(scores)
    margin = (ranked[m] - ranked[m - 1]) / max(abs(ranked[m]), 1e-12) if m < k else 1.0
    return np.mean([x[i] for i in order[:m]], axis=0), margin


def ref_bulyan(x: np.ndarray, f: int) -> tuple[np.ndarray, float]:
    k, d = x.shape
    theta, left, chosen, margin = k - 2 * f, list(range(k)), [], 1.0
    while len(chosen) < theta:
        r = len(left)
        if r == 1:
            chosen.append(left.pop())
            continue
        scores = ref_scores(x, left, min(max(r - f - 2, 2), r - 1))
        margin = min(margin, gap(scores))
        chosen.append(left.pop(int(np.argmin(scores))))
    s = x[chosen]
    beta, out = theta - 2 * f, []
    for j in range(d):
        med = np.median(s[:, j])
        out.append(np.mean(sorted(s[:, j], key=lambda v, med=med: abs(v - med))[:beta]))
    return np.array(out), margin


def ref_geometric_median(x: np.ndarray, iterations: int, nu: float) -> np.ndarray:
    v = np.median(x, axis=0)
    for _ in range(iterations):
        w = [1.0 / max(nu, float(np.linalg.norm(v - xi))) for xi in x]
        v = sum(wi * xi for wi, xi in zip(w, x, strict=True)) / sum(w)
    return v


def ref_centered_clipping(x: np.ndarray, v: np.ndarray, tau: float, steps: int) -> np.ndarray:
    for _ in range(steps):
        moves = []
        for xi in x:
            diff = xi - v
            moves.append(diff * min(1.0, tau / max(float(np.linalg.norm(diff)), 1e-300)))
        v = v + np.mean(moves, axis=0)
    return v


def ref_norm_bounding(x: np.ndarray, bound: float) -> np.ndarray:
    return np.mean([xi * min(1.0, bound / float(np.linalg.norm(xi))) for xi in x], axis=0)


def close(got: np.ndarray, want: np.ndarray, scale: np.ndarray) -> None:
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * (1 + np.abs(scale).max()))


# ---- equal to the references -----------------------------------------------------------

seeds = st.integers(0, 2**32 - 1)


@FAST
@given(seed=seeds, k=st.integers(1, 12), d=st.integers(1, 6), data=st.data())
def test_median_and_trimmed_mean_equal_their_references(
    seed: int, k: int, d: int, data: st.DataObject
) -> None:
    x = stack(seed, k, d)
    close(aggregate(CoordinateMedian((k - 1) // 2), x)[0], np.median(x, axis=0), x)
    b = data.draw(st.integers(0, (k - 1) // 2))
    close(aggregate(TrimmedMean(b), x)[0], ref_trimmed(x, b), x)


@FAST
@given(seed=seeds, f=st.integers(0, 3), extra=st.integers(0, 5), d=st.integers(1, 6))
def test_krum_and_multi_krum_equal_their_references(seed: int, f: int, extra: int, d: int) -> None:
    k = 2 * f + 3 + extra
    x = stack(seed, k, d)
    want, margin = ref_multi_krum(x, f, 1)
    assume(margin > NEAR_TIE and k - f - 2 >= 2)  # one neighbour: the closest pair ties
    close(aggregate(Krum(f), x)[0], want, x)
    m = 1 + seed % (k - f)
    want, margin = ref_multi_krum(x, f, m)
    assume(margin > NEAR_TIE)
    close(aggregate(MultiKrum(f, selected=m), x)[0], want, x)
    want, margin = ref_multi_krum(x, f, k - f)
    assume(margin > NEAR_TIE)
    close(aggregate(MultiKrum(f), x)[0], want, x)


@FAST
@given(seed=seeds, f=st.integers(0, 2), extra=st.integers(0, 4), d=st.integers(1, 5))
def test_bulyan_equals_its_reference(seed: int, f: int, extra: int, d: int) -> None:
    x = stack(seed, 4 * f + 3 + extra, d)
    want, margin = ref_bulyan(x, f)
    assume(margin > NEAR_TIE)
    close(aggregate(Bulyan(f), x)[0], want, x)


@FAST
@given(seed=seeds, k=st.integers(1, 10), d=st.integers(1, 6), iterations=st.integers(1, 8))
def test_geometric_median_equals_smoothed_weiszfeld(
    seed: int, k: int, d: int, iterations: int
) -> None:
    x = stack(seed, k, d)
    got = aggregate(GeometricMedian(iterations=iterations, smoothing=1e-3), x)[0]
    close(got, ref_geometric_median(x, iterations, 1e-3), x)


@FAST
@given(seed=seeds, k=st.integers(1, 10), d=st.integers(1, 6), steps=st.integers(1, 4))
def test_clipping_aggregators_equal_their_references(seed: int, k: int, d: int, steps: int) -> None:
    x = stack(seed, k, d)
    center = np.random.default_rng(seed + 1).normal(size=d)
    agg = CenteredClipping(tau=0.7, iterations=steps)
    state = {"center": torch.from_numpy(center.astype(np.float32))}
    got, new_state = aggregate(agg, x, state)
    want = ref_centered_clipping(x, center.astype(np.float32).astype(np.float64), 0.7, steps)
    close(got, want, x)
    assert np.array_equal(new_state["center"].double().numpy(), got)  # the next round's center
    close(aggregate(NormBounding(bound=0.5), x)[0], ref_norm_bounding(x, 0.5), x)


def test_centered_clipping_starts_from_the_previous_aggregate() -> None:
    agg = CenteredClipping(tau=0.5)
    x1, x2 = stack(1, 9, 4), stack(2, 9, 4)
    v1, state = aggregate(agg, x1)
    v2, _ = aggregate(agg, x2, state)
    close(v2, ref_centered_clipping(x2, v1, 0.5, 1), x2)
    assert not np.allclose(v2, aggregate(agg, x2)[0], atol=1e-3)  # not from zero again


def test_norm_bounding_adds_seeded_gaussian_noise_of_its_std() -> None:
    x = torch.from_numpy(stack(4, 6, 20_000).astype(np.float32))
    agg, plain = NormBounding(bound=1.0, noise_std=0.05), NormBounding(bound=1.0)
    noise = [
        agg.aggregate(x, torch.ones(6), {}, part_context(0, rnd, "aggregator"))[0]
        - plain.aggregate(x, torch.ones(6), {}, CTX)[0]
        for rnd in (1, 1, 2)
    ]
    assert torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    assert abs(float(noise[2].std()) - 0.05) < 0.002 and abs(float(noise[2].mean())) < 0.002


AGGREGATORS = [
    CoordinateMedian(2),
    TrimmedMean(2),
    Krum(2),
    MultiKrum(2),
    MultiKrum(2, selected=3),
    Bulyan(1),
    GeometricMedian(2),
    CenteredClipping(tau=1.0, iterations=2),
    NormBounding(bound=1.0),
]


@pytest.mark.parametrize("agg", AGGREGATORS, ids=repr)
def test_permuting_the_clients_changes_nothing(agg: Any) -> None:
    x = stack(7, 11, 5)
    for seed in range(3):
        perm = np.random.default_rng(seed).permutation(11)
        np.testing.assert_allclose(aggregate(agg, x[perm])[0], aggregate(agg, x)[0], atol=1e-6)


@pytest.mark.parametrize("agg", AGGREGATORS, ids=repr)
def test_weights_are_ignored_and_secure_aggregation_is_refused(agg: Any) -> None:
    x = torch.from_numpy(stack(3, 11, 4).astype(np.float32))
    state = agg.init(torch.zeros(4))
    a, _ = agg.aggregate(x, torch.ones(11), state, CTX)
    b, _ = agg.aggregate(x, torch.arange(1.0, 12.0), state, CTX)
    assert torch.equal(a, b)
    assert Need.EQUAL_WEIGHTS in gives(agg) and Need.INDIVIDUAL_UPDATES in needs(agg)


# ---- assumptions refused ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("agg", "fits", "message"),
    [
        (CoordinateMedian(3), 7, "CoordinateMedian assumes n >= 2f + 1: byzantine = 3 (f = 3)"),
        (TrimmedMean(2), 5, "TrimmedMean assumes 2 trim < n: trim = 2 (f = 2) needs a cohort"),
        (Krum(2), 7, "Krum assumes n >= 2f + 3: byzantine = 2 (f = 2) needs a cohort of at least"),
        (MultiKrum(1, selected=6), 7, "MultiKrum assumes n >= 2f + 3 and m <= n - f"),
        (Bulyan(2), 11, "Bulyan assumes n >= 4f + 3: byzantine = 2 (f = 2) needs a cohort of"),
        (Krum(0.25), 5, "Krum assumes n >= 2f + 3: byzantine = 0.25 (f = 1)"),
        (GeometricMedian(4), 9, "GeometricMedian assumes n >= 2f + 1"),
        (CenteredClipping(byzantine=2), 20, "CenteredClipping assumes f <= 0.1 n"),
    ],
)
def test_a_cohort_that_breaks_the_assumption_is_refused(agg: Any, fits: int, message: str) -> None:
    assert agg.bind_cohort(float(fits)) is agg
    with pytest.raises(ValueError, match="aggregator: ") as err:
        agg.bind_cohort(fits - 1.0)
    assert message in str(err.value) and f"the expected cohort is {fits - 1}" in str(err.value)
    x = torch.randn(fits - 1, 3)
    with pytest.raises(RoundAborted, match=f"but this round has {fits - 1} updates"):
        agg.aggregate(x, torch.ones(fits - 1), agg.init(torch.zeros(3)), CTX)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Krum(-1), "byzantine must be an int >= 0 (a count) or a float in [0, 1)"),
        (lambda: Bulyan(2.0), "got 2.0 (write 2 for a count)"),
        (lambda: CoordinateMedian(True), "got True"),
        (lambda: TrimmedMean(0.5), "trim must be below 0.5 of the cohort, got 0.5"),
        (lambda: MultiKrum(1, selected=0), "selected must be an int >= 1, got 0"),
        (lambda: GeometricMedian(iterations=0), "iterations must be an int >= 1, got 0"),
        (lambda: GeometricMedian(smoothing=0.0), "smoothing must be a finite number > 0"),
        (lambda: CenteredClipping(tau=-1.0), "tau must be a finite number > 0, got -1.0"),
        (lambda: NormBounding(bound=float("inf")), "bound must be a finite number > 0"),
        (lambda: NormBounding(noise_std=-0.1), "noise_std must be a finite number >= 0"),
    ],
)
def test_bad_parameters_name_the_parameter_and_value(make: Any, message: str) -> None:
    with pytest.raises(ValueError) as err:
        make()
    assert message in str(err.value)


# ---- the defining behaviour ------------------------------------------------------------

N, F, D = 25, 5, 40
ROBUST = [
    CoordinateMedian(F),
    TrimmedMean(F),
    Krum(F),
    MultiKrum(F),
    Bulyan(F),
    GeometricMedian(F),
    CenteredClipping(tau=2.0, iterations=3, byzantine=2),
    NormBounding(bound=2.0),
]


def byzantine_stack(attack: str, size: float, f: int) -> tuple[np.ndarray, np.ndarray]:
    """``N - f`` honest updates around a common mean, then ``f`` Byzantine ones of norm
    about ``size``: all at one point (colluding) or scattered at random (not)."""
    rng = np.random.default_rng(0)
    honest = 1.0 / np.sqrt(D) + 0.1 * rng.normal(size=(N - f, D))
    direction = rng.normal(size=(f, D)) if attack == "scattered" else np.ones((f, D))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    return np.concatenate([honest, size * direction]), honest.mean(axis=0)


@pytest.mark.parametrize("attack", ["colluding", "scattered"])
@pytest.mark.parametrize("agg", ROBUST, ids=repr)
def test_the_distance_to_the_honest_mean_stays_bounded_while_the_mean_diverges(
    agg: Any, attack: str
) -> None:
    f = agg.faulty(N) if hasattr(agg, "faulty") else F
    radius = None
    for size in (1e1, 1e3, 1e5, 1e7):
        x, honest_mean = byzantine_stack(attack, size, f)
        if radius is None:
            radius = float(np.linalg.norm(x[: N - f] - honest_mean, axis=1).max())
        robust = float(np.linalg.norm(aggregate(agg, x)[0] - honest_mean))
        mean = float(np.linalg.norm(aggregate(WeightedMean(), x)[0] - honest_mean))
        assert robust <= radius, (size, robust, radius)  # within the honest updates' spread
        assert mean >= 0.5 * size * np.sqrt(f) / N  # the mean follows the attackers
    assert mean > 1e4 * radius
