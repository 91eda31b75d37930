"""Federation: lazy per-client splits, user data, config errors; describe()."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from potluck.data import Federation, describe, iid, label_entropy, load_source


def digits_federation(test_fraction: float) -> Federation:
    return Federation.from_config(
        "digits", num_clients=10, partition="iid", test_fraction=test_fraction
    )


def test_client_split_is_deterministic_disjoint_and_sized() -> None:
    src = load_source("synthetic", num_clients=5)
    part = iid(len(src.train), 7, np.random.default_rng(0))
    fed = Federation(src, part, test_fraction=0.25, seed=3)
    again = Federation(src, part, test_fraction=0.25, seed=3)
    other = Federation(src, part, test_fraction=0.25, seed=4)
    for cid in range(fed.num_clients):
        a, b = fed.client(cid), again.client(cid)
        np.testing.assert_array_equal(a.x_train, b.x_train)
        np.testing.assert_array_equal(a.y_test, b.y_test)
        n = len(part.client(cid))
        assert len(a.y_test) == math.floor(0.25 * n) and a.num_examples == n - len(a.y_test)
        assert fed.num_examples(cid) == a.num_examples
        # Disjoint and complete: rows of train + test are exactly the client's rows.
        got = np.concatenate([a.x_train, a.x_test])
        want = src.train.x[part.client(cid)]
        assert sorted(map(bytes, got)) == sorted(map(bytes, want))
    assert not np.array_equal(fed.client(0).x_train, other.client(0).x_train)  # seed matters
    np.testing.assert_array_equal(
        fed.num_examples_all(), [fed.num_examples(c) for c in range(fed.num_clients)]
    )


def test_zero_test_fraction_and_bad_values() -> None:
    fed = digits_federation(test_fraction=0.0)
    assert len(fed.client(2).y_test) == 0 and fed.client(2).x_test.shape[1:] == (64,)
    with pytest.raises(ValueError, match=r"test_fraction must be in \[0, 1\)"):
        digits_federation(test_fraction=1.0)
    with pytest.raises(IndexError, match=r"valid ids are 0\.\.9"):
        fed.client(10)


def test_from_config_partitions_and_errors() -> None:
    fed = Federation.from_config(
        "digits",
        num_clients=8,
        partition="dirichlet",
        partition_options={"alpha": 0.3, "min_size": 5},
    )
    assert fed.num_clients == 8 and fed.partition.sizes().min() >= 5
    same = Federation.from_config(
        "digits",
        num_clients=8,
        partition="dirichlet",
        partition_options={"alpha": 0.3, "min_size": 5},
    )
    np.testing.assert_array_equal(fed.partition.indices, same.partition.indices)
    with pytest.raises(ValueError, match="available: digits, fashion_mnist, synthetic"):
        Federation.from_config("cifar", num_clients=2)
    with pytest.raises(ValueError, match="unknown partition 'weird'; allowed: iid"):
        Federation.from_config("digits", num_clients=2, partition="weird")
    with pytest.raises(ValueError, match="needs per-example groups"):
        Federation.from_config("digits", num_clients=2, partition="natural")


def test_synthetic_natural_partition_recovers_devices() -> None:
    opts = {"num_clients": 12}
    fed = Federation.from_config(
        "synthetic", num_clients=12, partition="natural", source_options=opts
    )
    assert fed.num_clients == 12
    sizes = fed.partition.sizes()
    assert sizes.std() / sizes.mean() > 0.3
    groups = fed.source.train.groups
    assert groups is not None
    for cid in (0, 11):
        assert set(groups[fed.partition.client(cid)].tolist()) == {cid}
    every = Federation.from_config(
        "synthetic", num_clients=0, partition="natural", source_options=opts
    )
    assert every.num_clients == 12
    with pytest.raises(ValueError, match="num_clients=5 but the data has 12 groups"):
        Federation.from_config("synthetic", num_clients=5, partition="natural", source_options=opts)


def test_from_client_data_numpy() -> None:
    rng = np.random.default_rng(0)
    clients = [(rng.random((n, 2, 3)), rng.integers(0, 4, n)) for n in (5, 9, 3)]
    test = (rng.random((4, 2, 3)), np.array([0, 1, 2, 5]))
    fed = Federation.from_client_data(clients, test=test)
    assert fed.num_clients == 3 and fed.source.num_classes == 6
    assert fed.source.input_shape == (2, 3) and len(fed.source.test) == 4
    data = fed.client(1)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
    np.testing.assert_allclose(
        np.sort(data.x_train.ravel()), np.sort(clients[1][0].ravel().astype(np.float32))
    )
    assert fed.num_examples_all().tolist() == [5, 9, 3]  # test_fraction defaults to 0


def test_from_client_data_torch_tensors_and_datasets() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 4, generator=g), torch.arange(10) % 3

    class Pairs(Dataset[tuple[torch.Tensor, torch.Tensor]]):
        def __len__(self) -> int:
            return 6

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return x[i], y[i]

    fed = Federation.from_client_data(
        [(x.requires_grad_(False), y), TensorDataset(x[:4], y[:4]), Pairs(), [x[:2], y[:2]]],
        test=(x[:3], y[:3]),
        num_classes=5,
        test_fraction=0.5,
    )
    assert fed.num_clients == 4 and fed.source.num_classes == 5
    assert fed.partition.sizes().tolist() == [10, 4, 6, 2]
    c2 = fed.client(2)
    got = np.concatenate([c2.x_train, c2.x_test])
    assert sorted(map(bytes, got)) == sorted(map(bytes, x[:6].numpy()))
    assert len(c2.y_test) == 3


def test_from_client_data_errors_name_the_client() -> None:
    ok = (np.zeros((3, 4), np.float32), np.array([0, 1, 1]))
    with pytest.raises(
        ValueError, match=r"client 2: feature shape \(5,\) differs from client 0's \(4,\)"
    ):
        Federation.from_client_data([ok, ok, (np.zeros((3, 5)), np.array([0, 1, 1]))])
    with pytest.raises(ValueError, match="client 1: x has 3 rows but y has 2"):
        Federation.from_client_data([ok, (np.zeros((3, 4)), np.array([0, 1]))])
    with pytest.raises(ValueError, match="client 0: y must be 1-D integer"):
        Federation.from_client_data([(np.zeros((3, 4)), np.array([0.5, 1, 1]))])
    with pytest.raises(ValueError, match="client 1: no examples"):
        Federation.from_client_data([ok, (np.zeros((0, 4)), np.zeros(0, int))])
    with pytest.raises(ValueError, match="clients is empty"):
        Federation.from_client_data([])
    with pytest.raises(ValueError, match="num_classes=1 but the data has label 1"):
        Federation.from_client_data([ok], num_classes=1)
    with pytest.raises(ValueError, match=r"test: feature shape \(2,\)"):
        Federation.from_client_data([ok], test=(np.zeros((1, 2)), np.array([0])))


def test_label_entropy() -> None:
    assert label_entropy(np.array([0, 1, 2, 3]), 4) == 2.0
    assert label_entropy(np.array([3, 3]), 4) == 0.0
    assert label_entropy(np.array([], dtype=np.int64), 4) == 0.0
    assert label_entropy(np.array([0, 0, 0, 1]), 2) == pytest.approx(0.8112781244591328)


def test_describe_on_a_tiny_federation() -> None:
    x = lambda n: np.zeros((n, 1), np.float32)  # noqa: E731
    clients = [
        (x(4), np.array([0, 0, 1, 1])),  # 1 bit, 2 labels
        (x(3), np.array([2, 2, 2])),  # 0 bits, 1 label
        (x(5), np.array([0, 1, 2, 3, 3])),  # 4 labels
    ]
    fed = Federation.from_client_data(clients, test_fraction=0.2)
    stats = describe(fed, max_rows=2)
    h2 = label_entropy(np.array([0, 1, 2, 3, 3]), 4)
    assert stats["num_clients"] == 3 and stats["num_classes"] == 4
    assert stats["total_train"] == 4 + 3 + 4  # floor(0.2 * 5) = 1 test example for client 2
    assert stats["sizes"] == {
        "min": 3.0,
        "max": 4.0,
        "mean": 11 / 3,
        "std": pytest.approx(np.std([4, 3, 4])),
        "median": 4.0,
    }
    assert stats["label_entropy"] == {
        "mean": pytest.approx((1 + h2) / 3),
        "min": 0.0,
        "max": pytest.approx(h2),
    }
    assert stats["labels_per_client"] == {"mean": 7 / 3, "min": 1.0, "max": 4.0}
    assert stats["clients"] == [
        {"client": 0, "train": 4, "test": 0, "labels": 2, "entropy": 1.0, "top_labels": [0, 1]},
        {"client": 1, "train": 3, "test": 0, "labels": 1, "entropy": 0.0, "top_labels": [2]},
    ]
    assert describe(fed)["clients"][2]["top_labels"] == [3, 0, 1]


def test_describe_scales_to_many_clients() -> None:
    src = load_source("synthetic", num_clients=3)
    part = iid(len(src.train), len(src.train) // 2, np.random.default_rng(0))
    stats = describe(Federation(src, part), max_rows=5)
    assert stats["num_clients"] == part.num_clients and len(stats["clients"]) == 5
    assert stats["labels_per_client"]["max"] <= 2
