"""FedNova (Wang et al. 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous
Federated Optimization", NeurIPS): FedAvg with each update normalised by the client's
number of local steps (momentum-aware) and the aggregate rescaled by the effective steps.

Example:
    >>> algo = fednova(clients_per_round=10, epochs=10, batch_size=64, lr=0.01, momentum=0.9)
    >>> algo.name, algo.rule.momentum
    ('fednova', 0.9)
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from potluck.algorithms.base import Algorithm
from potluck.algorithms.fedavg import fedavg
from potluck.client.rules import FedNova


def fednova(**fedavg_args: Any) -> Algorithm:
    """FedNova; arguments as for ``fedavg`` (the local momentum sets the normaliser)."""
    base = fedavg(**fedavg_args)
    return replace(base, name="fednova", rule=FedNova(momentum=base.local.momentum))
