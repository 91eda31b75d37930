"""Stream limits and deadlines: what keeps one client from freezing the server.

Every gRPC stream holds one of the server's threads while it is open, so a client that
opens streams and sends nothing could take all of them (300 stalled streams once left the
server unresponsive to its members). The ``Guard`` admits a stream only while its client
holds fewer than ``per_client`` streams and the server fewer than ``total``; it cancels a
stream whose message has not arrived whole within ``timeout_s`` of being armed (and one
whose answer the client does not take within it), from one watchdog thread; and once a
burst of cut or refused streams is over, it returns the memory they freed to the system
(``memory.release_freed_memory``), which the server otherwise keeps for the next round.

A client is known by its certificate's name before it sends anything; without TLS it is
not known until its message has been read, so only the total limit applies (``client``
None).

Example:
    >>> guard = Guard(total=3, per_client=1, timeout_s=5.0)
    >>> first = guard.open("site-a", context=None)
    >>> guard.open("site-a", context=None)
    Traceback (most recent call last):
    ...
    potluck.deploy.guard.Busy: client 'site-a' already has 1 open streams (deploy.max_stre...
    >>> first.close()
    >>> guard.open("site-a", context=None).close()
    >>> guard.stop()
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from potluck.deploy.memory import release_freed_memory


class Busy(Exception):
    """A stream the server does not take: its client, or the server, holds too many."""


@dataclass(eq=False)
class Stream:
    """One admitted stream; ``cut`` says why the guard cancelled it (None if it did not)."""

    guard: Guard
    client: str | None
    context: Any
    deadline: float | None = None
    phase: str = ""
    cut: str | None = None
    closed: bool = False

    def arm(self, phase: str) -> None:
        """Cancel the stream unless ``disarm`` comes within the guard's timeout."""
        self.guard._arm(self, phase)

    def disarm(self) -> None:
        self.guard._disarm(self)

    def close(self) -> None:
        self.guard._close(self)

    def __enter__(self) -> Stream:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Guard:
    """Admission of streams (``open``) and their deadlines (``Stream.arm``)."""

    def __init__(
        self,
        *,
        total: int,
        per_client: int,
        timeout_s: float,
        quiet_s: float = 2.0,
        release: Callable[[], object] = release_freed_memory,
    ) -> None:
        self.total, self.per_client, self.timeout_s = total, per_client, timeout_s
        self.quiet_s, self._release = quiet_s, release
        self._cv = threading.Condition()
        self._per: Counter[str] = Counter()
        self._count = 0
        self._armed: set[Stream] = set()
        self._abused_at: float | None = None  # the last cut or refused stream, until released
        self._watcher: threading.Thread | None = None
        self._stopped = False
        self.refused = self.cut = self.releases = 0  # for the log and the benchmarks

    @property
    def open_streams(self) -> int:
        with self._cv:
            return self._count

    def open(self, client: str | None, context: Any) -> Stream:
        """Admit a stream of ``client`` (None: not known yet), or raise ``Busy``."""
        with self._cv:
            if client is not None and self._per[client] >= self.per_client:
                self._abused()
                raise Busy(
                    f"client {client!r} already has {self._per[client]} open streams"
                    " (deploy.max_streams_per_client)"
                )
            if self._count >= self.total:
                self._abused()
                raise Busy(f"the server has {self._count} open streams (deploy.max_streams)")
            self._count += 1
            if client is not None:
                self._per[client] += 1
            return Stream(self, client, context)

    def stop(self) -> None:
        """End the watchdog (open streams keep their slots until they close)."""
        with self._cv:
            self._stopped = True
            self._cv.notify_all()

    # -- called by the streams --------------------------------------------------------------

    def _arm(self, stream: Stream, phase: str) -> None:
        with self._cv:
            stream.deadline, stream.phase = time.monotonic() + self.timeout_s, phase
            self._armed.add(stream)
            self._watching()
            self._cv.notify_all()

    def _disarm(self, stream: Stream) -> None:
        with self._cv:
            self._armed.discard(stream)
            stream.deadline = None

    def _close(self, stream: Stream) -> None:
        with self._cv:
            if stream.closed:
                return
            self._armed.discard(stream)
            self._count -= 1
            if stream.client is not None:
                self._per[stream.client] -= 1
                if not self._per[stream.client]:
                    del self._per[stream.client]
            stream.closed = True

    # -- the watchdog ---------------------------------------------------------------------------

    def _abused(self) -> None:
        self._abused_at = time.monotonic()
        self.refused += 1
        self._watching()
        self._cv.notify_all()

    def _watching(self) -> None:
        if self._watcher is None and not self._stopped:
            self._watcher = threading.Thread(target=self._watch, name="potluck-guard", daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        while True:
            with self._cv:
                due, release = self._due()
                while not (due or release):
                    if self._stopped:
                        return
                    self._cv.wait(self._next_wake(time.monotonic()))
                    due, release = self._due()
            for s in due:  # outside the lock: cancelling may run gRPC callbacks
                s.context.cancel()
            if release:
                self._release()

    def _due(self) -> tuple[list[Stream], bool]:
        """The streams past their deadline (marked cut), and whether to release memory."""
        now = time.monotonic()
        due = [s for s in self._armed if s.deadline is not None and s.deadline <= now]
        for s in due:
            self._armed.discard(s)
            s.cut = f"{s.phase} took longer than {self.timeout_s:g} s (deploy.receive_timeout_s)"
            self.cut += 1
            self._abused_at = now
        quiet = self._abused_at is not None and now - self._abused_at >= self.quiet_s
        if quiet:
            self._abused_at = None
            self.releases += 1
        return due, quiet

    def _next_wake(self, now: float) -> float | None:
        wakes = [s.deadline for s in self._armed if s.deadline is not None]
        if self._abused_at is not None:
            wakes.append(self._abused_at + self.quiet_s)
        return max(0.0, min(wakes) - now) if wakes else None
