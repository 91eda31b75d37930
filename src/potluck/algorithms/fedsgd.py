"""FedSGD (McMahan et al. 2017, the large-batch baseline): each sampled client computes one
full-batch gradient at the global model; the server averages the gradients weighted by
example count and takes one SGD step with learning rate ``lr``.

Composed from the same parts as FedAvg: local training of one full-batch step with rate 1
(so ``delta = -grad``) and server SGD with rate ``lr``.

Example:
    >>> algo = fedsgd(clients_per_round=10, lr=0.5)
    >>> algo.local.max_steps, algo.local.batch_size, algo.server.lr
    (1, 'full', 0.5)
"""

from __future__ import annotations

from typing import Any

from potluck.algorithms.base import Algorithm, preset
from potluck.algorithms.fedavg import compose, fedavg
from potluck.client.sgd import LocalSGD


@preset("fedsgd")
def fedsgd_parts() -> dict[str, Any]:
    """One full-batch step of rate 1 per client (the server's lr is the step size)."""
    return {"local": LocalSGD(epochs=1, batch_size="full", lr=1.0, max_steps=1)}


def fedsgd(*, lr: float = 0.1, server_momentum: float = 0.0, **fedavg_args: Any) -> Algorithm:
    """FedSGD: one full-batch gradient per client, averaged, one server step of size ``lr``;
    the cohort, ``transforms`` and other parts as for ``fedavg``."""
    base = fedavg(server_lr=lr, server_momentum=server_momentum, **fedavg_args)
    return compose("fedsgd", fedsgd_parts(), base)
