"""Partitioners: split a dataset's sample indices among clients.

A :class:`Partition` is one concatenated index array plus offsets, so a federation of
100,000 clients costs two integer arrays. Every partitioner here but ``"sampled"`` assigns
every sample to exactly one client; ``"sampled"`` (:mod:`potluck.data.sampled`) draws
federations larger than the dataset. All draw their randomness from the generator given.

Example:
    >>> rng = np.random.default_rng(0)
    >>> part = iid(10, 3, rng)
    >>> part.sizes().tolist()
    [4, 3, 3]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from potluck.data.options import check_client_id, check_options
from potluck.data.sampled import sampled

__all__ = [
    "PARTITION_KINDS",
    "Partition",
    "Partitioning",
    "dirichlet",
    "iid",
    "label_quantity",
    "make_partition",
    "natural",
    "quantity_skew",
    "shards",
]


class Partitioning(Protocol):
    """What a federation needs of a partition: :class:`Partition` (every example owned by
    one client) or :class:`~potluck.data.sampled.SampledPartition` (drawn per client)."""

    @property
    def num_clients(self) -> int: ...

    def client(self, cid: int) -> np.ndarray: ...

    def sizes(self) -> np.ndarray: ...

    def support(self) -> np.ndarray: ...


@dataclass(frozen=True)
class Partition:
    """Client ``c`` owns ``indices[offsets[c]:offsets[c + 1]]``.

    Both arrays are stored as read-only int64 views, so client index arrays handed out by
    :meth:`client` cannot be shuffled in place by accident.

    Example:
        >>> part = Partition.from_lists([np.array([2, 0]), np.array([1])])
        >>> part.num_clients, part.client(0).tolist(), part.sizes().tolist()
        (2, [2, 0], [2, 1])
    """

    indices: np.ndarray
    offsets: np.ndarray

    def __post_init__(self) -> None:
        indices = _readonly_int64("indices", self.indices)
        offsets = _readonly_int64("offsets", self.offsets)
        if len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(indices):
            raise ValueError(
                f"offsets must start at 0 and end at len(indices)={len(indices)}, got "
                f"{offsets[:1].tolist()}...{offsets[-1:].tolist()}"
            )
        if np.any(np.diff(offsets) < 0):
            raise ValueError("offsets must be non-decreasing")
        object.__setattr__(self, "indices", indices)
        object.__setattr__(self, "offsets", offsets)

    @property
    def num_clients(self) -> int:
        return len(self.offsets) - 1

    def client(self, cid: int) -> np.ndarray:
        """Sample indices of client ``cid`` (a read-only view)."""
        check_client_id(cid, self.num_clients)
        return self.indices[self.offsets[cid] : self.offsets[cid + 1]]

    def sizes(self) -> np.ndarray:
        """Number of samples per client, shape ``(num_clients,)``."""
        return np.diff(self.offsets)

    def support(self) -> np.ndarray:
        """Every index some client holds (client-major)."""
        return self.indices

    @classmethod
    def from_lists(cls, parts: Sequence[np.ndarray]) -> Partition:
        """A partition from one index array per client."""
        lengths = np.array([len(p) for p in parts], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = [np.asarray(p, dtype=np.int64).reshape(-1) for p in parts]
        indices = np.concatenate(flat) if flat else np.zeros(0, np.int64)
        return cls(indices, offsets)


def _readonly_int64(name: str, a: Any) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"Partition.{name} must be a 1-D integer array, got {arr.dtype} {arr.shape}"
        )
    view = arr.astype(np.int64, copy=False).view()
    view.flags.writeable = False
    return view


def _from_assignment(owner: np.ndarray, order: np.ndarray, num_clients: int) -> Partition:
    """Partition where sample ``order[i]`` belongs to client ``owner[i]`` (kept in order)."""
    perm = np.argsort(owner, kind="stable")
    counts = np.bincount(owner, minlength=num_clients)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return Partition(order[perm].astype(np.int64), offsets)


def _from_sizes(order: np.ndarray, sizes: np.ndarray) -> Partition:
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return Partition(order.astype(np.int64, copy=False), offsets)


def _check_count(name: str, value: int, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    return labels


def _even_sizes(total: int, parts: int) -> np.ndarray:
    """``parts`` sizes summing to ``total`` that differ by at most one (larger first)."""
    return total // parts + (np.arange(parts) < total % parts).astype(np.int64)


def iid(num_samples: int, num_clients: int, rng: np.random.Generator) -> Partition:
    """Uniformly random, equal-size (within one) split: the IID baseline.

    Example:
        >>> iid(7, 2, np.random.default_rng(0)).sizes().tolist()
        [4, 3]
    """
    _check_count("num_samples", num_samples, 1)
    _check_count("num_clients", num_clients, 1, num_samples)
    return _from_sizes(rng.permutation(num_samples), _even_sizes(num_samples, num_clients))


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 10,
    max_retries: int = 100,
) -> Partition:
    """Label skew: each class is spread over clients with proportions ``~ Dir(alpha)``.

    The scheme of Hsu et al. 2019 ("Measuring the Effects of Non-Identical Data Distribution
    for Federated Visual Classification") as implemented in NIID-Bench (Li et al. 2022,
    "Federated Learning on Non-IID Data Silos: An Experimental Study"): a client that already
    holds ``num_samples / num_clients`` samples receives no more, and the draw is repeated
    until every client has ``min_size`` samples. ``min_size`` is lowered to
    ``num_samples // num_clients`` when larger, so it is always satisfiable in principle;
    after ``max_retries`` failed draws a ``ValueError`` suggests what to change.
    Smaller ``alpha`` means fewer labels per client.

    Example:
        >>> labels = np.repeat(np.arange(10), 100)
        >>> part = dirichlet(labels, 5, 0.5, np.random.default_rng(0))
        >>> int(part.sizes().sum()), bool(part.sizes().min() >= 10)
        (1000, True)
    """
    labels = _check_labels(labels)
    n = len(labels)
    _check_count("num_samples (len(labels))", n, 1)
    _check_count("num_clients", num_clients, 1, n)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    _check_count("min_size", min_size, 0)
    _check_count("max_retries", max_retries, 1)
    need = min(min_size, n // num_clients)
    order = np.argsort(labels, kind="stable")
    class_sizes = np.unique(labels[order], return_counts=True)[1]
    for _ in range(max_retries):
        owner = _dirichlet_owner(class_sizes, num_clients, alpha, rng, n / num_clients)
        counts = np.bincount(owner, minlength=num_clients)
        if counts.min() >= need:
            shuffled = _shuffle_within_classes(order, class_sizes, rng)
            return _from_assignment(owner, shuffled, num_clients)
    raise ValueError(
        f"dirichlet: no draw in max_retries={max_retries} gave every one of {num_clients} "
        f"clients at least min_size={need} of {n} samples (alpha={alpha}); raise alpha, lower "
        "min_size or num_clients, or raise max_retries"
    )


def _dirichlet_owner(
    class_sizes: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator, cap: float
) -> np.ndarray:
    """Client of each sample, samples ordered by class (one Dirichlet draw per class)."""
    counts = np.zeros(num_clients, np.int64)
    owners = []
    for size in class_sizes:
        props = rng.dirichlet(np.full(num_clients, alpha))
        open_ = counts < cap
        props = props * open_
        total = props.sum()
        # Dir(alpha) with tiny alpha can put all mass on full clients (or underflow to 0).
        props = props / total if total > 0 else open_ / open_.sum()
        cuts = (np.cumsum(props) * size).astype(np.int64)[:-1]
        per_client = np.diff(np.concatenate([[0], cuts, [size]]))
        owners.append(np.repeat(np.arange(num_clients), per_client))
        counts += per_client
    return np.concatenate(owners)


def _shuffle_within_classes(
    order: np.ndarray, class_sizes: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Permute the samples of each class block of ``order`` independently (vectorised)."""
    block = np.repeat(np.arange(len(class_sizes)), class_sizes)
    keys = np.lexsort((rng.random(len(order)), block))
    return order[keys]


def shards(
    labels: np.ndarray, num_clients: int, shards_per_client: int, rng: np.random.Generator
) -> Partition:
    """Pathological non-IID split of McMahan et al. 2017 ("Communication-Efficient Learning
    of Deep Networks from Decentralized Data", AISTATS).

    Samples are sorted by label (stably), cut into ``num_clients * shards_per_client``
    contiguous shards, and each client receives ``shards_per_client`` random shards. When the
    division is not exact, the first ``num_samples % num_shards`` shards hold one extra sample,
    so every sample is still assigned. A client may draw two shards of the same label.

    Example:
        >>> labels = np.repeat(np.arange(10), 6000)
        >>> part = shards(labels, 100, 2, np.random.default_rng(0))
        >>> set(part.sizes().tolist())
        {600}
    """
    labels = _check_labels(labels)
    n = len(labels)
    _check_count("num_clients", num_clients, 1)
    _check_count("shards_per_client", shards_per_client, 1)
    num_shards = num_clients * shards_per_client
    if num_shards > n:
        raise ValueError(
            f"num_clients * shards_per_client = {num_shards} shards exceed the {n} samples; "
            "lower num_clients or shards_per_client"
        )
    order = np.argsort(labels, kind="stable")
    shard_sizes = _even_sizes(n, num_shards)
    shard_starts = np.concatenate([[0], np.cumsum(shard_sizes)[:-1]])
    picked = rng.permutation(num_shards)  # client c gets picked[c*s:(c+1)*s]
    lengths = shard_sizes[picked]
    out_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    positions = np.arange(n) + np.repeat(shard_starts[picked] - out_starts, lengths)
    client_sizes = lengths.reshape(num_clients, shards_per_client).sum(axis=1)
    return _from_sizes(order[positions], client_sizes)


def label_quantity(
    labels: np.ndarray, num_clients: int, labels_per_client: int, rng: np.random.Generator
) -> Partition:
    """Quantity-based label imbalance ("#C=k") of NIID-Bench (Li, Diao, Chen, He 2022,
    "Federated Learning on Non-IID Data Silos: An Experimental Study", ICDE).

    Client ``c`` holds the ``c % L``-th of the ``L`` distinct labels plus ``k - 1`` other
    labels drawn uniformly without replacement (``k = labels_per_client``); the samples of
    each label are shuffled and split evenly among the clients holding it. Unlike
    :func:`shards`, every client holds exactly ``k`` labels. ``num_clients >= L`` is required,
    so that every label has a holder and every sample is assigned.

    Example:
        >>> labels = np.repeat(np.arange(10), 100)
        >>> part = label_quantity(labels, 10, 2, np.random.default_rng(0))
        >>> [len(np.unique(labels[part.client(c)])) for c in range(10)]
        [2, 2, 2, 2, 2, 2, 2, 2, 2, 2]
    """
    labels = _check_labels(labels)
    order = np.argsort(labels, kind="stable")
    classes, class_sizes = np.unique(labels[order], return_counts=True)
    _check_count("labels_per_client", labels_per_client, 1, len(classes))
    _check_count("num_clients", num_clients, 1)
    if num_clients < len(classes):
        raise ValueError(
            f"label_quantity needs num_clients >= the {len(classes)} distinct labels so that "
            f"every label has a holder, got num_clients={num_clients}"
        )
    held = _held_labels(num_clients, len(classes), labels_per_client, rng)
    owner = np.concatenate(
        [
            np.repeat(holders, _even_sizes(size, len(holders)))
            for holders, size in zip(map(np.flatnonzero, held.T), class_sizes, strict=True)
        ]
    )
    part = _from_assignment(owner, _shuffle_within_classes(order, class_sizes, rng), num_clients)
    empty = np.flatnonzero(part.sizes() == 0)
    if len(empty):
        raise ValueError(
            f"label_quantity: client {int(empty[0])} got no samples: its labels have fewer "
            f"samples than holders; lower num_clients or raise labels_per_client"
        )
    return part


def _held_labels(
    num_clients: int, num_labels: int, per_client: int, rng: np.random.Generator
) -> np.ndarray:
    """``(num_clients, num_labels)`` mask: label ``c % L`` plus ``per_client - 1`` random others."""
    own = np.arange(num_clients) % num_labels
    keys = rng.random((num_clients, num_labels))
    keys[np.arange(num_clients), own] = -1.0  # always among the per_client smallest
    chosen = np.argpartition(keys, per_client - 1, axis=1)[:, :per_client]
    held = np.zeros((num_clients, num_labels), dtype=bool)
    held[np.arange(num_clients)[:, None], chosen] = True
    return held


def quantity_skew(
    num_samples: int,
    num_clients: int,
    rng: np.random.Generator,
    distribution: str = "lognormal",
    sigma: float = 1.0,
    exponent: float = 1.5,
    min_size: int = 1,
) -> Partition:
    """Quantity skew: unequal client sizes with IID contents.

    Relative sizes are drawn from ``lognormal(0, sigma)`` or, with
    ``distribution="powerlaw"``, from a Pareto law with tail ``exponent`` (``1 + Pareto``);
    each client gets ``min_size`` samples plus a share of the rest proportional to its draw
    (largest-remainder rounding, so sizes sum to ``num_samples`` exactly).

    Example:
        >>> part = quantity_skew(1000, 10, np.random.default_rng(0))
        >>> int(part.sizes().sum()), bool(part.sizes().min() >= 1)
        (1000, True)
    """
    _check_count("num_samples", num_samples, 1)
    _check_count("num_clients", num_clients, 1, num_samples)
    _check_count("min_size", min_size, 0)
    if num_clients * min_size > num_samples:
        raise ValueError(
            f"min_size={min_size} for {num_clients} clients needs {num_clients * min_size} "
            f"samples, only {num_samples}; lower min_size or num_clients"
        )
    if distribution == "lognormal":
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        weights = rng.lognormal(0.0, sigma, num_clients)
    elif distribution == "powerlaw":
        if not exponent > 0:
            raise ValueError(f"exponent must be > 0, got {exponent}")
        weights = 1.0 + rng.pareto(exponent, num_clients)
    else:
        raise ValueError(f"distribution must be 'lognormal' or 'powerlaw', got {distribution!r}")
    spare = num_samples - num_clients * min_size
    share = weights / weights.sum() * spare
    sizes = np.floor(share).astype(np.int64)
    leftover = spare - int(sizes.sum())
    sizes[np.argsort(sizes - share, kind="stable")[:leftover]] += 1
    return _from_sizes(rng.permutation(num_samples), sizes + min_size)


def natural(groups: np.ndarray) -> Partition:
    """One client per distinct value of ``groups`` (writer, user, ...), in sorted order.

    Example:
        >>> natural(np.array([7, 3, 7, 3, 3])).sizes().tolist()
        [3, 2]
    """
    groups = np.asarray(groups)
    if groups.ndim != 1 or not np.issubdtype(groups.dtype, np.integer) or len(groups) == 0:
        raise ValueError(
            f"groups must be a non-empty 1-D integer array, got {groups.dtype} {groups.shape}"
        )
    order = np.argsort(groups, kind="stable")
    counts = np.unique(groups[order], return_counts=True)[1]
    return _from_sizes(order, counts)


PARTITION_KINDS: dict[str, tuple[str, ...]] = {
    "iid": (),
    "dirichlet": ("alpha", "min_size", "max_retries"),
    "shards": ("shards_per_client",),
    "labels": ("labels_per_client",),
    "quantity": ("distribution", "sigma", "exponent", "min_size"),
    "natural": (),
    "sampled": ("examples_per_client", "sigma", "alpha"),
}
_REQUIRED = {
    "dirichlet": ("alpha",),
    "shards": ("shards_per_client",),
    "labels": ("labels_per_client",),
}


def make_partition(
    kind: str,
    *,
    labels: np.ndarray,
    groups: np.ndarray | None,
    num_clients: int | None,
    rng: np.random.Generator,
    **options: Any,
) -> Partitioning:
    """Build a partition by name (see ``PARTITION_KINDS`` for each kind's options).

    For ``"natural"`` the clients are the distinct ``groups``; ``num_clients`` must then be
    0/None (all groups) or equal the number of groups.

    Example:
        >>> labels = np.repeat(np.arange(10), 100)
        >>> rng = np.random.default_rng(0)
        >>> make_partition("dirichlet", labels=labels, groups=None, num_clients=4, rng=rng,
        ...                alpha=0.3).num_clients
        4
    """
    if kind not in PARTITION_KINDS:
        raise ValueError(f"unknown partition {kind!r}; allowed: {', '.join(PARTITION_KINDS)}")
    check_options(options, PARTITION_KINDS[kind], f"partition {kind!r}")
    missing = [o for o in _REQUIRED.get(kind, ()) if o not in options]
    if missing:
        raise ValueError(f"partition {kind!r} requires option(s) {missing}")
    if kind == "natural":
        return _natural_checked(groups, num_clients)
    if num_clients is None:
        raise ValueError(f"num_clients is required for partition {kind!r}")
    n = len(labels)
    if kind == "sampled":
        return sampled(_check_labels(labels), num_clients, rng, **options)
    if isinstance(num_clients, (int, np.integer)) and num_clients > n:
        raise ValueError(
            f"num_clients={num_clients} exceeds the dataset's {n} examples: partition {kind!r} "
            "gives each example to one client; for a federation larger than the dataset use "
            "partition 'sampled' (clients drawing their examples from the whole set)"
        )
    if kind == "iid":
        return iid(n, num_clients, rng)
    if kind == "dirichlet":
        return dirichlet(labels, num_clients, rng=rng, **options)
    if kind == "shards":
        return shards(labels, num_clients, rng=rng, **options)
    if kind == "labels":
        return label_quantity(labels, num_clients, rng=rng, **options)
    return quantity_skew(n, num_clients, rng, **options)


def _natural_checked(groups: np.ndarray | None, num_clients: int | None) -> Partition:
    if groups is None:
        raise ValueError("partition 'natural' needs per-example groups; this dataset has none")
    part = natural(groups)
    if num_clients and num_clients != part.num_clients:
        raise ValueError(
            f"partition 'natural': num_clients={num_clients} but the data has "
            f"{part.num_clients} groups; set num_clients to {part.num_clients} (or 0 for all)"
        )
    return part
