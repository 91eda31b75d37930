"""Data drift across rounds, seen through summaries a client can afford to share.

Each client summarises its current training data as two histograms (``summarize``): its
labels over the federation's classes and its input values over bins the server places at
quantiles of its own test set (``feature_edges``). Gaussian noise of std ``noise`` may be
added to every count before the histograms are normalised (``noise = "secure"`` draws it
from ``os.urandom``, which a deployment needs); the noise is not accounted by the privacy
ledger, so a run with a privacy budget refuses summaries (``check_private``). The server
compares each client's summary with the first one it received from that client by total
variation distance (``total_variation``): 0 when nothing changed, 1 when the two share no
mass. Webb et al. 2016 ("Characterizing concept drift", Data Min. Knowl. Disc.) name the
two shifts: a change of the label prior P(y) and of the covariates P(x).

``DriftScenario`` injects drift to test this: from ``start_round`` on, a seeded
``fraction`` of the clients train on shifted data (``features``: every input value moved by
``shift``; ``labels``: the client's examples resampled, to the same count, from the lower
half of the classes it holds).

Example:
    >>> import torch
    >>> x, y = torch.zeros(4, 2), torch.tensor([0, 0, 1, 1])
    >>> labels, feats = summarize(x, y, 3, torch.tensor([0.5]))
    >>> labels.tolist(), feats.tolist()
    ([0.5, 0.5, 0.0], [1.0, 0.0])
    >>> total_variation(labels, torch.tensor([0.0, 0.5, 0.5]))
    0.5
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from potluck.core.message import Message, MessageError
from potluck.core.parts import Context
from potluck.core.seeding import Seeds
from potluck.privacy.central import gaussian_noise

SUMMARIZE = "summarize"  # the clients' stage that answers with their summaries
EDGE_SAMPLE = 200_000  # test-set values the feature bins' quantiles are taken from


@dataclass(frozen=True)
class SummaryOptions:
    """How a client summarises its data: ``noise`` (std of the Gaussian noise on each
    count; 0 = none) drawn from ``"seed"`` (simulation) or ``"secure"``."""

    noise: float = 0.0
    source: Literal["seed", "secure"] = "seed"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise) and self.noise >= 0):
            raise ValueError(f"monitoring.summary_noise must be >= 0, got {self.noise}")
        if self.source not in ("seed", "secure"):
            raise ValueError(f"monitoring.noise must be 'seed' or 'secure', got {self.source!r}")


def summarize(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    edges: torch.Tensor,
    options: SummaryOptions | None = None,
    ctx: Context | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The label histogram (``num_classes`` bins) and the input-value histogram (one bin
    more than ``edges``) of a client's data, each normalised to sum 1 (float64), after
    ``options.noise`` on the counts (negative counts clipped to 0).

    Example:
        >>> labels, feats = summarize(torch.tensor([[0.0, 2.0]]), torch.tensor([1]), 2,
        ...                           torch.tensor([1.0]))
        >>> labels.tolist(), feats.tolist()
        ([0.0, 1.0], [0.5, 0.5])
    """
    labels = torch.bincount(y.long().reshape(-1), minlength=num_classes)[:num_classes]
    values = x.reshape(-1).double()
    feats = torch.bincount(
        torch.bucketize(values, edges.double(), right=True), minlength=len(edges) + 1
    )
    out = []
    for name, counts in (("labels", labels), ("features", feats)):
        c = counts.double()
        if options is not None and options.noise > 0:
            if ctx is None:
                raise ValueError("noised summaries need the client's context")
            c = c + gaussian_noise(len(c), options.noise, options.source, ctx, name)
        out.append(normalised(c.clamp(min=0)))
    return out[0], out[1]


def normalised(counts: torch.Tensor) -> torch.Tensor:
    """``counts`` over their sum (uniform when they sum to 0).

    Example:
        >>> normalised(torch.tensor([0.0, 0.0])).tolist()
        [0.5, 0.5]
    """
    total = float(counts.sum())
    if total <= 0:
        return torch.full_like(counts, 1.0 / len(counts))
    return counts / total


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    """Half the L1 distance of two distributions over the same bins (in [0, 1]).

    Example:
        >>> total_variation(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
        1.0
    """
    return float(0.5 * torch.sum(torch.abs(p.double() - q.double())))


def feature_edges(x: np.ndarray, bins: int, seed: int) -> torch.Tensor:
    """``bins - 1`` distinct, ascending bin edges at the quantiles of the values of ``x``
    (a seeded sample of ``EDGE_SAMPLE`` of them), so each bin holds about as many of the
    server's test values.

    Example:
        >>> feature_edges(np.arange(100.0).reshape(10, 10), 4, seed=0).tolist()
        [24.75, 49.5, 74.25]
    """
    if bins < 2:
        raise ValueError(f"monitoring.summary_bins must be >= 2, got {bins}")
    values = np.asarray(x, dtype=np.float64).reshape(-1)
    if len(values) == 0:
        raise ValueError("drift summaries need a central test set to place the feature bins")
    if len(values) > EDGE_SAMPLE:
        pick = Seeds(seed).numpy("feature_edges").choice(len(values), EDGE_SAMPLE, replace=False)
        values = values[pick]
    qs = np.quantile(values, np.arange(1, bins) / bins)
    return torch.from_numpy(np.unique(qs))


def summary_request(num_classes: int, edges: torch.Tensor) -> Message:
    """The ``summarize`` stage's broadcast: the bins every client uses."""
    return Message({"edges": edges.double()}, {"classes": num_classes})


def read_request(shared: Message) -> tuple[int, torch.Tensor]:
    """The bins of a ``summarize`` broadcast, checked (a server's message is checked too).

    Example:
        >>> read_request(summary_request(3, torch.tensor([0.0, 1.0])))[0]
        3
    """
    classes, edges = shared.scalars.get("classes"), shared.arrays.get("edges")
    if not isinstance(classes, int) or isinstance(classes, bool) or not 1 <= classes <= 1_000_000:
        raise MessageError(f"summarize: 'classes' must be an integer in [1, 10^6], got {classes!r}")
    if not isinstance(edges, torch.Tensor) or edges.dim() != 1 or not 1 <= len(edges) <= 4096:
        raise MessageError("summarize: 'edges' must be a vector of 1 to 4096 bin edges")
    if not bool(torch.isfinite(edges).all()) or bool((edges[1:] <= edges[:-1]).any()):
        raise MessageError("summarize: 'edges' must be finite and strictly ascending")
    return classes, edges


def summary_message(labels: torch.Tensor, features: torch.Tensor) -> Message:
    return Message({"labels": labels, "features": features})


def read_summary(
    message: Message, classes: int, bins: int, source: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """A client's summary, checked against the bins it was asked for: two finite,
    non-negative histograms summing to 1 (``MessageError`` naming ``source`` otherwise).

    Example:
        >>> msg = summary_message(torch.tensor([0.5, 0.5]), torch.tensor([1.0]))
        >>> [h.tolist() for h in read_summary(msg, 2, 1, "client 3")]
        [[0.5, 0.5], [1.0]]
    """
    if set(message.arrays) != {"labels", "features"} or message.scalars:
        raise MessageError(f"{source}: a summary holds 'labels' and 'features' only")
    out = []
    for name, size in (("labels", classes), ("features", bins)):
        h = message.arrays[name]
        if h.shape != (size,) or not h.dtype.is_floating_point:
            raise MessageError(
                f"{source}: summary {name!r} must be {size} floats, got {tuple(h.shape)}"
            )
        h = h.double()
        if not bool(torch.isfinite(h).all()) or bool((h < 0).any()):
            raise MessageError(f"{source}: summary {name!r} holds negative or non-finite values")
        if abs(float(h.sum()) - 1.0) > 1e-6:
            raise MessageError(f"{source}: summary {name!r} sums to {float(h.sum()):g}, not 1")
        out.append(h)
    return out[0], out[1]


@dataclass(frozen=True)
class DriftScenario:
    """From ``start_round`` on, a seeded ``fraction`` of the clients see shifted data:
    ``kind = "features"`` adds ``shift`` to every input value (covariate shift),
    ``"labels"`` resamples each of them, to the same count, from the lower half of the
    classes it holds (prior shift; a client holding one class keeps its data).

    Example:
        >>> s = DriftScenario(start_round=3, fraction=0.5)
        >>> sorted(s.drifted(4, seed=0)), s.active(2), s.active(3)
        ([1, 2], False, True)
    """

    start_round: int
    fraction: float
    kind: Literal["features", "labels"] = "features"
    shift: float = 1.0

    def __post_init__(self) -> None:
        if self.start_round < 1:
            raise ValueError(f"data.drift.start_round must be >= 1, got {self.start_round}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"data.drift.fraction must be in (0, 1], got {self.fraction}")
        if self.kind not in ("features", "labels"):
            raise ValueError(f"data.drift.kind must be 'features' or 'labels', got {self.kind!r}")
        if not math.isfinite(self.shift):
            raise ValueError(f"data.drift.shift must be finite, got {self.shift}")

    def active(self, round: int) -> bool:
        return round >= self.start_round

    def drifted(self, num_clients: int, seed: int) -> frozenset[int]:
        """The clients that drift (``ceil(fraction * num_clients)``, drawn from the seed)."""
        k = math.ceil(self.fraction * num_clients - 1e-9)
        rng = Seeds(seed).numpy("drift", "clients")
        return frozenset(int(c) for c in rng.choice(num_clients, size=k, replace=False))

    def apply(
        self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A drifting client's data from ``start_round`` on.

        Example:
            >>> s = DriftScenario(1, 1.0, kind="labels")
            >>> x, y = s.apply(torch.arange(4.0)[:, None], torch.tensor([0, 1, 2, 3]),
            ...                torch.Generator().manual_seed(0))
            >>> len(y), set(y.tolist()) <= {0, 1}
            (4, True)
        """
        if self.kind == "features":
            return x + self.shift, y
        held = torch.unique(y)
        if len(held) < 2:
            return x, y
        keep = torch.nonzero(torch.isin(y, held[: len(held) // 2])).reshape(-1)
        pick = keep[torch.randint(len(keep), (len(y),), generator=gen)]
        return x[pick], y[pick]


class ShiftTracker:
    """The server's side: each client's first summary (its reference) and the distance of
    every later one to it.

    Example:
        >>> t = ShiftTracker()
        >>> t.observe(4, torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]))
        (0.0, 0.0)
        >>> t.observe(4, torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5]))
        (0.5, 0.0)
    """

    def __init__(self) -> None:
        self.references: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def observe(
        self, cid: int, labels: torch.Tensor, features: torch.Tensor
    ) -> tuple[float, float]:
        """``(label_shift, feature_shift)`` of client ``cid``'s summary (0 for its first)."""
        ref = self.references.setdefault(cid, (labels, features))
        return total_variation(labels, ref[0]), total_variation(features, ref[1])

    def restore(self, first: Mapping[int, Mapping[str, float]], classes: int, bins: int) -> None:
        """The references from the per-client metrics of each client's first summary
        (``summary_metrics``), as a run's store holds them."""
        for cid, m in first.items():
            try:
                labels = torch.tensor(
                    [m[f"label_hist_{k}"] for k in range(classes)], dtype=torch.float64
                )
                feats = torch.tensor(
                    [m[f"feature_hist_{k}"] for k in range(bins)], dtype=torch.float64
                )
            except KeyError as exc:
                raise ValueError(f"client {cid}'s stored summary lacks {exc.args[0]}") from None
            self.references[cid] = (labels, feats)


def summary_metrics(labels: torch.Tensor, features: torch.Tensor) -> dict[str, float]:
    """A summary as per-client metrics (``label_hist_<k>``, ``feature_hist_<k>``).

    Example:
        >>> summary_metrics(torch.tensor([1.0]), torch.tensor([0.25, 0.75]))
        {'label_hist_0': 1.0, 'feature_hist_0': 0.25, 'feature_hist_1': 0.75}
    """
    out = {f"label_hist_{k}": float(v) for k, v in enumerate(labels.tolist())}
    return out | {f"feature_hist_{k}": float(v) for k, v in enumerate(features.tolist())}
