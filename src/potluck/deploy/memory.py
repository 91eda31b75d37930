"""Make glibc's malloc keep freed memory for the next round instead of returning it.

A server round allocates and frees the same large buffers every round (each client's
6.65 MB chunks and decoded update for the McMahan CNN). By default glibc serves such sizes
with ``mmap`` and gives them back with ``munmap``, creates one arena per thread (up to 8 per
core) whose heaps it shrinks, and trims the top of the heap: every round then faults in and
zeroes fresh pages again. ``reuse_freed_memory`` asks glibc (``mallopt``) for one arena per
core, heap allocation up to the largest ``mmap`` threshold glibc accepts (32 MiB), and no
trimming, so that the process keeps its peak and reuses it: at 200 clients the server's page
faults fell from 100-170 k per round to a few tens of thousands or none once the heap had
settled (BENCHMARKS.md §9). One arena per core rather than one for the whole process: gRPC's
event-engine threads (about one per core) allocate as they send and receive, and with a single
arena they queued for its lock (malloc took 0.69 CPU-s per TLS round at 200 clients on two
cores, 0.46-0.60 s in two runs with two arenas, at the same peak memory). A library that
calls ``malloc_trim`` itself still returns the memory (protobuf's Python runtime does, which
is one reason for ``codec``). Elsewhere than glibc it does nothing.

``release_freed_memory`` gives what is free back to the system at once (``malloc_trim``):
the server calls it after a burst of abusive streams (``guard``), so that memory an attacker
made it allocate does not stay resident.

Example:
    >>> reuse_freed_memory()  # glibc accepts every setting
    True
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's largest accepted value on 64-bit hosts
NEVER_TRIM = -1  # mallopt stores it as a size_t: SIZE_MAX, "trimming disabled" (mallopt(3))

log = logging.getLogger("potluck.deploy")


def reuse_freed_memory(arenas: int | None = None) -> bool:
    """Tune glibc's malloc as above (``arenas``: default one per core this process may run
    on); True if glibc accepted every setting.

    Call it early (before the server's threads start): threads pick their arena at their
    first allocation."""
    arenas = arenas or len(os.sched_getaffinity(0))
    mallopt = _mallopt()
    if mallopt is None:
        return False
    settings = {
        "M_ARENA_MAX": (_M_ARENA_MAX, arenas),
        "M_MMAP_THRESHOLD": (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX),
        "M_TRIM_THRESHOLD": (_M_TRIM_THRESHOLD, NEVER_TRIM),
    }
    refused = [name for name, (param, value) in settings.items() if mallopt(param, value) != 1]
    if refused:
        log.warning("glibc refused %s: freed memory may be returned and faulted in again", refused)
    return not refused


def release_freed_memory() -> bool:
    """Return the freed memory of every arena to the system (glibc's ``malloc_trim(0)``);
    True if some was returned, False if none was or this is not glibc.

    Example:
        >>> isinstance(release_freed_memory(), bool)
        True
    """
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "malloc_trim"):
        return False
    trim = libc.malloc_trim
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    returned = bool(trim(0))
    log.info("returned freed memory to the system after abusive streams: %s", returned)
    return returned


def _mallopt() -> Callable[[int, int], int] | None:
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):
        return None  # not glibc: musl's mallopt accepts nothing
    fn = libc.mallopt
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn
