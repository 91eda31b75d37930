"""Cross-device federations larger than their dataset.

Every partitioner in :mod:`potluck.data.partition` gives each example to exactly one
client, so Fashion-MNIST's 60,000 training images make at most 60,000 clients. Real
cross-device populations are 10^5 to 10^7 phones with a few dozen examples each. A
:class:`SampledPartition` draws each client's examples from the whole training set with
replacement *across* clients (two clients may hold the same image) and without
replacement *within* one (a client never holds an example twice, so its local test split
never repeats a training example). Label skew follows Hsu et al. 2019, "Measuring the
Effects of Non-Identical Data Distribution for Federated Visual Classification": each
client's label proportions are a draw from ``Dir(alpha * 1)``.

Nothing per client is stored but its size: client ``c``'s examples are drawn again, the
same every time, from a generator keyed by ``(key, c)``, so a million clients cost eight
bytes each plus the dataset's class-sorted order.

Example:
    >>> labels = np.repeat(np.arange(4), 50)
    >>> part = sampled(labels, 1_000_000, np.random.default_rng(0), examples_per_client=8)
    >>> part.num_clients, part.client(999_999).shape, bool((part.client(7) == part.client(7)).all())
    (1000000, (8,), True)
"""

from __future__ import annotations

import numpy as np

from potluck.data.options import check_client_id

__all__ = ["SampledPartition", "sampled"]


class SampledPartition:
    """Client ``c`` holds ``sizes[c]`` distinct examples drawn from the dataset, again on
    every call, from a generator keyed by ``(key, c)``; ``alpha`` (or ``None`` for draws
    uniform over the dataset) is the Dirichlet concentration of each client's labels.

    Example:
        >>> part = SampledPartition(np.array([0, 0, 1, 1]), np.array([2, 1, 2]), alpha=None,
        ...                         key=3)
        >>> part.sizes().tolist(), sorted(set(part.client(0).tolist())) == sorted(part.client(0))
        ([2, 1, 2], True)
    """

    def __init__(
        self, labels: np.ndarray, sizes: np.ndarray, *, alpha: float | None, key: int
    ) -> None:
        labels = np.asarray(labels)
        sizes = np.asarray(sizes)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or not len(labels):
            raise ValueError(f"labels must be a non-empty 1-D integer array, got {labels.shape}")
        if sizes.ndim != 1 or not len(sizes) or not np.issubdtype(sizes.dtype, np.integer):
            raise ValueError(f"sizes must be a non-empty 1-D integer array, got {sizes.shape}")
        if alpha is not None and not alpha > 0:
            raise ValueError(f"alpha must be > 0 (or None for no label skew), got {alpha}")
        self.order = np.argsort(labels, kind="stable").astype(np.int64)
        self.class_sizes = np.bincount(labels[self.order] - labels.min())
        self.class_sizes = self.class_sizes[self.class_sizes > 0]
        self.starts = np.concatenate([[0], np.cumsum(self.class_sizes)[:-1]]).astype(np.int64)
        self.alpha = alpha
        self.key = int(key)
        self._sizes = sizes.astype(np.int64)
        self._sizes.flags.writeable = False
        self.order.flags.writeable = False
        _check_sizes(self._sizes, self.class_sizes)

    def __repr__(self) -> str:
        return (
            f"SampledPartition(num_clients={self.num_clients}, num_samples={len(self.order)}, "
            f"alpha={self.alpha})"
        )

    @property
    def num_clients(self) -> int:
        return len(self._sizes)

    def sizes(self) -> np.ndarray:
        """Number of samples per client, shape ``(num_clients,)``."""
        return self._sizes

    def support(self) -> np.ndarray:
        """Every index a client may hold: the whole dataset."""
        return self.order

    def client(self, cid: int) -> np.ndarray:
        """Sample indices of client ``cid`` (drawn again, identically, on every call)."""
        check_client_id(cid, self.num_clients)
        rng = np.random.default_rng([self.key, int(cid)])
        size = int(self._sizes[cid])
        if self.alpha is None:
            picked = self.order[rng.choice(len(self.order), size, replace=False)]
        else:
            picked = self._skewed(rng, size)
        picked.flags.writeable = False
        return picked

    def _skewed(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """``size`` distinct indices whose labels follow one ``Dir(alpha)`` draw."""
        k = len(self.class_sizes)
        counts = rng.multinomial(size, rng.dirichlet(np.full(k, self.alpha)))
        _spill(counts, self.class_sizes)
        parts = [
            self.order[self.starts[j] + rng.choice(int(self.class_sizes[j]), int(n), False)]
            for j, n in enumerate(counts)
            if n
        ]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _spill(counts: np.ndarray, room: np.ndarray) -> None:
    """Move any count beyond its class's size to the classes with the most room left."""
    extra = int(np.maximum(counts - room, 0).sum())
    if not extra:
        return
    np.minimum(counts, room, out=counts)
    for j in np.argsort(counts - room):
        take = min(extra, int(room[j] - counts[j]))
        counts[j] += take
        extra -= take
        if not extra:
            return


def _check_sizes(sizes: np.ndarray, class_sizes: np.ndarray) -> None:
    if sizes.min() < 1:
        raise ValueError(f"every client needs at least one example, got a size {sizes.min()}")
    total = int(class_sizes.sum())
    if sizes.max() > total:
        raise ValueError(
            f"a client of {sizes.max()} examples cannot hold them once each: the dataset has "
            f"{total}; lower examples_per_client or sigma"
        )


def sampled(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    examples_per_client: int = 32,
    sigma: float = 0.0,
    alpha: float | None = None,
) -> SampledPartition:
    """``num_clients`` clients (any number) of ``examples_per_client`` examples each drawn
    from the dataset, or sizes lognormal with that mean and spread ``sigma`` (clipped to
    the dataset's size); labels skewed by ``Dir(alpha)`` per client when ``alpha`` is given.

    Example:
        >>> labels = np.repeat(np.arange(10), 100)
        >>> part = sampled(labels, 200_000, np.random.default_rng(1), examples_per_client=20,
        ...                sigma=0.5, alpha=0.1)
        >>> part.num_clients, bool(15 < part.sizes().mean() < 25)
        (200000, True)
        >>> len(np.unique(labels[part.client(3)])) <= 3  # a skewed client: few labels
        True
    """
    for name, value in (("num_clients", num_clients), ("examples_per_client", examples_per_client)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not sigma >= 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if sigma == 0:
        sizes = np.full(num_clients, examples_per_client, np.int64)
    else:  # lognormal with mean examples_per_client
        z = rng.lognormal(-(sigma**2) / 2, sigma, num_clients)
        sizes = np.clip(np.rint(examples_per_client * z), 1, len(labels)).astype(np.int64)
    key = int(rng.integers(2**63))
    return SampledPartition(labels, sizes, alpha=alpha, key=key)
