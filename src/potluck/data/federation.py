"""The simulated federation: a virtual, lazy population of clients over one dataset.

A client's data is gathered only when asked for: ``client(cid)`` looks up the client's
indices in the :class:`~potluck.data.partition.Partition` and splits them into local train
and test sets with a permutation drawn from ``Seeds(seed).numpy("split", cid)``, unless
each client's own test set is given (``local_test``: a second dataset and partition, as
``from_client_data(..., client_tests=...)`` builds); then nothing is split.

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
from potluck.data.partition import Partition, Partitioning, make_partition, natural
from potluck.data.sources import ArrayDataset, DataSource, load_source

__all__ = ["ClientData", "Federation"]

_EPS = 1e-9  # so that e.g. 0.29 * 100 counts as 29 test samples, not 28
_INT64_MAX = np.iinfo(np.int64).max


@dataclass(frozen=True)
class ClientData:
    """One client's local train and test arrays (``x`` float32, or int64 integer inputs)."""

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
    Given ``local_test`` and ``local_test_partition`` (both or neither; ``test_fraction``
    must then be 0), client ``cid`` instead trains on all of its partition's samples, in
    order, and tests on the ``local_test`` samples at ``local_test_partition.client(cid)``.

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
        partition: Partitioning,
        *,
        test_fraction: float = 0.2,
        seed: int = 0,
        local_test: ArrayDataset | None = None,
        local_test_partition: Partitioning | None = None,
    ) -> None:
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
        _check_indices("partition", partition, len(source.train), f"the {source.name} train set")
        self.source = source
        self.partition = partition
        self.test_fraction = float(test_fraction)
        self.seeds = Seeds(seed)
        self.local_test = local_test
        self.local_test_partition = local_test_partition
        # how this federation can be made again (``from_config``'s arguments, or the import
        # path of a builder: ``Federation.load``), so a run over it can be resumed
        self.recipe: dict[str, Any] | None = None
        if local_test is not None or local_test_partition is not None:
            self._check_local_test()

    def _check_local_test(self) -> None:
        test, part = self.local_test, self.local_test_partition
        if test is None or part is None:
            raise ValueError("pass local_test and local_test_partition together, or neither")
        if self.test_fraction != 0:
            raise ValueError(
                "test_fraction must be 0 when each client's test set is given (local_test), "
                f"got {self.test_fraction}"
            )
        if part.num_clients != self.num_clients:
            raise ValueError(
                f"local_test_partition has {part.num_clients} clients but partition has "
                f"{self.num_clients}"
            )
        _check_indices("local_test_partition", part, len(test), "local_test")
        _check_matches_source(self.source, test, "local_test")

    def __repr__(self) -> str:
        local = "" if self.local_test is None else f", local_test={len(self.local_test)} examples"
        return (
            f"Federation({self.source.name!r}, num_clients={self.num_clients}, "
            f"test_fraction={self.test_fraction}{local})"
        )

    @property
    def num_clients(self) -> int:
        return self.partition.num_clients

    def client(self, cid: int) -> ClientData:
        """Client ``cid``'s local train/test data, gathered now (deterministic per seed).

        Example:
            >>> fed = Federation.from_client_data(
            ...     [(np.ones((3, 1)), np.array([0, 1, 1]))],
            ...     client_tests=[(np.zeros((1, 1)), np.array([1]))])
            >>> data = fed.client(0)
            >>> data.x_train.tolist(), data.x_test.tolist(), data.y_test.tolist()
            ([[1.0], [1.0], [1.0]], [[0.0]], [1])
        """
        train_idx, test_idx = self._client_indices(cid)
        train = self.source.train
        test = train if self.local_test is None else self.local_test
        return ClientData(
            train.features(train_idx),
            train.y[train_idx],
            test.features(test_idx),
            test.y[test_idx],
        )

    def _client_indices(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        """Client ``cid``'s (train, test) rows: of ``source.train`` and of the test dataset."""
        idx = self.partition.client(cid)
        if self.local_test_partition is not None:
            return idx, self.local_test_partition.client(cid)
        perm = self.seeds.numpy("split", int(cid)).permutation(len(idx))
        n_test = int(_num_test(len(idx), self.test_fraction))
        return idx[perm[n_test:]], idx[perm[:n_test]]

    def num_examples(self, cid: int) -> int:
        """Client ``cid``'s number of local train examples (no data is gathered)."""
        n = len(self.partition.client(cid))
        return n - int(_num_test(n, self.test_fraction))  # test_fraction is 0 with local_test

    def num_examples_all(self) -> np.ndarray:
        """Local train example counts of all clients, shape ``(num_clients,)``."""
        sizes = self.partition.sizes()
        return sizes - _num_test(sizes, self.test_fraction)

    def num_test_examples_all(self) -> np.ndarray:
        """Local test example counts of all clients, shape ``(num_clients,)`` (no data is
        gathered).

        Example:
            >>> clients = [(np.zeros((5, 1)), np.zeros(5, int))] * 2
            >>> Federation.from_client_data(clients, test_fraction=0.4).num_test_examples_all()
            array([2, 2])
        """
        if self.local_test_partition is not None:
            return self.local_test_partition.sizes()
        return _num_test(self.partition.sizes(), self.test_fraction)

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
        fed = cls(source, part, test_fraction=test_fraction, seed=seed)
        fed.recipe = {
            "dataset": dataset,
            "num_clients": num_clients,
            "partition": partition,
            "partition_options": dict(partition_options or {}),
            "test_fraction": test_fraction,
            "seed": seed,
            "path": path,
            "source_options": dict(source_options or {}),
        }
        return fed

    @classmethod
    def load(cls, ref: str) -> Federation:
        """The federation built by ``package.module:builder`` (a ``Federation``, or a
        function of no arguments returning one), remembered by that name, so a run over it
        can be resumed from the command line (``[data] federation = "..."``).

        Example:
            >>> Federation.load("nope")  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            potluck.core.registry.RegistryError: data.federation: expected ...
        """
        from potluck.core.registry import load_path

        obj = load_path(ref, "data.federation")
        fed = obj if isinstance(obj, Federation) else obj()
        if not isinstance(fed, Federation):
            raise TypeError(f"{ref} gave {type(fed).__name__}, not a potluck Federation")
        fed.recipe = {"federation": ref}
        return fed

    @classmethod
    def from_client_data(
        cls,
        clients: Sequence[Any],
        *,
        test: tuple[Any, Any] | None = None,
        client_tests: Sequence[Any] | None = None,
        num_classes: int | None = None,
        test_fraction: float = 0.0,
        seed: int = 0,
    ) -> Federation:
        """A federation over your own per-client data, one client per item of ``clients``.

        Each item is an ``(x, y)`` pair (tuple or 2-list) of NumPy arrays or torch tensors,
        or a ``torch.utils.data.Dataset`` (anything with ``__len__``/``__getitem__``) that
        yields ``(x, y)`` pairs; ``y`` holds class labels and becomes int64. ``x`` becomes
        float32, or int64 when it holds wider integers (token ids or category codes for an
        embedding layer); uint8 (pixels) and bool (0/1 indicators) become float32. All
        clients and test sets must agree on integer or float ``x``, and NaN or Inf is
        refused. ``test`` is an optional centralised ``(x, y)`` test set;
        ``num_classes`` defaults to the largest label + 1.

        ``client_tests`` gives each client its own held-out test set instead of a random
        ``test_fraction`` split (which leaks when examples overlap, e.g. windows of one
        text): one item per client, in the forms of ``clients``, possibly empty. Client
        ``i`` then trains on all of ``clients[i]`` and tests on exactly ``client_tests[i]``;
        ``test_fraction`` must be 0.

        Example:
            >>> import torch
            >>> fed = Federation.from_client_data([(torch.randn(8, 2), torch.arange(8) % 2)] * 3)
            >>> fed.num_clients, fed.source.num_classes, fed.source.input_shape
            (3, 2, (2,))
            >>> ids = np.array([[1, 2], [2, 3], [3, 4]])
            >>> fed = Federation.from_client_data([(ids[:2], np.array([3, 4]))],
            ...                                   client_tests=[(ids[2:], np.array([5]))])
            >>> fed.client(0).x_train.dtype, fed.client(0).x_test.tolist()
            (dtype('int64'), [[3, 4]])
        """
        if len(clients) == 0:
            raise ValueError("from_client_data: clients is empty; pass at least one (x, y)")
        _check_client_tests(len(clients), client_tests, test_fraction)
        train = _client_sets(clients)
        shape = train[0].x.shape[1:]
        central = [] if test is None else [_test_set(test, "test", shape)]
        local = [
            _test_set(t, f"client {i} test set", shape)
            for i, t in enumerate(() if client_tests is None else client_tests)
        ]
        every = [*train, *central, *local]
        dtype = _common_dtype(every)
        groups = np.repeat(np.arange(len(train), dtype=np.int64), [len(s.y) for s in train])
        source = DataSource(
            "client_data",
            _stack(train, shape, dtype, groups),
            _stack(central, shape, dtype),
            _num_classes(every, num_classes),
            tuple(shape),
        )
        if client_tests is None:
            return cls(source, natural(groups), test_fraction=test_fraction, seed=seed)
        return cls(
            source,
            natural(groups),
            test_fraction=test_fraction,
            seed=seed,
            local_test=_stack(local, shape, dtype),
            local_test_partition=_consecutive(local),
        )


def _check_indices(name: str, part: Partitioning, n: int, what: str) -> None:
    idx = part.support()
    if len(idx) and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(
            f"{name} indices must lie in [0, {n}) ({what}), got [{idx.min()}, {idx.max()}]"
        )


def _check_matches_source(source: DataSource, ds: ArrayDataset, name: str) -> None:
    """``ds`` has ``source``'s feature shape, label space and kind of inputs."""
    if ds.x.shape[1:] != tuple(source.input_shape):
        raise ValueError(
            f"{name}: feature shape {ds.x.shape[1:]} != input_shape {tuple(source.input_shape)}"
        )
    if len(ds) and (ds.y.min() < 0 or ds.y.max() >= source.num_classes):
        raise ValueError(
            f"{name}: labels must lie in [0, {source.num_classes}), got "
            f"[{ds.y.min()}, {ds.y.max()}]"
        )
    if ds.integer_features != source.train.integer_features:
        raise ValueError(
            f"{name}: inputs are {_kind(ds.integer_features)} but {source.name}'s train inputs "
            f"are {_kind(source.train.integer_features)}; use one kind for both"
        )


def _kind(integer: bool) -> str:
    return "integer" if integer else "float"


@dataclass(frozen=True)
class _Set:
    """One materialised ``(x, y)`` set and the name errors give it."""

    where: str
    x: np.ndarray
    y: np.ndarray


def _check_client_tests(
    num_clients: int, client_tests: Sequence[Any] | None, test_fraction: float
) -> None:
    if client_tests is None:
        return
    if len(client_tests) != num_clients:
        raise ValueError(
            f"client_tests has {len(client_tests)} test sets but clients has {num_clients} "
            "clients; pass one (x, y) test set per client, in the same order (an empty one is "
            "allowed)"
        )
    if test_fraction != 0:
        raise ValueError(
            f"client_tests and test_fraction={test_fraction} exclude each other: with "
            "client_tests each client tests on the set given and trains on all of its data; "
            "pass test_fraction=0"
        )


def _client_sets(clients: Sequence[Any]) -> list[_Set]:
    sets: list[_Set] = []
    for i, item in enumerate(clients):
        s = _Set(f"client {i}", *_materialise(item, f"client {i}", "train"))
        if sets and s.x.shape[1:] != sets[0].x.shape[1:]:
            raise ValueError(
                f"client {i}: feature shape {s.x.shape[1:]} differs from client 0's "
                f"{sets[0].x.shape[1:]}"
            )
        sets.append(s)
    return sets


def _test_set(item: Any, where: str, shape: tuple[int, ...]) -> _Set:
    """A test set; an empty one may have any feature shape and dtype (it adopts the clients')."""
    s = _Set(where, *_materialise(item, where, "test", allow_empty=True))
    if len(s.y) and s.x.shape[1:] != shape:
        raise ValueError(
            f"{where}: feature shape {s.x.shape[1:]} differs from the clients' {shape}"
        )
    return s


def _common_dtype(sets: list[_Set]) -> np.dtype[Any]:
    """int64 if the (non-empty) sets hold integer inputs, float32 if floats; refuse a mix."""
    ints = [s.where for s in sets if len(s.y) and s.x.dtype.kind == "i"]
    floats = [s.where for s in sets if len(s.y) and s.x.dtype.kind == "f"]
    if ints and floats:
        raise ValueError(
            f"integer and float inputs are mixed: integer x in {_names(ints)}, float x in "
            f"{_names(floats)}; use one kind for every client and test set (token ids or "
            "category codes: x.astype(np.int64); features: x.astype(np.float32))"
        )
    return np.dtype(np.int64) if ints else np.dtype(np.float32)


def _names(wheres: list[str], limit: int = 3) -> str:
    more = len(wheres) - limit
    return ", ".join(wheres[:limit]) + (f" and {more} more" if more > 0 else "")


def _num_classes(sets: list[_Set], num_classes: int | None) -> int:
    max_label = max(int(s.y.max()) for s in sets if len(s.y))
    if num_classes is None:
        return max_label + 1
    if max_label >= num_classes:
        raise ValueError(f"num_classes={num_classes} but the data has label {max_label}")
    return num_classes


def _stack(
    sets: list[_Set], shape: tuple[int, ...], dtype: np.dtype[Any], groups: np.ndarray | None = None
) -> ArrayDataset:
    """The sets' rows, concatenated in order (empty sets take ``shape`` and ``dtype``)."""
    xs = [s.x if len(s.y) else np.zeros((0, *shape), dtype) for s in sets]
    x = np.concatenate(xs) if xs else np.zeros((0, *shape), dtype)
    y = np.concatenate([s.y for s in sets]) if sets else np.zeros(0, np.int64)
    return ArrayDataset(x, y, groups)


def _consecutive(sets: list[_Set]) -> Partition:
    """Client ``i`` owns the rows of ``sets[i]`` in :func:`_stack`'s concatenation."""
    sizes = np.array([len(s.y) for s in sets], np.int64)
    offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(sizes)])
    return Partition(np.arange(int(sizes.sum()), dtype=np.int64), offsets)


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


def _materialise(
    item: Any, where: str, split: str, allow_empty: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y int64)`` from a pair or a dataset of pairs, validated; ``x`` is float32, or
    int64 for integer inputs, and finite."""
    x, y = _arrays(item, where, allow_empty)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{where}: y must be 1-D integer class labels, got {y.dtype} {y.shape}")
    if x.ndim < 1 or len(x) != len(y):
        raise ValueError(f"{where}: x has {len(x) if x.ndim else 0} rows but y has {len(y)}")
    if len(y) == 0 and not allow_empty:
        raise ValueError(f"{where}: no examples")
    if len(y) and y.min() < 0:
        raise ValueError(f"{where}: labels must be >= 0, got {y.min()}")
    x = _cast_inputs(x, where)
    _check_finite(x, where, split)
    return x, y.astype(np.int64)


def _arrays(item: Any, where: str, allow_empty: bool) -> tuple[np.ndarray, np.ndarray]:
    if _is_pair(item):
        if len(item) != 2:
            raise ValueError(f"{where}: expected an (x, y) pair, got a tuple of {len(item)}")
        return _to_numpy(item[0]), _to_numpy(item[1])
    if hasattr(item, "__len__") and hasattr(item, "__getitem__"):
        return _stack_dataset(item, where, allow_empty)
    raise ValueError(f"{where}: expected an (x, y) pair or a Dataset, got {type(item).__name__}")


def _cast_inputs(x: np.ndarray, where: str) -> np.ndarray:
    """Integers (any width, signed or not) to int64; bool, uint8 (pixel values, as image
    sets ship them) and floats to float32."""
    if x.dtype in (np.bool_, np.uint8):
        return np.ascontiguousarray(x, dtype=np.float32)
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"{where}: x must be real numbers, got {x.dtype}")
    if not np.issubdtype(x.dtype, np.integer):
        with np.errstate(over="ignore"):  # values beyond float32 become Inf: _check_finite
            return np.ascontiguousarray(x, dtype=np.float32)
    if x.dtype == np.uint64 and x.size and x.max() > _INT64_MAX:
        raise ValueError(f"{where}: x holds {x.max()}, beyond int64's range")
    return np.ascontiguousarray(x, dtype=np.int64)


def _check_finite(x: np.ndarray, where: str, split: str) -> None:
    if x.dtype.kind != "f" or np.isfinite(x).all():
        return
    bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
    raise ValueError(
        f"{where}: x has NaN or Inf in {len(bad)} of {len(x)} {split} examples (first at row "
        f"{bad[0]}; values beyond float32's range, about 3.4e38, count as Inf); clean or "
        "impute the data (drop or fill those rows) before building the federation"
    )


def _stack_dataset(ds: Any, where: str, allow_empty: bool) -> tuple[np.ndarray, np.ndarray]:
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
        if allow_empty:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        raise ValueError(f"{where}: no examples")
    if len({x.shape for x in xs}) > 1:
        raise ValueError(f"{where}: items have different feature shapes")
    return np.stack(xs), np.concatenate(ys)
