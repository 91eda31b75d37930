"""The ``Guard`` alone: stream limits per client and in all, deadlines that cancel a stalled
stream, and freed memory returned once a burst of abuse is over."""

from __future__ import annotations

import threading
import time

import pytest

from potluck.deploy.guard import Busy, Guard


class Context:
    """What the guard uses of a gRPC servicer context."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


def test_limits_per_client_and_in_all() -> None:
    guard = Guard(total=3, per_client=2, timeout_s=60, release=lambda: None)
    a1, a2 = guard.open("a", Context()), guard.open("a", Context())
    with pytest.raises(Busy, match="'a' already has 2"):
        guard.open("a", Context())
    b = guard.open(None, Context())  # not known yet (no TLS): only the total counts
    with pytest.raises(Busy, match="the server has 3 open streams"):
        guard.open("c", Context())
    a1.close()
    a1.close()  # twice: harmless
    guard.open("c", Context()).close()
    for s in (a2, b):
        s.close()
    assert guard.open_streams == 0 and guard.refused == 2
    guard.stop()


def test_a_stalled_stream_is_cut_and_memory_released_after_the_burst() -> None:
    released = threading.Event()
    guard = Guard(total=8, per_client=4, timeout_s=0.2, quiet_s=0.3, release=released.set)
    stalled, prompt = Context(), Context()
    with guard.open("a", stalled) as s, guard.open("b", prompt) as p:
        s.arm("receiving the message")
        p.arm("receiving the message")
        p.disarm()  # its message came in time
        assert stalled.cancelled.wait(5)
        assert s.cut == "receiving the message took longer than 0.2 s (deploy.receive_timeout_s)"
        assert p.cut is None and not prompt.cancelled.is_set()
        t_cut = time.monotonic()
        assert released.wait(5)
        assert time.monotonic() - t_cut >= 0.25  # only once the burst is over
    assert guard.cut == 1 and guard.releases == 1
    guard.stop()
