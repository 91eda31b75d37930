"""The inline engine: clients run one after another in this process, on one model instance.

Weights are loaded by passing the flat vector to the program (no per-client model
construction, no serialisation).

Example:
    >>> import numpy as np
    >>> import torch
    >>> from potluck.client import ClientProgram, LocalSGD
    >>> from potluck.client.program import RoundInput
    >>> from potluck.core.task import Task
    >>> from potluck.data import Federation
    >>> fed = Federation.from_client_data([(torch.randn(8, 2), torch.arange(8) % 2)] * 3)
    >>> engine = InlineEngine(ClientProgram(Task(lambda: torch.nn.Linear(2, 2)), fed, LocalSGD()))
    >>> job = RoundInput(1, torch.zeros(6), np.array([0, 2]), {}, ({}, {}), np.ones(2))
    >>> len(engine.train(job))
    2
"""

from __future__ import annotations

import numpy as np
import torch

from potluck.client.program import ClientProgram, ClientResult, EvalResult, RoundInput
from potluck.client.rules import Tensors


class InlineEngine:
    """Sequential execution in the calling process."""

    name = "inline"
    remote = False

    def __init__(self, program: ClientProgram) -> None:
        self.program = program

    def train(self, job: RoundInput) -> list[ClientResult]:
        return self.program.run_round(job)

    def evaluate(
        self, clients: np.ndarray, w: torch.Tensor, states: tuple[Tensors, ...]
    ) -> list[dict[str, EvalResult]]:
        return self.program.evaluate_clients(clients, w, states)

    def evaluate_test(self, w: torch.Tensor) -> EvalResult:
        """Centralised evaluation in this process."""
        return self.program.evaluate_test(w)

    def close(self) -> None:
        """Nothing to release."""
