"""The inline engine: clients run one after another in this process, on one model instance.

Weights are loaded by passing the flat vector to the program (no per-client model
construction, no serialisation).

Example:
    >>> import numpy as np
    >>> import torch
    >>> from potluck.algorithms import fedavg
    >>> from potluck.client import ClientProgram
    >>> from potluck.core.message import Message
    >>> from potluck.core.records import StageJob
    >>> from potluck.core.task import Task
    >>> from potluck.data import Federation
    >>> fed = Federation.from_client_data([(torch.randn(8, 2), torch.arange(8) % 2)] * 3)
    >>> engine = InlineEngine(ClientProgram(Task(lambda: torch.nn.Linear(2, 2)), fed, fedavg()))
    >>> job = StageJob("train", 1, Message({"w": torch.zeros(6)}), np.array([0, 2]),
    ...                (Message(), Message()), ({}, {}))
    >>> len(engine.run_stage(job))
    2
"""

from __future__ import annotations

import numpy as np
import torch

from potluck.client.program import ClientProgram, EvalResult
from potluck.core.records import Reply, StageJob


class InlineEngine:
    """Sequential execution in the calling process."""

    name = "inline"
    remote = False

    def __init__(self, program: ClientProgram) -> None:
        self.program = program

    def run_stage(self, job: StageJob) -> list[Reply | None]:
        return self.program.run_stage(job)

    def evaluate_test(self, w: torch.Tensor, rows: np.ndarray | None = None) -> EvalResult:
        """Centralised evaluation in this process."""
        return self.program.evaluate_test(w, rows)

    def close(self) -> None:
        """Nothing to release."""
