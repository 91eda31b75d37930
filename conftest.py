"""Shared test setup: the user-written parts of ``examples/my_lab`` are importable, as a
user's own package would be (for the tests and the doctests of ``src/`` and ``examples/``)."""

from __future__ import annotations

import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))
