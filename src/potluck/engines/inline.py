"""The inline engine: clients run one after another in this process, on one model instance.

Weights are loaded by passing the flat vector to the program (no per-client model
construction, no serialisation).

Example:
    >>> import numpy as np
    >>> import torch
    >>> from potluck.client import ClientProgram, LocalSGD
    >>> from potluck.core.task import Task
    >>> from potluck.data import Federation
    >>> fed = Federation.from_client_data([(torch.randn(8, 2), torch.arange(8) % 2)] * 3)
    >>> engine = InlineEngine(ClientProgram(Task(lambda: torch.nn.Linear(2, 2)), fed, LocalSGD()))
    >>> len(engine.train(np.array([0, 2]), torch.zeros(6), round=1))
    2
"""

from __future__ import annotations

import numpy as np
import torch

from potluck.client.program import ClientProgram, EvalResult
from potluck.core.message import Message


class InlineEngine:
    """Sequential execution in the calling process."""

    name = "inline"

    def __init__(self, program: ClientProgram) -> None:
        self.program = program

    def train(self, cohort: np.ndarray, w: torch.Tensor, round: int) -> list[Message]:
        return [self.program.train(int(cid), w, round) for cid in cohort]

    def evaluate(self, clients: np.ndarray, w: torch.Tensor) -> list[EvalResult]:
        return [self.program.evaluate(int(cid), w) for cid in clients]

    def close(self) -> None:
        """Nothing to release."""
