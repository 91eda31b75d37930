"""The round loop: sample, run the round's stages, aggregate, step, evaluate, commit.

A round samples a cohort, lets parts with stages of their own run them (``before_train``),
runs the ``train`` stage on the engine, lets parts finish their stages (``after_train``),
decodes and validates the updates, aggregates them, decodes the aggregate, lets the terms'
server halves move it and the server optimizer step. Each round is committed to the run
store (metrics, per-client metrics, the client states it produced, and a checkpoint with
every part's server state in its own named slots) before the next begins;
``resume_experiment`` continues a killed run from its last checkpoint and ends with the
same metrics as an uninterrupted run.

Example:
    >>> import torch
    >>> from potluck import Experiment, Task, run_experiment
    >>> from potluck.algorithms import fedavg
    >>> from potluck.data import Federation
    >>> g = torch.Generator().manual_seed(0)
    >>> clients = [(torch.randn(30, 4, generator=g), torch.randint(0, 3, (30,), generator=g))
    ...            for _ in range(6)]
    >>> exp = Experiment(
    ...     task=Task(lambda: torch.nn.Linear(4, 3)),
    ...     federation=Federation.from_client_data(clients, test_fraction=0.2),
    ...     algorithm=fedavg(clients_per_round=3, lr=0.1),
    ...     rounds=2,
    ... )
    >>> result = run_experiment(exp)
    >>> sorted(result.history[-1])[:3]
    ['bytes_down', 'bytes_total', 'bytes_up']
    >>> sorted(result.state_dict())
    ['bias', 'weight']
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from potluck.aggregate import cohort
from potluck.aggregate.anomaly import Detection, anomaly_scores
from potluck.aggregate.byzantine import byzantine_count
from potluck.aggregate.stack import StackBuffer
from potluck.algorithms.base import Algorithm
from potluck.attacks.poisoning import Attack, attack_context, check_attack
from potluck.client.program import ClientProgram, EvalResult, parse_evaluation
from potluck.core.clock import KEPT, ClockPolicy
from potluck.core.device import HOST, aggregation_device, on_device, resolve_device
from potluck.core.message import Message, MessageError
from potluck.core.params import ParamSpec
from potluck.core.parts import (
    Context,
    Contributions,
    Need,
    RoundAborted,
    State,
    gives,
    part_context,
)
from potluck.core.records import EVALUATE, TRAIN, ClientState, Reply, StageJob, by_namespace
from potluck.core.seeding import Seeds
from potluck.core.task import Task
from potluck.data.federation import Federation
from potluck.data.profiles import LognormalProfiles, TraceProfiles
from potluck.deploy import rounds
from potluck.engines.base import Engine, EngineOptions, choose_engine, make_engine
from potluck.monitor import DriftScenario, Monitoring, ShiftTracker, drift, round_figures
from potluck.monitor.distances import update_distances
from potluck.monitor.rounds import summarises, summary_options
from potluck.privacy import ledger as privacy
from potluck.privacy.distributed import DistributedLedger
from potluck.privacy.ledger import PrivacyBudget
from potluck.privacy.participation import ParticipationLedger
from potluck.sampling import clock as virtual
from potluck.sampling.asynchrony import Asynchrony
from potluck.store.checkpoint import Checkpoint
from potluck.store.sqlite import ResumePoint, RunStore

if TYPE_CHECKING:
    from potluck.buffered import AsyncDriver

_log = logging.getLogger("potluck")

EngineFactory = Callable[[ClientProgram], Engine]
RoundCallback = Callable[[int, Mapping[str, float]], None]
# (round, the global weights the cohort started from, each accepted update as decoded)
UpdateObserver = Callable[[int, torch.Tensor, Mapping[int, Message]], None]
TIMING_METRICS = frozenset({"round_seconds"})
REMOTE_METRICS = frozenset({"failed", "refused", "capped"})  # of rounds with remote members
_COUNTS = ("num_examples", "num_steps", "weight")  # scalars of every update, >= 0
PerClient = list[tuple[int, dict[str, float]]]


@dataclass(frozen=True)
class Evaluation:
    """When and how the global model is evaluated.

    ``every``: every k rounds (and always after the last). ``centralized``: on the held-out
    test set. ``federated_clients``: how many clients' local test sets (sampled each time;
    0 = none, -1 = all) give a weighted federated accuracy, and a personalised one where a
    term keeps personal models. ``finetune_epochs``: also report the accuracy after that
    many epochs of local fine-tuning of the global model (0 = off). ``test_examples``: the
    centralised evaluation on that many test examples drawn once from the run seed (the
    same sample every round, so the curve moves only with the model; default: all).
    """

    every: int = 1
    centralized: bool = True
    federated_clients: int = 0
    finetune_epochs: int = 0
    test_examples: int | None = None

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"evaluation.every must be >= 1, got {self.every}")
        if self.federated_clients < -1:
            raise ValueError("evaluation.federated_clients must be >= 0, or -1 for all")
        if self.finetune_epochs < 0:
            raise ValueError("evaluation.finetune_epochs must be >= 0")
        if self.test_examples is not None and self.test_examples < 1:
            raise ValueError(f"evaluation.test_examples must be >= 1, got {self.test_examples}")

    def test_rows(self, test_size: int, seed: int) -> np.ndarray | None:
        """The test rows of the centralised evaluation, ascending (``None``: all of them).

        Example:
            >>> Evaluation(test_examples=3).test_rows(10, seed=0).tolist()
            [0, 7, 9]
        """
        k = self.test_examples
        if k is None or k == test_size:
            return None
        if k > test_size:
            raise ValueError(
                f"evaluation.test_examples = {k}: the test set holds {test_size} examples"
            )
        return np.sort(Seeds(seed).numpy("test_sample").choice(test_size, size=k, replace=False))

    def due(self, rnd: int, rounds: int) -> bool:
        return rnd % self.every == 0 or rnd == rounds


@dataclass(frozen=True)
class Experiment:
    """Everything a run needs: task, federation, algorithm, schedule, seed and engine.

    ``config`` is the experiment's config when it came from one (``ExperimentConfig.build``);
    otherwise ``describe`` writes one from the parts, naming what has no name.
    """

    task: Task
    federation: Federation
    algorithm: Algorithm
    rounds: int
    seed: int = 0
    evaluation: Evaluation = field(default_factory=Evaluation)
    engine: str = "inline"
    workers: int | None = None
    ray_address: str | None = None
    checkpoint_every: int = 1
    threads: int | None = None
    device: str = "cpu"
    min_updates: int = 1
    max_update_norm: float | None = None
    max_weight: float | None = None
    max_norm_ratio: float | None = 10.0
    max_weight_ratio: float | None = 10.0
    privacy: PrivacyBudget | None = None
    attack: Attack | None = None
    detection: Detection = field(default_factory=Detection)
    monitoring: Monitoring = field(default_factory=Monitoring)
    drift: DriftScenario | None = None
    clock: ClockPolicy | None = None
    profiles: LognormalProfiles | TraceProfiles | None = None
    asynchrony: Asynchrony | None = None
    name: str | None = None
    config: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.min_updates < 1:
            raise ValueError(f"min_updates must be >= 1, got {self.min_updates}")
        for bound in ("max_update_norm", "max_weight"):
            value = getattr(self, bound)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{bound} must be a finite number > 0 or None, got {value}")
        for ratio in ("max_norm_ratio", "max_weight_ratio"):
            value = getattr(self, ratio)
            if value is not None and not (math.isfinite(value) and value >= 1):
                raise ValueError(f"{ratio} must be a finite number >= 1 or None, got {value}")
        if not isinstance(self.algorithm, Algorithm):
            raise TypeError(
                f"algorithm must be a potluck Algorithm (e.g. potluck.algorithms.fedavg(...)),"
                f" got {type(self.algorithm).__name__}"
            )
        options = self.engine_options  # validates them
        if self.engine in ("pool", "ray"):
            options.host_only(self.engine)
        self.algorithm.sampler.cohort_size(self.federation.num_clients)
        if self.attack is not None:
            check_attack(self.attack)
        self._check_privacy()

    def _check_privacy(self) -> None:
        """A private mechanism (a private aggregator, a local DP transform) gets its budget
        (by default, delta 1e-5) and, with a ``target_epsilon``, its calibrated noise; a
        budget without one is refused."""
        algo, budget = self.algorithm, self.privacy
        found = privacy.private_mechanism(algo)
        if found is None:
            if budget is not None:
                raise ValueError(
                    "privacy: a budget needs a private mechanism (aggregator dp_mean, "
                    "dp_mean_adaptive or dp_ftrl, or a local_dp, dskellam or central_dp "
                    "transform); this algorithm has none (aggregator "
                    f"{type(algo.aggregator).__name__})"
                )
            return
        if Need.FIXED_DENOMINATOR in gives(found[1]) and self.min_updates > 1:
            raise ValueError(
                f"min_updates = {self.min_updates}: with central DP every round's noised sum is "
                "released, however few updates it has (skipping a round would depend on who "
                "took part, which the accountant does not cover); use min_updates = 1"
            )
        budget = budget or PrivacyBudget()
        prepared = privacy.prepare(algo, self.federation.num_clients, self.rounds, budget)
        object.__setattr__(self, "privacy", budget)
        object.__setattr__(self, "algorithm", prepared)

    @property
    def engine_options(self) -> EngineOptions:
        return EngineOptions(self.workers, self.threads, self.ray_address, self.device)

    def describe(self) -> dict[str, Any]:
        """A JSON-able record of the experiment: its config, from which ``potluck resume``
        rebuilds it. Where a piece has no name (a lambda, an in-memory federation), the
        record says under ``not_resumable`` what to name to make it resumable."""
        if self.config is not None:
            return dict(self.config)
        from potluck.config import describe_experiment

        return describe_experiment(self)


@dataclass
class RunResult:
    """The outcome of a run: its id, the final global weights, per-round metrics and, where
    a term keeps one, each client's personal model (flat, like ``weights``)."""

    run_id: str | None
    weights: torch.Tensor
    history: list[dict[str, float]]
    run_dir: Path | None = None
    spec: ParamSpec | None = None
    personal: dict[int, torch.Tensor] = field(default_factory=dict)
    stopped: str | None = None  # why the run ended before its last round (a privacy budget)

    @property
    def final(self) -> dict[str, float]:
        """The last round's metrics, with the latest evaluation carried forward."""
        merged: dict[str, float] = {}
        for metrics in self.history:
            merged.update(metrics)
        return merged

    def state_dict(self, client: int | None = None) -> dict[str, torch.Tensor]:
        """The trained model's parameters by name (``model.load_state_dict(...,
        strict=False)`` loads them); with ``client``, that client's personal model."""
        if self.spec is None:
            raise ValueError("this result has no parameter spec")
        if client is None:
            flat = self.weights
        elif client in self.personal:
            flat = self.personal[client]
        else:
            raise KeyError(
                f"client {client} has no personal model (clients with one: "
                f"{sorted(self.personal)[:10]}{'...' if len(self.personal) > 10 else ''})"
            )
        return {k: v.clone() for k, v in self.spec.unflatten(flat).items()}


@dataclass
class _State:
    """Everything the server carries from round to round (all of it checkpointed): the
    global weights and each part's server state, by namespace."""

    round: int
    w: torch.Tensor
    slots: dict[str, State]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"global": self.w}
        for ns, state in self.slots.items():
            out.update({f"{ns}/{k}": v for k, v in state.items()})
        return out

    @classmethod
    def from_checkpoint(cls, round: int, ckpt: Checkpoint) -> _State:
        if "global" not in ckpt.tensors:
            from potluck.store.checkpoint import CheckpointError

            raise CheckpointError(
                f"the checkpoint of round {round} has no 'global' tensor (it has "
                f"{sorted(ckpt.tensors)[:10]}): it was not written by potluck's round loop"
            )
        slots: dict[str, State] = {}
        for key, t in ckpt.tensors.items():
            if key != "global":
                ns, _, name = key.partition("/")
                slots.setdefault(ns, {})[name] = t
        return cls(round, ckpt.tensors["global"], slots)


@dataclass(frozen=True)
class _Update:
    """One accepted update, decoded and checked, with the L2 norms of its uploaded arrays
    (``norms``: each floating one's taken once at validation, for finiteness, the bounds,
    the cohort and the scores; an integer one's when a bound first asks, ``norm``)."""

    client: int
    message: Message
    weight: float
    metrics: dict[str, float]
    norms: dict[str, float] = field(default_factory=dict)

    def with_arrays(self, arrays: Mapping[str, torch.Tensor]) -> _Update:
        """This update with ``arrays`` in place of its own of those names (their norms taken
        again when asked: a crafted or rescaled delta is not the one validated)."""
        message = Message({**self.message.arrays, **arrays}, self.message.scalars)
        return replace(
            self, message=message, norms={k: v for k, v in self.norms.items() if k not in arrays}
        )

    def norm(self, name: str) -> float:
        """The L2 norm of the uploaded array ``name``."""
        if name not in self.norms:
            self.norms[name] = _norm(self.message.arrays[name])
        return self.norms[name]


def resolve_engine(experiment: Experiment) -> tuple[Experiment, str]:
    """``experiment`` with ``engine = "auto"`` replaced by the engine chosen for it (also in
    its config, so the stored run and its resume use that engine), and why.

    Example:
        >>> from potluck.config import ExperimentConfig
        >>> cfg = {"data": {"dataset": "digits", "num_clients": 10}, "model": {"name": "mlp"},
        ...        "rounds": 200, "client": {"epochs": 5}}
        >>> exp, why = resolve_engine(
        ...     ExperimentConfig.from_dict(cfg, ["run.engine='auto'"]).build())
        >>> exp.engine, exp.config["run"]["engine"]
        ('vectorized', 'vectorized')
    """
    if experiment.engine != "auto":
        return experiment, f"engine {experiment.engine!r} as configured"
    fed, algo = experiment.federation, experiment.algorithm
    cohort = algo.sampler.cohort_size(fed.num_clients)
    mean_examples = round(float(fed.num_examples_all().mean())) if fed.num_clients else 0
    run_steps = experiment.rounds * cohort * algo.local.num_steps(mean_examples)
    program = _program(experiment)
    name, why = choose_engine(program, cohort, experiment.engine_options, run_steps)
    config = experiment.config
    if config is not None and isinstance(config.get("run"), Mapping):
        config = {**config, "run": {**config["run"], "engine": name}}
    _log.info("engine auto: %s (%s)", name, why)
    return replace(experiment, engine=name, config=config), f"auto: {why}"


def _program(exp: Experiment) -> ClientProgram:
    return exp.algorithm.client_program(
        exp.task,
        exp.federation,
        seed=exp.seed,
        finetune_epochs=exp.evaluation.finetune_epochs,
        attack=exp.attack,
        summaries=summary_options(exp.monitoring),
        drift=exp.drift,
    )


def run_experiment(
    experiment: Experiment,
    store: RunStore | str | Path | None = None,
    *,
    on_round: RoundCallback | None = None,
    engine: EngineFactory | None = None,
    on_updates: UpdateObserver | None = None,
    progress: bool = True,
) -> RunResult:
    """Run ``experiment`` from round 1; record it in ``store`` if one is given.

    ``progress``: the CLI's progress bar on stderr while it runs (drawn only where stderr is
    a terminal).

    Without a store, client state (SCAFFOLD's ``c_i``, an error-feedback residual) is kept
    in memory for the run; give a store for large stateful federations. ``engine`` makes the
    engine from the client program instead of ``experiment.engine`` (the deployment server
    passes its gRPC engine this way). ``on_updates(round, w, updates)`` sees each round's
    accepted updates as the server does, decoded by the transforms, with the global weights
    ``w`` the cohort started from (``potluck.attacks.capture`` keeps chosen ones).
    """
    if engine is None:
        experiment, _ = resolve_engine(experiment)
    with _shown(progress, experiment.rounds, 0, on_round) as callback:
        loop = _Loop(experiment, callback, engine)  # builds the model: bad tasks fail here
        loop.on_updates = on_updates
        opened = _open(store)
        if opened is not None:
            loop.record_to(opened, opened.create_run(experiment.describe(), experiment.name))
        return loop.run(None)


@contextmanager
def _shown(
    progress: bool, rounds: int, done: int, on_round: RoundCallback | None
) -> Iterator[RoundCallback | None]:
    """``on_round``, also feeding a progress bar when ``progress``."""
    if not progress:
        yield on_round
        return
    from potluck.report.progress import RoundProgress

    with RoundProgress(rounds, done) as show:

        def both(rnd: int, metrics: Mapping[str, float]) -> None:
            show(rnd, metrics)
            if on_round is not None:
                on_round(rnd, metrics)

        yield both


def resume_experiment(
    experiment: Experiment,
    store: RunStore | str | Path,
    run_id: str,
    *,
    on_round: RoundCallback | None = None,
    engine: EngineFactory | None = None,
    fallback: bool = False,
    on_resume: Callable[[ResumePoint], None] | None = None,
    progress: bool = True,
) -> RunResult:
    """Continue stored run ``run_id`` from its last checkpoint to the end of ``experiment``.

    The checkpoint is verified against the store first (``RunStore.resume_point``: its
    SHA-256 and round). A damaged one is refused with a ``DamagedCheckpointError`` that
    names the file, the round and what is wrong, and which earlier checkpoint verifies;
    with ``fallback=True`` the run resumes after that one instead and the rounds after it
    are recomputed. Temporary files that a kill left in the run's checkpoint directory are
    removed. ``on_resume(point)`` is told where the run resumes just before the first round;
    without it, a fallback (and a checkpoint from before checksums, schema 5, verified by
    its structure and round only) is logged as a warning naming the round. ``progress``: as
    for ``run_experiment``.
    """
    opened = _open(store)
    assert opened is not None
    run_id = opened.resolve(run_id)
    opened.hold(run_id)  # a run executing in another process is refused (RunBusyError)
    try:
        point = opened.resume_point(run_id, fallback=fallback)
        start = None
        if point.checkpoint is not None:
            start = _State.from_checkpoint(point.round, point.checkpoint)
        if engine is None:
            experiment, _ = resolve_engine(experiment)
        with _shown(progress, experiment.rounds, point.round, on_round) as callback:
            loop = _Loop(experiment, callback, engine)
            return _resume(opened, run_id, point, start, loop, on_resume)
    except BaseException:
        opened.release(run_id)  # not executing here any more (a no-op once it failed)
        raise


def _resume(
    opened: RunStore,
    run_id: str,
    point: ResumePoint,
    start: _State | None,
    loop: _Loop,
    on_resume: Callable[[ResumePoint], None] | None,
) -> RunResult:
    opened.remove_stray_files(run_id)
    opened.truncate_after(run_id, point.round)
    if on_resume is not None:
        on_resume(point)
    else:
        for skipped in point.skipped:
            _log.warning("%s; falling back", skipped.problem)
        if point.checkpoint is not None and not point.checksum:
            _log.warning(
                "checkpoint %s has no recorded checksum (committed before schema 5): verified"
                " by its safetensors structure and round only",
                point.path,
            )
        log = _log.warning if point.skipped else _log.info
        log("run %s: resuming after round %d", run_id, point.round)
    opened.set_status(run_id, "running")
    loop.record_to(opened, run_id)
    return loop.run(start)


def _open(store: RunStore | str | Path | None) -> RunStore | None:
    if store is None or isinstance(store, RunStore):
        return store
    return RunStore(store)


class PartStages:
    """A round's stages as one part's server half drives them (its ``before_train`` and
    ``after_train`` hooks get one): ``run("commit")`` sends the part's stage ``commit`` (its
    ``client_stage`` answers on each client) to the round's current ``members`` and returns
    the answers of those that answered; the others have dropped out of the round. ``leave``
    puts a message in a member's inbox for the ``train`` stage (the part's ``encode`` finds
    it in ``ctx.inbox``, and the part's server ``decode`` of that member's upload too);
    ``tell_aggregator`` leaves a message for the aggregator's ``aggregate`` (its
    ``ctx.inbox``); ``state`` is a member's client state of the part (after the ``train``
    stage, the new one); ``report`` adds a round metric ``<namespace>/<name>``."""

    def __init__(self, stages: RoundStages, namespace: str) -> None:
        self._stages, self.namespace = stages, namespace

    @property
    def members(self) -> np.ndarray:
        return self._stages.members

    @property
    def round(self) -> int:
        return self._stages.round

    def run(
        self,
        stage: str,
        shared: Message | None = None,
        payloads: Mapping[int, Message] | None = None,
    ) -> dict[int, Message]:
        return self._stages.run(f"{self.namespace}:{stage}", shared, payloads)

    def leave(self, client: int, message: Message) -> None:
        self._stages.inbox.setdefault(int(client), {})[self.namespace] = message

    def tell_aggregator(self, message: Message) -> None:
        self._stages.told_aggregator = message

    def state(self, client: int) -> State:
        """This part's client state of member ``client`` as of the round's latest stage;
        refused for a part whose client state is secret from the server (``secret_state``)."""
        if self.namespace in self._stages.loop.secret:
            raise PermissionError(
                f"{self.namespace} keeps its client state secret from the server: its server "
                "half sees only what its stages answer"
            )
        return dict(self._stages.states[int(client)].get(self.namespace, {}))

    def report(self, name: str, value: float) -> None:
        self._stages.metrics[f"{self.namespace}/{name}"] = float(value)


class RoundStages:
    """The stages of one round: ``run`` sends a stage to the round's current ``members`` and
    returns the answers of those that answered (the others drop out of the round), keeping
    each member's client state and the bytes each way."""

    def __init__(self, loop: _Loop, engine: Engine, rnd: int, members: np.ndarray) -> None:
        self.loop, self.engine, self.round = loop, engine, rnd
        self.members = members
        self.states: dict[int, dict[str, State]] = {
            int(c): {ns: dict(s) for ns, s in st.items()}
            for c, st in zip(members, loop._client_states(members), strict=True)
        }
        self.changed: dict[int, set[str]] = {}
        self.inbox: dict[int, dict[str, Message]] = {}
        self.told_aggregator: Message | None = None
        self.metrics: dict[str, float] = {}
        self.refused: dict[str, int] = {}  # stage -> answers that arrived but were refused
        self.bytes_up: dict[int, int] = {}
        self.bytes_down: dict[int, int] = {}
        self.scores: dict[int, dict[str, float]] = {}  # client -> anomaly scores, flagged
        self.start, self.target = 0.0, 0  # on a virtual clock: the start, the answers kept
        self.batch: dict[int, int] = {}  # members' own batch sizes (adaptive_batch)
        self.settled: virtual.Settled | None = None

    def run(
        self,
        stage: str,
        shared: Message | None = None,
        payloads: Mapping[int, Message] | None = None,
    ) -> dict[int, Message]:
        """Stage ``stage`` (``"<namespace>:<name>"`` for a part's own) for every member."""
        replies = self._send(stage, shared or Message(), payloads or {})
        return {c: r.message for c, r in replies.items()}

    def _send(
        self, stage: str, shared: Message, payloads: Mapping[int, Message]
    ) -> dict[int, Reply]:
        job = self.job(stage, shared, payloads)
        answers = self.engine.run_stage(job) if len(job.clients) else []
        out = self.received(job, dict(zip((int(c) for c in job.clients), answers, strict=True)))
        self.members = np.array([c for c in job.clients if int(c) in out], dtype=np.int64)
        return out

    def job(self, stage: str, shared: Message, payloads: Mapping[int, Message]) -> StageJob:
        """Stage ``stage`` for every member, with its payload and client state."""
        clients = self.members
        own = tuple(payloads.get(int(c), Message()) for c in clients)
        states = tuple(self.states[int(c)] for c in clients)
        return StageJob(stage, self.round, shared, clients, own, states)

    def received(self, job: StageJob, answers: Mapping[int, Reply | None]) -> dict[int, Reply]:
        """The usable ``answers`` to ``job`` (by member; ``None``: none came): the bytes
        each way counted for every member it names, each new client state checked and
        kept."""
        out: dict[int, Reply] = {}
        shared_bytes = job.shared.wire_bytes
        for c, p in zip(job.clients, job.payloads, strict=True):
            cid = int(c)
            if cid not in answers:
                continue
            reply = answers[cid]
            self.bytes_down[cid] = self.bytes_down.get(cid, 0) + shared_bytes + p.wire_bytes
            if reply is None:
                continue
            try:
                if reply.refused:
                    raise MessageError(reply.refused)
                if reply.state:
                    self.loop._check_state(cid, reply, self.states[cid], self.engine.remote)
            except MessageError as exc:
                if not self.engine.remote:
                    raise
                _log.warning("refused %s", exc)
                self.refused[job.stage] = self.refused.get(job.stage, 0) + 1
                continue
            self.bytes_up[cid] = self.bytes_up.get(cid, 0) + reply.message.wire_bytes
            for ns, state in reply.state.items():
                self.states[cid][ns] = dict(state)
                self.changed.setdefault(cid, set()).add(ns)
            out[cid] = reply
        return out


class _Loop:
    """One execution of the round loop for an experiment."""

    def __init__(
        self, exp: Experiment, on_round: RoundCallback | None, engine: EngineFactory | None
    ) -> None:
        self.exp, self.on_round = exp, on_round
        self.on_updates: UpdateObserver | None = None
        self.store: RunStore | None = None
        self.run_id = ""
        self.memory_states: dict[int, dict[str, State]] = {}  # runs without a store
        self.seeds = Seeds(exp.seed)
        self.program = _program(exp)
        self.parts = dict(self.program.parts)  # bound to the model's parameters
        program = self.program
        self.terms = list(zip(program.term_ns, program.terms, strict=True))
        self.transforms = list(zip(program.transform_ns, program.transforms, strict=True))
        self.upload_arrays, self.upload_numbers, self.upload_dtypes = self._expected_upload()
        self.num_clients = exp.federation.num_clients
        self.staged = [(ns, p) for ns, p in self.parts.items() if hasattr(p, "before_train")]
        self.finishing = [(ns, p) for ns, p in self.parts.items() if hasattr(p, "after_train")]
        self.stateful = {ns for ns in self.parts if ns.startswith(("terms.", "transforms."))}
        self.stateful |= {ns for ns, p in self.parts.items() if hasattr(p, "client_stage")}
        # downlinks that send each member its own message (from their server state)
        self.member_downlinks = [
            (ns, p) for ns, p in self.parts.items() if hasattr(p, "encode_members")
        ]
        self.stateful |= {ns for ns, _ in self.member_downlinks}
        # parts whose client state is a round's secrets: kept between its stages, not stored
        self.secret = {ns for ns, p in self.parts.items() if getattr(p, "secret_state", False)}
        # parts whose client state a deployed site keeps to itself across rounds (stored in
        # a simulation, where it stands for the site's own memory)
        self.site_kept = {ns for ns, p in self.parts.items() if getattr(p, "site_state", False)}
        self.aggregator, self.ledger = self._private_aggregation()
        # the round's (K, d) updates, in memory reused each round, where they are aggregated
        self.stack = StackBuffer(aggregation_device(self.aggregator, resolve_device(exp.device)))
        root, train = getattr(self.aggregator, "root_examples", 0), exp.federation.source.train
        if root > len(train.y):
            raise ValueError(
                f"aggregator.root_examples = {root}: the server's root data is drawn from the "
                f"source's training set, which holds {len(train.y)} examples"
            )
        self.test_rows = exp.evaluation.test_rows(len(exp.federation.source.test), exp.seed)
        self.shifts, self.edges = self._monitoring()
        self.clock = self._virtual_clock()
        self.realtime: ClockPolicy | None = None  # deployed: [clock] on real time
        self.driver: AsyncDriver | None = None
        attack = exp.attack
        if attack is not None and attack.colludes and self.upload_dtypes["delta"] != torch.float32:
            raise ValueError(
                f"attack: {type(attack).__name__} crafts the decoded updates, but a transform "
                "encodes them for the aggregator (secure aggregation): the server never sees one"
            )
        # an engine that cannot run this experiment refuses here, before any run is stored
        if engine is not None:
            self.engine = engine(self.program)
        elif exp.engine == "auto":
            raise ValueError('engine "auto" must be resolved first: see resolve_engine')
        else:
            self.engine = make_engine(exp.engine, self.program, exp.engine_options)
        if exp.asynchrony is not None:
            self._drive_asynchronously(exp.asynchrony)
        if self.engine.remote:
            try:
                privacy.check_deployable(self.exp.algorithm)
                self.exp.monitoring.check_deployable()
                if exp.attack is not None:
                    raise ValueError(
                        "attack: in a deployment the malicious clients run the attack "
                        "(potluck client --attack NAME); the server's experiment has none"
                    )
                self._on_real_time(exp)
            except ValueError:
                self.engine.close()
                raise

    def _monitoring(self) -> tuple[ShiftTracker | None, torch.Tensor]:
        """The checks of ``[monitoring]`` and, with summaries, the server's shift tracker
        and the feature bins at the quantiles of its test set."""
        exp, options = self.exp, self.exp.monitoring
        options.check_clients(self.num_clients)
        if not options.summaries:
            return None, torch.zeros(0)
        if exp.privacy is not None or self.ledger is not None:
            raise ValueError(
                "monitoring.summaries: the clients' data summaries are not accounted by the "
                "privacy ledger; a run with a privacy budget cannot release them"
            )
        if exp.asynchrony is not None:
            raise ValueError("monitoring.summaries needs synchronous rounds (no [async])")
        test = exp.federation.source.test
        edges = drift.feature_edges(test.features(None), options.summary_bins, exp.seed)
        return ShiftTracker(), edges

    def _summaries(self, engine: Engine, rnd: int, clients: Sequence[int]) -> PerClient:
        """The ``summarize`` stage for ``clients``: each one's summary and its shift from
        its first one (a remote member's malformed answer is refused and logged)."""
        tracker, classes = self.shifts, self.exp.federation.source.num_classes
        if tracker is None or not clients:
            return []
        members = np.array(sorted(clients), dtype=np.int64)
        job = StageJob(
            drift.SUMMARIZE,
            rnd,
            drift.summary_request(classes, self.edges),
            members,
            tuple(Message() for _ in members),
            tuple({} for _ in members),
        )
        out: PerClient = []
        for c, reply in zip(members, engine.run_stage(job), strict=True):
            if reply is None:
                continue
            try:
                labels, feats = drift.read_summary(
                    reply.message, classes, len(self.edges) + 1, f"client {int(c)}"
                )
            except MessageError as exc:
                if not engine.remote:
                    raise
                _log.warning("refused %s", exc)
                continue
            label_shift, feature_shift = tracker.observe(int(c), labels, feats)
            shifts = {"label_shift": label_shift, "feature_shift": feature_shift}
            out.append((int(c), {**shifts, **drift.summary_metrics(labels, feats)}))
        return out

    def _on_real_time(self, exp: Experiment) -> None:
        """A deployment's ``[clock]``: its deadline and over-selection on real time."""
        if exp.profiles is not None:
            raise ValueError("profiles: a deployment's devices are real, not drawn")
        if exp.clock is not None and self.driver is None:
            rounds.check_deployable(exp.clock)
            self.realtime, self.clock = exp.clock, None

    def _drive_asynchronously(self, policy: Asynchrony) -> None:
        """The asynchronous driver: on the virtual clock in a simulation, on the answers'
        real order in a deployment (where a clock or profiles are refused)."""
        from potluck import buffered

        try:
            if self.engine.remote:
                if self.exp.clock is not None or self.exp.profiles is not None:
                    raise ValueError(
                        "clock/profiles: a deployment runs on real time, its devices are real"
                    )
                self.clock = None
                buffered.check(self, policy)
                if self.exp.evaluation.federated_clients:
                    raise ValueError(
                        "async: deployed, federated evaluation would wait for sites that are "
                        "busy training; set evaluation.federated_clients = 0 (the server "
                        "evaluates centrally)"
                    )
                wait = float(getattr(self.engine, "round_timeout_s", 600.0))
                self.driver = buffered.RealTimeDriver(self, policy, wait_s=wait)
            else:
                buffered.check(self, policy)
                self.driver = buffered.AsyncDriver(self, policy)
        except ValueError:
            self.engine.close()
            raise

    def _virtual_clock(self) -> virtual.VirtualClock | None:
        """The experiment's devices and round policy on virtual time, if it has either;
        refused with what cannot work on it."""
        exp = self.exp
        if exp.clock is None and exp.profiles is None and exp.asynchrony is None:
            return None
        clock = virtual.VirtualClock(
            exp.clock or ClockPolicy(),
            exp.profiles or LognormalProfiles(),
            self.num_clients,
            exp.seed,
        )
        sampler = exp.algorithm.sampler
        name = type(sampler).__name__
        run_batch = getattr(exp.algorithm.local, "batch_size", None)
        if clock.policy.adaptive_batch and not isinstance(run_batch, int):
            raise ValueError(
                f"clock.adaptive_batch: the local optimizer's batch_size is {run_batch!r}, "
                "not a number of examples to scale"
            )
        if clock.policy.over_selection and not hasattr(sampler, "resized"):
            raise ValueError(f"clock.over_selection: the sampler {name} cannot be asked for more")
        if not clock.devices.always_available:
            if not getattr(sampler, "samples_available", False):
                raise ValueError(
                    f"profiles: devices that are not always online need a sampler that samples "
                    f"among the online ones; {name} does not (uniform does)"
                )
            if exp.privacy is not None:
                raise ValueError(
                    "profiles: sampling among the online devices is not the sampling the "
                    "privacy accountant assumes; give every device 24 available hours"
                )
        return clock

    def _private_aggregation(
        self,
    ) -> tuple[Any, privacy.Ledger | ParticipationLedger | DistributedLedger | None]:
        """The aggregator, with its denominator set to the expected cohort where it has a
        fixed one, and the privacy ledger of a private mechanism."""
        agg, sampler = self.exp.algorithm.aggregator, self.exp.algorithm.sampler
        if hasattr(agg, "bind_cohort"):
            agg = agg.bind_cohort(privacy.expected_cohort(sampler, self.num_clients))
        if self.exp.privacy is None:
            return agg, None
        return agg, privacy.ledger_for(self.exp.algorithm, self.num_clients, self.exp.privacy)

    def record_to(self, store: RunStore, run_id: str) -> None:
        """Commit every round to ``store`` under ``run_id``. An engine with an
        ``attach(store, run_id)`` method (the gRPC engine, for client health) is told where
        the run is recorded."""
        self.store, self.run_id = store, run_id
        if self.shifts is not None:  # a resumed run's clients keep their first summaries
            first = store.first_client_metrics(run_id, "label_hist_")
            feats = store.first_client_metrics(run_id, "feature_hist_")
            rows = {c: {**m, **feats.get(c, {})} for c, m in first.items()}
            classes = self.exp.federation.source.num_classes
            self.shifts.restore(rows, classes, len(self.edges) + 1)
        attach = getattr(self.engine, "attach", None)
        if attach is not None:
            attach(store, run_id)

    def run(self, start: _State | None) -> RunResult:
        exp = self.exp
        if exp.threads is not None:
            torch.set_num_threads(exp.threads)
        if start is None:
            start = self._initial_state()
        self.program.spec.check(start.w, "checkpointed global weights")
        history = [r.metrics for r in self.store.rounds(self.run_id)] if self.store else []
        engine, state, stopped = self.engine, start, None
        try:
            for rnd in range(start.round + 1, exp.rounds + 1):
                if self.ledger is not None:
                    stopped = self.ledger.admits(state.slots.get(privacy.SLOT, {}))
                if stopped:
                    _log.warning("run stopped before round %d: %s", rnd, stopped)
                    break
                step = self._round if self.driver is None else self.driver.step
                state, metrics, per_client, client_states = step(engine, state, rnd)
                metrics.update(self._figures(history, metrics, per_client))
                self._commit(state, metrics, per_client, client_states)
                history.append(metrics)
                if self.on_round:
                    self.on_round(rnd, metrics)
            result = RunResult(
                self.run_id or None, state.w, history, spec=self.program.spec, stopped=stopped
            )
            if self.program.personal is not None:
                result.personal = self._personal_models(state.w, tolerant=engine.remote)
        except BaseException:
            if self.store:
                self.store.set_status(self.run_id, "failed")
            raise
        finally:
            engine.close()
        if self.store:
            result.run_dir = self._finish(result)
        return result

    def _figures(
        self,
        history: Sequence[Mapping[str, float]],
        metrics: dict[str, float],
        per_client: PerClient,
    ) -> dict[str, float]:
        """The round's monitoring figures (``monitor.rounds``); a run that starts to
        diverge or plateau says so once."""
        classes = self.exp.federation.source.num_classes
        figs = round_figures(self.exp.monitoring, history, metrics, per_client, classes=classes)
        before = history[-1] if history else {}
        for flag, what in (
            ("diverging", "diverging (its training loss)"),
            ("plateau", "on a plateau"),
        ):
            if figs.get(flag) == 1.0 and before.get(flag) != 1.0:
                _log.warning("round %d: the run looks %s", len(history) + 1, what)
        return figs

    def _initial_state(self) -> _State:
        w0 = self.program.initial_weights()
        slots: dict[str, State] = {}
        for ns, part in self.parts.items():
            if ns == "sampler":
                state = part.init(self.num_clients)
            elif ns.startswith("terms.") or ns.startswith("transforms."):
                state = part.server_init(w0)
            elif hasattr(part, "init") and ns in ("aggregator", "server"):
                state = part.init(w0)
            else:
                continue
            if state:
                slots[ns] = dict(state)
        return _State(0, w0, slots)

    def _personal_models(self, w: torch.Tensor, tolerant: bool) -> dict[int, torch.Tensor]:
        """Each client's personal model from its stored state. A remote member's state that
        does not give a model of the global model's shape is skipped and logged
        (``tolerant``); in a simulation it is a bug and raises."""
        clients = self._clients_with_state()
        out: dict[int, torch.Tensor] = {}
        for cid, state in zip(clients, self._client_states(clients), strict=True):
            try:
                personal = self.program.personal_model(w, state)
                if personal is not None:
                    self.program.spec.check(personal, f"client {int(cid)}'s personal model")
            except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                if not tolerant:
                    raise
                _log.warning("no personal model for client %d: %s", int(cid), exc)
                continue
            if personal is not None:
                out[int(cid)] = personal
        return out

    def _clients_with_state(self) -> np.ndarray:
        if self.store is None:
            return np.array(sorted(self.memory_states), dtype=np.int64)
        return np.array(self.store.clients_with_state(self.run_id), dtype=np.int64)

    def _finish(self, result: RunResult) -> Path:
        from potluck.report.plots import write_report

        assert self.store is not None
        summary = _summary(result)
        self.store.finish(self.run_id, "finished", summary)
        info = self.store.get_run(self.run_id)
        named = info.name and info.name != self.run_id
        title = f"potluck run {self.run_id}" + (f" ({info.name})" if named else "")
        write_report(
            info.run_dir,
            self.store.rounds(self.run_id),
            title=title,
            summary=summary,
            config=info.config,
            clients=self.store.client_metrics(self.run_id),
        )
        return info.run_dir

    # ---- one round ---------------------------------------------------------------------

    def _ctx(
        self, ns: str, rnd: int, client: int | None = None, inbox: Message | None = None
    ) -> Context:
        return part_context(
            self.exp.seed, rnd, ns, client, num_clients=self.num_clients, inbox=inbox
        )

    def _round(
        self, engine: Engine, state: _State, rnd: int
    ) -> tuple[_State, dict[str, float], PerClient, dict[int, dict[str, State]]]:
        algo, t0 = self.exp.algorithm, time.perf_counter()
        slots = {ns: dict(s) for ns, s in state.slots.items()}
        clock, sampler, target, now = self.clock, algo.sampler, 0, 0.0
        if clock is not None:
            now = clock.now(slots.get(virtual.SLOT, {}))
            sampler, target = clock.sampler(sampler, self.num_clients)
        elif self.realtime is not None:
            sampler, target = virtual.over_selecting(self.realtime, sampler, self.num_clients)
        sampling = Context(
            self.exp.seed,
            rnd,
            ("sampling", rnd),
            num_clients=self.num_clients,
            available=clock.available(now) if clock is not None else None,
        )
        cohort, slots["sampler"] = sampler.sample(
            self.num_clients, slots.get("sampler", {}), sampling
        )
        quarantined = self._quarantined(cohort, slots)
        cohort = cohort[~quarantined]
        work, reports = algo.stragglers.plan(
            len(cohort), algo.local.epochs, self.seeds.numpy("stragglers", rnd)
        )
        batch: dict[int, int] = {}
        if clock is not None:
            batch = self._batch_sizes(cohort)
            work = work * self._fitting(now, cohort, work, slots, batch)
        stages = RoundStages(self, engine, rnd, cohort[reports])
        stages.start, stages.target, stages.batch = now, target, batch
        shares = dict(zip((int(c) for c in cohort[reports]), work[reports], strict=True))
        try:
            trained, updates, new_state = self._stages_and_step(stages, state, slots, shares)
        except RoundAborted as exc:  # a part's protocol failed safely: nothing is applied
            _log.warning("round %d aborted: %s; the model is not moved", rnd, exc)
            stages.metrics["aborted"] = 1.0
            trained, updates = {}, []
            kept = {**state.slots, "sampler": slots["sampler"]}
            new_state = _State(rnd, state.w, {ns: s for ns, s in kept.items() if s})
        privacy_metrics = {}
        if self.ledger is not None:  # released, applied or not: accounted
            ledger_state = slots.get(privacy.SLOT, {})
            new_state.slots[privacy.SLOT], spent = self.ledger.record(ledger_state, cohort)
            privacy_metrics["epsilon"] = spent
            if isinstance(self.ledger, DistributedLedger):  # and the server's own
                privacy_metrics.update(self.ledger.metrics(new_state.slots[privacy.SLOT]))
        active = len(cohort[reports])
        metrics = {
            "cohort_size": float(len(cohort)),
            "updates": float(len(updates)),
            "train_loss": _weighted_mean([(u.client, u.metrics) for u in updates], "train_loss"),
            "bytes_up": float(sum(stages.bytes_up.values())),
            "bytes_down": float(sum(stages.bytes_down.values())),
            **stages.metrics,
            **privacy_metrics,
        }
        if self.exp.detection.quarantine:
            metrics["quarantined"] = float(quarantined.sum())
        if self.exp.attack is not None:
            attackers = self.program.attackers
            metrics["malicious"] = float(sum(u.client in attackers for u in updates))
            if "flagged" in metrics:  # detection scored against the ground truth
                metrics["flagged_malicious"] = float(
                    sum(stages.scores.get(c, {}).get("flagged", 0.0) for c in attackers)
                )
        if clock is not None:
            settled = stages.settled or virtual.unsettled(now, clock.policy)
            down = np.array(list(stages.bytes_down.values()), dtype=np.float64)
            up = np.array([b for b in stages.bytes_up.values() if b > 0], dtype=np.float64)
            new_state.slots[virtual.SLOT] = clock.slot(settled.end, down, up)
            metrics.update(settled.metrics(now))
        if engine.remote:
            refused = sum(stages.refused.values())  # at any stage: each drops its member
            over = stages.metrics.get("over_selected", 0.0)  # the round did not wait for them
            metrics["failed"] = float(active - len(trained) - refused - over)
            metrics["refused"] = float(refused + len(trained) - len(updates))
            metrics["capped"] = float(sum("claimed_weight" in u.metrics for u in updates))
        accepted = {u.client for u in updates}
        client_states = {
            c: {ns: stages.states[c][ns] for ns in changed if ns not in self.secret}
            for c, changed in stages.changed.items()
            if c in accepted
        }
        per_client = self._per_client(updates, stages)
        if stages.settled is not None:  # every timed member's transfers and compute
            per_client = _merge_clients(per_client, list(stages.settled.per_client().items()))
        if self.shifts is not None and summarises(self.exp.monitoring, rnd):
            # the members that trained summarise their data
            summaries = self._summaries(engine, rnd, [u.client for u in updates])
            per_client = _merge_clients(per_client, summaries)
        if hasattr(algo.sampler, "observe"):  # a sampler that learns from the round (Oort)
            new_state.slots["sampler"] = algo.sampler.observe(
                new_state.slots.get("sampler", {}), _outcomes(updates, stages), sampling
            )
        if self.exp.evaluation.due(rnd, self.exp.rounds):
            evaluated, per_eval = self._evaluate(engine, new_state.w, rnd, client_states)
            metrics.update(evaluated)
            per_client = _merge_clients(per_client, per_eval)
        metrics["round_seconds"] = time.perf_counter() - t0
        return new_state, metrics, per_client, client_states

    def _stages_and_step(
        self, stages: RoundStages, state: _State, slots: dict[str, State], work: Mapping[int, float]
    ) -> tuple[dict[int, Reply], list[_Update], _State]:
        """The parts' stages before training, the ``train`` stage, their stages after it,
        then the updates decoded, checked, aggregated and applied. A part may raise
        ``RoundAborted`` anywhere here (the round loop then applies nothing)."""
        rnd = stages.round
        for ns, part in self.staged:
            view = PartStages(stages, ns)
            slots[ns] = dict(part.before_train(view, slots.get(ns, {}), self._ctx(ns, rnd)))
        shared = self._broadcast(state.w, slots)
        for ns, down in self.member_downlinks:
            ctx = self._ctx(ns, rnd)
            shared, sent, slots[ns] = down.encode_members(
                shared, stages.members, slots.get(ns, {}), ctx
            )
            for c, message in sent.items():
                stages.inbox.setdefault(int(c), {})[ns] = message
        payloads = {
            c: self._train_payload(work[c], stages.inbox.get(c, {}), stages.batch.get(c))
            for c in stages.members
        }
        if self.realtime is not None:
            trained, outcome = rounds.first_answers(
                stages, TRAIN, shared, payloads, self.realtime, target=stages.target
            )
            stages.metrics.update(outcome.metrics())
        else:
            trained = stages._send(TRAIN, shared, payloads)
        if self.clock is not None:
            trained = self._on_time(stages, trained, work)
        for ns, part in self.finishing:
            view = PartStages(stages, ns)
            slots[ns] = dict(part.after_train(view, slots.get(ns, {}), self._ctx(ns, rnd)))
        updates = self._collect(rnd, trained, stages.inbox, tolerant=stages.engine.remote)
        if self.exp.attack is not None and self.exp.attack.colludes:
            updates = self._collude(rnd, updates)
        if self.on_updates is not None:
            self.on_updates(rnd, state.w, {u.client: u.message for u in updates})
        return trained, updates, self._step(state, slots, updates, stages)

    def _collude(self, rnd: int, updates: list[_Update]) -> list[_Update]:
        """The round's malicious updates rewritten together by a colluding attack (the side
        channel its attackers assume), from their honest versions and, if it is omniscient,
        the benign ones; the others unchanged."""
        attack, attackers = self.exp.attack, self.program.attackers
        assert attack is not None
        bad = [i for i, u in enumerate(updates) if u.client in attackers]
        if not bad:
            return updates
        good = [i for i, u in enumerate(updates) if u.client not in attackers]
        rows = [updates[i].message.arrays["delta"] for i in bad]
        shown = good if attack.knowledge == "omniscient" else []
        benign = [updates[i].message.arrays["delta"] for i in shown]
        empty = rows[0].new_zeros((0, rows[0].numel()))
        ctx = attack_context(self.exp.seed, rnd)
        crafted = attack.collude(torch.stack(rows), torch.stack(benign) if benign else empty, ctx)
        out: list[_Update | None] = list(updates)
        for row, i in zip(crafted, bad, strict=True):
            u = updates[i]
            if not bool(torch.isfinite(row).all()):  # refused, as the server refuses any
                _log.warning("refused update from client %d in round %d: NaN or Inf", u.client,
                             rnd)  # fmt: skip
                out[i] = None
                continue
            out[i] = u.with_arrays({"delta": row})
        return [u for u in out if u is not None]

    def _batch_sizes(self, members: np.ndarray) -> dict[int, int]:
        """Each member's batch size on the clock, where ``adaptive_batch`` gives one."""
        assert self.clock is not None
        if not self.clock.policy.adaptive_batch:
            return {}
        run = int(getattr(self.exp.algorithm.local, "batch_size", 0))
        sizes = self.clock.batches(members, run)
        return {int(c): int(b) for c, b in zip(members, sizes, strict=True)}

    def _step_share(self, batch: Mapping[int, int], client: int) -> float:
        """The time of one of ``client``'s steps in steps of the run's batch size."""
        if client not in batch:
            return 1.0
        return batch[client] / int(getattr(self.exp.algorithm.local, "batch_size", 1))

    def _fitting(
        self,
        now: float,
        cohort: np.ndarray,
        work: np.ndarray,
        slots: Mapping[str, State],
        batch: Mapping[int, int],
    ) -> np.ndarray:
        """Each member's share of its work on the clock (``adaptive_work``: by its speed;
        ``late = "partial"``: what fits the deadline; 1 otherwise); a member for which
        nothing fits does one step, late."""
        assert self.clock is not None
        steps = np.array(
            [
                self.program.steps_for(int(c), float(w), batch.get(int(c)))
                * self._step_share(batch, int(c))
                for c, w in zip(cohort, work, strict=True)
            ]
        )
        model_bytes = Message({"w": torch.empty(self.program.spec.size)}).wire_bytes
        fit = self.clock.work(now, cohort, slots.get(virtual.SLOT, {}), steps, model_bytes)
        return np.maximum(fit, 1e-9)

    def _on_time(
        self, stages: RoundStages, trained: dict[int, Reply], work: Mapping[int, float]
    ) -> dict[int, Reply]:
        """The ``train`` answers the virtual clock keeps (``Settled``, on ``stages``); the
        others leave the round as dropped members do: no update, no client state kept."""
        assert self.clock is not None
        members = np.array([c for c in trained], dtype=np.int64)
        steps = np.array(
            [
                float(
                    trained[c].message.scalars.get(
                        "num_steps", self.program.steps_for(c, work[c], stages.batch.get(c))
                    )
                )
                * self._step_share(stages.batch, c)
                for c in trained
            ],
            dtype=np.float64,
        )
        down = np.array([stages.bytes_down.get(c, 0) for c in trained], dtype=np.float64)
        up = np.array([stages.bytes_up.get(c, 0) for c in trained], dtype=np.float64)
        settled = self.clock.settle(
            stages.round, stages.start, members, down, up, steps, stages.target
        )
        stages.settled = settled
        kept = {int(c) for c, o in zip(members, settled.outcome, strict=True) if o == KEPT}
        for c in set(trained) - kept:
            stages.changed.pop(c, None)
        stages.members = np.array([c for c in stages.members if int(c) in kept], dtype=np.int64)
        return {c: r for c, r in trained.items() if c in kept}

    def _train_payload(
        self, work: float, inbox: Mapping[str, Message], batch_size: int | None = None
    ) -> Message:
        arrays = {f"{ns}/{k}": v for ns, m in inbox.items() for k, v in m.arrays.items()}
        scalars: dict[str, int | float | str] = {
            f"{ns}/{k}": v for ns, m in inbox.items() for k, v in m.scalars.items()
        }
        scalars["work"] = float(work)
        if batch_size is not None:
            scalars["batch_size"] = int(batch_size)
        return Message(arrays, scalars)

    def _broadcast(self, w: torch.Tensor, slots: Mapping[str, State]) -> Message:
        """The ``train`` stage's shared message: the global weights and each term's
        broadcast, encoded by the downlink transforms."""
        return self._downlinked(self._broadcast_arrays(w, slots))

    def _broadcast_arrays(self, w: torch.Tensor, slots: Mapping[str, State]) -> dict[str, Any]:
        """The global weights ``w`` and each term's broadcast from its server state."""
        arrays = {"w": w}
        for ns, term in self.terms:
            arrays.update({f"{ns}/{k}": v for k, v in term.broadcast(slots.get(ns, {})).items()})
        return arrays

    def _downlinked(self, arrays: Mapping[str, torch.Tensor]) -> Message:
        """``arrays`` as the downlink transforms encode them."""
        message = Message(dict(arrays))
        for down in self.exp.algorithm.downlink:
            message = down.encode(message)
        return message

    def _step(
        self, state: _State, slots: dict[str, State], updates: list[_Update], stages: RoundStages
    ) -> _State:
        """Aggregate, decode the aggregate (a transform with an ``after_aggregate`` stage hook
        runs it first, e.g. to have the sum decrypted), the terms' server halves, the server
        step."""
        rnd = stages.round
        weights = torch.tensor([u.weight for u in updates], dtype=torch.float64)
        fixed = Need.FIXED_DENOMINATOR in gives(self.aggregator)  # defined for any count
        if not fixed and (len(updates) < self.exp.min_updates or not float(weights.sum()) > 0):
            _log.warning(
                "round %d: %d updates with total weight %g (need at least %d, with a positive "
                "weight); the model is not moved",
                rnd,
                len(updates),
                float(weights.sum()),
                self.exp.min_updates,
            )
            return _State(rnd, state.w, slots)  # the model does not move
        before = dict(slots)
        algo = self.exp.algorithm
        aggregate = self._aggregated(stages, state.w, updates, weights, slots)
        for ns, transform in reversed(
            list(zip(self.program.transform_ns, self.program.transforms, strict=True))
        ):
            if hasattr(transform, "after_aggregate"):
                view, ctx = PartStages(stages, ns), self._ctx(ns, rnd)
                slots[ns] = dict(transform.after_aggregate(view, aggregate, slots.get(ns, {}), ctx))
            aggregate, slots[ns] = transform.decode_aggregate(
                aggregate, slots.get(ns, {}), self._ctx(ns, rnd)
            )
        clients = np.array([u.client for u in updates], dtype=np.int64)
        for ns, term in reversed(self.terms):
            mine = _contributions(ns, clients, weights, updates)
            aggregate, slots[ns] = term.server_update(
                slots.get(ns, {}), aggregate, mine, self._ctx(ns, rnd)
            )
        w, server_state = algo.server.step(
            state.w, aggregate, slots.get("server", {}), self._ctx("server", rnd)
        )
        if not bool(torch.isfinite(w).all()):
            _log.warning(
                "round %d: the new global model would hold NaN or Inf (updates that are finite "
                "one by one can overflow together); the round is not applied",
                rnd,
            )
            return _State(rnd, state.w, before)
        slots["server"] = server_state
        return _State(rnd, w, {ns: s for ns, s in slots.items() if s})

    def _aggregated(
        self,
        stages: RoundStages,
        w: torch.Tensor,
        updates: list[_Update],
        weights: torch.Tensor,
        slots: dict[str, State],
    ) -> torch.Tensor:
        """The aggregator over the round's (K, d) stack, with the anomaly scores, on the
        aggregation device (``aggregation_device``: the stack, weights, the aggregator's
        state and inbox moved there); the aggregate and the new state come back to the host."""
        dev = self.stack.device
        rows = [u.message.arrays["delta"] for u in updates]
        deltas = self.stack.stack(rows) if rows else w.new_zeros((0, w.numel()), device=dev)
        inbox = self._aggregator_inbox(stages, w)
        if inbox is not None:
            inbox = Message(on_device(inbox.arrays, dev), inbox.scalars)
        members = tuple(u.client for u in updates)
        ctx = replace(self._ctx("aggregator", stages.round, inbox=inbox), members=members)
        aggregate, state = self.aggregator.aggregate(
            deltas, weights.to(dev), on_device(slots.get("aggregator", {}), dev), ctx
        )
        slots["aggregator"] = on_device(state, HOST)
        if self.upload_dtypes["delta"] == torch.float32:  # individual updates to score
            norms = torch.tensor([u.norm("delta") for u in updates], dtype=torch.float64)
            self._score(stages, members, deltas, norms.to(dev), aggregate, slots, ctx)
        return aggregate.to(HOST)

    def _score(
        self,
        stages: RoundStages,
        members: tuple[int, ...],
        deltas: torch.Tensor,
        norms: torch.Tensor,
        aggregate: torch.Tensor,
        slots: dict[str, State],
        ctx: Context,
    ) -> None:
        """The round's anomaly scores and flags, per client (``stages.scores``), with the
        aggregator's own (its ``update_scores(deltas, ctx)``, e.g. FLTrust's trust), and a
        flagged client's strike (server state ``quarantine/strikes``) under quarantine;
        ``norms``: the rows' L2 norms (float64, on the stack's device)."""
        det = self.exp.detection
        f = byzantine_count(getattr(self.aggregator, "byzantine", 0), len(members))
        dots = (deltas @ aggregate.to(deltas.dtype)).double()
        scores = anomaly_scores(deltas, aggregate, det.scores, f, norms=norms, dots=dots)
        own = getattr(self.aggregator, "update_scores", None)  # a rule's own (FLTrust's trust)
        if own is not None:
            scores.update(own(deltas, ctx))
        scores = on_device(scores, HOST)
        flagged = det.flagged(scores, len(members))
        update_norms, drifts = update_distances(deltas, aggregate, norms, dots)
        for i, c in enumerate(members):
            row = {f"score_{name}": float(v[i]) for name, v in scores.items()}
            row |= {"update_norm": update_norms[i], "client_drift": drifts[i]}
            stages.scores[c] = {**row, "flagged": float(flagged[i])}
        stages.metrics["flagged"] = float(flagged.sum())
        if det.quarantine and bool(flagged.any()):
            strikes = slots.get("quarantine", {}).get("strikes")
            if strikes is None:
                strikes = torch.zeros(self.num_clients, dtype=torch.int32)
            strikes = strikes.clone()
            strikes[torch.tensor(members, dtype=torch.int64)[flagged]] += 1
            slots["quarantine"] = {"strikes": strikes}

    def _quarantined(self, cohort: np.ndarray, slots: Mapping[str, State]) -> np.ndarray:
        """Which of ``cohort`` are quarantined (flagged in ``detection.strikes`` rounds)."""
        strikes = slots.get("quarantine", {}).get("strikes")
        if strikes is None or not self.exp.detection.quarantine:
            return np.zeros(len(cohort), dtype=bool)
        return strikes.numpy()[cohort] >= self.exp.detection.strikes

    def _aggregator_inbox(self, stages: RoundStages, w: torch.Tensor) -> Message | None:
        """What the aggregator is told this round: what its stages left, and the server's
        own update on ``root_examples`` examples of root data if it asks for them (FLTrust's
        trusted update, trained from the global model ``w`` like a client's)."""
        told, k = stages.told_aggregator, getattr(self.aggregator, "root_examples", 0)
        if not k:
            return told
        root = self.program.root_update(w, stages.round, k)
        base = told or Message()
        return Message({**base.arrays, "root_delta": root}, base.scalars)

    def _client_states(
        self, clients: np.ndarray, fresh: Mapping[int, Mapping[str, State]] | None = None
    ) -> tuple[ClientState, ...]:
        """Clients' persistent states by part namespace: ``fresh`` (this round's) over the
        stored ones."""
        fresh = fresh or {}
        if not self.stateful:  # no part of this run keeps client state
            return tuple({} for _ in clients)
        if self.store is None:
            stored = [self.memory_states.get(int(c), {}) for c in clients]
        else:
            stored = [
                by_namespace(s)
                for s in self.store.client_states(self.run_id, [int(c) for c in clients])
            ]
        return tuple({**s, **fresh.get(int(c), {})} for c, s in zip(clients, stored, strict=True))

    def _check_state(
        self, cid: int, reply: Reply, before: Mapping[str, State], remote: bool = False
    ) -> None:
        """A member's new client state: only for parts that keep state, under the names and
        dtypes a part declares (its ``client_state``: name -> dtype), finite, of the shape it
        declares (``client_state_shapes``) and of the dtype and shape of the version it
        replaces (``before``); never a ``secret_state`` part's from a ``remote`` member (a
        site keeps its secrets: the server must not hold them)."""
        for ns, state in reply.state.items():
            if remote and (ns in self.secret or ns in self.site_kept):
                raise MessageError(
                    f"client {cid} sent the state of {ns!r}, which a site keeps to itself"
                )
            if ns not in self.stateful:
                raise MessageError(
                    f"client {cid} sent state for {ns!r}, which is not a part of this run "
                    "that keeps client state"
                )
            declared: Mapping[str, str] | None = getattr(self.parts[ns], "client_state", None)
            shapes = self._state_shapes(ns)
            for name, t in state.items():
                where = f"client {cid}: state {ns}/{name}"
                if not isinstance(t, torch.Tensor):
                    raise MessageError(f"{where} is not a tensor")
                if declared is not None and name not in declared:
                    raise MessageError(f"{where}: the part keeps only {sorted(declared)}")
                if declared is not None and str(t.dtype).removeprefix("torch.") != declared[name]:
                    raise MessageError(f"{where} is {t.dtype}, the part keeps {declared[name]}")
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise MessageError(f"{where} contains NaN or Inf")
                shape = shapes.get(name)
                if shape is not None and tuple(t.shape) != tuple(shape):
                    raise MessageError(
                        f"{where} has shape {tuple(t.shape)}, the part keeps {shape}"
                    )
                old = before.get(ns, {}).get(name)
                if old is not None and (old.dtype, old.shape) != (t.dtype, t.shape):
                    raise MessageError(
                        f"{where} is {t.dtype} {tuple(t.shape)}, but the version it replaces "
                        f"is {old.dtype} {tuple(old.shape)}"
                    )

    def _state_shapes(self, ns: str) -> Mapping[str, tuple[int, ...]]:
        shapes = getattr(self.parts[ns], "client_state_shapes", None)
        return {} if shapes is None else shapes(self.program.spec)

    def _collect(
        self,
        rnd: int,
        replies: Mapping[int, Reply],
        inbox: Mapping[int, Mapping[str, Message]],
        tolerant: bool,
    ) -> list[_Update]:
        """Decode and validate the reported updates (each transform's ``decode`` with what its
        stages left for the member, ``inbox``). An invalid one stops the run, unless
        ``tolerant`` (remote clients): then it is refused, logged and left out."""
        updates = []
        for cid, reply in replies.items():
            try:
                updates.append(self._validated(rnd, cid, reply.message, inbox.get(cid, {})))
            except MessageError as exc:
                if not tolerant:
                    raise
                _log.warning("refused %s", exc)
        return self._within_cohort(rnd, updates) if tolerant else updates

    def _within_cohort(self, rnd: int, updates: list[_Update]) -> list[_Update]:
        """Remote members' updates against the round's own scale (``aggregate.cohort``):
        refused past ``max_norm_ratio`` times the median norm of an uploaded array, weights
        capped at ``max_weight_ratio`` times their median."""
        ratio, weight_ratio = self.exp.max_norm_ratio, self.exp.max_weight_ratio
        if ratio is not None:
            norms = {name: np.array([u.norm(name) for u in updates]) for name in self.upload_arrays}
            reasons = cohort.norm_outliers(norms, ratio)
            for u, why in zip(updates, reasons, strict=True):
                if why is not None:
                    _log.warning(
                        "refused update from client %d in round %d: %s (deploy.max_norm_ratio)",
                        u.client, rnd, why,
                    )  # fmt: skip
            updates = [u for u, why in zip(updates, reasons, strict=True) if why is None]
        if weight_ratio is None:
            return updates
        weights = cohort.capped(np.array([u.weight for u in updates]), weight_ratio)
        out = []
        for u, w in zip(updates, weights.tolist(), strict=True):
            if w < u.weight:
                _log.warning(
                    "round %d: client %d claims aggregation weight %g; capped at %g, %g times "
                    "the round's median (deploy.max_weight_ratio)",
                    rnd, u.client, u.weight, w, weight_ratio,
                )  # fmt: skip
                u = replace(
                    u, weight=w, metrics={**u.metrics, "weight": w, "claimed_weight": u.weight}
                )
            out.append(u)
        return out

    def _expected_upload(self) -> tuple[dict[str, int], list[str], dict[str, torch.dtype]]:
        """The arrays (name -> length) and numeric scalars every update must carry, and the
        arrays not float32: the delta of a transform that encodes it for the aggregator
        (its ``encoded_delta(size) -> (length, dtype)``, e.g. secure aggregation's)."""
        size = self.program.spec.size
        encoded = [t.encoded_delta(size) for _, t in self.transforms if hasattr(t, "encoded_delta")]
        length, dtype = encoded[-1] if encoded else (size, torch.float32)
        arrays = {"delta": length}
        numbers = list(_COUNTS)
        for ns, term in self.terms:
            arrays.update({f"{ns}/{name}": size for name in term.uploads})
            numbers += [f"{ns}/{name}" for name in term.upload_scalars]
        return arrays, numbers, {"delta": dtype}

    def _validated(self, rnd: int, cid: int, raw: Message, left: Mapping[str, Message]) -> _Update:
        source = f"update from client {cid}"
        msg = raw
        for ns, transform in reversed(self.transforms):
            msg = transform.decode(msg, self._ctx(ns, rnd, cid, left.get(ns)))
        expected, numbers = self.upload_arrays, self.upload_numbers
        msg.validate(expected, source=source, dtypes=self.upload_dtypes, finite=False)
        if len(msg.arrays) != len(expected):
            extra = sorted(set(msg.arrays) - set(expected))
            raise MessageError(f"{source}: unexpected arrays {extra[:5]}")
        floats = [name for name in expected if msg.arrays[name].is_floating_point()]
        update = _Update(cid, msg, 0.0, {}, {name: _norm(msg.arrays[name]) for name in floats})
        for name, norm in update.norms.items():  # a finite norm proves every element finite
            if not math.isfinite(norm):
                raise MessageError(f"{source}: array {name!r} contains NaN or Inf")
        values = {key: msg.scalar(key, source=source) for key in numbers}
        for key, value in values.items():
            if not math.isfinite(value) or (value < 0 and key in _COUNTS):
                raise MessageError(f"{source}: scalar {key!r} must be finite and >= 0, got {value}")
        for key, v in msg.scalars.items():  # metrics too: a NaN loss is no report
            if isinstance(v, float) and not math.isfinite(v):
                raise MessageError(f"{source}: scalar {key!r} is NaN or Inf ({v})")
        self._check_bounds(source, update, values["weight"])
        metrics = {k: float(v) for k, v in msg.scalars.items() if _is_number(v)}
        if metrics.get("weight") == metrics.get("num_examples"):
            del metrics["weight"]  # the default weight: recorded only where a part sets it
        return replace(update, weight=values["weight"], metrics=metrics)

    def _check_bounds(self, source: str, update: _Update, weight: float) -> None:
        """The server's own bounds on an update: ``deploy.max_update_norm`` on the L2 norm of
        each uploaded array (the delta, and what the terms upload, e.g. SCAFFOLD's
        ``delta_c``), ``deploy.max_weight`` on its aggregation weight. A member's claims are
        not trusted."""
        bound, cap = self.exp.max_update_norm, self.exp.max_weight
        if bound is not None:
            for name in self.upload_arrays:
                norm = update.norm(name)
                if not norm <= bound:
                    raise MessageError(
                        f"{source}: {name!r} has L2 norm {norm:.6g}, above "
                        f"deploy.max_update_norm = {bound:g}"
                    )
        if cap is not None and weight > cap:
            raise MessageError(
                f"{source}: aggregation weight {weight:g} is above deploy.max_weight = {cap:g}"
            )

    def _per_client(self, updates: Sequence[_Update], stages: RoundStages) -> PerClient:
        out: PerClient = []
        attacked = self.exp.attack is not None
        for u in updates:
            traffic = {
                "bytes_up": float(stages.bytes_up.get(u.client, 0)),
                "bytes_down": float(stages.bytes_down.get(u.client, 0)),
            }
            if attacked:  # the ground truth that detection is scored against
                traffic["malicious"] = float(u.client in self.program.attackers)
            out.append((u.client, {**u.metrics, **traffic, **stages.scores.get(u.client, {})}))
        return out

    def _evaluate(
        self, engine: Engine, w: torch.Tensor, rnd: int, fresh: Mapping[int, Mapping[str, State]]
    ) -> tuple[dict[str, float], PerClient]:
        """Round metrics and per-client metrics of centralised and federated evaluation."""
        ev, out = self.exp.evaluation, dict[str, float]()
        if ev.centralized:
            test = self.exp.federation.source.test
            if len(test):
                rows = self.test_rows
                res = engine.evaluate_test(w) if rows is None else engine.evaluate_test(w, rows)
                out.update(test_loss=res.loss, test_accuracy=res.accuracy)
                triggered = getattr(self.exp.attack, "triggered", None)
                if triggered is not None:  # a backdoor's attack success rate
                    y_test = test.y if rows is None else test.y[rows]
                    x_test = torch.from_numpy(test.features(rows))
                    x, y = triggered(x_test, torch.from_numpy(y_test))
                    asr = self.program.evaluate_arrays(w, x.numpy(), y.numpy())
                    out["backdoor_accuracy"] = asr.accuracy
        if not ev.federated_clients:
            return out, []
        k = self.num_clients if ev.federated_clients == -1 else ev.federated_clients
        rng = self.seeds.numpy("federated_eval", rnd)
        clients = np.sort(
            rng.choice(self.num_clients, size=min(k, self.num_clients), replace=False)
        )
        job = StageJob(
            EVALUATE,
            rnd,
            Message({"w": w}),
            clients,
            tuple(Message() for _ in clients),
            self._client_states(clients, fresh),
        )
        pairs: list[tuple[int, dict[str, EvalResult]]] = []
        for c, reply in zip(clients, engine.run_stage(job), strict=True):
            if reply is None:
                continue
            try:
                if reply.message.arrays or reply.state:
                    raise MessageError(
                        f"evaluation from client {int(c)}: arrays or state, which an evaluation"
                        f" answer does not carry ({sorted(reply.message.arrays)[:3]})"
                    )
                pairs.append((int(c), parse_evaluation(reply.message, f"client {int(c)}")))
            except MessageError as exc:
                if not engine.remote:
                    raise
                _log.warning("refused %s", exc)
        results = [r for _, r in pairs]
        for kind, prefix in (
            ("global", "fed"),
            ("personal", "personal"),
            ("finetuned", "finetuned"),
        ):
            sums = [r[kind] for r in results if kind in r]
            total = _sum_results(sums)
            if total.n:
                loss = total.loss  # the pooled mean, finite however large a member's sums:
                if not math.isfinite(loss):
                    loss = _mean([r.loss for r in sums if r.n], [r.n for r in sums if r.n])
                out.update({f"{prefix}_loss": loss, f"{prefix}_accuracy": total.accuracy})
        per_client = [
            (c, {f"eval_{kind}_accuracy": res.accuracy for kind, res in r.items() if res.n})
            for c, r in pairs
        ]
        return out, per_client

    def _commit(
        self,
        state: _State,
        metrics: dict[str, float],
        per_client: PerClient,
        client_states: dict[int, dict[str, State]],
    ) -> None:
        if self.store is None:
            for cid, states in client_states.items():
                self.memory_states.setdefault(cid, {}).update(states)
            return
        exp = self.exp
        ckpt = None
        if state.round % exp.checkpoint_every == 0 or state.round == exp.rounds:
            ckpt = Checkpoint(tensors=state.tensors(), meta={"round": state.round})
        flat = {
            cid: {f"{ns}/{k}": v for ns, s in states.items() for k, v in s.items()}
            for cid, states in client_states.items()
        }
        self.store.commit_round(
            self.run_id, state.round, metrics, per_client, ckpt, client_states=flat
        )


def _contributions(
    ns: str, clients: np.ndarray, weights: torch.Tensor, updates: Sequence[_Update]
) -> Contributions:
    prefix = f"{ns}/"
    arrays = tuple(
        {k[len(prefix) :]: v for k, v in u.message.arrays.items() if k.startswith(prefix)}
        for u in updates
    )
    scalars = tuple(
        {k[len(prefix) :]: v for k, v in u.message.scalars.items() if k.startswith(prefix)}
        for u in updates
    )
    return Contributions(clients, weights, arrays, scalars)


def _norm(t: torch.Tensor) -> float:
    """The L2 norm of ``t``: a float tensor in its own dtype unless that overflows, an
    integer one (SecAgg's masked field elements) and an overflow in float64. A float64 copy of
    every update is 0.5 s a round for 200 updates of a 1.66 M-parameter CNN.

    Example:
        >>> _norm(torch.tensor([3.0, 4.0])), _norm(torch.tensor([3e30, 4e30]))
        (5.0, 4.999999984567896e+30)
        >>> _norm(torch.tensor([3, 4], dtype=torch.int32))
        5.0
    """
    if t.is_floating_point():
        norm = float(torch.linalg.vector_norm(t))
        if math.isfinite(norm):
            return norm
    return float(torch.linalg.vector_norm(t.double()))


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _outcomes(updates: Sequence[_Update], stages: RoundStages) -> dict[int, dict[str, float]]:
    """What a round tells a learning sampler of each member: the training loss and examples
    of the updates it used, and the virtual duration of every member the clock timed."""
    out: dict[int, dict[str, float]] = {}
    for u in updates:
        out[u.client] = {k: u.metrics[k] for k in ("train_loss", "num_examples") if k in u.metrics}
    if stages.settled is not None:
        for c, t in stages.settled.per_client().items():
            duration = t["download_s"] + t["compute_s"] + t["upload_s"]
            out.setdefault(c, {})["duration_s"] = duration
    return out


def _merge_clients(*groups: PerClient) -> PerClient:
    merged: dict[int, dict[str, float]] = {}
    for group in groups:
        for cid, metrics in group:
            merged.setdefault(cid, {}).update(metrics)
    return [(cid, m) for cid, m in merged.items() if m]


def _weighted_mean(per_client: PerClient, key: str) -> float:
    pairs = [(m[key], m["num_examples"]) for _, m in per_client if key in m]
    return _mean([v for v, _ in pairs], [n for _, n in pairs])


def _mean(values: Sequence[float], weights: Sequence[float]) -> float:
    """The mean of finite ``values`` weighted by ``weights`` (>= 0); NaN if they sum to 0.
    It is finite: where the plain sums overflow (a member's finite but huge report), it is
    computed on values and weights scaled to at most 1.

    Example:
        >>> _mean([1.0, 4.0], [3, 1]), _mean([-1.7e308, 2.0], [1e308, 1e308])
        (1.75, -8.5e+307)
    """
    total = sum(weights)
    if total == 0:
        return math.nan
    plain = sum(v * w for v, w in zip(values, weights, strict=True)) / total
    if math.isfinite(total) and math.isfinite(plain):
        return plain
    w_max, v_max = max(weights), max(abs(v) for v in values)
    shares = [w / w_max for w in weights]
    norm = math.fsum(shares)
    return v_max * math.fsum(p / norm * (v / v_max) for p, v in zip(shares, values, strict=True))


def _sum_results(results: Sequence[EvalResult]) -> EvalResult:
    return EvalResult(
        sum(r.loss_sum for r in results), sum(r.correct for r in results), sum(r.n for r in results)
    )


def _summary(result: RunResult) -> dict[str, Any]:
    final = result.final
    keys = (  # a personalised method's headline: its clients' personal accuracy first
        "personal_accuracy",
        "test_accuracy",
        "test_loss",
        "fed_accuracy",
        "fed_loss",
        "personal_loss",
        "finetuned_accuracy",
        "train_loss",
    )
    summary: dict[str, Any] = {k: final[k] for k in keys if k in final}
    summary["rounds"] = float(len(result.history))
    if result.stopped:
        summary["stopped"] = result.stopped
    summary["total_round_seconds"] = sum(m.get("round_seconds", 0.0) for m in result.history)
    return summary
