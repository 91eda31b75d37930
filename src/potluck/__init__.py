"""potluck: federated learning that moves the model to the data.

Importing ``potluck`` is cheap; heavy modules (torch, grpc) load only where used.

Example:
    >>> import potluck
    >>> potluck.__version__
    '0.1.0'
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "Task": "potluck.core.task",
    "ParamSpec": "potluck.core.params",
    "Federation": "potluck.data.federation",
    "Experiment": "potluck.orchestrator",
    "run_experiment": "potluck.orchestrator",
    "resume_experiment": "potluck.orchestrator",
    "ExperimentConfig": "potluck.config",
    "RunStore": "potluck.store.sqlite",
}

if TYPE_CHECKING:
    from potluck.config import ExperimentConfig
    from potluck.core.params import ParamSpec
    from potluck.core.task import Task
    from potluck.data.federation import Federation
    from potluck.orchestrator import Experiment, resume_experiment, run_experiment
    from potluck.store.sqlite import RunStore


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'potluck' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "Experiment",
    "ExperimentConfig",
    "Federation",
    "ParamSpec",
    "RunStore",
    "Task",
    "__version__",
    "resume_experiment",
    "run_experiment",
]
