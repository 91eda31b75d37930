"""Per-client anomaly scores of a round's updates, flagging, and quarantine.

Every round the server scores each accepted update against the round's others: its L2
``norm``, its ``cosine`` similarity to the aggregate, and (on request: it costs a K x K Gram
matrix of the stack) its ``krum`` score, the sum of squared distances to its ``K - f - 2``
nearest others (Blanchard et al. 2017) for the aggregator's ``f`` (0 for a non-robust one).
The scores are stored with the round as per-client metrics ``score_<name>``.

An update is flagged when the ``flag_on`` score is a robust outlier of the round: more than
``threshold`` median absolute deviations (scaled by 1.4826, the normal's consistency
constant) above the round's median (below it, for ``cosine``). With ``quarantine`` on, a
client flagged in ``strikes`` rounds is left out of every later cohort; its strikes are
server state (slot ``quarantine``), so a resumed run quarantines the same clients.

Example:
    >>> import torch
    >>> deltas = torch.tensor([[1.0, 0.0], [1.1, 0.1], [0.9, -0.1], [1.0, 0.05], [-30.0, 0.0]])
    >>> scores = anomaly_scores(deltas, deltas[:4].mean(0), ("norm", "cosine"), f=1)
    >>> [round(v, 2) for v in scores["cosine"].tolist()]
    [1.0, 1.0, 0.99, 1.0, -1.0]
    >>> Detection(flag_on="norm").flagged(scores, 5).tolist()
    [False, False, False, False, True]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from potluck.aggregate.byzantine import pairwise_sq_distances
from potluck.aggregate.krum import krum_scores

__all__ = ["SCORES", "Detection", "anomaly_scores", "robust_z"]

SCORES = ("norm", "cosine", "krum")
MAD_TO_STD = 1.4826  # the MAD of a normal distribution times this is its std


def anomaly_scores(
    deltas: torch.Tensor,
    aggregate: torch.Tensor,
    names: tuple[str, ...],
    f: int = 0,
    *,
    norms: torch.Tensor | None = None,
    dots: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The ``names`` scores (of ``SCORES``) of each row of a (K, d) stack of updates; the
    rows' ``norms`` and dot products with the aggregate (``dots``, float64) where known."""
    out: dict[str, torch.Tensor] = {}
    # float32 passes over the stack (no float64 copy of it), results in float64
    norms = torch.linalg.vector_norm(deltas, dim=1).double() if norms is None else norms
    if "norm" in names:
        out["norm"] = norms
    if "cosine" in names:
        if dots is None:
            dots = (deltas @ aggregate.to(deltas.dtype)).double()
        out["cosine"] = dots / (norms * float(aggregate.norm())).clamp(min=1e-30)
    if "krum" in names and len(deltas) >= 2:
        k = len(deltas)
        neighbours = min(max(k - f - 2, 1), k - 1)
        d2 = pairwise_sq_distances(deltas).to(torch.float64)
        out["krum"] = krum_scores(d2, neighbours)
    return out


def robust_z(values: torch.Tensor) -> torch.Tensor:
    """Each value's distance from the median in scaled median absolute deviations (0 where
    the deviation is 0: a round whose values mostly agree flags only the ones that differ).

    Example:
        >>> robust_z(torch.tensor([1.0, 1.0, 1.0, 5.0])).tolist()
        [0.0, 0.0, 0.0, inf]
    """
    median = values.median()
    mad = MAD_TO_STD * (values - median).abs().median()
    diff = values - median
    if float(mad) == 0:
        return torch.where(diff == 0, 0.0, diff.sign() * math.inf).to(values.dtype)
    return diff / mad


@dataclass(frozen=True)
class Detection:
    """Which anomaly scores each round records (``scores``), which one flags an update
    (``flag_on``, at ``threshold`` scaled MADs), and whether a client flagged in
    ``strikes`` rounds is quarantined (left out of later cohorts)."""

    scores: tuple[str, ...] = ("norm", "cosine")
    flag_on: str = "norm"
    threshold: float = 3.0
    quarantine: bool = False
    strikes: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "scores", tuple(self.scores))
        unknown = [s for s in self.scores if s not in SCORES]
        if unknown:
            raise ValueError(f"detection.scores: unknown {unknown}; scores are {list(SCORES)}")
        if self.flag_on not in self.scores:
            raise ValueError(
                f"detection.flag_on = {self.flag_on!r} must be one of the recorded scores "
                f"{list(self.scores)}"
            )
        if not (math.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(f"detection.threshold must be a number > 0, got {self.threshold}")
        if isinstance(self.strikes, bool) or not isinstance(self.strikes, int) or self.strikes < 1:
            raise ValueError(f"detection.strikes must be an int >= 1, got {self.strikes!r}")

    def flagged(self, scores: dict[str, torch.Tensor], k: int) -> torch.Tensor:
        """Which of the round's ``k`` updates it flags (a boolean (k,) tensor); none of
        fewer than 3."""
        values = scores.get(self.flag_on)
        if values is None or k < 3:
            return torch.zeros(k, dtype=torch.bool)
        z = robust_z(values)
        return z < -self.threshold if self.flag_on == "cosine" else z > self.threshold
