"""Shared test setup: the user-written parts of ``examples/my_lab`` are importable, as a
user's own package would be (subprocesses get the same path through ``USER_ENV``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))
USER_ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(EXAMPLES), os.environ.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    ),
}
