"""SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning", ICML): FedAvg with control variates that correct client drift. The
client control variates ``c_i`` persist per client in the run store (and so in resumes).

Example:
    >>> algo = scaffold(clients_per_round=10, epochs=10, batch_size=64, lr=0.01)
    >>> algo.name, algo.rule.client_state
    ('scaffold', ('c_i',))
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from potluck.algorithms.base import Algorithm
from potluck.algorithms.fedavg import fedavg
from potluck.client.rules import Scaffold


def scaffold(**fedavg_args: Any) -> Algorithm:
    """SCAFFOLD (option II control variates); arguments as for ``fedavg`` (the local momentum
    sets the control variates' step normaliser)."""
    base = fedavg(**fedavg_args)
    return replace(base, name="scaffold", rule=Scaffold(momentum=base.local.momentum))
