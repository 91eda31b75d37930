"""FedSGD (McMahan et al. 2017, the large-batch baseline): each sampled client computes one
full-batch gradient at the global model; the server averages the gradients weighted by
example count and takes one SGD step with learning rate ``lr``.

Composed from the same parts as FedAvg: a local rule of one full-batch step with rate 1
(so ``delta = -grad``) and server SGD with rate ``lr``.

Example:
    >>> algo = fedsgd(clients_per_round=10, lr=0.5)
    >>> algo.local.max_steps, algo.local.batch_size, algo.server.lr
    (1, None, 0.5)
"""

from __future__ import annotations

from potluck.algorithms.base import Algorithm
from potluck.client.sgd import LocalSGD
from potluck.optim.sgd import ServerSGD
from potluck.sampling.uniform import UniformSampler
from potluck.updates.base import Chain, Transform


def fedsgd(
    *,
    clients_per_round: int | None = None,
    fraction: float | None = None,
    min_clients: int = 1,
    lr: float = 0.1,
    server_momentum: float = 0.0,
    transforms: tuple[Transform, ...] = (),
) -> Algorithm:
    """FedSGD: one full-batch gradient per client, averaged, one server step of size ``lr``."""
    return Algorithm(
        name="fedsgd",
        sampler=UniformSampler(clients_per_round, fraction, min_clients),
        local=LocalSGD(epochs=1, batch_size=None, lr=1.0, max_steps=1),
        server=ServerSGD(lr, server_momentum),
        transforms=Chain(transforms),
    )
