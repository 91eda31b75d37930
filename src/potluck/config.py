"""Experiment configuration: TOML <-> validated objects -> an ``Experiment``.

Every field is validated before anything starts; a wrong key, type or value is refused with
a message naming the field and what is allowed. ``--set key=value`` overrides use dotted keys
(``client.lr=0.1``) and TOML literals for values.

Example:
    >>> cfg = ExperimentConfig.from_dict({"rounds": 3}, overrides=["client.lr=0.2"])
    >>> cfg.rounds, cfg.client.lr, cfg.data.dataset
    (3, 0.2, 'fashion_mnist')
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

if TYPE_CHECKING:
    from potluck.algorithms.base import Algorithm
    from potluck.data.federation import Federation
    from potluck.optim.base import ServerOptimizer
    from potluck.orchestrator import Experiment


def default_store() -> str:
    """The run store directory: ``$POTLUCK_STORE`` or ``./potluck-runs``."""
    return os.environ.get("POTLUCK_STORE", "potluck-runs")


class ConfigError(ValueError):
    """An experiment configuration that cannot be run, with every problem listed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PartitionConfig(_Section):
    """How the dataset is split among clients."""

    kind: Literal["iid", "dirichlet", "shards", "labels", "quantity", "natural"] = "dirichlet"
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (dirichlet)")
    min_size: int = Field(10, ge=1, description="minimum samples per client (dirichlet)")
    shards_per_client: int = Field(2, ge=1, description="shards per client (shards)")
    labels_per_client: int = Field(2, ge=1, description="distinct labels per client (labels)")
    distribution: Literal["lognormal", "powerlaw"] = "lognormal"
    sigma: float = Field(1.0, gt=0, description="lognormal sigma (quantity)")
    exponent: float = Field(1.5, gt=0, description="power-law exponent (quantity)")

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


class SamplerConfig(_Section):
    """Which clients take part each round: a count or a fraction."""

    clients_per_round: int | None = Field(10, ge=1)
    fraction: float | None = Field(None, gt=0, le=1)
    min_clients: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _one_of(self) -> SamplerConfig:
        if self.fraction is not None and "clients_per_round" not in self.model_fields_set:
            return self.model_copy(update={"clients_per_round": None})
        if (self.clients_per_round is None) == (self.fraction is None):
            raise ValueError("set exactly one of sampler.clients_per_round or sampler.fraction")
        return self


class ClientConfig(_Section):
    """Local training: epochs of mini-batch SGD."""

    epochs: int = Field(2, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)


class ServerConfig(_Section):
    """Server optimizer on the pseudo-gradient: SGD (lr 1 = FedAvg; momentum = FedAvgM),
    or FedAdam / FedYogi / FedAdagrad (Reddi et al. 2021) with beta1, beta2, tau."""

    optimizer: Literal["sgd", "adam", "yogi", "adagrad"] = "sgd"
    lr: float = Field(1.0, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1, description="sgd only")
    beta1: float = Field(0.9, ge=0, lt=1, description="adaptive only")
    beta2: float = Field(0.99, ge=0, lt=1, description="adam and yogi only")
    tau: float = Field(1e-3, gt=0, description="adaptive only: adaptivity degree")

    def build(self) -> ServerOptimizer:
        from potluck import optim

        if self.optimizer == "sgd":
            return optim.ServerSGD(self.lr, self.momentum)
        if self.optimizer == "adagrad":
            return optim.ServerAdagrad(self.lr, beta1=self.beta1, tau=self.tau)
        adaptive = {"adam": optim.ServerAdam, "yogi": optim.ServerYogi}[self.optimizer]
        return adaptive(self.lr, beta1=self.beta1, beta2=self.beta2, tau=self.tau)


class AlgorithmConfig(_Section):
    """The named algorithm and its own hyperparameters."""

    name: Literal[
        "fedavg", "fedsgd", "fedprox", "scaffold", "fednova", "qffl", "fedper", "ditto"
    ] = "fedavg"
    mu: float = Field(0.01, ge=0, description="FedProx proximal weight")
    q: float = Field(1.0, ge=0, description="q-FFL fairness parameter (0 = FedAvg objective)")
    lam: float = Field(0.1, ge=0, description="Ditto: personal model's pull to the global one")
    personal_layers: list[str] = Field(
        default_factory=list,
        description="FedPer: parameter-name prefixes kept local (default: last layer)",
    )
    stragglers: float = Field(
        0.0, ge=0, le=1, description="share of each cohort doing 1..E epochs (FedProx: kept)"
    )
    clip_norm: float | None = Field(None, gt=0, description="L2-clip each update (None = off)")

    @model_validator(mode="after")
    def _fedsgd_has_no_stragglers(self) -> AlgorithmConfig:
        if self.name == "fedsgd" and self.stragglers:
            raise ValueError("fedsgd takes one step per client: stragglers do not apply")
        return self


class EvaluationConfig(_Section):
    every: int = Field(1, ge=1, description="evaluate every k rounds (and after the last)")
    centralized: bool = True
    federated_clients: int = Field(10, ge=-1, description="clients for federated eval; -1 all")
    finetune_epochs: int = Field(0, ge=0, description="also evaluate after local fine-tuning")


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
    store: str = Field(default_factory=default_store, description="run store directory")
    name: str | None = None


class DeployConfig(_Section):
    """Deployment over gRPC (``potluck server``); ignored by simulations."""

    listen: str = Field("127.0.0.1:50051", description="host:port the server listens on")
    min_clients: int = Field(1, ge=1, description="clients connected before round 1")
    min_updates: int = Field(1, ge=1, description="updates needed to move the model")
    round_timeout_s: float = Field(600.0, gt=0, description="deadline of a round's clients")
    join_timeout_s: float = Field(3600.0, gt=0, description="wait for min_clients this long")
    poll_timeout_s: float = Field(20.0, gt=0, description="a client's long poll")
    max_message_mb: float = Field(512.0, gt=0, description="larger messages are refused")
    admit: list[str] | None = Field(
        None, description="admitted client names; a client's id is its position"
    )
    reuse_memory: bool = Field(
        True, description="glibc keeps freed buffers for the next round (fewer page faults)"
    )

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"expected HOST:PORT, got {value!r}")
        return value


class ExperimentConfig(_Section):
    """A whole experiment; the defaults are potluck's default experiment."""

    seed: int = Field(0, ge=0)
    rounds: int = Field(20, ge=1)
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    sampler: SamplerConfig = SamplerConfig()
    client: ClientConfig = ClientConfig()
    server: ServerConfig = ServerConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    run: RunConfig = RunConfig()
    deploy: DeployConfig = DeployConfig()

    @classmethod
    def from_dict(cls, data: dict[str, Any], overrides: Sequence[str] = ()) -> ExperimentConfig:
        """Validate ``data`` after applying ``key=value`` overrides; ConfigError if invalid."""
        merged = _apply_overrides(data, overrides)
        try:
            return cls.model_validate(merged)
        except ValidationError as exc:
            raise ConfigError(_format_errors(exc)) from None

    @classmethod
    def from_toml(cls, path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
        """Read and validate a TOML experiment file."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"experiment file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
        return cls.from_dict(data, overrides)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.model_dump(mode="json", exclude_none=True))

    def build(self) -> Experiment:
        """The runnable ``Experiment`` (loads the dataset, builds the partition)."""
        import torch

        from potluck.core.task import Task
        from potluck.models import build_model
        from potluck.orchestrator import Evaluation, Experiment

        federation = self.build_federation()
        source = federation.source
        model_name, dataset = self.model.name, self.data.dataset
        task = Task(
            model_fn=lambda: build_model(
                model_name, input_shape=source.input_shape, num_classes=source.num_classes
            ),
            name=f"{dataset}/{model_name}",
        )
        # float results depend on the intra-op thread count: fix it in the stored config so a
        # resumed run computes exactly as the interrupted one did
        run = self.run.model_copy(update={"threads": self.run.threads or torch.get_num_threads()})
        return Experiment(
            task=task,
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
            min_updates=self.deploy.min_updates,
            name=run.name,
            config=self.model_copy(update={"run": run}).to_dict(),
        )

    def build_federation(self) -> Federation:
        """The federation this config describes (loads the dataset, builds the partition)."""
        from potluck.data.federation import Federation

        data = self.data
        return Federation.from_config(
            data.dataset,
            num_clients=data.num_clients,
            partition=data.partition.kind,
            partition_options=data.partition.options(),
            test_fraction=data.test_fraction,
            seed=self.seed,
            path=data.path,
            source_options=data.source_options(),
        )

    def algorithm_parts(self) -> Algorithm:
        """The named algorithm with this config's hyperparameters."""
        from potluck import algorithms
        from potluck.updates import ClipNorm

        s, c, sv, a = self.sampler, self.client, self.server, self.algorithm
        clip = (ClipNorm(a.clip_norm),) if a.clip_norm else ()
        cohort: dict[str, Any] = {
            "clients_per_round": s.clients_per_round,
            "fraction": s.fraction,
            "min_clients": s.min_clients,
            "transforms": clip,
        }
        if a.name == "fedsgd":
            return replace(algorithms.fedsgd(**cohort), server=sv.build())
        local: dict[str, Any] = {
            "epochs": c.epochs,
            "batch_size": c.batch_size,
            "lr": c.lr,
            "momentum": c.momentum,
            "weight_decay": c.weight_decay,
            "server": sv.build(),
            "stragglers": a.stragglers,
        }
        if a.name == "fedprox":
            return algorithms.fedprox(mu=a.mu, **cohort, **local)
        if a.name == "qffl":
            return algorithms.qffl(q=a.q, **cohort, **local)
        if a.name == "ditto":
            return algorithms.ditto(lam=a.lam, **cohort, **local)
        if a.name == "fedper":
            return algorithms.fedper(personal_layers=tuple(a.personal_layers), **cohort, **local)
        named = {
            "fedavg": algorithms.fedavg,
            "scaffold": algorithms.scaffold,
            "fednova": algorithms.fednova,
        }
        return named[a.name](**cohort, **local)


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
    return "; allowed: " + ", ".join(model.model_fields)
