"""Partitioners: coverage, skew, validation and scale."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from potluck.data.describe import label_entropy
from potluck.data.partition import (
    Partition,
    dirichlet,
    iid,
    label_quantity,
    make_partition,
    natural,
    quantity_skew,
    shards,
)

FAST = settings(max_examples=40, deadline=None)


def assert_exact_cover(part: Partition, n: int) -> None:
    assert part.indices.dtype == np.int64 and part.offsets.dtype == np.int64
    assert part.offsets[0] == 0 and part.offsets[-1] == n
    np.testing.assert_array_equal(np.sort(part.indices), np.arange(n))


def mean_entropy(part: Partition, labels: np.ndarray) -> float:
    return float(
        np.mean([label_entropy(labels[part.client(c)], 10) for c in range(part.num_clients)])
    )


@st.composite
def labelled(draw: st.DrawFn) -> tuple[np.ndarray, int, int]:
    n = draw(st.integers(1, 300))
    k = draw(st.integers(1, n))
    classes = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**32 - 1))
    labels = np.random.default_rng(seed).integers(0, classes, n)
    return labels, k, seed


@FAST
@given(labelled())
def test_iid_covers_every_sample_once(case: tuple[np.ndarray, int, int]) -> None:
    labels, k, seed = case
    part = iid(len(labels), k, np.random.default_rng(seed))
    assert_exact_cover(part, len(labels))
    assert part.num_clients == k and part.sizes().max() - part.sizes().min() <= 1


@FAST
@given(labelled(), st.floats(0.05, 100.0))
def test_dirichlet_covers_every_sample_once(
    case: tuple[np.ndarray, int, int], alpha: float
) -> None:
    labels, k, seed = case
    part = dirichlet(labels, k, alpha, np.random.default_rng(seed), min_size=0)
    assert_exact_cover(part, len(labels))
    assert part.num_clients == k


@FAST
@given(labelled(), st.sampled_from(["lognormal", "powerlaw"]), st.integers(0, 3))
def test_quantity_covers_every_sample_once(
    case: tuple[np.ndarray, int, int], distribution: str, min_size: int
) -> None:
    labels, k, seed = case
    n = len(labels)
    min_size = min(min_size, n // k)
    rng = np.random.default_rng(seed)
    part = quantity_skew(n, k, rng, distribution=distribution, min_size=min_size)
    assert_exact_cover(part, n)
    assert part.sizes().min() >= min_size


@FAST
@given(labelled(), st.integers(1, 4))
def test_shards_covers_every_sample_once(case: tuple[np.ndarray, int, int], per: int) -> None:
    labels, k, seed = case
    per = min(per, len(labels))
    k = max(1, min(k, len(labels) // per))
    part = shards(labels, k, per, np.random.default_rng(seed))
    assert_exact_cover(part, len(labels))
    # Inexact division: shard sizes differ by at most one.
    lo = len(labels) // (k * per)
    assert part.sizes().min() >= lo * per and part.sizes().max() <= (lo + 1) * per


@st.composite
def label_quantity_case(draw: st.DrawFn) -> tuple[np.ndarray, int, int, int]:
    classes = draw(st.integers(1, 8))
    per = draw(st.integers(1, classes))
    clients = draw(st.integers(classes, 3 * classes))
    counts = draw(st.lists(st.integers(clients, clients + 20), min_size=classes, max_size=classes))
    codes = np.array(sorted(draw(st.sets(st.integers(-3, 30), min_size=classes, max_size=classes))))
    labels = np.repeat(codes, counts)
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).permutation(labels), clients, per, seed


@FAST
@given(label_quantity_case())
def test_label_quantity_gives_each_client_exactly_k_labels(
    case: tuple[np.ndarray, int, int, int],
) -> None:
    labels, clients, per, seed = case
    part = label_quantity(labels, clients, per, np.random.default_rng(seed))
    assert_exact_cover(part, len(labels))
    codes = np.unique(labels)
    held = [set(labels[part.client(c)].tolist()) for c in range(clients)]
    assert all(len(h) == per for h in held)
    assert all(codes[c % len(codes)] in held[c] for c in range(clients))
    for code in codes:  # each label is split evenly among the clients holding it
        shares = [
            int((labels[part.client(c)] == code).sum()) for c in range(clients) if code in held[c]
        ]
        assert max(shares) - min(shares) <= 1


def test_label_quantity_niid_bench_setting() -> None:
    labels = np.repeat(np.arange(10), 6000)
    part = label_quantity(labels, 10, 2, np.random.default_rng(0))
    assert_exact_cover(part, len(labels))
    for c in range(10):
        own = labels[part.client(c)]
        assert len(np.unique(own)) == 2 and c in own
    # The second label is uniform over the other nine: across seeds, client 0 gets each.
    seconds = {
        int(
            np.setdiff1d(
                labels[label_quantity(labels, 10, 2, np.random.default_rng(s)).client(0)], [0]
            )[0]
        )
        for s in range(100)
    }
    assert seconds == set(range(1, 10))
    # labels_per_client = all labels is a stratified IID split.
    full = label_quantity(labels, 10, 10, np.random.default_rng(0))
    assert (full.sizes() == 6000).all()
    assert all(len(np.unique(labels[full.client(c)])) == 10 for c in range(10))


@FAST
@given(st.lists(st.integers(-5, 50), min_size=1, max_size=200))
def test_natural_covers_every_sample_once(values: list[int]) -> None:
    groups = np.array(values, dtype=np.int64)
    part = natural(groups)
    assert_exact_cover(part, len(groups))
    distinct = np.unique(groups)
    assert part.num_clients == len(distinct)
    for c, g in enumerate(distinct):  # sorted by group value, one group per client
        assert set(groups[part.client(c)].tolist()) == {g}


def test_dirichlet_skew_grows_as_alpha_falls() -> None:
    labels = np.repeat(np.arange(10), 6000)
    entropies = [
        mean_entropy(dirichlet(labels, 100, alpha, np.random.default_rng(1)), labels)
        for alpha in (100.0, 1.0, 0.1)
    ]
    assert entropies[0] > entropies[1] > entropies[2]
    assert entropies[0] > 3.2  # near log2(10): almost uniform labels


def test_dirichlet_respects_min_size_and_is_seeded() -> None:
    labels = np.repeat(np.arange(10), 100)
    a = dirichlet(labels, 20, 0.3, np.random.default_rng(5), min_size=20)
    b = dirichlet(labels, 20, 0.3, np.random.default_rng(5), min_size=20)
    assert a.sizes().min() >= 20
    np.testing.assert_array_equal(a.indices, b.indices)


def test_dirichlet_impossible_is_a_clear_error() -> None:
    labels = np.repeat(np.arange(10), 6000)
    with pytest.raises(ValueError, match=r"num_clients must be in \[1, 60000\], got 100000"):
        dirichlet(labels, 100_000, 0.5, np.random.default_rng(0), min_size=1)
    with pytest.raises(ValueError, match="max_retries=2"):
        dirichlet(labels[:100], 10, 0.01, np.random.default_rng(0), min_size=10, max_retries=2)


def test_shards_mcmahan_split() -> None:
    labels = np.repeat(np.arange(10), 6000)
    part = shards(labels, 100, 2, np.random.default_rng(0))
    assert_exact_cover(part, len(labels))
    assert (part.sizes() == 600).all()
    distinct = np.array([len(np.unique(labels[part.client(c)])) for c in range(100)])
    # McMahan's scheme allows two shards of one label, so <= 2 everywhere, == 2 for most.
    assert distinct.max() <= 2
    assert (distinct == 2).mean() >= 0.9


def test_quantity_skew_sizes_are_unequal() -> None:
    part = quantity_skew(60_000, 100, np.random.default_rng(0), sigma=1.0)
    sizes = part.sizes()
    assert sizes.sum() == 60_000 and sizes.min() >= 1
    assert sizes.std() / sizes.mean() > 0.5
    power = quantity_skew(60_000, 100, np.random.default_rng(0), distribution="powerlaw")
    assert power.sizes().std() / power.sizes().mean() > 0.5


def test_iid_with_100k_clients_is_just_index_arrays() -> None:
    n, k = 1_000_000, 100_000
    part = iid(n, k, np.random.default_rng(0))
    last = part.client(99_999)
    assert len(last) == 10 and last.base is not None  # a view, not a copy
    assert part.indices.nbytes + part.offsets.nbytes == 8 * (n + k + 1)
    with pytest.raises(IndexError, match=r"valid ids are 0\.\.99999"):
        part.client(100_000)


def test_partition_views_are_read_only() -> None:
    part = Partition.from_lists([np.array([1, 0]), np.array([2])])
    with pytest.raises(ValueError, match="read-only"):
        part.client(0)[0] = 5
    with pytest.raises(IndexError, match="out of range"):
        part.client(-1)


def test_partition_validates_offsets() -> None:
    with pytest.raises(ValueError, match="offsets must start at 0"):
        Partition(np.arange(3), np.array([0, 2]))
    with pytest.raises(ValueError, match="non-decreasing"):
        Partition(np.arange(3), np.array([0, 2, 1, 3]))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda r: iid(10, 0, r), r"num_clients must be in \[1, 10\], got 0"),
        (lambda r: iid(10, 11, r), r"num_clients must be in \[1, 10\], got 11"),
        (lambda r: dirichlet(np.zeros(10, int), 2, 0.0, r), "alpha must be > 0"),
        (lambda r: dirichlet(np.zeros(10), 2, 1.0, r), "labels must be a 1-D integer array"),
        (lambda r: shards(np.zeros(10, int), 6, 2, r), "12 shards exceed the 10 samples"),
        (lambda r: quantity_skew(10, 2, r, distribution="zipf"), "'lognormal' or 'powerlaw'"),
        (
            lambda r: label_quantity(np.arange(10) % 5, 4, 2, r),
            "num_clients >= the 5 distinct labels",
        ),
        (
            lambda r: label_quantity(np.arange(10) % 5, 5, 6, r),
            r"labels_per_client must be in \[1, 5\], got 6",
        ),
        (lambda r: label_quantity(np.array([0, 1]), 3, 1, r), "client 2 got no samples"),
        (lambda r: quantity_skew(10, 2, r, sigma=-1.0), "sigma must be > 0"),
        (lambda r: quantity_skew(10, 4, r, min_size=3), "min_size=3 for 4 clients"),
    ],
)
def test_parameters_are_validated(
    call: Callable[[np.random.Generator], Partition], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        call(np.random.default_rng(0))


def test_make_partition_dispatch_and_errors() -> None:
    labels = np.repeat(np.arange(4), 25)
    groups = np.arange(100) % 5
    rng = np.random.default_rng(0)
    kw: dict[str, Any] = {"labels": labels, "groups": groups, "rng": rng}
    assert make_partition("iid", num_clients=4, **kw).num_clients == 4
    assert make_partition("dirichlet", num_clients=4, alpha=1.0, min_size=5, **kw).num_clients == 4
    assert make_partition("shards", num_clients=5, shards_per_client=2, **kw).num_clients == 5
    assert make_partition("labels", num_clients=5, labels_per_client=2, **kw).num_clients == 5
    assert make_partition("quantity", num_clients=3, distribution="powerlaw", **kw).num_clients == 3
    assert make_partition("natural", num_clients=0, **kw).num_clients == 5
    assert make_partition("natural", num_clients=5, **kw).num_clients == 5
    with pytest.raises(
        ValueError, match="unknown partition 'pathological'; allowed: iid, dirichlet"
    ):
        make_partition("pathological", num_clients=4, **kw)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['beta'\].*allowed: alpha"):
        make_partition("dirichlet", num_clients=4, alpha=1.0, beta=2.0, **kw)
    with pytest.raises(ValueError, match="requires option"):
        make_partition("shards", num_clients=4, **kw)
    with pytest.raises(ValueError, match="num_clients=4 but the data has 5 groups"):
        make_partition("natural", num_clients=4, **kw)
    with pytest.raises(ValueError, match="needs per-example groups"):
        make_partition("natural", num_clients=0, labels=labels, groups=None, rng=rng)
