"""What the Byzantine-robust aggregators share: the number of Byzantine clients ``f`` they
are configured for, the cohort size their paper's guarantee needs, and the kernels several
of them use (the coordinate-wise median, pairwise squared distances).

A setting of ``f`` is a count (an ``int``: at most that many clients of every round lie) or
a fraction of the cohort (a ``float`` in [0, 1): ``f = floor(fraction * n)`` for a cohort
of ``n``). Before a run ``bind_cohort`` refuses a setting whose expected cohort breaks the
aggregator's assumption (``ValueError``); in a round whose cohort is too small for it (after
dropouts) ``aggregate`` raises ``RoundAborted`` and the round loop leaves the model unmoved.

Robust aggregators count every update alike: a client's aggregation weight is what it
claims (its example count), which a Byzantine client could inflate at will, so they give
``Need.EQUAL_WEIGHTS`` and ignore the weights.

Example:
    >>> byzantine_count(2, 10), byzantine_count(0.25, 10)
    (2, 2)
    >>> check_byzantine("byzantine", 1.5)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: byzantine must be an int >= 0 (a count) or a float in [0, 1) ..., got 1.5
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar, Self

import torch

from potluck.aggregate.mean import check_stack
from potluck.core.parts import Context, Need, RoundAborted, State

ROBUST_NEEDS = frozenset({Need.INDIVIDUAL_UPDATES})
ROBUST_GIVES = frozenset({Need.EQUAL_WEIGHTS})
ON_DEVICE_ROBUST = ROBUST_GIVES | {Need.ON_DEVICE}  # ours, checked on the fake accelerator


def check_byzantine(setting: str, value: int | float) -> None:
    """Refuse a setting of ``f`` that is neither a count >= 0 nor a fraction in [0, 1)."""
    count = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    fraction = isinstance(value, float) and 0 <= value < 1
    if not (count or fraction):
        whole = isinstance(value, float) and value.is_integer() and value >= 1
        hint = f" (write {int(value)} for a count)" if whole else ""
        raise ValueError(
            f"{setting} must be an int >= 0 (a count) or a float in [0, 1) "
            f"(a fraction of the cohort), got {value!r}{hint}"
        )


def byzantine_count(value: int | float, n: int) -> int:
    """``f`` for a cohort of ``n``: the count itself, or ``floor(fraction * n)``."""
    return value if isinstance(value, int) else math.floor(value * n)


def check_positive_int(setting: str, value: int, minimum: int = 1) -> None:
    """Refuse an integer setting below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{setting} must be an int >= {minimum}, got {value!r}")


def check_positive(setting: str, value: float) -> None:
    """Refuse a setting that is not a finite number > 0."""
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{setting} must be a finite number > 0, got {value!r}")


class ByzantineRobust(ABC):
    """Base of a robust aggregator: it says its assumption (``rule``, e.g.
    ``"n >= 2f + 3"``), the smallest cohort it needs for ``f`` Byzantine clients
    (``needed``), which of its settings gives ``f`` (``setting``, ``"byzantine"`` unless it
    says otherwise), and its rule over a round's stack (``combine``); ``aggregate`` checks
    the stack and the round's cohort first."""

    rule: ClassVar[str]
    setting: ClassVar[str] = "byzantine"
    needs: ClassVar[frozenset[str]] = ROBUST_NEEDS
    gives: ClassVar[frozenset[str]] = ROBUST_GIVES

    def __post_init__(self) -> None:
        check_byzantine(self.setting, getattr(self, self.setting))

    @abstractmethod
    def needed(self, f: int) -> int:
        """The smallest cohort for which the guarantee holds with ``f`` Byzantine clients."""

    @abstractmethod
    def combine(self, deltas: torch.Tensor, f: int, state: State) -> tuple[torch.Tensor, State]:
        """The aggregate of a (K, d) stack with ``f`` Byzantine rows, and the new state."""

    def init(self, w: torch.Tensor) -> State:
        return {}

    def aggregate(
        self, deltas: torch.Tensor, weights: torch.Tensor, state: State, ctx: Context
    ) -> tuple[torch.Tensor, State]:
        """``combine`` of this round's updates (their weights ignored); ``RoundAborted`` if
        they are too few for the assumption."""
        check_stack(deltas, weights)
        return self.combine(deltas, self.check_round(deltas.shape[0]), state)

    def faulty(self, n: int) -> int:
        """``f`` in a cohort of ``n``."""
        return byzantine_count(getattr(self, self.setting), n)

    def _breach(self, n: int) -> str | None:
        f = self.faulty(n)
        need = self.needed(f)
        if n >= need:
            return None
        value = getattr(self, self.setting)
        return (
            f"{type(self).__name__} assumes {self.rule}: {self.setting} = {value!r} "
            f"(f = {f}) needs a cohort of at least {need}"
        )

    def bind_cohort(self, expected_cohort: float) -> Self:
        """This aggregator, once its assumption holds for the sampler's expected cohort."""
        breach = self._breach(math.floor(expected_cohort + 1e-9))
        if breach:
            raise ValueError(
                f"aggregator: {breach}, but the expected cohort is {expected_cohort:g}: "
                f"sample more clients per round or lower {self.setting}"
            )
        return self

    def check_round(self, k: int) -> int:
        """``f`` for this round's ``k`` updates; ``RoundAborted`` if they are too few."""
        breach = self._breach(k)
        if breach:
            raise RoundAborted(f"{breach}, but this round has {k} updates")
        return self.faulty(k)


BLOCK = 2**22  # elements of the stack in one block of ``by_coordinates`` (16 MiB of float32)


def by_coordinates(
    deltas: torch.Tensor,
    rule: Callable[[torch.Tensor], torch.Tensor],
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """A per-coordinate ``rule`` over a (K, d) stack, block by block of coordinates: each
    block goes to ``rule`` as a contiguous (c, K) tensor, a row per coordinate, and its (c,)
    results fill the (d,) output (of ``dtype``, the stack's by default). Over the whole stack
    at once, a sort's values and int64 indices alone would take three times the stack (20 GB
    for 1,000 updates of the McMahan CNN: BENCHMARKS.md section 20).

    Example:
        >>> by_coordinates(torch.tensor([[1.0, 5.0], [3.0, 0.0]]), lambda rows: rows.amax(1))
        tensor([3., 5.])
    """
    k, d = deltas.shape
    out = deltas.new_empty(d, dtype=dtype or deltas.dtype)
    step = max(1, BLOCK // k)
    for start in range(0, d, step):
        out[start : start + step] = rule(deltas[:, start : start + step].T.contiguous())
    return out


def row_medians(rows: torch.Tensor) -> torch.Tensor:
    """The median of each row of a (c, K) tensor (the mean of the two middle values for an
    even K; a NaN counts as the largest value, as in a sort)."""
    k = rows.shape[1]
    low = rows.topk(k // 2 + 1, dim=1, largest=False).values
    return (low[:, (k - 1) // 2] + low[:, k // 2]) / 2


def coordinate_median(deltas: torch.Tensor) -> torch.Tensor:
    """The coordinate-wise median of a (K, d) stack (the mean of the two middle values for
    an even K).

    Example:
        >>> coordinate_median(torch.tensor([[1.0, 5.0], [3.0, 0.0], [2.0, 9.0], [4.0, 1.0]]))
        tensor([2.5000, 3.0000])
    """
    return by_coordinates(deltas, row_medians)


def pairwise_sq_distances(deltas: torch.Tensor) -> torch.Tensor:
    """The (K, K) squared L2 distances between the rows (float64), from one Gram matrix of
    the rows centred on their coordinate-wise median (a Byzantine row far away cannot then
    drown the honest rows' distances in rounding); the diagonal is 0.

    Example:
        >>> pairwise_sq_distances(torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]]))
        tensor([[ 0., 25.,  1.],
                [25.,  0., 18.],
                [ 1., 18.,  0.]], dtype=torch.float64)
    """
    centred = deltas - coordinate_median(deltas)
    gram = (centred @ centred.T).double()
    sq = gram.diagonal()
    d2 = (sq[:, None] + sq[None, :] - 2 * gram).clamp(min=0)
    return d2.fill_diagonal_(0)
