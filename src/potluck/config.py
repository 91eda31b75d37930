"""Experiment configuration: TOML <-> validated objects -> an ``Experiment``.

Every field is validated before anything starts; a wrong key, type or value is refused with
a message naming the field and what is allowed. ``--set key=value`` overrides use dotted keys
(``client.lr=0.1``) and TOML literals for values.

The algorithm's parts each have a section of their own, validated by that part's own
parameters through the registry (``potluck.core.registry``): ``[algorithm]`` (a named
algorithm and its parameters), ``[sampler]``, ``[stragglers]``, ``[client]`` (the local
optimizer), ``[[terms]]``, ``[[transforms]]``, ``[[downlink]]``, ``[aggregator]`` and
``[server]``, and the threat model's ``[attack]`` (a poisoning attack, ``potluck.attacks``);
each has a ``name`` (a registered one, or an import path such as ``"my_lab.agg:Median"``).
A validated config holds every part written out in full, so it is stored, resumed and
deployed exactly.

Example:
    >>> cfg = ExperimentConfig.from_dict({"rounds": 3}, overrides=["client.lr=0.2"])
    >>> cfg.rounds, cfg.client["lr"], cfg.data.dataset
    (3, 0.2, 'fashion_mnist')
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from potluck.core.registry import NotNameable, RegistryError, part_config

if TYPE_CHECKING:
    from potluck.algorithms.base import Algorithm
    from potluck.attacks.poisoning import Attack
    from potluck.core.task import Task
    from potluck.data.federation import Federation
    from potluck.data.profiles import LognormalProfiles, TraceProfiles
    from potluck.orchestrator import Experiment


def default_store() -> str:
    """The run store directory: ``$POTLUCK_STORE`` or ``./potluck-runs``."""
    return os.environ.get("POTLUCK_STORE", "potluck-runs")


class ConfigError(ValueError):
    """An experiment configuration that cannot be run, with every problem listed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class PartitionConfig(_Section):
    """How the dataset is split among clients."""

    kind: Literal["iid", "dirichlet", "shards", "labels", "quantity", "natural", "sampled"] = (
        "dirichlet"
    )
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (dirichlet, sampled)")
    min_size: int = Field(10, ge=1, description="minimum samples per client (dirichlet)")
    shards_per_client: int = Field(2, ge=1, description="shards per client (shards)")
    labels_per_client: int = Field(2, ge=1, description="distinct labels per client (labels)")
    distribution: Literal["lognormal", "powerlaw"] = "lognormal"
    sigma: float = Field(1.0, ge=0, description="lognormal sigma of sizes (quantity, sampled)")
    exponent: float = Field(1.5, gt=0, description="power-law exponent (quantity)")
    examples_per_client: int = Field(32, ge=1, description="mean client size (sampled)")
    skew: Literal["dirichlet", "none"] = Field(
        "dirichlet", description="sampled clients' labels: Dir(alpha) proportions or none"
    )

    def options(self) -> dict[str, Any]:
        options: dict[str, dict[str, Any]] = {
            "iid": {},
            "dirichlet": {"alpha": self.alpha, "min_size": self.min_size},
            "shards": {"shards_per_client": self.shards_per_client},
            "labels": {"labels_per_client": self.labels_per_client},
            "quantity": {
                "distribution": self.distribution,
                "sigma": self.sigma,
                "exponent": self.exponent,
            },
            "natural": {},
            "sampled": {
                "examples_per_client": self.examples_per_client,
                "sigma": self.sigma,
                "alpha": self.alpha if self.skew == "dirichlet" else None,
            },
        }
        return options[self.kind]


class DataConfig(_Section):
    """Dataset, federation size and partition."""

    dataset: Literal["fashion_mnist", "digits", "synthetic"] = "fashion_mnist"
    path: str | None = Field(None, description="directory with the dataset files")
    num_clients: int = Field(100, ge=1)
    test_fraction: float = Field(0.2, ge=0, lt=1, description="per-client local test share")
    partition: PartitionConfig = PartitionConfig()
    synthetic_alpha: float = Field(1.0, ge=0, description="Synthetic(alpha, beta): alpha")
    synthetic_beta: float = Field(1.0, ge=0, description="Synthetic(alpha, beta): beta")
    seed: int | None = Field(None, ge=0, description="partition seed (default: the run's)")
    federation: str | None = Field(
        None, description="pkg.module:build, a function returning your Federation"
    )

    def source_options(self) -> dict[str, Any]:
        if self.dataset != "synthetic":
            return {}
        return {
            "alpha": self.synthetic_alpha,
            "beta": self.synthetic_beta,
            "num_clients": self.num_clients,
        }


class ModelConfig(_Section):
    name: Literal["logreg", "mlp", "mlp2nn", "cnn", "small_cnn", "lenet5"] = "small_cnn"


class TaskConfig(_Section):
    """The user's task by import path (instead of a built-in ``[model]``): ``name`` a
    ``Task`` or a function returning one, or ``model`` a model factory with optional
    ``loss`` and ``correct`` functions."""

    name: str | None = Field(None, description="pkg.module:task (a Task or a function)")
    model: str | None = Field(None, description="pkg.module:Model (a model factory)")
    loss: str | None = Field(None, description="pkg.module:loss (mean loss of a batch)")
    correct: str | None = Field(None, description="pkg.module:correct (correct count)")

    @model_validator(mode="after")
    def _one_way(self) -> TaskConfig:
        if self.name and (self.model or self.loss or self.correct):
            raise ValueError("give task.name, or task.model (with loss, correct), not both")
        if (self.loss or self.correct) and not self.model:
            raise ValueError("task.loss and task.correct need task.model")
        return self

    @property
    def given(self) -> bool:
        return bool(self.name or self.model)


class EvaluationConfig(_Section):
    every: int = Field(1, ge=1, description="evaluate every k rounds (and after the last)")
    centralized: bool = True
    federated_clients: int = Field(10, ge=-1, description="clients for federated eval; -1 all")
    finetune_epochs: int = Field(0, ge=0, description="also evaluate after local fine-tuning")
    test_examples: int | None = Field(
        None,
        ge=1,
        description="centralised evaluation on this many test examples, drawn once from the"
        " seed (default: all)",
    )


class DetectionConfig(_Section):
    """Per-client anomaly scores every round, flagging and quarantine
    (``potluck.aggregate.anomaly``)."""

    scores: list[Literal["norm", "cosine", "krum"]] = Field(
        ["norm", "cosine"], description="scores recorded per client each round"
    )
    flag_on: Literal["norm", "cosine", "krum"] = Field("norm", description="the flagging score")
    threshold: float = Field(3.0, gt=0, description="flag past this many scaled MADs")
    quarantine: bool = Field(False, description="leave clients flagged `strikes` times out")
    strikes: int = Field(2, ge=1, description="flagged rounds before quarantine")

    @model_validator(mode="after")
    def _flag_on_recorded(self) -> DetectionConfig:
        if self.flag_on not in self.scores:
            raise ValueError(
                f"flag_on = {self.flag_on!r} must be one of the recorded scores {self.scores}"
            )
        return self


class MonitoringConfig(_Section):
    """What a run monitors besides its metrics (``potluck.monitor``): data-drift summaries,
    fairness groups and the convergence diagnostics' windows."""

    summaries: bool = Field(False, description="clients summarise their data; drift measured")
    summary_bins: int = Field(16, ge=2, le=4096, description="input-value histogram bins")
    summary_every: int = Field(1, ge=1, description="summaries in round 1 and every k-th")
    summary_noise: float = Field(0.0, ge=0, description="std of the noise on each count")
    noise: Literal["seed", "secure"] = Field("seed", description="the noise's source")
    shift_threshold: float = Field(0.2, gt=0, le=1, description="a shifted client's distance")
    groups: dict[str, list[int]] = Field(
        default_factory=dict, description="client ids per group, for per-group accuracy"
    )
    window: int = Field(5, ge=2, description="rounds of the trends and the plateau test")
    plateau_tol: float = Field(1e-3, ge=0, description="relative gain below which: plateau")
    divergence_factor: float = Field(2.0, gt=1, description="loss past this x its best")


class DriftConfig(_Section):
    """An injected data drift (``monitor.drift.DriftScenario``), to test drift detection."""

    start_round: int = Field(..., ge=1, description="the first round of drifted data")
    fraction: float = Field(..., gt=0, le=1, description="share of the clients that drift")
    kind: Literal["features", "labels"] = Field("features", description="covariate or prior")
    shift: float = Field(1.0, description="added to every input value (features)")


class ClockConfig(_Section):
    """Synchronous rounds on virtual time (``potluck.core.clock``): a deadline, late
    members dropped or given the partial work that fits it, over-selection."""

    deadline_s: float | None = Field(None, gt=0, description="virtual seconds a round waits")
    late: Literal["drop", "partial"] = Field(
        "drop", description='"partial": ask each member for the work that fits the deadline'
    )
    over_selection: float = Field(
        0.0, ge=0, le=10, description="sample K (1 + this) members, keep the first K answers"
    )
    server_s: float = Field(0.0, ge=0, description="the server's own virtual seconds a round")
    start_hour: float = Field(0.0, ge=0, lt=24, description="time of day round 1 starts")
    adaptive_work: bool = Field(
        False, description="local work in proportion to the device's speed (median: full)"
    )
    adaptive_batch: bool = Field(
        False, description="batch size in proportion to the device's memory (median: full)"
    )

    @model_validator(mode="after")
    def _partial_needs_deadline(self) -> ClockConfig:
        if self.late == "partial" and self.deadline_s is None:
            raise ValueError('late = "partial" needs a deadline_s to fit the work into')
        return self


class ProfilesConfig(_Section):
    """Device profiles (``potluck.data.profiles``): drawn lognormal around medians, or read
    from a trace file (CSV or JSON, one device a row)."""

    kind: Literal["lognormal", "trace"] = "lognormal"
    path: str | None = Field(None, description="the trace file (kind = trace)")
    speed: float = Field(20.0, gt=0, description="median local steps per second")
    speed_sigma: float = Field(0.5, ge=0, description="lognormal sigma of the speeds")
    down_mbps: float = Field(20.0, gt=0, description="median download megabits per second")
    up_mbps: float = Field(5.0, gt=0, description="median upload megabits per second")
    bandwidth_sigma: float = Field(0.8, ge=0, description="lognormal sigma of bandwidths")
    latency_ms: float = Field(50.0, ge=0, description="median one-way latency")
    latency_sigma: float = Field(0.5, ge=0)
    failure: float = Field(0.0, ge=0, le=1, description="chance a round's answer is lost")
    available_hours: float = Field(24.0, gt=0, le=24, description="hours online a day")
    memory_gb: float = Field(4.0, gt=0, description="median memory for training (GB)")
    memory_sigma: float = Field(0.5, ge=0, description="lognormal sigma of the memories")

    @model_validator(mode="after")
    def _trace_has_path(self) -> ProfilesConfig:
        if (self.kind == "trace") != (self.path is not None):
            raise ValueError('give path exactly when kind = "trace"')
        return self


class AsyncConfig(_Section):
    """Asynchronous FL (``potluck.buffered``): FedBuff (the defaults) or FedAsync (``buffer
    = 1``, ``mix = "model"``), on the virtual clock."""

    concurrency: int = Field(..., ge=1, description="clients training at once")
    buffer: int = Field(10, ge=1, description="updates per server step (FedBuff's K)")
    staleness: Literal["constant", "polynomial", "hinge"] = Field(
        "polynomial", description="s(tau): 1, (1 + tau)^-a, or hinge at b"
    )
    a: float = Field(0.5, ge=0, description="the staleness function's exponent or slope")
    b: float = Field(4.0, ge=0, description="the hinge's knee")
    mix: Literal["delta", "model"] = Field(
        "delta", description='"model": FedAsync mixes in the client\'s model'
    )
    max_staleness: int | None = Field(None, ge=0, description="older updates are dropped")

    @model_validator(mode="after")
    def _buffer_fits(self) -> AsyncConfig:
        if self.buffer > self.concurrency:
            raise ValueError(
                f"buffer = {self.buffer} is more than concurrency = {self.concurrency}: "
                "the clients in flight could never fill it"
            )
        return self


class PrivacyConfig(_Section):
    """The privacy budget of a run with a private mechanism (aggregator ``dp_mean``,
    ``dp_mean_adaptive`` or ``dp_ftrl``; transform ``local_dp``)."""

    delta: float = Field(1e-5, gt=0, lt=1, description="epsilon is stated at this delta")
    max_epsilon: float | None = Field(None, gt=0, description="stop before exceeding it")
    target_epsilon: float | None = Field(
        None, gt=0, description="set the noise multiplier so that all rounds spend it"
    )
    accountant: Literal["rdp", "pld"] = Field("rdp", description="dp-accounting's RDP or PLD")


class RunConfig(_Section):
    engine: Literal["auto", "inline", "vectorized", "pool", "ray", "grpc"] = Field(
        "inline",
        description='where clients train; "auto" picks and records the fastest; "grpc" is '
        "set by potluck server",
    )
    workers: int | None = Field(None, ge=1, description="pool/ray workers (default: per core)")
    ray_address: str | None = Field(None, description="Ray cluster address (default: local)")
    checkpoint_every: int = Field(1, ge=1)
    threads: int | None = Field(
        None, ge=1, description="torch intra-op threads (default: torch's, then recorded)"
    )
    device: str = Field(
        "cpu",
        description='where the inline and vectorized engines train and evaluate: "cpu", '
        '"cuda", "cuda:N" or "mps" (a deployed site: potluck client --device)',
    )
    store: str = Field(default_factory=default_store, description="run store directory")
    name: str | None = None

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        from potluck.core.device import resolve_device

        resolve_device(value)  # a device this machine has, before any data is loaded
        return value


class DeployConfig(_Section):
    """Deployment over gRPC (``potluck server``); ignored by simulations."""

    listen: str = Field("127.0.0.1:50051", description="host:port the server listens on")
    min_clients: int = Field(1, ge=1, description="clients connected before round 1")
    min_updates: int = Field(1, ge=1, description="updates needed to move the model")
    max_update_norm: float | None = Field(
        None,
        gt=0,
        description="refuse updates with an uploaded array (delta, term uploads) of a larger"
        " L2 norm (any run)",
    )
    max_weight: float | None = Field(
        None, gt=0, description="refuse updates claiming a larger aggregation weight (any run)"
    )
    max_norm_ratio: float = Field(
        10.0,
        description="refuse a member's update with an uploaded array of a larger L2 norm than"
        " this many times the round's median (from 3 updates on; 0: off)",
    )
    max_weight_ratio: float = Field(
        10.0,
        description="cap a member's aggregation weight at this many times the round's median"
        " (from 3 updates on; 0: off)",
    )
    round_timeout_s: float = Field(600.0, gt=0, description="deadline of a round's clients")
    join_timeout_s: float = Field(3600.0, gt=0, description="wait for min_clients this long")
    poll_timeout_s: float = Field(20.0, gt=0, description="a client's long poll")
    max_message_mb: float = Field(512.0, gt=0, description="larger messages are refused")
    reply_factor: float = Field(
        4.0, ge=1, description="an answer may be this many times its task's size, plus 1 MiB"
    )
    receive_timeout_s: float = Field(
        60.0, gt=0, description="a message must arrive whole (and a reply be taken) this fast"
    )
    max_streams_per_client: int = Field(
        4, ge=2, description="open streams a client (its certificate) may hold at once"
    )
    max_streams: int | None = Field(
        None, ge=2, description="open streams in all (default: the larger of 256 and 4 per client)"
    )
    admit: list[str] | None = Field(
        None, description="admitted client names; a client's id is its position"
    )
    reuse_memory: bool = Field(
        True, description="glibc keeps freed buffers for the next round (fewer page faults)"
    )

    @field_validator("max_norm_ratio", "max_weight_ratio")
    @classmethod
    def _ratio(cls, value: float) -> float:
        if value != 0 and not value >= 1:
            raise ValueError(f"must be 0 (off) or a number >= 1, got {value}")
        return value

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"expected HOST:PORT, got {value!r}")
        return value


FORMAT: Literal[2] = 2  # revision 2: a section per part (format 1: one [algorithm] bag of fields)
PART_SECTIONS = ("sampler", "stragglers", "client", "aggregator", "server")
CHAIN_SECTIONS = ("terms", "transforms", "downlink")
# the default experiment's local training, below whatever a preset or the config sets
DEFAULT_PARTS: dict[str, Any] = {
    "client": {"name": "sgd", "epochs": 2, "batch_size": 32, "lr": 0.1}
}


class ExperimentConfig(_Section):
    """A whole experiment; the defaults are potluck's default experiment."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, allow_inf_nan=False, populate_by_name=True
    )

    format: Literal[2] = FORMAT
    seed: int = Field(0, ge=0)
    rounds: int = Field(20, ge=1)
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    algorithm: dict[str, Any] = Field(default_factory=lambda: {"name": "fedavg"})
    sampler: dict[str, Any] = Field(default_factory=dict)
    stragglers: dict[str, Any] = Field(default_factory=dict)
    client: dict[str, Any] = Field(default_factory=dict)
    terms: list[dict[str, Any]] | None = None
    transforms: list[dict[str, Any]] | None = None
    downlink: list[dict[str, Any]] | None = None
    aggregator: dict[str, Any] = Field(default_factory=dict)
    server: dict[str, Any] = Field(default_factory=dict)
    privacy: PrivacyConfig | None = None
    attack: dict[str, Any] | None = None
    detection: DetectionConfig = DetectionConfig()
    monitoring: MonitoringConfig = MonitoringConfig()
    drift: DriftConfig | None = None
    clock: ClockConfig | None = None
    profiles: ProfilesConfig | None = None
    asynchrony: AsyncConfig | None = Field(None, alias="async")
    evaluation: EvaluationConfig = EvaluationConfig()
    run: RunConfig = RunConfig()
    deploy: DeployConfig = DeployConfig()

    @classmethod
    def from_dict(cls, data: dict[str, Any], overrides: Sequence[str] = ()) -> ExperimentConfig:
        """Validate ``data`` after applying ``key=value`` overrides; ConfigError if invalid.
        The algorithm's parts are written out in full (``algorithm_parts().to_config()``)."""
        merged = upgrade(_apply_overrides(data, overrides))
        try:
            cfg = cls.model_validate(merged)
        except ValidationError as exc:
            raise ConfigError(_format_errors(exc)) from None
        try:
            written = cfg.algorithm_parts().to_config()
            attack = cfg.build_attack()
            if attack is not None:
                written["attack"] = part_config("attack", attack)
        except (RegistryError, NotNameable, ValueError, TypeError) as exc:
            raise ConfigError(f"invalid experiment configuration: {exc}") from None
        return cfg.model_copy(update=written)

    @classmethod
    def from_toml(cls, path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
        """Read and validate a TOML experiment file; every problem with the file is a
        ``ConfigError`` naming it. An empty file is refused: to run the default experiment,
        give no file."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"experiment file not found: {path}") from None
        except IsADirectoryError:
            raise ConfigError(f"{path} is a directory, not an experiment file") from None
        except UnicodeDecodeError as exc:
            where = f"{exc.reason} at byte {exc.start}"
            raise ConfigError(f"{path}: not a UTF-8 text file ({where})") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
        except RecursionError:
            raise ConfigError(f"{path}: invalid TOML: nested too deeply") from None
        if not data:
            raise ConfigError(
                f"{path} holds no settings; to run the default experiment, give no file"
            )
        return cls.from_dict(data, overrides)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.model_dump(mode="json", exclude_none=True, by_alias=True))

    def build(self) -> Experiment:
        """The runnable ``Experiment`` (loads the dataset, builds the partition)."""
        import torch

        from potluck.aggregate.anomaly import Detection
        from potluck.core.clock import ClockPolicy
        from potluck.monitor import DriftScenario, Monitoring
        from potluck.orchestrator import Evaluation, Experiment
        from potluck.privacy.ledger import PrivacyBudget
        from potluck.sampling.asynchrony import Asynchrony

        federation = self.build_federation()
        # float results depend on the intra-op thread count: fix it in the stored config so a
        # resumed run computes exactly as the interrupted one did
        run = self.run.model_copy(update={"threads": self.run.threads or torch.get_num_threads()})
        return Experiment(
            task=self.build_task(federation),
            federation=federation,
            algorithm=self.algorithm_parts(),
            rounds=self.rounds,
            seed=self.seed,
            evaluation=Evaluation(**self.evaluation.model_dump()),
            engine=run.engine,
            workers=run.workers,
            ray_address=run.ray_address,
            checkpoint_every=run.checkpoint_every,
            threads=run.threads,
            device=run.device,
            min_updates=self.deploy.min_updates,
            max_update_norm=self.deploy.max_update_norm,
            max_weight=self.deploy.max_weight,
            max_norm_ratio=self.deploy.max_norm_ratio or None,
            max_weight_ratio=self.deploy.max_weight_ratio or None,
            privacy=PrivacyBudget(**self.privacy.model_dump()) if self.privacy else None,
            attack=self.build_attack(),
            detection=Detection(**self.detection.model_dump()),
            monitoring=Monitoring(**self.monitoring.model_dump()),
            drift=DriftScenario(**self.drift.model_dump()) if self.drift else None,
            clock=ClockPolicy(**self.clock.model_dump()) if self.clock else None,
            profiles=self.build_profiles(),
            asynchrony=Asynchrony(**self.asynchrony.model_dump()) if self.asynchrony else None,
            name=run.name,
            config=self.model_copy(update={"run": run}).to_dict(),
        )

    def build_profiles(self) -> LognormalProfiles | TraceProfiles | None:
        """The device profiles of ``[profiles]``, if given (a trace is read when drawn)."""
        from potluck.data.profiles import LognormalProfiles, TraceProfiles

        p = self.profiles
        if p is None:
            return None
        if p.kind == "trace":
            assert p.path is not None
            return TraceProfiles(p.path)
        return LognormalProfiles(**p.model_dump(exclude={"kind", "path"}))

    def build_attack(self) -> Attack | None:
        """The poisoning attack of ``[attack]`` (``name`` and its parameters), if any."""
        from potluck.attacks.poisoning import check_attack
        from potluck.core.registry import build_part

        if self.attack is None:
            return None
        return check_attack(build_part("attack", self.attack, "attack"))

    def build_task(self, federation: Federation) -> Task:
        """The task: the user's (``[task]``) or the built-in ``[model]`` for the data."""
        from potluck.core.registry import load_path
        from potluck.core.task import Task
        from potluck.models import build_model

        t = self.task
        if t.name:
            from potluck.deployment import load_task  # gRPC, only for a named task

            return load_task(t.name)
        if t.model:
            extra = {
                k: load_path(v, f"task.{k}")
                for k, v in (("loss_fn", t.loss), ("correct_fn", t.correct))
                if v
            }
            return Task(model_fn=load_path(t.model, "task.model"), name=t.model, **extra)
        source, model_name = federation.source, self.model.name
        return Task(
            model_fn=lambda: build_model(
                model_name, input_shape=source.input_shape, num_classes=source.num_classes
            ),
            name=f"{self.data.dataset}/{model_name}",
        )

    def build_federation(self) -> Federation:
        """The federation this config describes (loads the dataset, builds the partition),
        or the user's, built by ``data.federation``."""
        from potluck.data.federation import Federation

        data = self.data
        if data.federation:
            return Federation.load(data.federation)
        return Federation.from_config(
            data.dataset,
            num_clients=data.num_clients,
            partition=data.partition.kind,
            partition_options=data.partition.options(),
            test_fraction=data.test_fraction,
            seed=self.seed if data.seed is None else data.seed,
            path=data.path,
            source_options=data.source_options(),
        )

    def algorithm_parts(self) -> Algorithm:
        """The algorithm: the named one, its parts overridden by the sections given."""
        from potluck.algorithms.base import from_config

        given = self.model_fields_set
        sections: dict[str, Any] = {"algorithm": self.algorithm}
        for name in PART_SECTIONS:
            if name in given or getattr(self, name):
                sections[name] = getattr(self, name)
        for name in CHAIN_SECTIONS:
            if getattr(self, name) is not None:
                sections[name] = getattr(self, name)
        return from_config(sections, defaults=DEFAULT_PARTS)


def describe_experiment(experiment: Experiment) -> dict[str, Any]:
    """The config of an experiment built in Python, from which ``potluck resume`` rebuilds
    it; what has no name (a lambda model, an in-memory federation, a part defined in
    ``__main__``) is listed under ``not_resumable`` with what to do about it.

    Example:
        >>> import torch
        >>> from potluck import Experiment, Federation, Task
        >>> from potluck.algorithms import fedavg
        >>> fed = Federation.from_config("digits", num_clients=4, partition="iid")
        >>> exp = Experiment(Task(lambda: torch.nn.Linear(64, 10)), fed,
        ...                  fedavg(clients_per_round=2), rounds=1)
        >>> describe_experiment(exp)["not_resumable"]  # doctest: +ELLIPSIS
        'task: the model factory <lambda> is a lambda: define a named function at module level...'
    """
    from potluck.core.registry import import_path

    problems: list[str] = []
    out: dict[str, Any] = {"format": FORMAT, "seed": experiment.seed, "rounds": experiment.rounds}
    out["data"] = _data_section(experiment, problems)
    task = experiment.task
    if task.ref:
        out["task"] = {"name": task.ref}
    else:
        section = {}
        for key, fn in (
            ("model", task.model_fn),
            ("loss", task.loss_fn),
            ("correct", task.correct_fn),
        ):
            try:
                section[key] = import_path(fn)
            except NotNameable as exc:
                what = {"model": "model factory", "loss": "loss", "correct": "correct count"}[key]
                problems.append(f"task: the {what} {exc}")
        out["task"] = section
    try:
        out.update(experiment.algorithm.to_config())
    except NotNameable as exc:
        problems.append(f"algorithm: {exc}")
    out["evaluation"] = dataclasses.asdict(experiment.evaluation)
    detection = dataclasses.asdict(experiment.detection)
    out["detection"] = {**detection, "scores": list(detection["scores"])}
    monitoring = dataclasses.asdict(experiment.monitoring)
    out["monitoring"] = {
        **monitoring,
        "groups": {k: list(v) for k, v in monitoring["groups"].items()},
    }
    if experiment.drift is not None:
        out["drift"] = dataclasses.asdict(experiment.drift)
    out["run"] = _given(
        engine=experiment.engine,
        workers=experiment.workers,
        ray_address=experiment.ray_address,
        checkpoint_every=experiment.checkpoint_every,
        threads=experiment.threads,
        device=experiment.device,
        name=experiment.name,
    )
    if experiment.privacy is not None:
        out["privacy"] = _given(**dataclasses.asdict(experiment.privacy))
    if experiment.clock is not None:
        out["clock"] = _given(**dataclasses.asdict(experiment.clock))
    if experiment.asynchrony is not None:
        out["async"] = _given(**dataclasses.asdict(experiment.asynchrony))
    if experiment.profiles is not None:
        p = experiment.profiles
        kind = "trace" if hasattr(p, "path") else "lognormal"
        out["profiles"] = {"kind": kind, **dataclasses.asdict(p)}
    if experiment.attack is not None:
        try:
            out["attack"] = part_config("attack", experiment.attack)
        except NotNameable as exc:
            problems.append(f"attack: {exc}")
    out["deploy"] = _given(
        min_updates=experiment.min_updates,
        max_update_norm=experiment.max_update_norm,
        max_weight=experiment.max_weight,
        max_norm_ratio=experiment.max_norm_ratio or 0.0,  # None (off) is 0 in a config
        max_weight_ratio=experiment.max_weight_ratio or 0.0,
    )
    if problems:
        out["not_resumable"] = "; ".join(problems)
    return out


def _given(**fields: Any) -> dict[str, Any]:
    """``fields`` without the ``None`` ones (TOML has no null)."""
    return {k: v for k, v in fields.items() if v is not None}


def _data_section(experiment: Experiment, problems: list[str]) -> dict[str, Any]:
    recipe = experiment.federation.recipe
    if recipe is None:
        problems.append(
            "data: the federation was built in memory (e.g. Federation.from_client_data): "
            "build it in a function of an importable module and pass "
            "Federation.load('pkg.module:build'), so a run can rebuild it"
        )
        return {}
    if "federation" in recipe:
        return {"federation": recipe["federation"]}
    options = dict(recipe["source_options"])
    section: dict[str, Any] = {
        "dataset": recipe["dataset"],
        "num_clients": recipe["num_clients"] or options.get("num_clients", 0),
        "test_fraction": recipe["test_fraction"],
        "partition": {"kind": recipe["partition"], **recipe["partition_options"]},
    }
    if recipe["path"]:
        section["path"] = recipe["path"]
    if recipe["seed"] != experiment.seed:
        section["seed"] = recipe["seed"]
    for key in ("alpha", "beta"):
        if key in options:
            section[f"synthetic_{key}"] = options[key]
    return section


def upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """A config of format 1 (before revision 2: ``[algorithm]`` with ``mu``, ``q``, ``lam``,
    ``personal_layers``, ``stragglers`` and ``clip_norm``, ``[server] optimizer``) in the
    current format; other configs unchanged.

    Example:
        >>> upgrade({"algorithm": {"name": "fedprox", "mu": 0.1, "q": 1.0, "stragglers": 0.5}})
        {'algorithm': {'name': 'fedprox', 'mu': 0.1}, 'stragglers': {'fraction': 0.5}}
    """
    if "format" in data or not _legacy(data):
        return data
    out = {k: v for k, v in data.items()}
    algo = dict(out.get("algorithm") or {})
    name = algo.get("name", "fedavg")
    own = {"fedprox": ("mu",), "qffl": ("q",), "ditto": ("lam",), "fedper": ("personal_layers",)}
    head = {"name": name, **{k: algo[k] for k in own.get(name, ()) if k in algo}}
    if "label" in algo:
        head["label"] = algo["label"]
    out["algorithm"] = head
    if algo.get("stragglers"):
        out["stragglers"] = {**out.get("stragglers", {}), "fraction": algo["stragglers"]}
    if algo.get("clip_norm"):
        keep = [{"name": "keep_local", "layers": algo.get("personal_layers", [])}]
        out["transforms"] = (keep if name == "fedper" else []) + [
            {"name": "clip", "max_norm": algo["clip_norm"]}
        ]
    server = dict(out.get("server") or {})
    if "optimizer" in server:
        kind = server.pop("optimizer")
        keep_keys = {"sgd": ("lr", "momentum"), "adagrad": ("lr", "beta1", "tau")}
        wanted = keep_keys.get(kind, ("lr", "beta1", "beta2", "tau"))
        out["server"] = {"name": kind, **{k: server[k] for k in wanted if k in server}}
    return out


def _legacy(data: Mapping[str, Any]) -> bool:
    algo, server = data.get("algorithm") or {}, data.get("server") or {}
    if not isinstance(algo, Mapping) or not isinstance(server, Mapping):
        return False
    if "optimizer" in server or {"stragglers", "clip_norm"} & set(algo):
        return True
    return len({"mu", "q", "lam", "personal_layers"} & set(algo)) > 1


def _apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    merged: dict[str, Any] = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        node = merged
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
            node = child
        node[parts[-1]] = _parse_value(raw.strip())
    return merged


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def _parse_value(raw: str) -> Any:
    """A TOML literal (``0.1``, ``true``, ``"x"``, ``[1, 2]``), else the raw string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _format_errors(exc: ValidationError) -> str:
    lines = [f"invalid experiment configuration ({exc.error_count()} problem(s)):"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field" + _allowed_hint(err["loc"])
        lines.append(f"  {where}: {msg} (got {err.get('input')!r})")
    return "\n".join(lines)


def _allowed_hint(loc: tuple[int | str, ...]) -> str:
    model: type[BaseModel] = ExperimentConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    import difflib

    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; allowed: " + ", ".join(model.model_fields)
