"""A synchronous round on virtual time: the device profiles (``data.profiles``) and the
round policy (``core.clock.ClockPolicy``) of an experiment, as the round loop uses them.

Its server state (slot ``clock``) is the virtual time of the next round's start and the last
round's mean bytes each way per member (the estimate ``late = "partial"`` plans with), so a
resumed run goes on at the same virtual time.

Example:
    >>> import numpy as np
    >>> from potluck.data.profiles import LognormalProfiles
    >>> clock = VirtualClock(ClockPolicy(deadline_s=3.0), LognormalProfiles(), 100, seed=0)
    >>> now = clock.now({})
    >>> members = np.arange(10)
    >>> settled = clock.settle(1, now, members, np.full(10, 80_000), np.full(10, 80_000),
    ...                        np.full(10, 50), target=10)
    >>> sorted(set(settled.outcome.tolist())), settled.end > now
    (['kept', 'late'], True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from potluck.core.clock import FAILED, KEPT, LATE, OFFLINE, OVER, ClockPolicy, Timing, arrivals
from potluck.core.parts import State
from potluck.core.seeding import Seeds
from potluck.data.profiles import DeviceProfiles, LognormalProfiles, TraceProfiles

SLOT = "clock"


@dataclass(frozen=True)
class Settled:
    """A round's members on the clock: their timing, each one's outcome (``core.clock``'s
    ``kept``, ``failed``, ``offline``, ``late``, ``over_selected``) and the round's end."""

    members: np.ndarray
    timing: Timing
    outcome: np.ndarray
    end: float

    def metrics(self, start: float) -> dict[str, float]:
        counts = {o: float((self.outcome == o).sum()) for o in (FAILED, OFFLINE, LATE)}
        return {
            "virtual_time_s": self.end,
            "round_virtual_s": self.end - start,
            "dropped_failed": counts[FAILED],
            "dropped_offline": counts[OFFLINE],
            "dropped_late": counts[LATE],
            "over_selected": float((self.outcome == OVER).sum()),
        }

    def per_client(self) -> dict[int, dict[str, float]]:
        t = self.timing
        return {
            int(c): {
                "download_s": float(t.download_s[i]),
                "compute_s": float(t.compute_s[i]),
                "upload_s": float(t.upload_s[i]),
                "kept": float(self.outcome[i] == KEPT),
            }
            for i, c in enumerate(self.members)
        }


def unsettled(start: float, policy: ClockPolicy) -> Settled:
    """A round that ended before its ``train`` stage (aborted): it took its deadline."""
    empty = np.zeros(0)
    end = start + (policy.deadline_s or 0.0) + policy.server_s
    return Settled(np.zeros(0, np.int64), Timing(empty, empty, empty, empty), empty, end)


def over_selecting(policy: ClockPolicy, sampler: Any, num_clients: int) -> tuple[Any, int]:
    """``sampler`` asked for ``policy``'s over-selected cohort (itself without one), and
    the number of answers a round keeps (on the virtual clock, or on real time deployed).

    Example:
        >>> from potluck.sampling.uniform import UniformSampler
        >>> bigger, target = over_selecting(ClockPolicy(over_selection=0.3),
        ...                                 UniformSampler(clients_per_round=10), 100)
        >>> bigger.cohort_size(100), target
        (13, 10)
    """
    target = sampler.cohort_size(num_clients)
    if policy.over_selection == 0:
        return sampler, target
    return sampler.resized(min(policy.selected(target), num_clients)), target


class VirtualClock:
    """The profiles of ``num_clients`` devices and the round ``policy``."""

    def __init__(
        self,
        policy: ClockPolicy,
        profiles: LognormalProfiles | TraceProfiles,
        num_clients: int,
        seed: int,
    ) -> None:
        self.policy, self.spec, self.seed = policy, profiles, seed
        self.devices: DeviceProfiles = profiles.draw(num_clients, seed)
        self.median_speed = float(np.median(self.devices.speed))
        self.median_memory = float(np.median(self.devices.memory_gb))

    def batches(self, members: np.ndarray, batch_size: int) -> np.ndarray:
        """Each member's batch size (``adaptive_batch``: ``batch_size`` times its memory over
        the median device's, at least 1, at most ``batch_size``)."""
        if not self.policy.adaptive_batch:
            return np.full(len(members), batch_size, dtype=np.int64)
        share = self.devices.memory_gb[members] / self.median_memory
        return np.clip(np.floor(batch_size * share), 1, batch_size).astype(np.int64)

    def now(self, slot: State) -> float:
        """The virtual time this round starts: the slot's, or round 1's start hour; moved on
        to the first moment some device is online."""
        t = slot.get("now")
        now = float(t) if t is not None else self.policy.start_hour * 3600.0
        return now if self.devices.always_available else self.devices.next_online(now)

    def available(self, now: float) -> np.ndarray | None:
        """The ids of the clients online at ``now`` (``None``: all are, always)."""
        if self.devices.always_available:
            return None
        return np.flatnonzero(self.devices.available(np.arange(len(self.devices)), now))

    def sampler(self, sampler: Any, num_clients: int) -> tuple[Any, int]:
        """The sampler to draw a round's members with (asked for more when over-selecting)
        and the number of answers a round keeps."""
        return over_selecting(self.policy, sampler, num_clients)

    def work(
        self, now: float, members: np.ndarray, slot: State, steps: np.ndarray, model_bytes: int
    ) -> np.ndarray:
        """Each member's share of its local work: with ``adaptive_work``, its speed over
        the median device's (at most 1: the median device does a full share); with ``late =
        "partial"``, at most what fits the deadline after its transfers, estimated from the
        last round's mean bytes each way (round 1: ``model_bytes``)."""
        d = self.devices
        share = np.ones(len(members))
        if self.policy.adaptive_work and len(members):
            share = np.minimum(1.0, d.speed[members] / self.median_speed)
        if self.policy.late != "partial" or not len(members):
            return share
        first = torch.tensor(float(model_bytes))
        down = np.full(len(members), float(slot.get("down_bytes", first)))
        up = np.full(len(members), float(slot.get("up_bytes", first)))
        transfers = arrivals(
            start=now,
            latency_s=d.latency_s[members],
            down_bps=d.down_bps[members],
            up_bps=d.up_bps[members],
            speed=d.speed[members],
            bytes_down=down,
            bytes_up=up,
            steps=np.zeros(len(members)),
        )
        fits = self.policy.partial_work(
            start=now,
            timing_without_compute=transfers,
            speed=d.speed[members],
            steps=np.floor(steps * share),
        )
        return share * fits

    def settle(
        self,
        rnd: int,
        now: float,
        members: np.ndarray,
        bytes_down: np.ndarray,
        bytes_up: np.ndarray,
        steps: np.ndarray,
        target: int,
    ) -> Settled:
        """When each member's answer arrives and which the round keeps."""
        timing, lost = self._timed(rnd, now, members, bytes_down, bytes_up, steps)
        outcome = self.policy.keep(now, timing, lost, target)
        return Settled(members, timing, outcome, self.policy.end(now, timing, outcome))

    def settle_from(
        self,
        rnd: int,
        starts: np.ndarray,
        members: np.ndarray,
        bytes_down: np.ndarray,
        bytes_up: np.ndarray,
        steps: np.ndarray,
    ) -> Settled:
        """When each member, released at its own ``starts`` (the asynchronous driver),
        answers, and whether it does (``failed``, ``offline``: it does not)."""
        timing, lost = self._timed(rnd, starts, members, bytes_down, bytes_up, steps)
        outcome = np.where(lost == "", KEPT, lost).astype(object)
        end = float(timing.arrival.max(initial=0.0))
        return Settled(members, timing, outcome, end)

    def _timed(
        self,
        rnd: int,
        now: float | np.ndarray,
        members: np.ndarray,
        bytes_down: np.ndarray,
        bytes_up: np.ndarray,
        steps: np.ndarray,
    ) -> tuple[Timing, np.ndarray]:
        d, m = self.devices, members
        timing = arrivals(
            start=now,
            latency_s=d.latency_s[m],
            down_bps=d.down_bps[m],
            up_bps=d.up_bps[m],
            speed=d.speed[m],
            bytes_down=bytes_down.astype(np.float64),
            bytes_up=bytes_up.astype(np.float64),
            steps=steps.astype(np.float64),
        )
        draws = Seeds(self.seed).numpy("clock", "failure", rnd).random(len(d))[m]
        lost = np.where(draws < d.failure[m], FAILED, "").astype(object)
        offline = timing.arrival > now + d.online_for(m, now)
        lost[(lost == "") & offline] = OFFLINE
        return timing, lost

    def slot(self, end: float, bytes_down: np.ndarray, bytes_up: np.ndarray) -> State:
        """The clock's server state after a round that ended at ``end``."""

        def mean(b: np.ndarray, default: float) -> torch.Tensor:
            return torch.tensor(float(b.mean()) if len(b) else default, dtype=torch.float64)

        return {
            "now": torch.tensor(end, dtype=torch.float64),
            "down_bytes": mean(bytes_down, 0.0),
            "up_bytes": mean(bytes_up, 0.0),
        }
