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

import numpy as np


def check_options(options: Mapping[str, Any], allowed: Iterable[str], what: str) -> None:
    """Raise a ``ValueError`` naming any option of ``what`` that is not in ``allowed``."""
    allowed = tuple(allowed)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        names = ", ".join(allowed) or "none"
        raise ValueError(f"unknown option(s) {unknown} for {what}; allowed: {names}")


def check_client_id(cid: Any, num_clients: int) -> None:
    """Refuse a client id that is not an integer in ``[0, num_clients)``.

    Example:
        >>> check_client_id(3, 3)
        Traceback (most recent call last):
        ...
        IndexError: client id 3 out of range: valid ids are 0..2
    """
    if isinstance(cid, bool) or not isinstance(cid, (int, np.integer)):
        raise TypeError(f"client id must be an integer, got {type(cid).__name__}")
    if not 0 <= cid < num_clients:
        raise IndexError(f"client id {cid} out of range: valid ids are 0..{num_clients - 1}")
