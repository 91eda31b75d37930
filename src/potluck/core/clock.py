"""The virtual clock: when each client's answer reaches the server, and which answers a
synchronous round keeps (deadline, over-selection), in virtual seconds; nothing sleeps.

A member of a round that starts at ``t`` receives its messages after ``latency + bytes down
/ download bandwidth``, trains for ``local steps / speed`` and answers after ``latency +
bytes up / upload bandwidth``; the bytes are the ones the round really sent
(``Message.wire_bytes``), the steps the ones it took. A member is lost when its failure draw
says so (``failed``, seeded per round and client) or when its daily window closes before it
answers (``offline``). ``ClockPolicy`` then keeps, of the answers that arrive:

- with ``deadline_s``, those that arrive within it (``late`` otherwise); with ``late =
  "partial"`` each member is asked beforehand for only the share of its local work that fits
  (FedProx's partial work; Li et al. 2020), its upload time estimated from the last round's;
- with ``over_selection = f``, the sampler is asked for ``ceil(K (1 + f))`` members and the
  first ``K`` to arrive are kept (Bonawitz et al. 2019, "Towards Federated Learning at Scale:
  System Design", MLSys: 130 % of the target), the others ``over_selected``.

The round ends when the last kept answer arrives (at the deadline if a member it waited for
never came), plus ``server_s`` for the server's own step; the next starts then, or when the
first client comes online again if none is.

Example:
    >>> import numpy as np
    >>> t = arrivals(
    ...     start=0.0, latency_s=np.array([0.05, 0.05]), down_bps=np.array([1e6, 1e6]),
    ...     up_bps=np.array([1e5, 1e5]), speed=np.array([10.0, 1.0]),
    ...     bytes_down=np.array([1e6, 1e6]), bytes_up=np.array([1e5, 1e5]),
    ...     steps=np.array([20, 20]))
    >>> t.arrival.tolist()  # 0.05 + 1 s down, 2 s or 20 s of steps, 0.05 + 1 s up
    [4.1, 22.1]
    >>> ClockPolicy(deadline_s=10.0).keep(0.0, t, lost=np.array(["", ""])).tolist()
    ['kept', 'late']
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

KEPT, FAILED, OFFLINE, LATE, OVER = "kept", "failed", "offline", "late", "over_selected"


@dataclass(frozen=True)
class Timing:
    """Per member of a round: seconds to receive, to compute and to answer, and the virtual
    time its answer arrives."""

    download_s: np.ndarray
    compute_s: np.ndarray
    upload_s: np.ndarray
    arrival: np.ndarray


def arrivals(
    *,
    start: float | np.ndarray,
    latency_s: np.ndarray,
    down_bps: np.ndarray,
    up_bps: np.ndarray,
    speed: np.ndarray,
    bytes_down: np.ndarray,
    bytes_up: np.ndarray,
    steps: np.ndarray,
) -> Timing:
    """When each member's answer reaches the server from a round started at ``start``."""
    down = latency_s + bytes_down / down_bps
    compute = steps / speed
    up = latency_s + bytes_up / up_bps
    return Timing(down, compute, up, start + down + compute + up)


@dataclass(frozen=True)
class ClockPolicy:
    """What a synchronous round on virtual time keeps: answers within ``deadline_s`` (or
    every answer), the first ``K`` of ``ceil(K (1 + over_selection))`` members; ``late``:
    ``"drop"`` late members, or ask each for the ``"partial"`` work that fits the deadline;
    ``server_s``: the server's own time per round; ``start_hour``: the time of day of round
    1's start; ``adaptive_work``: each member does a share of its local work in proportion
    to its speed (the median device a full one, faster ones too), so that devices finish at
    about the same time (weights stay by examples; FedNova normalises by steps);
    ``adaptive_batch``: each member's batch is the run's scaled by its memory over the median
    device's (never above the run's), a step of a smaller batch taking its share of a step's
    time."""

    deadline_s: float | None = None
    late: Literal["drop", "partial"] = "drop"
    over_selection: float = 0.0
    server_s: float = 0.0
    start_hour: float = 0.0
    adaptive_work: bool = False
    adaptive_batch: bool = False

    def __post_init__(self) -> None:
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise ValueError(f"clock.deadline_s must be > 0, got {self.deadline_s}")
        if self.late not in ("drop", "partial"):
            raise ValueError(f"clock.late must be 'drop' or 'partial', got {self.late!r}")
        if self.late == "partial" and self.deadline_s is None:
            raise ValueError('clock.late = "partial" needs a deadline_s to fit the work into')
        if not 0 <= self.over_selection <= 10:
            raise ValueError(f"clock.over_selection must be in [0, 10], got {self.over_selection}")
        if not self.server_s >= 0:
            raise ValueError(f"clock.server_s must be >= 0, got {self.server_s}")
        if not 0 <= self.start_hour < 24:
            raise ValueError(f"clock.start_hour must be in [0, 24), got {self.start_hour}")

    def selected(self, target: int) -> int:
        """Members to sample for a target of ``target`` answers."""
        return math.ceil(target * (1 + self.over_selection) - 1e-9)

    def keep(
        self, start: float, timing: Timing, lost: np.ndarray, target: int | None = None
    ) -> np.ndarray:
        """Each member's outcome: ``kept``, ``lost`` where that gives a reason (``failed``,
        ``offline``; ``""``: none), ``late`` past the deadline, ``over_selected`` after the
        first ``target`` answers."""
        outcome = np.where(lost == "", KEPT, lost).astype(object)
        if self.deadline_s is not None:
            late = timing.arrival > start + self.deadline_s + 1e-9
            outcome[(outcome == KEPT) & late] = LATE
        if target is not None and self.over_selection > 0:
            arrived = np.flatnonzero(outcome == KEPT)
            order = arrived[np.argsort(timing.arrival[arrived], kind="stable")]
            outcome[order[target:]] = OVER
        return outcome

    def end(self, start: float, timing: Timing, outcome: np.ndarray) -> float:
        """When the round is over: its last kept answer, or the deadline where a member it
        waited for did not come (a late, failed or offline one), plus ``server_s``."""
        kept = timing.arrival[outcome == KEPT]
        last = float(kept.max()) if len(kept) else start
        waited = bool(np.isin(outcome, (LATE, FAILED, OFFLINE)).any())
        if self.deadline_s is not None and (waited or not len(kept)):
            last = max(last, start + self.deadline_s)
        return last + self.server_s

    def partial_work(
        self,
        *,
        start: float,
        timing_without_compute: Timing,
        speed: np.ndarray,
        steps: np.ndarray,
    ) -> np.ndarray:
        """Each member's share of its ``steps`` that fits the deadline after its estimated
        transfers (0: not even those fit)."""
        assert self.deadline_s is not None
        t = timing_without_compute
        left = self.deadline_s - t.download_s - t.upload_s
        fits = np.floor(np.maximum(left, 0.0) * speed + 1e-9)
        return np.clip(fits / np.maximum(steps, 1), 0.0, 1.0)
