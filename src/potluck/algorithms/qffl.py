"""q-FedAvg (Li, Sanjabi, Beirami, Smith 2020, "Fair Resource Allocation in Federated
Learning", ICLR): FedAvg's round structure with the q-FFL client rule, so that larger ``q``
gives more weight to the clients the global model serves worst.

Example:
    >>> algo = qffl(q=1.0, clients_per_round=10, epochs=1, batch_size=10, lr=0.1)
    >>> algo.name, algo.rule.q, algo.server.lr
    ('qffl', 1.0, 1.0)
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from potluck.algorithms.base import Algorithm
from potluck.algorithms.fedavg import fedavg
from potluck.client.rules import QFFL
from potluck.optim.sgd import ServerSGD


def qffl(*, q: float = 1.0, **fedavg_args: Any) -> Algorithm:
    """q-FedAvg with fairness parameter ``q``; other arguments as for ``fedavg`` (server lr
    stays 1: the step size comes from ``1 / lr`` as in the paper)."""
    server = fedavg_args.get("server")
    if fedavg_args.get("server_lr", 1.0) != 1.0 or server not in (None, ServerSGD()):
        raise ValueError(
            "q-FFL sets its own server step (sum Delta / sum h): keep server SGD with lr 1"
        )
    return replace(fedavg(**fedavg_args), name="qffl", rule=QFFL(q=q))
