"""The `potluck` command, driven in-process through typer's test runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from potluck.cli import app

runner = CliRunner()
FAST = [
    "--set",
    'data.dataset="digits"',
    "--set",
    "data.num_clients=10",
    "--set",
    'model.name="mlp"',
    "--set",
    "sampler.clients_per_round=3",
    "--set",
    "rounds=3",
    "--set",
    "client.batch_size=16",
    "--set",
    'run.name="cli-test"',
]


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "runs"


def test_run_list_show_and_report(store: Path) -> None:
    code, out = invoke("run", *FAST, "--store", str(store))
    assert code == 0, out
    assert "fedavg on digits (10 clients, dirichlet partition)" in out
    assert "round 3" in out and "done run" in out and "report.html" in out
    code, out = invoke("runs", "--store", str(store))
    assert code == 0 and "cli-test" in out and "finished" in out
    code, out = invoke("show", "cli-test", "--store", str(store), "--json")
    payload = json.loads(out)
    assert [r["round"] for r in payload["rounds"]] == [1, 2, 3]
    assert payload["status"] == "finished" and 0 < payload["rounds"][-1]["test_accuracy"] <= 1
    code, out = invoke("show", "cli-test", "--store", str(store), "--clients")
    assert code == 0 and "per-client metrics" in out and "num_examples" in out
    code, out = invoke("resume", "cli-test", "--store", str(store))
    assert code == 0 and "already finished" in out


def test_run_from_toml_with_override(tmp_path: Path, store: Path) -> None:
    exp = tmp_path / "exp.toml"
    code, out = invoke("config", *FAST)
    assert code == 0
    exp.write_text(out)
    code, out = invoke("run", str(exp), "--set", "rounds=2", "--store", str(store))
    assert code == 0, out
    assert "2 rounds" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--set", "client.lrr=0.1"], "client.lrr: unknown parameter of LocalSGD"),
        (["run", "--set", 'data.dataset="cifar10"'], "data.dataset: Input should be"),
        (
            [
                "run",
                "--set",
                'model.name="cnn"',
                "--set",
                'data.dataset="digits"',
                "--set",
                'data.partition.kind="iid"',
            ],
            "needs image inputs shaped (channels, height, width)",
        ),
        (["run", "missing.toml"], "experiment file not found"),
        (["run", "--set", "rounds"], "--set expects key=value"),
        (["run", "--set", 'data.path="/nonexistent"'], "/nonexistent"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(args: list[str], message: str, store: Path) -> None:
    code, out = invoke(*args, "--store", str(store))
    assert code == 2
    assert message in " ".join(out.split())
    assert not (store / "runs").exists() or not any((store / "runs").iterdir())


def test_unknown_run(store: Path) -> None:
    invoke("run", *FAST, "--store", str(store))
    code, out = invoke("show", "nope", "--store", str(store))
    assert code == 2 and "nope" in out


def describe(*overrides: str) -> tuple[int, str]:
    """``potluck data describe --json`` of digits with ``--set`` for each override."""
    sets = [arg for o in ('data.dataset="digits"', *overrides) for arg in ("--set", o)]
    return invoke("data", "describe", *sets, "--json")


def test_data_describe(store: Path) -> None:
    code, out = describe("data.num_clients=8", 'data.partition.kind="shards"')
    assert code == 0, out
    stats = json.loads(out)
    # shards are cut from label-sorted data: 2 shards give at most 2 labels, plus at most
    # one more per shard where a shard straddles a label boundary
    assert stats["num_clients"] == 8 and stats["labels_per_client"]["max"] <= 4
    assert stats["total_train"] + sum(c["test"] for c in stats["clients"]) == 1437
    code, out = describe(
        "data.num_clients=12",
        'data.partition.kind="labels"',
        "data.partition.labels_per_client=3",
    )
    assert code == 0, out
    per_client = json.loads(out)["labels_per_client"]  # NIID-Bench's #C=3: exactly three
    assert per_client["min"] == per_client["max"] == 3
    code, out = invoke(
        "data", "describe", "--set", 'data.dataset="digits"', "--set", "data.num_clients=8"
    )
    assert code == 0 and "label_entropy" in out  # the table, without --json
