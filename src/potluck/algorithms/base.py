"""``Algorithm``: the five parts of DESIGN.md in one plain dataclass.

A new method replaces one part and reuses the rest.

Example:
    >>> from potluck.algorithms import fedavg
    >>> algo = fedavg(clients_per_round=10, epochs=5, batch_size=10, lr=0.1)
    >>> algo.name, algo.local.epochs, algo.server.lr
    ('fedavg', 5, 1.0)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from potluck.aggregate.mean import WeightedMean
from potluck.client.sgd import LocalSGD
from potluck.optim.sgd import ServerSGD
from potluck.sampling.uniform import UniformSampler
from potluck.updates.base import Chain


@dataclass(frozen=True)
class Algorithm:
    """Sampler, local training, update transforms, aggregator and server optimizer."""

    name: str
    sampler: UniformSampler
    local: LocalSGD
    aggregator: WeightedMean = field(default_factory=WeightedMean)
    server: ServerSGD = field(default_factory=ServerSGD)
    transforms: Chain = field(default_factory=Chain)
