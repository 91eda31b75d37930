"""``potluck export`` round trips (CSV, JSON, MLflow's file store, TensorBoard's event files
read back and compared value by value) and ``potluck compare``."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from potluck.cli import app
from potluck.config import ExperimentConfig
from potluck.orchestrator import run_experiment
from potluck.report.compare import compare_rows
from potluck.report.export import export_run
from potluck.store.sqlite import RunStore

CFG = {
    "rounds": 3,
    "data": {"dataset": "digits", "num_clients": 8},
    "model": {"name": "mlp"},
    "sampler": {"clients_per_round": 3},
    "evaluation": {"federated_clients": 4},
}


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunStore, str]:
    root = tmp_path_factory.mktemp("runs")
    store = RunStore(root)
    result = run_experiment(
        ExperimentConfig.from_dict({**CFG, "run": {"name": "one"}}).build(), store
    )
    run_experiment(ExperimentConfig.from_dict({**CFG, "seed": 1, "rounds": 2}).build(), store)
    assert result.run_id is not None
    return store, result.run_id


def _finite_rounds(store: RunStore, run_id: str) -> dict[tuple[int, str], float]:
    return {
        (r.round, k): v
        for r in store.rounds(run_id)
        for k, v in r.metrics.items()
        if math.isfinite(v)
    }


def test_csv_round_trip(stored: tuple[RunStore, str], tmp_path: Path) -> None:
    store, run = stored
    out = export_run(store, run, "csv", tmp_path)
    with (tmp_path / "rounds.csv").open() as f:
        rows = list(csv.DictReader(f))
    back = {
        (int(row["round"]), k): float(v)
        for row in rows
        for k, v in row.items()
        if k != "round" and v
    }
    want = {(r.round, k): v for r in store.rounds(run) for k, v in r.metrics.items()}
    assert back.keys() == want.keys()
    assert all(back[k] == want[k] or (math.isnan(back[k]) and math.isnan(want[k])) for k in want)
    with (tmp_path / "clients.csv").open() as f:
        clients = list(csv.DictReader(f))
    expected = [(rnd, c, k, v) for rnd, c, m in store.client_metrics(run) for k, v in m.items()]
    assert len(clients) == len(expected) and out.values == len(want) + len(expected)
    first = clients[0]
    assert (int(first["round"]), int(first["client"]), first["metric"]) == expected[0][:3]
    assert float(first["value"]) == expected[0][3]


def test_json_round_trip(stored: tuple[RunStore, str], tmp_path: Path) -> None:
    store, run = stored
    (path,) = export_run(store, run, "json", tmp_path).paths
    doc = json.loads(path.read_text())
    assert doc["run"] == run and doc["name"] == "one" and doc["status"] == "finished"
    assert doc["config"] == store.get_run(run).config
    back = {
        (r["round"], k): v
        for r in doc["rounds"]
        for k, v in r.items()
        if k != "round" and v is not None
    }
    assert back == _finite_rounds(store, run)
    assert "train_loss_slope" not in doc["rounds"][0]  # one round has no slope
    assert doc["rounds"][1]["train_loss_slope"] == store.rounds(run)[1].metrics["train_loss_slope"]


def test_mlflow_round_trip(
    stored: tuple[RunStore, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    store, run = stored
    uri = (tmp_path / "mlruns").as_uri()
    out = export_run(store, run, "mlflow", tmp_path, tracking_uri=uri)
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    (found,) = client.search_runs([client.get_experiment_by_name("potluck").experiment_id])
    assert found.info.run_name == "one" and found.data.tags["potluck.run_id"] == run
    assert found.data.params["data.dataset"] == "digits"
    assert found.data.params["sampler.clients_per_round"] == "3"
    back = {
        (m.step, name): m.value
        for name in found.data.metrics
        for m in client.get_metric_history(found.info.run_id, name)
    }
    want = _finite_rounds(store, run)
    assert back == want and out.values == len(want)


def test_tensorboard_round_trip(stored: tuple[RunStore, str], tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store, run = stored
    out = export_run(store, run, "tensorboard", tmp_path)
    acc = EventAccumulator(str(out.paths[0].parent))
    acc.Reload()
    back = {(e.step, tag): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
    want = _finite_rounds(store, run)
    assert back.keys() == want.keys()
    assert all(back[k] == pytest.approx(want[k], rel=1e-6) for k in want)  # float32 on disk


def test_export_from_the_cli(stored: tuple[RunStore, str], tmp_path: Path) -> None:
    store, run = stored
    runner = CliRunner()
    args = ["export", "one", "--store", str(store.root), "--out", str(tmp_path)]
    got = runner.invoke(app, [*args, "--format", "json"])
    assert got.exit_code == 0, got.output
    assert (tmp_path / f"{run}.json").exists()
    bad = runner.invoke(app, [*args, "--format", "xml"])
    assert bad.exit_code == 2 and "choose one of csv, json, mlflow, tensorboard" in bad.output


def test_compare_table_and_plot(stored: tuple[RunStore, str], tmp_path: Path) -> None:
    store, run = stored
    other = next(i.run_id for i in store.list_runs() if i.run_id != run)
    rows = compare_rows(store, [run, other], "test_accuracy")
    accs = [[r.metrics["test_accuracy"] for r in store.rounds(x)] for x in (run, other)]
    assert [r.values["last"] for r in rows] == [a[-1] for a in accs]
    assert [r.values["best"] for r in rows] == [max(a) for a in accs]
    assert rows[0].values["MB moved"] == pytest.approx(
        sum(r.metrics["bytes_up"] + r.metrics["bytes_down"] for r in store.rounds(run)) / 1e6
    )
    plot = tmp_path / "c.svg"
    got = CliRunner().invoke(
        app, ["compare", "one", other, "--store", str(store.root), "--plot", str(plot)]
    )
    assert got.exit_code == 0, got.output
    assert "one" in got.output and plot.read_text().count("<polyline") == 2
    one = CliRunner().invoke(app, ["compare", "one", "--store", str(store.root)])
    assert one.exit_code == 2 and "at least two runs" in one.output
    missing = CliRunner().invoke(
        app, ["compare", "one", other, "--store", str(store.root), "--metric", "nope"]
    )
    assert missing.exit_code == 2 and "has the metric 'nope'" in missing.output
