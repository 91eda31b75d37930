"""Device profiles: each client's compute speed, bandwidth each way, latency, failure rate,
daily availability window and device class, drawn from seeded distributions or read from a
trace file. The virtual clock (``core.clock``) turns them into arrival times.

Drawn (``LognormalProfiles``): speeds, bandwidths and latencies are lognormal around their
medians with the stated ``sigma`` (of the logarithm: 0.5 puts the middle 50 % of devices
within a factor 1.4 of the median, 1.0 within 2); each client is available for
``available_hours`` a day from an hour drawn uniformly (24: always); its device class is its
speed's tercile, ``slow``, ``medium`` or ``fast``. Every draw comes from the run seed's
``("profiles",)`` stream: the same devices on every engine and after a resume.

Read (``TraceProfiles``): a CSV file with a header, or a JSON list of objects, one device a
row, with the columns

    speed          local steps per second (> 0)
    down_mbps      download bandwidth, megabits per second (> 0)
    up_mbps        upload bandwidth, megabits per second (> 0)
    latency_ms     one-way latency, milliseconds (>= 0; default 0)
    failure        probability that a round's answer is lost (0 to 1; default 0)
    available_from hour of the day the device comes online (0 to 24; default 0)
    available_hours hours a day it stays online (0 to 24; default 24)
    memory_gb      memory for training, gigabytes (> 0; default 4): ``adaptive_batch``
    class          a label for per-class figures (default: the speed's tercile)

``examples/traces/devices.csv`` is a small example. A federation with more clients than
devices gives each client a device drawn uniformly from the trace (seeded), as FedScale's
device traces are used.

Example:
    >>> p = LognormalProfiles(speed=10.0, speed_sigma=0.0).draw(4, seed=0)
    >>> p.speed.tolist(), p.classes
    ([10.0, 10.0, 10.0, 10.0], ('medium', 'medium', 'medium', 'medium'))
    >>> bool(p.available(3, now=0.0))
    True
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from potluck.core.seeding import Seeds

DAY = 86_400.0  # seconds
CLASSES = ("slow", "medium", "fast")
COLUMNS = (
    "speed",
    "down_mbps",
    "up_mbps",
    "latency_ms",
    "failure",
    "available_from",
    "available_hours",
    "memory_gb",
    "class",
)


@dataclass(frozen=True, eq=False)
class DeviceProfiles:
    """Per-client arrays (index = client id): ``speed`` steps/s, ``down_bps`` and ``up_bps``
    bytes/s, ``latency_s``, ``failure`` probability per round, the daily window
    ``[available_from, available_from + available_s)`` in seconds of the day, each
    client's ``classes`` label and its ``memory_gb``."""

    speed: np.ndarray
    down_bps: np.ndarray
    up_bps: np.ndarray
    latency_s: np.ndarray
    failure: np.ndarray
    available_from: np.ndarray
    available_s: np.ndarray
    classes: tuple[str, ...]
    memory_gb: np.ndarray

    def __len__(self) -> int:
        return len(self.speed)

    @property
    def always_available(self) -> bool:
        return bool((self.available_s >= DAY).all())

    def available(self, clients: np.ndarray | int, now: float) -> np.ndarray:
        """Whether each of ``clients`` is online at virtual time ``now``."""
        return self.online_for(clients, now) > 0

    def online_for(self, clients: np.ndarray | int, now: float | np.ndarray) -> np.ndarray:
        """Seconds each of ``clients`` stays online from ``now`` (0: offline; inf: always)."""
        c = np.asarray(clients)
        length = self.available_s[c]
        into = np.mod(now - self.available_from[c], DAY)  # seconds since the window opened
        left = np.where(into < length, length - into, 0.0)
        return np.where(length >= DAY, np.inf, left)

    def next_online(self, now: float) -> float:
        """The earliest time from ``now`` at which some client is online."""
        into = np.mod(now - self.available_from, DAY)
        wait = np.where(into < self.available_s, 0.0, DAY - into)
        return now + float(wait[self.available_s > 0].min(initial=np.inf))


@dataclass(frozen=True)
class LognormalProfiles:
    """Devices drawn around the medians (speed in local steps per second, bandwidths in
    megabits per second, latency in milliseconds) with lognormal spreads ``*_sigma``."""

    speed: float = 20.0
    speed_sigma: float = 0.5
    down_mbps: float = 20.0
    up_mbps: float = 5.0
    bandwidth_sigma: float = 0.8
    latency_ms: float = 50.0
    latency_sigma: float = 0.5
    failure: float = 0.0
    available_hours: float = 24.0
    memory_gb: float = 4.0
    memory_sigma: float = 0.5

    def __post_init__(self) -> None:
        for name in ("speed", "down_mbps", "up_mbps", "memory_gb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"profiles.{name} must be > 0, got {getattr(self, name)}")
        for name in (
            "speed_sigma",
            "bandwidth_sigma",
            "latency_sigma",
            "latency_ms",
            "memory_sigma",
        ):
            if not getattr(self, name) >= 0:
                raise ValueError(f"profiles.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.failure <= 1:
            raise ValueError(f"profiles.failure must be in [0, 1], got {self.failure}")
        if not 0 < self.available_hours <= 24:
            raise ValueError(
                f"profiles.available_hours must be in (0, 24], got {self.available_hours}"
            )

    def draw(self, num_clients: int, seed: int) -> DeviceProfiles:
        rng = Seeds(seed).numpy("profiles")
        n = num_clients

        def lognormal(median: float, sigma: float) -> np.ndarray:
            return median * np.exp(sigma * rng.standard_normal(n))

        speed = lognormal(self.speed, self.speed_sigma)
        down = lognormal(self.down_mbps, self.bandwidth_sigma) * 125_000
        up = lognormal(self.up_mbps, self.bandwidth_sigma) * 125_000
        latency = lognormal(self.latency_ms, self.latency_sigma) / 1000
        start = rng.uniform(0, DAY, n) if self.available_hours < 24 else np.zeros(n)
        memory = lognormal(self.memory_gb, self.memory_sigma)
        return DeviceProfiles(
            speed=speed,
            down_bps=down,
            up_bps=up,
            latency_s=latency,
            failure=np.full(n, self.failure),
            available_from=start,
            available_s=np.full(n, self.available_hours * 3600),
            classes=terciles(speed),
            memory_gb=memory,
        )


@dataclass(frozen=True)
class TraceProfiles:
    """Devices read from a trace file (CSV or JSON, see the module's columns)."""

    path: str

    def draw(self, num_clients: int, seed: int) -> DeviceProfiles:
        rows = read_trace(self.path)
        pick = (
            np.arange(num_clients)
            if len(rows) >= num_clients
            else Seeds(seed).numpy("profiles", "trace").integers(len(rows), size=num_clients)
        )
        return _from_rows([rows[i] for i in pick], self.path)


def read_trace(path: str | Path) -> list[dict[str, str | float]]:
    """The rows of a device trace (``.json``: a list of objects; else CSV with a header);
    a ``ValueError`` naming the file, row and column of anything wrong."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"device trace {p}: cannot read it ({exc.strerror or exc})") from None
    if p.suffix.lower() == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"device trace {p}: invalid JSON: {exc}") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"device trace {p}: must be a JSON list of objects")
    else:
        rows = list(csv.DictReader(text.splitlines()))
    if not rows:
        raise ValueError(f"device trace {p}: no devices")
    unknown = sorted({k for r in rows for k in r} - set(COLUMNS))
    if unknown:
        raise ValueError(f"device trace {p}: unknown columns {unknown} (known: {list(COLUMNS)})")
    return rows


def _from_rows(rows: Sequence[Mapping[str, str | float]], where: str) -> DeviceProfiles:
    def column(
        name: str, default: float | None, low: float, high: float = np.inf, positive: bool = False
    ) -> np.ndarray:
        out = np.empty(len(rows))
        for i, row in enumerate(rows):
            raw = row.get(name, "")
            if raw in ("", None):
                if default is None:
                    raise ValueError(f"device trace {where}: row {i + 1} has no {name!r}")
                out[i] = default
                continue
            try:
                value = float(raw)
            except (TypeError, ValueError):
                raise ValueError(
                    f"device trace {where}: row {i + 1}, {name} = {raw!r} is not a number"
                ) from None
            if not (low <= value <= high) or (
                name in ("speed", "down_mbps", "up_mbps") and value <= 0
            ):
                raise ValueError(
                    f"device trace {where}: row {i + 1}, {name} = {value} is out of range"
                )
            out[i] = value
        return out

    speed = column("speed", None, 0, positive=True)
    given = [str(r.get("class") or "") for r in rows]
    classes = tuple(given) if all(given) else terciles(speed)
    return DeviceProfiles(
        speed=speed,
        down_bps=column("down_mbps", None, 0, positive=True) * 125_000,
        up_bps=column("up_mbps", None, 0, positive=True) * 125_000,
        latency_s=column("latency_ms", 0.0, 0) / 1000,
        failure=column("failure", 0.0, 0, 1),
        available_from=column("available_from", 0.0, 0, 24) * 3600,
        available_s=column("available_hours", 24.0, 0, 24) * 3600,
        classes=classes,
        memory_gb=column("memory_gb", 4.0, 0, positive=True),
    )


def terciles(speed: np.ndarray) -> tuple[str, ...]:
    """``slow``, ``medium`` or ``fast``: each speed's tercile (all ``medium`` if equal)."""
    if len(speed) == 0 or float(speed.min()) == float(speed.max()):
        return ("medium",) * len(speed)
    low, high = np.quantile(speed, [1 / 3, 2 / 3])
    idx = (speed > low).astype(int) + (speed > high).astype(int)
    return tuple(CLASSES[i] for i in idx)
