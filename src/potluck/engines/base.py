"""The engine protocol, the engine registry and the ``auto`` choice.

An engine runs a ``ClientProgram`` for a cohort: ``train`` returns one ``ClientResult``
(encoded upload and new client state) per cohort member, in cohort order; ``evaluate`` one
``EvalResult`` per client; ``evaluate_test`` the sums on the held-out test set.

Example:
    >>> available_engines()[:3]
    ['inline', 'vectorized', 'pool']
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch.nn.modules.conv import _ConvNd

from potluck.client.program import ClientProgram, ClientResult, EvalResult, RoundInput
from potluck.client.rules import LocalRule, Tensors

ENGINES = ("inline", "vectorized", "pool", "ray")


class Engine(Protocol):
    """Executes client work; interchangeable by construction (same program, same seeds).

    ``train`` and ``evaluate`` return one entry per client, in order; a ``remote`` engine
    (clients across a network) may return None for a client that failed or missed the
    deadline, and the server then refuses that client's bad updates instead of stopping.
    """

    name: str
    remote: bool

    def train(self, job: RoundInput) -> Sequence[ClientResult | None]: ...

    def evaluate(
        self, clients: np.ndarray, w: torch.Tensor, states: tuple[Tensors, ...]
    ) -> Sequence[dict[str, EvalResult] | None]: ...

    def evaluate_test(self, w: torch.Tensor) -> EvalResult:
        """The centralised evaluation (``ClientProgram.evaluate_test``), where it is fastest."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class EngineOptions:
    """How an engine runs: ``workers`` (pool and ray; default one per core), the torch
    ``threads`` budget of the run (pool workers get ``threads // workers`` each, at least 1),
    and a Ray cluster's ``ray_address`` (default: start a local Ray)."""

    workers: int | None = None
    threads: int | None = None
    ray_address: str | None = None

    def __post_init__(self) -> None:
        for key in ("workers", "threads"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"engine option {key} must be >= 1, got {value}")

    def per_worker_threads(self, workers: int) -> int:
        return max(1, (self.threads or torch.get_num_threads()) // workers)


def available_engines() -> list[str]:
    """Engines that can run here (``ray`` only when the ``ray`` package is installed)."""
    return [e for e in ENGINES if e != "ray" or importlib.util.find_spec("ray") is not None]


def make_engine(name: str, program: ClientProgram, options: EngineOptions | None = None) -> Engine:
    """Engine ``name`` running ``program``; a clear error for unknown names."""
    opts = options or EngineOptions()
    if name == "inline":
        from potluck.engines.inline import InlineEngine

        return InlineEngine(program)
    if name == "vectorized":
        from potluck.engines.vectorized import VectorizedEngine

        return VectorizedEngine(program)
    if name == "pool":
        from potluck.engines.pool import PoolEngine, usable_cores

        workers = opts.workers or usable_cores()
        return PoolEngine(program, workers, threads=opts.per_worker_threads(workers))
    if name == "ray":
        if "ray" not in available_engines():
            raise ValueError('engine "ray" needs the ray package: pip install "potluck[ray]"')
        from potluck.engines.ray import RayEngine

        return RayEngine(program, opts)
    hint = {
        "auto": ' ("auto" is resolved by the orchestrator: resolve_engine)',
        "grpc": ' ("grpc" has real clients: start the run with potluck server)',
    }.get(name, "")
    raise ValueError(f"unknown engine {name!r}; available: {', '.join(available_engines())}{hint}")


VECTORIZE_MIN_STEPS = 20_000  # local steps in a run that amortise torch.func's ~1 s start


def choose_engine(
    model: torch.nn.Module,
    rule: LocalRule,
    cohort_size: int,
    options: EngineOptions,
    run_steps: int | None = None,
) -> tuple[str, str]:
    """The engine ``engine = "auto"`` runs an experiment on, and why (deterministic: the same
    experiment on the same machine always gets the same engine, so runs stay reproducible).

    Measured on CPU (BENCHMARKS.md): the vectorized engine trains MLPs and logistic regression
    2.0-2.4x faster than the inline engine once started, but its first step costs about 1 s
    (``torch.func`` loads its compiler stack), so it pays only in runs of at least
    ``VECTORIZE_MIN_STEPS`` local steps (``run_steps``: rounds x cohort x steps per client);
    LeNet's convolutions become grouped convolutions under ``vmap`` and run 1.6x slower;
    pool workers run one client per core.

    Example:
        >>> from potluck.client.rules import PlainRule
        >>> choose_engine(torch.nn.Linear(4, 2), PlainRule(), 10, EngineOptions(), 10**6)[0]
        'vectorized'
    """
    from potluck.engines.pool import usable_cores
    from potluck.engines.vectorized import vectorizing_problem

    if options.ray_address:
        return "ray", f"a Ray cluster address was given ({options.ray_address})"
    if cohort_size < 2:
        return "inline", "one client per round: there is nothing to run side by side"
    problem = vectorizing_problem(model, rule)
    convs = [n for n, m in model.named_modules() if isinstance(m, _ConvNd)]
    short = run_steps is not None and run_steps < VECTORIZE_MIN_STEPS
    if problem is None and not convs and not short:
        return "vectorized", (
            f"{cohort_size} clients per round of a model without convolutions train as one "
            "batched computation"
        )
    if problem is not None:
        why_not = problem
    elif convs:
        why_not = (
            f"convolutions (module {convs[0]!r}) run slower batched under vmap on CPU than "
            "one client at a time"
        )
    else:
        why_not = (
            f"{run_steps:,} local steps in the run are too few to amortise the vectorized "
            f"engine's start (about 1 s; it pays from {VECTORIZE_MIN_STEPS:,})"
        )
    workers = options.workers or usable_cores()
    if workers >= 2:
        return "pool", f"not vectorized: {why_not}; {workers} worker processes train side by side"
    return "inline", f"not vectorized: {why_not}; one core, so no pool"
