"""FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks", MLSys):
FedAvg whose clients minimise ``F_k(w) + mu/2 ||w - w_global||^2`` and whose stragglers'
partial work is aggregated rather than dropped.

Example:
    >>> algo = fedprox(mu=1.0, clients_per_round=10, epochs=20, batch_size=10, lr=0.01)
    >>> algo.name, algo.rule.mu, algo.stragglers.mode
    ('fedprox', 1.0, 'partial')
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from potluck.algorithms.base import Algorithm
from potluck.algorithms.fedavg import fedavg
from potluck.client.rules import FedProx
from potluck.sampling.stragglers import Stragglers


def fedprox(*, mu: float = 0.01, stragglers: float = 0.0, **fedavg_args: Any) -> Algorithm:
    """FedProx with proximal weight ``mu``; other arguments as for ``fedavg``."""
    base = fedavg(**fedavg_args)
    return replace(
        base, name="fedprox", rule=FedProx(mu=mu), stragglers=Stragglers(stragglers, "partial")
    )
