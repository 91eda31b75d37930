"""FedNova (Wang et al. 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous
Federated Optimization", NeurIPS): FedAvg with each update normalised by the client's
number of local steps (momentum-aware) and the aggregate rescaled by the effective steps.

Example:
    >>> algo = fednova(clients_per_round=10, epochs=10, batch_size=64, lr=0.01, momentum=0.9)
    >>> algo.name, algo.terms
    ('fednova', (FedNova(momentum=None),))
"""

from __future__ import annotations

from typing import Any

from potluck.algorithms.base import Algorithm, preset
from potluck.algorithms.fedavg import compose, fedavg
from potluck.client.terms import FedNova


@preset("fednova")
def fednova_parts() -> dict[str, Any]:
    """The normalising term (its momentum: the local optimizer's)."""
    return {"terms": (FedNova(),)}


def fednova(**fedavg_args: Any) -> Algorithm:
    """FedNova; arguments as for ``fedavg`` (the local momentum sets the normaliser)."""
    return compose("fednova", fednova_parts(), fedavg(**fedavg_args))
