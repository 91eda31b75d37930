"""The simulated federation: a virtual, lazy population of clients over one dataset.

A client's data is gathered only when asked for: ``client(cid)`` looks up the client's
indices in the :class:`~potluck.data.partition.Partition` and splits them into local train
and test sets with a permutation drawn from ``Seeds(seed).numpy("split", cid)``.

Example:
    >>> fed = Federation.from_config("digits", num_clients=10, partition="iid", seed=0)
    >>> data = fed.client(3)
    >>> data.num_examples == fed.num_examples(3), len(data.y_test)
    (True, 28)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from potluck.core.seeding import Seeds
from potluck.data.partition import Partition, make_partition, natural
from potluck.data.sources import ArrayDataset, DataSource, load_source

__all__ = ["ClientData", "Federation"]

_EPS = 1e-9  # so that e.g. 0.29 * 100 counts as 29 test samples, not 28


@dataclass(frozen=True)
class ClientData:
    """One client's local train and test arrays."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def num_examples(self) -> int:
        return len(self.y_train)


def _num_test(sizes: np.ndarray | int, test_fraction: float) -> np.ndarray:
    return np.floor(test_fraction * np.asarray(sizes) + _EPS).astype(np.int64)


class Federation:
    """Virtual, lazy population of clients over a DataSource and a Partition.

    Client ``cid`` keeps ``floor(test_fraction * n)`` of its ``n`` samples as a local test
    set; nothing per client is stored, so a million clients cost only the partition arrays.

    Example:
        >>> import numpy as np
        >>> clients = [(np.random.rand(10, 3).astype(np.float32), np.arange(10) % 2)] * 2
        >>> fed = Federation.from_client_data(clients, test_fraction=0.2)
        >>> fed.num_clients, fed.num_examples_all().tolist()
        (2, [8, 8])
    """

    def __init__(
        self,
        source: DataSource,
        partition: Partition,
        *,
        test_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
        n = len(source.train)
        if len(partition.indices) and (partition.indices.min() < 0 or partition.indices.max() >= n):
            raise ValueError(
                f"partition indices must lie in [0, {n}) (the {source.name} train set), got "
                f"[{partition.indices.min()}, {partition.indices.max()}]"
            )
        self.source = source
        self.partition = partition
        self.test_fraction = float(test_fraction)
        self.seeds = Seeds(seed)

    def __repr__(self) -> str:
        return (
            f"Federation({self.source.name!r}, num_clients={self.num_clients}, "
            f"test_fraction={self.test_fraction})"
        )

    @property
    def num_clients(self) -> int:
        return self.partition.num_clients

    def client(self, cid: int) -> ClientData:
        """Client ``cid``'s local train/test data, gathered now (deterministic per seed)."""
        idx = self.partition.client(cid)
        perm = self.seeds.numpy("split", int(cid)).permutation(len(idx))
        n_test = int(_num_test(len(idx), self.test_fraction))
        test_idx, train_idx = idx[perm[:n_test]], idx[perm[n_test:]]
        train = self.source.train
        return ClientData(
            train.features(train_idx),
            train.y[train_idx],
            train.features(test_idx),
            train.y[test_idx],
        )

    def num_examples(self, cid: int) -> int:
        """Client ``cid``'s number of local train examples (no data is gathered)."""
        n = len(self.partition.client(cid))
        return n - int(_num_test(n, self.test_fraction))

    def num_examples_all(self) -> np.ndarray:
        """Local train example counts of all clients, shape ``(num_clients,)``."""
        sizes = self.partition.sizes()
        return sizes - _num_test(sizes, self.test_fraction)

    @classmethod
    def from_config(
        cls,
        dataset: str,
        *,
        num_clients: int | None,
        partition: str = "iid",
        partition_options: dict[str, Any] | None = None,
        test_fraction: float = 0.2,
        seed: int = 0,
        path: str | None = None,
        source_options: dict[str, Any] | None = None,
    ) -> Federation:
        """Load ``dataset`` and partition its train set among ``num_clients`` clients.

        The partition draws from ``Seeds(seed).numpy("partition")``. For
        ``partition="natural"`` the clients are the dataset's groups (e.g. Synthetic's
        devices): pass ``num_clients`` equal to their number, or 0/None for all of them.

        Example:
            >>> fed = Federation.from_config("synthetic", num_clients=0, partition="natural",
            ...                              source_options={"num_clients": 7})
            >>> fed.num_clients
            7
        """
        source = load_source(dataset, path=path, seed=seed, **(source_options or {}))
        part = make_partition(
            partition,
            labels=source.train.y,
            groups=source.train.groups,
            num_clients=num_clients,
            rng=Seeds(seed).numpy("partition"),
            **(partition_options or {}),
        )
        return cls(source, part, test_fraction=test_fraction, seed=seed)

    @classmethod
    def from_client_data(
        cls,
        clients: Sequence[Any],
        *,
        test: tuple[Any, Any] | None = None,
        num_classes: int | None = None,
        test_fraction: float = 0.0,
        seed: int = 0,
    ) -> Federation:
        """A federation over your own per-client data, one client per item of ``clients``.

        Each item is an ``(x, y)`` pair (tuple or 2-list) of NumPy arrays or torch tensors,
        or a ``torch.utils.data.Dataset`` (anything with ``__len__``/``__getitem__``) that
        yields ``(x, y)`` pairs. ``x`` becomes float32, ``y`` int64 class labels. ``test`` is
        an optional centralised ``(x, y)`` test set; ``num_classes`` defaults to the largest
        label + 1.

        Example:
            >>> import torch
            >>> fed = Federation.from_client_data([(torch.randn(8, 2), torch.arange(8) % 2)] * 3)
            >>> fed.num_clients, fed.source.num_classes, fed.source.input_shape
            (3, 2, (2,))
        """
        if len(clients) == 0:
            raise ValueError("from_client_data: clients is empty; pass at least one (x, y)")
        xs: list[np.ndarray] = []
        ys: list[np.ndarray] = []
        for i, item in enumerate(clients):
            x, y = _materialise(item, f"client {i}")
            if xs and x.shape[1:] != xs[0].shape[1:]:
                raise ValueError(
                    f"client {i}: feature shape {x.shape[1:]} differs from client 0's "
                    f"{xs[0].shape[1:]}"
                )
            xs.append(x)
            ys.append(y)
        feature_shape = xs[0].shape[1:]
        if test is None:
            test_x, test_y = np.zeros((0, *feature_shape), np.float32), np.zeros(0, np.int64)
        else:
            test_x, test_y = _materialise(test, "test", allow_empty=True)
            if test_x.shape[1:] != feature_shape:
                raise ValueError(
                    f"test: feature shape {test_x.shape[1:]} differs from the clients' "
                    f"{feature_shape}"
                )
        max_label = max(int(y.max()) for y in (*ys, test_y) if len(y))
        if num_classes is None:
            num_classes = max_label + 1
        elif max_label >= num_classes:
            raise ValueError(f"num_classes={num_classes} but the data has label {max_label}")
        groups = np.repeat(np.arange(len(ys), dtype=np.int64), [len(y) for y in ys])
        train = ArrayDataset(np.concatenate(xs), np.concatenate(ys), groups)
        source = DataSource(
            "client_data", train, ArrayDataset(test_x, test_y), num_classes, tuple(feature_shape)
        )
        return cls(source, natural(groups), test_fraction=test_fraction, seed=seed)


def _to_numpy(a: Any) -> np.ndarray:
    torch = sys.modules.get("torch")  # a tensor implies torch is already imported
    if torch is not None and isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _is_pair(item: Any) -> bool:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(item, torch.utils.data.Dataset):
        return False
    return isinstance(item, tuple) or (isinstance(item, list) and len(item) == 2)


def _materialise(item: Any, where: str, allow_empty: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(x float32, y int64)`` from a pair or a dataset of pairs, validated."""
    if _is_pair(item):
        if len(item) != 2:
            raise ValueError(f"{where}: expected an (x, y) pair, got a tuple of {len(item)}")
        x, y = _to_numpy(item[0]), _to_numpy(item[1])
    elif hasattr(item, "__len__") and hasattr(item, "__getitem__"):
        x, y = _stack_dataset(item, where)
    else:
        raise ValueError(
            f"{where}: expected an (x, y) pair or a Dataset, got {type(item).__name__}"
        )
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{where}: y must be 1-D integer class labels, got {y.dtype} {y.shape}")
    if x.ndim < 1 or len(x) != len(y):
        raise ValueError(f"{where}: x has {len(x) if x.ndim else 0} rows but y has {len(y)}")
    if len(y) == 0 and not allow_empty:
        raise ValueError(f"{where}: no examples")
    if len(y) and y.min() < 0:
        raise ValueError(f"{where}: labels must be >= 0, got {y.min()}")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"{where}: x must be real numbers, got {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32), y.astype(np.int64)


def _stack_dataset(ds: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    tensors = getattr(ds, "tensors", None)  # TensorDataset: no per-item loop
    if isinstance(tensors, tuple) and len(tensors) == 2:
        return _to_numpy(tensors[0]), _to_numpy(tensors[1])
    xs, ys = [], []
    for j in range(len(ds)):
        pair = ds[j]
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"{where}: item {j} is not an (x, y) pair")
        xs.append(_to_numpy(pair[0]))
        ys.append(_to_numpy(pair[1]).reshape(-1))
    if not xs:
        raise ValueError(f"{where}: no examples")
    if len({x.shape for x in xs}) > 1:
        raise ValueError(f"{where}: items have different feature shapes")
    return np.stack(xs), np.concatenate(ys)
