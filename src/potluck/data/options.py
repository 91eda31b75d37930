"""Validation of the keyword options that datasets and partitioners accept.

Example:
    >>> check_options({"alpha": 0.5}, ("alpha", "min_size"), "partition 'dirichlet'")
    >>> check_options({"beta": 1}, (), "dataset 'digits'")
    Traceback (most recent call last):
    ...
    ValueError: unknown option(s) ['beta'] for dataset 'digits'; allowed: none
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def check_options(options: Mapping[str, Any], allowed: Iterable[str], what: str) -> None:
    """Raise a ``ValueError`` naming any option of ``what`` that is not in ``allowed``."""
    allowed = tuple(allowed)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        names = ", ".join(allowed) or "none"
        raise ValueError(f"unknown option(s) {unknown} for {what}; allowed: {names}")
