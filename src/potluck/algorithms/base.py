"""``Algorithm``: the five parts of DESIGN.md in one plain dataclass.

A new method replaces one part and reuses the rest.

Example:
    >>> from potluck.algorithms import fedavg
    >>> algo = fedavg(clients_per_round=10, epochs=5, batch_size=10, lr=0.1)
    >>> algo.name, algo.local.epochs, algo.server.lr, algo.rule.name
    ('fedavg', 5, 1.0, 'plain')
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from potluck.aggregate.mean import WeightedMean
from potluck.client.rules import LocalRule, PlainRule
from potluck.client.sgd import LocalSGD
from potluck.optim.base import ServerOptimizer
from potluck.optim.sgd import ServerSGD
from potluck.sampling.stragglers import Stragglers
from potluck.sampling.uniform import UniformSampler
from potluck.updates.base import Chain

if TYPE_CHECKING:
    from potluck.client.program import ClientProgram
    from potluck.core.task import Task
    from potluck.data.federation import Federation


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

    def client_program(
        self, task: Task, federation: Federation, *, seed: int, finetune_epochs: int = 0
    ) -> ClientProgram:
        """What every client of a run executes: the same on every engine and on a deployed
        site (which passes a federation holding only its own data). ``finetune_epochs > 0``
        also fine-tunes the global model locally before evaluating it.

        Example:
            >>> import torch
            >>> from potluck.algorithms import fedavg
            >>> from potluck.core.task import Task
            >>> from potluck.data import Federation
            >>> fed = Federation.from_client_data([(torch.randn(8, 2), torch.arange(8) % 2)])
            >>> algo = fedavg(clients_per_round=1)
            >>> program = algo.client_program(Task(lambda: torch.nn.Linear(2, 2)), fed, seed=0)
            >>> program.rule.name
            'plain'
        """
        from potluck.client.program import ClientProgram

        finetune = None
        if finetune_epochs:
            finetune = replace(self.local, epochs=finetune_epochs, max_steps=None)
        return ClientProgram(
            task,
            federation,
            self.local,
            rule=self.rule,
            transforms=self.transforms,
            finetune=finetune,
            seed=seed,
        )
