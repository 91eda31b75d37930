"""FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks", MLSys):
FedAvg whose clients minimise ``F_k(w) + mu/2 ||w - w_global||^2`` and whose stragglers'
partial work is aggregated rather than dropped.

Example:
    >>> algo = fedprox(mu=1.0, clients_per_round=10, epochs=20, batch_size=10, lr=0.01)
    >>> algo.name, algo.terms[0].mu, algo.stragglers.mode
    ('fedprox', 1.0, 'partial')
"""

from __future__ import annotations

from typing import Any

from potluck.algorithms.base import Algorithm, preset
from potluck.algorithms.fedavg import compose, fedavg
from potluck.client.terms import FedProx
from potluck.sampling.stragglers import Stragglers


@preset("fedprox")
def fedprox_parts(*, mu: float = 0.01) -> dict[str, Any]:
    """The proximal term with weight ``mu``; stragglers' partial work is kept."""
    return {"terms": (FedProx(mu=mu),), "stragglers": Stragglers(mode="partial")}


def fedprox(*, mu: float = 0.01, **fedavg_args: Any) -> Algorithm:
    """FedProx with proximal weight ``mu``; other arguments as for ``fedavg``."""
    return compose("fedprox", fedprox_parts(mu=mu), fedavg(**fedavg_args))
