"""The engine protocol, the engine registry and the ``auto`` choice.

An engine runs a ``ClientProgram`` for the members of a stage: ``run_stage`` returns one
``Reply`` (upload and new client state) per member, in order, or ``None`` for a member that
dropped out; ``evaluate_test`` the sums on the held-out test set. Engines register by name
(``register("engine", name)`` on a factory ``(program, options) -> Engine``), so a user's
engine is named by import path like any part.

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
from torch.nn.modules.rnn import RNNBase

from potluck.client.program import ClientProgram, EvalResult
from potluck.core import registry
from potluck.core.device import HOST, fork_problem, resolve_device
from potluck.core.records import Reply, StageJob

ENGINES = ("inline", "vectorized", "pool", "ray")


class Engine(Protocol):
    """Executes client work; interchangeable by construction (same program, same seeds).

    ``run_stage`` returns one entry per member, in order; ``None`` is a member that dropped
    out (a part's stage may decline; a ``remote`` engine's client may fail or miss the
    deadline, and the server then refuses that client's bad answers instead of stopping).
    """

    name: str
    remote: bool

    def run_stage(self, job: StageJob) -> Sequence[Reply | None]: ...

    def evaluate_test(self, w: torch.Tensor, rows: np.ndarray | None = None) -> EvalResult:
        """The centralised evaluation (``ClientProgram.evaluate_test``), where it is fastest;
        on the test ``rows`` if given (``evaluation.test_examples``), else on all of them."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class EngineOptions:
    """How an engine runs: ``workers`` (pool and ray; default one per core), the torch
    ``threads`` budget of the run (pool workers get ``threads // workers`` each, at least 1),
    a Ray cluster's ``ray_address`` (default: start a local Ray) and the ``device`` the
    inline and vectorized engines train and evaluate on (``run.device``)."""

    workers: int | None = None
    threads: int | None = None
    ray_address: str | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        for key in ("workers", "threads"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"engine option {key} must be >= 1, got {value}")
        resolve_device(self.device)

    @property
    def on_host(self) -> bool:
        """Whether the run trains on the CPU."""
        return resolve_device(self.device) == HOST

    def host_only(self, engine: str) -> None:
        """Refuse an accelerator for ``engine``, whose workers train on CPU."""
        if not self.on_host:
            raise ValueError(
                f"run.device = {self.device!r}: engine {engine!r} trains in CPU worker "
                'processes; use engine = "vectorized" or "inline" (or "auto") on an accelerator'
            )

    def per_worker_threads(self, workers: int) -> int:
        return max(1, (self.threads or torch.get_num_threads()) // workers)


def available_engines() -> list[str]:
    """Engines that can run here (``ray`` only when the ``ray`` package is installed)."""
    return [e for e in ENGINES if e != "ray" or importlib.util.find_spec("ray") is not None]


def make_engine(name: str, program: ClientProgram, options: EngineOptions | None = None) -> Engine:
    """Engine ``name`` (registered, or an import path) running ``program``."""
    hint = {
        "auto": ' ("auto" is resolved by the orchestrator: resolve_engine)',
        "grpc": ' ("grpc" has real clients: start the run with potluck server)',
    }.get(name)
    if hint is not None:
        raise ValueError(f"engine {name!r} cannot be made here{hint}")
    factory = registry.lookup("engine", name, "run.engine")
    engine: Engine = factory(program, options or EngineOptions())
    return engine


@registry.register("engine", "inline")
def _inline(program: ClientProgram, options: EngineOptions) -> Engine:
    from potluck.engines.inline import InlineEngine

    program.place(options.device)
    return InlineEngine(program)


@registry.register("engine", "vectorized")
def _vectorized(program: ClientProgram, options: EngineOptions) -> Engine:
    from potluck.engines.vectorized import VectorizedEngine

    program.place(options.device)
    return VectorizedEngine(program)


@registry.register("engine", "pool")
def _pool(program: ClientProgram, options: EngineOptions) -> Engine:
    from potluck.engines.pool import PoolEngine, usable_cores

    options.host_only("pool")
    workers = options.workers or usable_cores()
    return PoolEngine(program, workers, threads=options.per_worker_threads(workers))


@registry.register("engine", "ray")
def _ray(program: ClientProgram, options: EngineOptions) -> Engine:
    options.host_only("ray")  # refused on an accelerator whether or not ray is installed
    if "ray" not in available_engines():
        raise ValueError('engine "ray" needs the ray package: pip install "potluck[ray]"')
    from potluck.engines.ray import RayEngine

    return RayEngine(program, options)


VECTORIZE_MIN_STEPS = 20_000  # local steps in a run that amortise torch.func's ~1 s start


def choose_engine(
    program: ClientProgram,
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
    recurrent layers have no batching rule (an LSTM ran 3.7x slower vectorized than inline);
    pool workers run one client per core.

    Example:
        >>> from potluck.algorithms import fedavg
        >>> from potluck.core.task import Task
        >>> from potluck.data import Federation
        >>> fed = Federation.from_client_data([(torch.randn(8, 4), torch.arange(8) % 2)] * 3)
        >>> program = ClientProgram(Task(lambda: torch.nn.Linear(4, 2)), fed, fedavg())
        >>> choose_engine(program, 10, EngineOptions(), 10**6)[0]
        'vectorized'
    """
    from potluck.engines.pool import usable_cores
    from potluck.engines.vectorized import vectorizing_problem

    if options.ray_address:
        return "ray", f"a Ray cluster address was given ({options.ray_address})"
    if cohort_size < 2:
        return "inline", "one client per round: there is nothing to run side by side"
    if not options.on_host:
        return _accelerated(program, cohort_size, options.device)
    model = program.model
    convs = [n for n, m in model.named_modules() if isinstance(m, _ConvNd | RNNBase)]
    short = run_steps is not None and run_steps < VECTORIZE_MIN_STEPS
    problem = vectorizing_problem(program, probe=not convs and not short)
    if problem is None and not convs and not short:
        return "vectorized", (
            f"{cohort_size} clients per round of a model without convolutions train as one "
            "batched computation"
        )
    if problem is not None:
        why_not = problem
    elif convs:
        kind = type(dict(model.named_modules())[convs[0]]).__name__
        why_not = (
            f"{kind} layers (module {convs[0]!r}) run slower batched under vmap on CPU than "
            "one client at a time"
        )
    else:
        why_not = (
            f"{run_steps:,} local steps in the run are too few to amortise the vectorized "
            f"engine's start (about 1 s; it pays from {VECTORIZE_MIN_STEPS:,})"
        )
    workers = options.workers or usable_cores()
    if workers < 2:
        return "inline", f"not vectorized: {why_not}; one core, so no pool"
    if (unforkable := fork_problem()) is not None:
        return "inline", f"not vectorized: {why_not}; no pool: {unforkable}"
    return "pool", f"not vectorized: {why_not}; {workers} worker processes train side by side"


def _accelerated(program: ClientProgram, cohort_size: int, device: str) -> tuple[str, str]:
    """``auto`` on an accelerator: the vectorized engine where it can batch the cohort
    (convolutions too: ``vmap`` makes them grouped convolutions, which a GPU runs as one
    kernel), else inline; the pool and Ray train on CPU."""
    from potluck.engines.vectorized import vectorizing_problem

    problem = vectorizing_problem(program, probe=True)
    if problem is None:
        return "vectorized", f"{cohort_size} clients per round train as one batched {device} step"
    return "inline", f"not vectorized: {problem}; one client at a time on {device}"
