"""The engine protocol and the engine registry.

An engine runs a ``ClientProgram`` for a cohort: ``train`` returns one ``ClientResult``
(encoded upload and new client state) per cohort member, in cohort order; ``evaluate`` one
``EvalResult`` per client.

Example:
    >>> available_engines()
    ['inline', 'vectorized']
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from potluck.client.program import ClientProgram, ClientResult, EvalResult, RoundInput
from potluck.client.rules import Tensors


class Engine(Protocol):
    """Executes client work; interchangeable by construction (same program, same seeds)."""

    name: str

    def train(self, job: RoundInput) -> list[ClientResult]: ...

    def evaluate(
        self, clients: np.ndarray, w: torch.Tensor, states: tuple[Tensors, ...]
    ) -> list[dict[str, EvalResult]]: ...

    def close(self) -> None: ...


def available_engines() -> list[str]:
    return ["inline", "vectorized"]


def make_engine(name: str, program: ClientProgram) -> Engine:
    """Engine ``name`` running ``program``; a clear error for unknown names."""
    if name == "inline":
        from potluck.engines.inline import InlineEngine

        return InlineEngine(program)
    if name == "vectorized":
        from potluck.engines.vectorized import VectorizedEngine

        return VectorizedEngine(program)
    raise ValueError(f"unknown engine {name!r}; available: {', '.join(available_engines())}")
