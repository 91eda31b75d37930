"""Federation: lazy per-client splits, user data, config errors; describe()."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from potluck.data import (
    ArrayDataset,
    ClientData,
    Federation,
    Partition,
    describe,
    iid,
    label_entropy,
    load_source,
)


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


# --------------------------------------------------------------------------- client_tests


def windows(ids: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Next-character examples: x = ids[i:i+width], y = ids[i+width], stride 1 (overlapping)."""
    x = np.lib.stride_tricks.sliding_window_view(ids[:-1], width)
    return np.ascontiguousarray(x), ids[width:]


def test_client_tests_are_exactly_the_given_sets_and_train_is_unsplit() -> None:
    rng = np.random.default_rng(0)
    clients = [(rng.random((n, 4)), rng.integers(0, 3, n)) for n in (5, 7, 3)]
    tests = [
        (rng.random((2, 4)), np.array([0, 5])),  # label 5 only here: num_classes counts it
        (np.zeros((0, 4)), np.zeros(0, np.int64)),  # an empty test set
        (torch.rand(4, 4), torch.tensor([1, 1, 2, 0])),
    ]
    fed = Federation.from_client_data(clients, client_tests=tests, seed=3)
    assert fed.source.num_classes == 6 and "local_test=6 examples" in repr(fed)
    for cid, ((x, y), (tx, ty)) in enumerate(zip(clients, tests, strict=True)):
        data = fed.client(cid)
        np.testing.assert_array_equal(data.x_train, x.astype(np.float32))  # all of it, in order
        np.testing.assert_array_equal(data.y_train, y)
        np.testing.assert_array_equal(data.x_test, np.asarray(tx, np.float32).reshape(-1, 4))
        np.testing.assert_array_equal(data.y_test, np.asarray(ty))
        assert data.x_test.dtype == np.float32 and data.y_test.dtype == np.int64
        assert fed.num_examples(cid) == len(y)
    assert fed.client(1).x_test.shape == (0, 4)
    assert fed.num_examples_all().tolist() == [5, 7, 3]
    assert fed.num_test_examples_all().tolist() == [2, 0, 4]
    other_seed = Federation.from_client_data(clients, client_tests=tests, seed=4)
    np.testing.assert_array_equal(other_seed.client(2).x_train, fed.client(2).x_train)


def test_client_tests_accept_datasets_and_empty_ones_of_any_shape() -> None:
    x, y = torch.randn(6, 3), torch.arange(6) % 2
    tests = [TensorDataset(x[:2], y[:2]), (torch.empty(0), torch.empty(0, dtype=torch.long))]
    fed = Federation.from_client_data([(x, y), (x, y)], client_tests=tests)
    np.testing.assert_array_equal(fed.client(0).x_test, x[:2].numpy())
    assert fed.client(1).x_test.shape == (0, 3) and fed.client(1).x_test.dtype == np.float32


def test_client_tests_do_not_leak_overlapping_windows() -> None:
    """A random split of overlapping next-character windows puts each test answer in train;
    held-out text per client does not."""
    rng = np.random.default_rng(0)
    texts = [rng.integers(0, 26, 400) for _ in range(3)]
    width, cut = 8, 320
    clients = [windows(t[:cut], width) for t in texts]
    tests = [windows(t[cut:], width) for t in texts]

    def leaks(data: ClientData) -> int:
        train_rows = set(map(bytes, data.x_train))
        return sum(
            bytes(x) in train_rows or bytes(np.append(x[1:], y)) in train_rows
            for x, y in zip(data.x_test, data.y_test, strict=True)
        )

    split = Federation.from_client_data([windows(t, width) for t in texts], test_fraction=0.2)
    assert all(leaks(split.client(c)) > 0 for c in range(3))
    held_out = Federation.from_client_data(clients, client_tests=tests)
    for c in range(3):
        data = held_out.client(c)
        assert leaks(data) == 0 and len(data.y_test) == 400 - cut - width
        assert data.x_train.dtype == np.int64  # token ids stay integers


def test_client_tests_errors_name_both_parameters() -> None:
    ok = (np.zeros((3, 4), np.float32), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="client_tests has 1 test sets but clients has 2 clients"):
        Federation.from_client_data([ok, ok], client_tests=[ok])
    with pytest.raises(ValueError, match=r"client_tests and test_fraction=0\.2 exclude each other"):
        Federation.from_client_data([ok], client_tests=[ok], test_fraction=0.2)
    with pytest.raises(ValueError, match=r"client 1 test set: feature shape \(2,\) differs"):
        Federation.from_client_data([ok, ok], client_tests=[ok, (np.zeros((1, 2)), [0])])
    with pytest.raises(ValueError, match="client 0 test set: labels must be >= 0"):
        Federation.from_client_data([ok], client_tests=[(np.zeros((1, 4)), np.array([-1]))])
    with pytest.raises(ValueError, match="num_classes=2 but the data has label 4"):
        Federation.from_client_data(
            [ok], client_tests=[(np.zeros((1, 4)), np.array([4]))], num_classes=2
        )


def test_federation_constructor_validates_local_test() -> None:
    base = Federation.from_client_data(
        [(np.zeros((3, 2)), np.array([0, 1, 1]))] * 2,
        client_tests=[(np.ones((1, 2)), np.array([1]))] * 2,
    )
    src, part = base.source, base.partition
    test, test_part = base.local_test, base.local_test_partition
    assert test is not None and test_part is not None
    with pytest.raises(ValueError, match="local_test and local_test_partition together"):
        Federation(src, part, test_fraction=0, local_test=test)
    with pytest.raises(ValueError, match="test_fraction must be 0 when each client's test set"):
        Federation(src, part, local_test=test, local_test_partition=test_part)
    one = Partition.from_lists([np.array([0, 1])])
    with pytest.raises(ValueError, match="local_test_partition has 1 clients but partition has 2"):
        Federation(src, part, test_fraction=0, local_test=test, local_test_partition=one)
    far = Partition.from_lists([np.array([0]), np.array([5])])
    with pytest.raises(ValueError, match=r"local_test_partition indices must lie in \[0, 2\)"):
        Federation(src, part, test_fraction=0, local_test=test, local_test_partition=far)
    ints = ArrayDataset(np.zeros((2, 2), np.int64), np.array([0, 1]))
    with pytest.raises(ValueError, match="local_test: inputs are integer but client_data's"):
        Federation(src, part, test_fraction=0, local_test=ints, local_test_partition=test_part)
    wide = ArrayDataset(np.zeros((2, 3), np.float32), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"local_test: feature shape \(3,\) != input_shape"):
        Federation(src, part, test_fraction=0, local_test=wide, local_test_partition=test_part)
    big = ArrayDataset(np.zeros((2, 2), np.float32), np.array([0, 7]))
    with pytest.raises(ValueError, match=r"local_test: labels must lie in \[0, 2\)"):
        Federation(src, part, test_fraction=0, local_test=big, local_test_partition=test_part)


def test_describe_runs_on_client_tests() -> None:
    clients = [(np.zeros((4, 1)), np.array([0, 0, 1, 1])), (np.zeros((2, 1)), np.array([2, 2]))]
    tests = [(np.zeros((1, 1)), np.array([1])), (np.zeros((3, 1)), np.array([0, 2, 2]))]
    stats = describe(Federation.from_client_data(clients, client_tests=tests))
    assert stats["num_clients"] == 2 and stats["total_train"] == 6
    assert [row["train"] for row in stats["clients"]] == [4, 2]
    assert stats["labels_per_client"] == {"mean": 1.5, "min": 1.0, "max": 2.0}


# --------------------------------------------------------------------------- integer inputs


def test_uint8_pixels_become_float32() -> None:
    """uint8 is how image sets ship their pixels: they become float32 values, as before."""
    clients = [(np.arange(12, dtype=np.uint8).reshape(4, 3), np.array([0, 1, 2, 3]))]
    data = Federation.from_client_data(clients).client(0)
    assert data.x_train.dtype == np.float32
    np.testing.assert_array_equal(np.sort(data.x_train, axis=0), np.arange(12).reshape(4, 3))


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.int64, np.uint64])
def test_integer_inputs_stay_int64(dtype: type) -> None:
    clients = [(np.arange(12).reshape(4, 3).astype(dtype), np.array([0, 1, 2, 3]))] * 2
    fed = Federation.from_client_data(clients, test=(clients[0][0][:1], np.array([1])))
    data = fed.client(1)
    assert data.x_train.dtype == np.int64 and data.x_test.dtype == np.int64
    assert fed.source.train.integer_features and fed.source.test.x.dtype == np.int64
    np.testing.assert_array_equal(np.sort(data.x_train, axis=0), np.arange(12).reshape(4, 3))


def test_default_empty_test_set_takes_the_integer_dtype() -> None:
    fed = Federation.from_client_data([(torch.arange(6).reshape(3, 2), torch.tensor([0, 1, 1]))])
    assert fed.source.test.x.dtype == np.int64 and fed.source.test.x.shape == (0, 2)
    fed = Federation.from_client_data(
        [(np.ones((3, 2), np.int32), np.array([0, 1, 1]))],
        test=(np.zeros((0, 2)), np.zeros(0, int)),
    )
    assert fed.source.test.x.dtype == np.int64  # an empty float test set adopts integers


def test_embedding_model_consumes_client_token_ids() -> None:
    ids = np.random.default_rng(0).integers(0, 50, 200)
    fed = Federation.from_client_data([windows(ids[:100], 5), windows(ids[100:], 5)])
    data = fed.client(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(50, 4), torch.nn.Flatten(), torch.nn.Linear(20, 50)
    )
    logits = model(torch.from_numpy(data.x_train))
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(data.y_train))
    assert logits.shape == (95, 50) and torch.isfinite(loss)


def test_bool_and_float_inputs_become_float32() -> None:
    flags = np.array([[True, False], [False, True]])
    fed = Federation.from_client_data([(flags, np.array([0, 1])), (np.ones((2, 2)), [1, 0])])
    assert fed.client(0).x_train.dtype == np.float32
    assert sorted(fed.client(0).x_train.tolist()) == [[0.0, 1.0], [1.0, 0.0]]


def test_mixed_integer_and_float_inputs_are_refused() -> None:
    ints, floats = np.zeros((2, 3), np.int64), np.zeros((2, 3), np.float32)
    y = np.array([0, 1])
    with pytest.raises(
        ValueError,
        match=r"integer and float inputs are mixed: integer x in client 0, client 2, float x "
        r"in client 1; use one kind",
    ):
        Federation.from_client_data([(ints, y), (floats, y), (ints, y)])
    with pytest.raises(ValueError, match=r"integer x in client 0, float x in test;"):
        Federation.from_client_data([(ints, y)], test=(floats, y))
    with pytest.raises(ValueError, match="float x in client 1 test set"):
        Federation.from_client_data([(ints, y)] * 2, client_tests=[(ints, y), (floats, y)])
    many = [(ints, y)] * 5 + [(floats, y)]
    with pytest.raises(ValueError, match="client 0, client 1, client 2 and 2 more, float x"):
        Federation.from_client_data(many)


def test_uint64_beyond_int64_is_refused() -> None:
    x = np.array([[2**63]], np.uint64)
    with pytest.raises(ValueError, match="client 0: x holds 9223372036854775808, beyond int64"):
        Federation.from_client_data([(x, np.array([0]))])


# --------------------------------------------------------------------------- NaN / Inf


def test_nan_and_inf_are_refused_naming_the_client_and_split() -> None:
    ok = (np.zeros((3, 2)), np.array([0, 1, 1]))
    nan = np.zeros((3, 2))
    nan[1, 0] = np.nan
    with pytest.raises(
        ValueError,
        match=r"client 2: x has NaN or Inf in 1 of 3 train examples \(first at row 1;.*"
        r"clean or impute the data",
    ):
        Federation.from_client_data([ok, ok, (nan, ok[1])])
    inf = np.zeros((4, 2), np.float32)
    inf[[2, 3], 1] = -np.inf
    with pytest.raises(
        ValueError, match=r"client 1 test set: x has NaN or Inf in 2 of 4 test examples .*row 2"
    ):
        Federation.from_client_data([ok, ok], client_tests=[ok, (inf, np.zeros(4, int))])
    with pytest.raises(ValueError, match=r"^test: x has NaN or Inf in 1 of 3 test examples"):
        Federation.from_client_data([ok], test=(nan, ok[1]))
    huge = np.full((1, 2), 1e300)  # finite in float64, Inf in float32
    with pytest.raises(ValueError, match=r"client 0: x has NaN or Inf.*float32's range"):
        Federation.from_client_data([(huge, np.array([0]))])
    with pytest.raises(ValueError, match="client 0: x has NaN or Inf"):
        Federation.from_client_data([(torch.tensor([[float("nan")]]), torch.tensor([0]))])
