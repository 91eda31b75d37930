"""FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS): sample C*K clients, E local epochs of batch-B SGD, weighted
mean of the updates by example count, applied with server learning rate 1.

Server momentum > 0 gives FedAvgM (Hsu et al. 2019). ``server=`` takes any server optimizer
(FedAdam, FedYogi, FedAdagrad: Reddi et al. 2021). Stragglers are dropped, as in the FedProx
paper's FedAvg baseline. ``compose`` builds the other named algorithms on these arguments.

Example:
    >>> algo = fedavg(fraction=0.1, epochs=1, batch_size=32, lr=0.05)
    >>> algo.sampler.cohort_size(100)
    10
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

from potluck.aggregate.mean import WeightedMean
from potluck.algorithms.base import CHAINS, Algorithm, preset
from potluck.client.sgd import LocalSGD
from potluck.core.parts import Aggregator, Downlink, GradientTerm, ServerOptimizer, Transform
from potluck.optim.sgd import ServerSGD
from potluck.sampling.stragglers import Stragglers
from potluck.sampling.uniform import UniformSampler


@preset("fedavg")
def fedavg_parts() -> dict[str, Any]:
    """FedAvg's parts beyond the defaults: stragglers' work is dropped."""
    return {"stragglers": Stragglers(mode="drop")}


def fedavg(
    *,
    clients_per_round: int | None = None,
    fraction: float | None = None,
    min_clients: int = 1,
    epochs: int = 1,
    batch_size: int | Literal["full"] | None = 32,
    lr: float = 0.01,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    server_lr: float = 1.0,
    server_momentum: float = 0.0,
    server: ServerOptimizer | None = None,
    stragglers: float = 0.0,
    terms: tuple[GradientTerm, ...] = (),
    transforms: tuple[Transform, ...] = (),
    downlink: tuple[Downlink, ...] = (),
    aggregator: Aggregator | None = None,
) -> Algorithm:
    """FedAvg with the given cohort, local SGD and server step settings; ``terms``,
    ``transforms``, ``downlink`` and ``aggregator`` add or replace parts."""
    return Algorithm(
        name="fedavg",
        sampler=UniformSampler(clients_per_round, fraction, min_clients),
        local=LocalSGD(epochs, batch_size, lr, momentum, weight_decay),
        terms=terms,
        transforms=transforms,
        downlink=downlink,
        aggregator=aggregator or WeightedMean(),
        server=server or ServerSGD(server_lr, server_momentum),
        stragglers=Stragglers(stragglers, "drop"),
    )


def compose(name: str, parts: dict[str, Any], base: Algorithm) -> Algorithm:
    """The algorithm ``name``: ``base`` with a preset's ``parts``; the preset's chains go
    before ``base``'s and its stragglers mode applies to ``base``'s stragglers.

    Example:
        >>> from potluck.client.terms import FedProx
        >>> algo = compose("fedprox", {"terms": (FedProx(mu=1.0),)}, fedavg(clients_per_round=2))
        >>> algo.name, algo.terms
        ('fedprox', (FedProx(mu=1.0),))
    """
    slots: dict[str, Any] = {k: v for k, v in parts.items() if k not in CHAINS}
    if "stragglers" in parts:
        slots["stragglers"] = replace(base.stragglers, mode=parts["stragglers"].mode)
    for chain in CHAINS:
        slots[chain] = (*parts.get(chain, ()), *getattr(base, chain))
    return replace(base, name=name, **slots)
