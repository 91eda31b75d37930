"""FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS): sample C*K clients, E local epochs of batch-B SGD, weighted
mean of the updates by example count, applied with server learning rate 1.

Server momentum > 0 gives FedAvgM (Hsu et al. 2019). ``server=`` takes any server optimizer
(FedAdam, FedYogi, FedAdagrad: Reddi et al. 2021). Stragglers are dropped, as in the FedProx
paper's FedAvg baseline.

Example:
    >>> algo = fedavg(fraction=0.1, epochs=1, batch_size=32, lr=0.05)
    >>> algo.sampler.cohort_size(100)
    10
"""

from __future__ import annotations

from potluck.algorithms.base import Algorithm
from potluck.client.sgd import LocalSGD
from potluck.optim.base import ServerOptimizer
from potluck.optim.sgd import ServerSGD
from potluck.sampling.stragglers import Stragglers
from potluck.sampling.uniform import UniformSampler
from potluck.updates.base import Chain, Transform


def fedavg(
    *,
    clients_per_round: int | None = None,
    fraction: float | None = None,
    min_clients: int = 1,
    epochs: int = 1,
    batch_size: int | None = 32,
    lr: float = 0.01,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    server_lr: float = 1.0,
    server_momentum: float = 0.0,
    server: ServerOptimizer | None = None,
    stragglers: float = 0.0,
    transforms: tuple[Transform, ...] = (),
) -> Algorithm:
    """FedAvg with the given cohort, local SGD and server step settings."""
    return Algorithm(
        name="fedavg",
        sampler=UniformSampler(clients_per_round, fraction, min_clients),
        local=LocalSGD(epochs, batch_size, lr, momentum, weight_decay),
        stragglers=Stragglers(stragglers, "drop"),
        server=server or ServerSGD(server_lr, server_momentum),
        transforms=Chain(transforms),
    )
