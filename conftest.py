"""Shared test setup: the user-written parts of ``examples/my_lab`` are importable, as a
user's own package would be (for the tests and the doctests of ``src/`` and ``examples/``).

gRPC's fork handlers are turned off, before gRPC is first imported: the deployment tests run
gRPC servers and channels in this process and the pool engine's tests later fork workers
from it; the handlers would reset gRPC's event engine in each child, which aborts a worker
(an ``ev_epoll1_linux.cc`` check) when a finished test's server left its pollers behind.
The workers never call gRPC.

Decoded datasets are cached in a temporary directory of the test session's own.

Tests marked ``cuda`` are skipped where torch sees no CUDA device, and run last where it
does: a process that has used CUDA cannot fork the pool's workers
(``potluck.core.device.fork_problem``), and the pool's tests and doctest fork.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
# decoded datasets go to a cache of this session's own (``potluck.data.sources.cache_dir``):
# the tests neither read nor fill the user's ~/.cache/potluck
os.environ.setdefault("POTLUCK_CACHE", tempfile.mkdtemp(prefix="potluck-test-cache-"))

EXAMPLES = Path(__file__).resolve().parent / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="no CUDA device here")
        for item in items:
            if item.get_closest_marker("cuda") is not None:
                item.add_marker(skip)
    items.sort(key=lambda item: item.get_closest_marker("cuda") is not None)  # stable
