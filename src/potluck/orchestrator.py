"""The round loop: sample, broadcast, train locally, collect, aggregate, step, evaluate, commit.

Each round is committed to the run store (metrics, per-client metrics, checkpoint with the
algorithm state) before the next begins; ``resume_experiment`` continues a killed run from
its last checkpoint and ends with the same metrics as an uninterrupted run.

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
    ['bytes_down', 'bytes_up', 'cohort_size']
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from potluck.aggregate.stack import StackBuffer
from potluck.algorithms.base import Algorithm
from potluck.client.program import ClientProgram, ClientResult, EvalResult, RoundInput
from potluck.client.rules import Tensors, Uploaded
from potluck.core.message import Message, MessageError
from potluck.core.seeding import Seeds
from potluck.core.task import Task
from potluck.data.federation import Federation
from potluck.engines.base import Engine, EngineOptions, choose_engine, make_engine
from potluck.store.checkpoint import Checkpoint
from potluck.store.sqlite import RunStore

_log = logging.getLogger("potluck")

EngineFactory = Callable[[ClientProgram], Engine]
RoundCallback = Callable[[int, Mapping[str, float]], None]
TIMING_METRICS = frozenset({"round_seconds"})


@dataclass(frozen=True)
class Evaluation:
    """When and how the global model is evaluated.

    ``every``: every k rounds (and always after the last). ``centralized``: on the held-out
    test set. ``federated_clients``: how many clients' local test sets (sampled each time;
    0 = none, -1 = all) give a weighted federated accuracy, and a personalised one where the
    rule keeps personal models. ``finetune_epochs``: also report the accuracy after that
    many epochs of local fine-tuning of the global model (0 = off).
    """

    every: int = 1
    centralized: bool = True
    federated_clients: int = 0
    finetune_epochs: int = 0

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"evaluation.every must be >= 1, got {self.every}")
        if self.federated_clients < -1:
            raise ValueError("evaluation.federated_clients must be >= 0, or -1 for all")
        if self.finetune_epochs < 0:
            raise ValueError("evaluation.finetune_epochs must be >= 0")

    def due(self, rnd: int, rounds: int) -> bool:
        return rnd % self.every == 0 or rnd == rounds


@dataclass(frozen=True)
class Experiment:
    """Everything a run needs: task, federation, algorithm, schedule, seed and engine."""

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
    min_updates: int = 1
    name: str | None = None
    config: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.min_updates < 1:
            raise ValueError(f"min_updates must be >= 1, got {self.min_updates}")
        EngineOptions(self.workers, self.threads, self.ray_address)  # validates them
        self.algorithm.sampler.cohort_size(self.federation.num_clients)

    @property
    def engine_options(self) -> EngineOptions:
        return EngineOptions(self.workers, self.threads, self.ray_address)

    def describe(self) -> dict[str, Any]:
        """A JSON-able record of the experiment (its config if it came from one)."""
        if self.config is not None:
            return dict(self.config)
        return {
            "name": self.name,
            "task": self.task.name,
            "algorithm": repr(self.algorithm),
            "rounds": self.rounds,
            "seed": self.seed,
            "num_clients": self.federation.num_clients,
            "engine": self.engine,
        }


@dataclass
class RunResult:
    """The outcome of a run: its id, the final global weights and per-round metrics."""

    run_id: str | None
    weights: torch.Tensor
    history: list[dict[str, float]]
    run_dir: Path | None = None

    @property
    def final(self) -> dict[str, float]:
        """The last round's metrics, with the latest evaluation carried forward."""
        merged: dict[str, float] = {}
        for metrics in self.history:
            merged.update(metrics)
        return merged


@dataclass
class _State:
    """Everything the server carries from round to round (all of it checkpointed)."""

    round: int
    w: torch.Tensor
    server: dict[str, torch.Tensor]
    rule: dict[str, torch.Tensor]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "global": self.w,
            **{f"server/{k}": v for k, v in self.server.items()},
            **{f"rule/{k}": v for k, v in self.rule.items()},
        }

    @classmethod
    def from_checkpoint(cls, round: int, ckpt: Checkpoint) -> _State:
        t = ckpt.tensors
        return cls(round, t["global"], _prefixed(t, "server/"), _prefixed(t, "rule/"))


@dataclass(frozen=True)
class _Collected:
    """The validated uploads of one round, stacked for aggregation."""

    deltas: torch.Tensor
    weights: torch.Tensor
    uploads: list[Uploaded]
    per_client: list[tuple[int, dict[str, float]]]
    accepted: set[int]


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
    with torch.random.fork_rng():
        model = experiment.task.build_model()
    name, why = choose_engine(model, algo.rule, cohort, experiment.engine_options, run_steps)
    config = experiment.config
    if config is not None and isinstance(config.get("run"), Mapping):
        config = {**config, "run": {**config["run"], "engine": name}}
    _log.info("engine auto: %s (%s)", name, why)
    return replace(experiment, engine=name, config=config), f"auto: {why}"


def run_experiment(
    experiment: Experiment,
    store: RunStore | str | Path | None = None,
    *,
    on_round: RoundCallback | None = None,
    engine: EngineFactory | None = None,
) -> RunResult:
    """Run ``experiment`` from round 1; record it in ``store`` if one is given.

    Algorithms whose clients keep state (SCAFFOLD) keep it in a run store; without one, a
    temporary store is used and removed afterwards. ``engine`` makes the engine from the
    client program instead of ``experiment.engine`` (the deployment server passes its gRPC
    engine this way).
    """
    if engine is None:
        experiment, _ = resolve_engine(experiment)
    loop = _Loop(experiment, on_round, engine)  # builds the model: bad tasks fail before storing
    opened = _open(store)
    if opened is None and experiment.algorithm.rule.client_state:
        with tempfile.TemporaryDirectory(prefix="potluck-states-") as tmp, RunStore(tmp) as temp:
            loop.record_to(temp, temp.create_run(experiment.describe()), keep=False)
            return loop.run(None)
    if opened is not None:
        loop.record_to(opened, opened.create_run(experiment.describe(), experiment.name))
    return loop.run(None)


def resume_experiment(
    experiment: Experiment,
    store: RunStore | str | Path,
    run_id: str,
    *,
    on_round: RoundCallback | None = None,
    engine: EngineFactory | None = None,
) -> RunResult:
    """Continue stored run ``run_id`` from its last checkpoint to the end of ``experiment``."""
    opened = _open(store)
    assert opened is not None
    run_id = opened.resolve(run_id)
    found = opened.latest_checkpoint(run_id)
    start = _State.from_checkpoint(*found) if found is not None else None
    if engine is None:
        experiment, _ = resolve_engine(experiment)
    loop = _Loop(experiment, on_round, engine)
    opened.truncate_after(run_id, start.round if start else 0)
    opened.set_status(run_id, "running")
    loop.record_to(opened, run_id)
    return loop.run(start)


def _open(store: RunStore | str | Path | None) -> RunStore | None:
    if store is None or isinstance(store, RunStore):
        return store
    return RunStore(store)


def _prefixed(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


class _Loop:
    """One execution of the round loop for an experiment."""

    def __init__(
        self, exp: Experiment, on_round: RoundCallback | None, engine: EngineFactory | None
    ) -> None:
        self.exp, self.on_round = exp, on_round
        self.store: RunStore | None = None
        self.run_id, self.keep = "", True
        self.seeds = Seeds(exp.seed)
        self.program = exp.algorithm.client_program(
            exp.task,
            exp.federation,
            seed=exp.seed,
            finetune_epochs=exp.evaluation.finetune_epochs,
        )
        self.rule = self.program.rule  # bound to the model's parameters
        self.stack = StackBuffer()  # the round's (K, d) updates, in memory reused each round
        self.num_clients = exp.federation.num_clients
        # an engine that cannot run this experiment refuses here, before any run is stored
        if engine is not None:
            self.engine = engine(self.program)
            return
        if exp.engine == "auto":
            raise ValueError('engine "auto" must be resolved first: see resolve_engine')
        self.engine = make_engine(exp.engine, self.program, exp.engine_options)

    def record_to(self, store: RunStore, run_id: str, keep: bool = True) -> None:
        """Commit every round to ``store`` under ``run_id``; ``keep=False``: a scratch store.
        An engine with an ``attach(store, run_id)`` method (the gRPC engine, for client
        health) is told where the run is recorded."""
        self.store, self.run_id, self.keep = store, run_id, keep
        attach = getattr(self.engine, "attach", None)
        if attach is not None:
            attach(store, run_id)

    def run(self, start: _State | None) -> RunResult:
        exp = self.exp
        if exp.threads is not None:
            torch.set_num_threads(exp.threads)
        if start is None:
            w0 = self.program.initial_weights()
            start = _State(0, w0, exp.algorithm.server.init(w0), self.rule.server_init(w0))
        self.program.spec.check(start.w, "checkpointed global weights")
        history = [r.metrics for r in self.store.rounds(self.run_id)] if self.store else []
        engine, state = self.engine, start
        try:
            for rnd in range(start.round + 1, exp.rounds + 1):
                state, metrics, per_client, client_states = self._round(engine, state, rnd)
                self._commit(state, metrics, per_client, client_states)
                history.append(metrics)
                if self.on_round:
                    self.on_round(rnd, metrics)
        except BaseException:
            if self.store:
                self.store.set_status(self.run_id, "failed")
            raise
        finally:
            engine.close()
        result = RunResult(self.run_id if self.keep else None, state.w, history)
        if self.store and self.keep:
            result.run_dir = self._finish(result)
        return result

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
        )
        return info.run_dir

    def _round(
        self, engine: Engine, state: _State, rnd: int
    ) -> tuple[_State, dict[str, float], list[tuple[int, dict[str, float]]], dict[int, Tensors]]:
        algo, t0 = self.exp.algorithm, time.perf_counter()
        cohort = algo.sampler.sample(self.num_clients, self.seeds.numpy("sampling", rnd))
        work, reports = algo.stragglers.plan(
            len(cohort), algo.local.epochs, self.seeds.numpy("stragglers", rnd)
        )
        active = cohort[reports]
        broadcast = self.rule.broadcast(state.rule)
        states = self._client_states(active)
        job = RoundInput(rnd, state.w, active, broadcast, states, work[reports])
        results = engine.train(job) if len(active) else []
        reported = [(int(c), r) for c, r in zip(active, results, strict=True) if r is not None]
        up = self._collect(reported, tolerant=engine.remote)
        new_state = state
        if len(up.uploads) >= max(1, self.exp.min_updates):
            mean_delta = algo.aggregator(up.deltas, up.weights)
            mean_delta, rule_state = self.rule.server_update(
                state.rule, mean_delta, up.uploads, up.weights, self.num_clients
            )
            w, server_state = algo.server.step(state.w, mean_delta, state.server)
            new_state = _State(rnd, w, server_state, rule_state)
        elif len(active):
            _log.warning(
                "round %d: %d of at least %d updates arrived; the model is not moved",
                rnd,
                len(up.uploads),
                self.exp.min_updates,
            )
        new_state.round = rnd
        down = state.w.numel() + sum(v.numel() for v in broadcast.values())
        metrics = {
            "cohort_size": float(len(cohort)),
            "updates": float(len(up.uploads)),
            "train_loss": _weighted_mean(up.per_client, "train_loss"),
            "bytes_up": float(sum(r.message.nbytes for _, r in reported)),
            "bytes_down": float(len(active) * down * 4),
        }
        if engine.remote:
            metrics["failed"] = float(len(active) - len(reported))
            metrics["refused"] = float(len(reported) - len(up.uploads))
        client_states = {cid: r.state for cid, r in reported if r.state and cid in up.accepted}
        per_client = up.per_client
        if self.exp.evaluation.due(rnd, self.exp.rounds):
            evaluated, per_eval = self._evaluate(engine, new_state.w, rnd, client_states)
            metrics.update(evaluated)
            per_client = _merge_clients(per_client, per_eval)
        metrics["round_seconds"] = time.perf_counter() - t0
        return new_state, metrics, per_client, client_states

    def _client_states(
        self, cohort: np.ndarray, fresh: Mapping[int, Tensors] | None = None
    ) -> tuple[Tensors, ...]:
        """Cohort members' persistent states: ``fresh`` (this round's) over the stored ones."""
        if not self.rule.client_state or self.store is None:
            return tuple({} for _ in cohort)
        stored = self.store.client_states(self.run_id, [int(c) for c in cohort])
        fresh = fresh or {}
        return tuple(fresh.get(int(c), s) for c, s in zip(cohort, stored, strict=True))

    def _collect(
        self, reported: Sequence[tuple[int, ClientResult]], tolerant: bool = False
    ) -> _Collected:
        """Decode and validate the reported updates. An invalid one stops the run, unless
        ``tolerant`` (remote clients): then it is refused, logged and left out."""
        uploads, per_client, weights, accepted = [], [], [], set()
        for cid, result in reported:
            try:
                upload, numeric, weight = self._validated(cid, result.message)
            except MessageError as exc:
                if not tolerant:
                    raise
                _log.warning("refused %s", exc)
                continue
            uploads.append(upload)
            per_client.append((cid, numeric))
            weights.append(weight)
            accepted.add(cid)
        if not uploads:
            size = self.program.spec.size
            return _Collected(torch.zeros(0, size), torch.zeros(0), [], [], accepted)
        deltas = self.stack.stack([u.arrays["delta"] for u in uploads])
        weight_t = torch.tensor(weights, dtype=torch.float64)
        return _Collected(deltas, weight_t, uploads, per_client, accepted)

    def _validated(self, cid: int, raw: Message) -> tuple[Uploaded, dict[str, float], float]:
        spec, algo = self.program.spec, self.exp.algorithm
        expected = {"delta": spec.size, **{name: spec.size for name in self.rule.uploads}}
        source = f"update from client {cid}"
        msg = algo.transforms.decode(raw)
        msg.validate(expected, source=source)
        numeric = {k: float(v) for k, v in msg.scalars.items() if isinstance(v, int | float)}
        key = "weight" if "weight" in msg.scalars else "num_examples"
        weight = msg.scalar(key, source=source)
        if not math.isfinite(weight) or weight < 0:
            raise MessageError(f"{source}: scalar {key!r} must be finite and >= 0, got {weight}")
        return Uploaded(msg.arrays, msg.scalars), numeric, weight

    def _evaluate(
        self, engine: Engine, w: torch.Tensor, rnd: int, fresh: Mapping[int, Tensors]
    ) -> tuple[dict[str, float], list[tuple[int, dict[str, float]]]]:
        """Round metrics and per-client metrics of centralised and federated evaluation."""
        ev, out = self.exp.evaluation, dict[str, float]()
        if ev.centralized:
            test = self.exp.federation.source.test
            if len(test):
                res = engine.evaluate_test(w)
                out.update(test_loss=res.loss, test_accuracy=res.accuracy)
        if not ev.federated_clients:
            return out, []
        k = self.num_clients if ev.federated_clients == -1 else ev.federated_clients
        rng = self.seeds.numpy("federated_eval", rnd)
        clients = np.sort(
            rng.choice(self.num_clients, size=min(k, self.num_clients), replace=False)
        )
        answered = engine.evaluate(clients, w, self._client_states(clients, fresh))
        pairs = [(int(c), r) for c, r in zip(clients, answered, strict=True) if r is not None]
        results = [r for _, r in pairs]
        for kind, prefix in (
            ("global", "fed"),
            ("personal", "personal"),
            ("finetuned", "finetuned"),
        ):
            total = _sum_results([r[kind] for r in results if kind in r])
            if total.n:
                out.update({f"{prefix}_loss": total.loss, f"{prefix}_accuracy": total.accuracy})
        per_client = [
            (c, {f"eval_{kind}_accuracy": res.accuracy for kind, res in r.items() if res.n})
            for c, r in pairs
        ]
        return out, per_client

    def _commit(
        self,
        state: _State,
        metrics: dict[str, float],
        per_client: list[tuple[int, dict[str, float]]],
        client_states: dict[int, Tensors],
    ) -> None:
        if self.store is None:
            return
        exp = self.exp
        ckpt = None
        if state.round % exp.checkpoint_every == 0 or state.round == exp.rounds:
            ckpt = Checkpoint(tensors=state.tensors(), meta={"round": state.round})
        self.store.commit_round(
            self.run_id, state.round, metrics, per_client, ckpt, client_states=client_states
        )


def _merge_clients(
    *groups: list[tuple[int, dict[str, float]]],
) -> list[tuple[int, dict[str, float]]]:
    merged: dict[int, dict[str, float]] = {}
    for group in groups:
        for cid, metrics in group:
            merged.setdefault(cid, {}).update(metrics)
    return [(cid, m) for cid, m in merged.items() if m]


def _weighted_mean(per_client: list[tuple[int, dict[str, float]]], key: str) -> float:
    pairs = [(m[key], m["num_examples"]) for _, m in per_client if key in m]
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total if total else math.nan


def _sum_results(results: Sequence[EvalResult]) -> EvalResult:
    return EvalResult(
        sum(r.loss_sum for r in results), sum(r.correct for r in results), sum(r.n for r in results)
    )


def _summary(result: RunResult) -> dict[str, float]:
    final = result.final
    keys = ("test_accuracy", "test_loss", "fed_accuracy", "fed_loss", "train_loss")
    summary = {k: final[k] for k in keys if k in final}
    summary["rounds"] = float(len(result.history))
    summary["total_round_seconds"] = sum(m.get("round_seconds", 0.0) for m in result.history)
    return summary
