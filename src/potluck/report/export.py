"""A stored run in other tools' formats: CSV, JSON, an MLflow run, TensorBoard event files.

- ``csv``: ``rounds.csv`` (one row per round, one column per metric) and ``clients.csv``
  (``round, client, metric, value``: long, since clients have different metrics);
- ``json``: one file with the run's id, name, status, config, summary, rounds and per-client
  metrics (NaN and infinities as ``null``: JSON has none);
- ``mlflow``: one MLflow run (``mlflow-skinny``, the ``export`` extra) in an experiment named
  after the run store's runs (``potluck``): the config flattened into parameters, every
  finite round metric at ``step = round``, the run id, status and algorithm as tags. A local
  directory as the tracking URI is a file store, which MLflow 3 allows only with
  ``MLFLOW_ALLOW_FILE_STORE=true`` (set here for that case);
- ``tensorboard``: event files (``tensorboard``, the ``export`` extra) with every finite
  round metric as a scalar at ``step = round``.

Non-finite values are left out of MLflow and TensorBoard (MLflow refuses infinities; a NaN
would break their charts) and say so in the returned count.

Example:
    >>> import tempfile
    >>> from potluck.store import RunStore
    >>> store = RunStore(tempfile.mkdtemp())
    >>> run = store.create_run({"seed": 1}, name="demo")
    >>> store.commit_round(run, 1, {"test_accuracy": 0.5}, [(2, {"train_loss": 1.5})])
    >>> out = export_run(store, run, "csv", Path(tempfile.mkdtemp()))
    >>> [p.name for p in out.paths], out.values
    (['rounds.csv', 'clients.csv'], 2)
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from potluck.store.sqlite import RunStore

FORMATS = ("csv", "json", "mlflow", "tensorboard")
MLFLOW_EXPERIMENT = "potluck"
_PARAM_CHARS = 6000  # MLflow's longest parameter value


@dataclass(frozen=True)
class Exported:
    """Where a run went: the files or tracking URI (``paths``), the values written and the
    non-finite ones left out."""

    paths: list[Path]
    values: int
    skipped: int = 0
    target: str = ""


def export_run(
    store: RunStore, run_id: str, fmt: str, out: Path, *, tracking_uri: str | None = None
) -> Exported:
    """Export run ``run_id`` of ``store`` as ``fmt`` into ``out`` (a directory; for
    ``mlflow`` the file store when no ``tracking_uri`` is given)."""
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "csv":
        return _csv(store, run_id, out)
    if fmt == "json":
        return _json(store, run_id, out)
    if fmt == "mlflow":
        return _mlflow(store, run_id, tracking_uri or out.resolve().as_uri())
    return _tensorboard(store, run_id, out)


def _csv(store: RunStore, run_id: str, out: Path) -> Exported:
    out.mkdir(parents=True, exist_ok=True)
    rounds = store.rounds(run_id)
    names = list(dict.fromkeys(k for r in rounds for k in r.metrics))
    values = 0
    with (out / "rounds.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["round", *names])
        for r in rounds:
            w.writerow([r.round, *(_csv_value(r.metrics.get(n)) for n in names)])
            values += len(r.metrics)
    with (out / "clients.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["round", "client", "metric", "value"])
        for rnd, client, metrics in store.client_metrics(run_id):
            for name, value in metrics.items():
                w.writerow([rnd, client, name, _csv_value(value)])
                values += 1
    return Exported([out / "rounds.csv", out / "clients.csv"], values)


def _csv_value(value: float | None) -> str:
    return "" if value is None else repr(float(value))  # repr: every digit; nan, inf as such


def _json(store: RunStore, run_id: str, out: Path) -> Exported:
    out.mkdir(parents=True, exist_ok=True)
    info = store.get_run(run_id)
    rounds = [{"round": r.round, **_finite(r.metrics)} for r in store.rounds(run_id)]
    clients = [
        {"round": rnd, "client": c, **_finite(m)} for rnd, c, m in store.client_metrics(run_id)
    ]
    doc = {
        "run": run_id,
        "name": info.name,
        "status": info.status,
        "created_at": info.created_at,
        "config": info.config,
        "summary": info.summary,
        "rounds": rounds,
        "clients": clients,
    }
    path = out / f"{run_id}.json"
    path.write_text(json.dumps(doc, indent=1, allow_nan=False), encoding="utf-8")
    values = sum(len(r) - 1 for r in rounds) + sum(len(c) - 2 for c in clients)
    return Exported([path], values)


def _finite(metrics: Mapping[str, float]) -> dict[str, float | None]:
    return {k: v if math.isfinite(v) else None for k, v in metrics.items()}


def _mlflow(store: RunStore, run_id: str, uri: str) -> Exported:
    if uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # a local store: allowed
    try:
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise RuntimeError(
            "export --format mlflow needs MLflow: pip install 'potluck[export]' (mlflow-skinny)"
        ) from None
    info = store.get_run(run_id)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    exp_id = (
        experiment.experiment_id
        if experiment is not None
        else client.create_experiment(MLFLOW_EXPERIMENT)
    )
    tags = {"potluck.run_id": run_id, "potluck.status": info.status}
    algorithm = info.config.get("algorithm")
    if isinstance(algorithm, dict) and algorithm.get("name"):
        tags["potluck.algorithm"] = str(algorithm["name"])
    run = client.create_run(exp_id, run_name=info.name or run_id, tags=tags)
    params = [Param(k, v[:_PARAM_CHARS]) for k, v in _flat(info.config)]
    for start in range(0, len(params), 100):  # MLflow's batch limit for parameters
        client.log_batch(run.info.run_id, params=params[start : start + 100])
    metrics, skipped = [], 0
    for r in store.rounds(run_id):
        stamp = _millis(r.committed_at)
        for name, value in r.metrics.items():
            if math.isfinite(value):
                metrics.append(Metric(name, value, stamp, r.round))
            else:
                skipped += 1
    for start in range(0, len(metrics), 1000):  # and for metrics
        client.log_batch(run.info.run_id, metrics=metrics[start : start + 1000])
    client.set_terminated(run.info.run_id, "FINISHED" if info.status == "finished" else "FAILED")
    return Exported([], len(metrics), skipped, target=f"{uri} (run {run.info.run_id})")


def _flat(value: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """A nested config as ``section.key`` parameters (lists as JSON).

    Example:
        >>> list(_flat({"seed": 0, "data": {"dataset": "digits", "ids": [1, 2]}}))
        [('seed', '0'), ('data.dataset', 'digits'), ('data.ids', '[1, 2]')]
    """
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _flat(v, f"{prefix}{k}.")
    else:
        text = json.dumps(value) if isinstance(value, list | bool) or value is None else str(value)
        yield prefix.rstrip("."), text


def _millis(iso: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(iso).timestamp() * 1000)


def _tensorboard(store: RunStore, run_id: str, out: Path) -> Exported:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RuntimeError(
            "export --format tensorboard needs TensorBoard: pip install 'potluck[export]'"
        ) from None
    logdir = out / run_id
    values, skipped = 0, 0
    writer = SummaryWriter(log_dir=str(logdir))
    try:
        for r in store.rounds(run_id):
            for name, value in r.metrics.items():
                if math.isfinite(value):
                    writer.add_scalar(name, value, r.round)
                    values += 1
                else:
                    skipped += 1
    finally:
        writer.close()
    return Exported(sorted(logdir.glob("events.out.tfevents.*")), values, skipped)
