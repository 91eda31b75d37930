"""Federations larger than the dataset (``partition = "sampled"``): each client's examples
are drawn again, identically, from its own key; distinct within a client, any number of
clients; Dirichlet label skew or none; the CLI, every engine and a resume run over them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from potluck.cli import app
from potluck.config import ExperimentConfig
from potluck.data.describe import describe
from potluck.data.federation import Federation
from potluck.data.partition import make_partition
from potluck.data.sampled import SampledPartition, sampled
from potluck.orchestrator import run_experiment
from potluck.testing import interrupted_and_resumed, learning

LABELS = np.repeat(np.arange(10), 300)


def test_a_client_is_drawn_again_identically_and_from_its_own_key() -> None:
    part = sampled(LABELS, 500_000, np.random.default_rng(0), examples_per_client=20, alpha=0.5)
    again = sampled(LABELS, 500_000, np.random.default_rng(0), examples_per_client=20, alpha=0.5)
    other = sampled(LABELS, 500_000, np.random.default_rng(1), examples_per_client=20, alpha=0.5)
    for c in (0, 17, 499_999):
        assert np.array_equal(part.client(c), part.client(c))
        assert np.array_equal(part.client(c), again.client(c))
    assert not np.array_equal(part.client(17), other.client(17))
    assert not np.array_equal(part.client(17), part.client(18))
    with pytest.raises(IndexError, match=r"0\.\.499999"):
        part.client(500_000)


def test_nothing_per_client_is_stored_but_its_size() -> None:
    part = sampled(LABELS, 1_000_000, np.random.default_rng(0), examples_per_client=30)
    arrays = [v for v in vars(part).values() if isinstance(v, np.ndarray)]
    assert sum(a.nbytes for a in arrays) < 8 * 1_000_000 + 4 * 8 * len(LABELS)


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    size=st.integers(1, 60),
    alpha=st.one_of(st.none(), st.floats(0.01, 10)),
    seed=st.integers(0, 2**32),
)
def test_a_client_holds_distinct_examples_of_the_dataset(
    counts: list[int], size: int, alpha: float | None, seed: int
) -> None:
    labels = np.repeat(np.arange(len(counts)) * 3, counts)  # labels need not be 0..k-1
    size = min(size, len(labels))
    part = SampledPartition(labels, np.full(5, size), alpha=alpha, key=seed)
    for c in range(5):
        held = part.client(c)
        assert len(held) == size and len(np.unique(held)) == size
        assert held.min() >= 0 and held.max() < len(labels)


def test_sizes_are_equal_or_lognormal_with_the_mean_asked_for() -> None:
    rng = np.random.default_rng(0)
    assert set(sampled(LABELS, 1000, rng, examples_per_client=12).sizes().tolist()) == {12}
    sizes = sampled(LABELS, 100_000, rng, examples_per_client=40, sigma=0.8).sizes()
    assert abs(sizes.mean() - 40) < 1 and sizes.std() > 20 and sizes.min() >= 1


def test_dirichlet_skew_concentrates_labels_and_none_follows_the_dataset() -> None:
    rng = np.random.default_rng(0)
    skewed = sampled(LABELS, 2000, rng, examples_per_client=30, alpha=0.05)
    plain = sampled(LABELS, 2000, rng, examples_per_client=30)
    few = [len(np.unique(LABELS[skewed.client(c)])) for c in range(200)]
    many = [len(np.unique(LABELS[plain.client(c)])) for c in range(200)]
    assert np.mean(few) < 2.5 < 8 < np.mean(many)
    pooled = np.bincount(LABELS[np.concatenate([plain.client(c) for c in range(2000)])])
    assert np.abs(pooled / pooled.sum() - 0.1).max() < 0.01  # IID: the dataset's shares


def test_bad_sizes_and_too_many_clients_for_a_one_owner_partition_are_refused() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="cannot hold them once each: the dataset has 3000"):
        sampled(LABELS, 10, rng, examples_per_client=3001)
    with pytest.raises(ValueError, match="examples_per_client must be an integer >= 1"):
        sampled(LABELS, 10, rng, examples_per_client=0)
    with pytest.raises(ValueError, match="use partition 'sampled'"):
        make_partition("iid", labels=LABELS, groups=None, num_clients=3001, rng=rng)


def test_a_federation_of_a_million_clients_trains_locally_and_describes_itself() -> None:
    fed = Federation.from_config(
        "digits",
        num_clients=1_000_000,
        partition="sampled",
        partition_options={"examples_per_client": 10, "sigma": 0.0, "alpha": 0.3},
    )
    data = fed.client(999_999)
    assert (len(data.y_train), len(data.y_test)) == (8, 2)
    train, test = fed._client_indices(999_999)
    assert not set(train.tolist()) & set(test.tolist())  # no example both trained and tested
    small = Federation.from_config("digits", num_clients=50, partition="sampled")
    stats = describe(small, max_rows=3)
    assert stats["num_clients"] == 50 and stats["sizes"]["mean"] == 26  # 32 less its test 6


BASE: dict[str, Any] = {
    "seed": 3,
    "rounds": 3,
    "data": {
        "dataset": "digits",
        "num_clients": 100_000,
        "partition": {"kind": "sampled", "examples_per_client": 24, "alpha": 0.5},
    },
    "model": {"name": "mlp"},
    "sampler": {"clients_per_round": 6},
    "client": {"epochs": 1, "batch_size": 8, "lr": 0.1},
    "run": {"threads": 1},
}


@pytest.mark.parametrize("engine", ["vectorized", "pool"])
def test_every_engine_runs_a_sampled_federation_as_inline_does(engine: str) -> None:
    inline = run_experiment(ExperimentConfig.from_dict(BASE).build())
    opts = {"threads": 1, "engine": engine, **({"workers": 2} if engine == "pool" else {})}
    other = run_experiment(ExperimentConfig.from_dict({**BASE, "run": opts}).build())
    assert np.allclose(
        [m["train_loss"] for m in learning(inline)], [m["train_loss"] for m in learning(other)]
    )
    assert learning(inline)[-1]["test_accuracy"] == pytest.approx(
        learning(other)[-1]["test_accuracy"], abs=0.01
    )


def test_a_resumed_sampled_run_equals_the_uninterrupted_one(tmp_path: Path) -> None:
    config = ExperimentConfig.from_dict(BASE)
    whole = run_experiment(config.build())
    resumed = interrupted_and_resumed(config, tmp_path, after=1)
    assert learning(resumed) == learning(whole)


def test_the_cli_runs_a_federation_larger_than_the_dataset(tmp_path: Path) -> None:
    sets = ["data.dataset=digits", "data.num_clients=200000", "data.partition.kind=sampled"]
    sets += ["data.partition.skew=none", "rounds=1", "model.name=mlp"]
    sets += ["sampler.clients_per_round=5", "evaluation.federated_clients=5"]
    args = [x for s in sets for x in ("--set", s)]
    result = CliRunner().invoke(app, ["run", *args, "--store", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "200000 clients" in result.output.replace(",", "")
