"""potluck: federated learning that moves the model to the data.

Importing ``potluck`` is cheap; heavy modules (torch, grpc) load only where used.

The part protocols (``Sampler``, ``GradientTerm``, ``Transform``, ``Aggregator``,
``ServerOptimizer``, ...) are what a new method implements; ``Algorithm`` composes them.

Example:
    >>> import potluck
    >>> potluck.__version__
    '0.1.0'
    >>> from potluck import Aggregator, Algorithm, Evaluation, Message, RunResult
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "Task": "potluck.core.task",
    "ParamSpec": "potluck.core.params",
    "Message": "potluck.core.message",
    "Context": "potluck.core.parts",
    "Need": "potluck.core.parts",
    "Sampler": "potluck.core.parts",
    "LocalOptimizer": "potluck.core.parts",
    "GradientTerm": "potluck.core.parts",
    "Transform": "potluck.core.parts",
    "Downlink": "potluck.core.parts",
    "Aggregator": "potluck.core.parts",
    "ServerOptimizer": "potluck.core.parts",
    "Term": "potluck.client.terms",
    "Algorithm": "potluck.algorithms.base",
    "Federation": "potluck.data.federation",
    "Experiment": "potluck.orchestrator",
    "Evaluation": "potluck.orchestrator",
    "RunResult": "potluck.orchestrator",
    "run_experiment": "potluck.orchestrator",
    "resume_experiment": "potluck.orchestrator",
    "ExperimentConfig": "potluck.config",
    "RunStore": "potluck.store.sqlite",
}

if TYPE_CHECKING:
    from potluck.algorithms.base import Algorithm
    from potluck.client.terms import Term
    from potluck.config import ExperimentConfig
    from potluck.core.message import Message
    from potluck.core.params import ParamSpec
    from potluck.core.parts import (
        Aggregator,
        Context,
        Downlink,
        GradientTerm,
        LocalOptimizer,
        Need,
        Sampler,
        ServerOptimizer,
        Transform,
    )
    from potluck.core.task import Task
    from potluck.data.federation import Federation
    from potluck.orchestrator import (
        Evaluation,
        Experiment,
        RunResult,
        resume_experiment,
        run_experiment,
    )
    from potluck.store.sqlite import RunStore


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'potluck' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "Aggregator",
    "Algorithm",
    "Context",
    "Downlink",
    "Evaluation",
    "Experiment",
    "ExperimentConfig",
    "Federation",
    "GradientTerm",
    "LocalOptimizer",
    "Message",
    "Need",
    "ParamSpec",
    "RunResult",
    "RunStore",
    "Sampler",
    "ServerOptimizer",
    "Task",
    "Term",
    "Transform",
    "__version__",
    "resume_experiment",
    "run_experiment",
]
