"""``Algorithm``: the five parts of DESIGN.md in one plain dataclass.

A new method replaces one part and reuses the rest.

Example:
    >>> from potluck.algorithms import fedavg
    >>> algo = fedavg(clients_per_round=10, epochs=5, batch_size=10, lr=0.1)
    >>> algo.name, algo.local.epochs, algo.server.lr, algo.rule.name
    ('fedavg', 5, 1.0, 'plain')
"""

from __future__ import annotations

from dataclasses import dataclass, field

from potluck.aggregate.mean import WeightedMean
from potluck.client.rules import LocalRule, PlainRule
from potluck.client.sgd import LocalSGD
from potluck.optim.base import ServerOptimizer
from potluck.optim.sgd import ServerSGD
from potluck.sampling.stragglers import Stragglers
from potluck.sampling.uniform import UniformSampler
from potluck.updates.base import Chain


@dataclass(frozen=True)
class Algorithm:
    """Sampler (+ stragglers), local optimizer and rule, transforms, aggregator, server opt."""

    name: str
    sampler: UniformSampler
    local: LocalSGD
    rule: LocalRule = field(default_factory=PlainRule)
    stragglers: Stragglers = field(default_factory=Stragglers)
    aggregator: WeightedMean = field(default_factory=WeightedMean)
    server: ServerOptimizer = field(default_factory=ServerSGD)
    transforms: Chain = field(default_factory=Chain)
