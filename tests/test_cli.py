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
    assert "fedavg / digits" in out and "mlp" in out  # what ran (folded to fit)
    assert max(len(line) for line in out.splitlines()) <= 80
    code, out = invoke("show", "cli-test", "--store", str(store), "--json")
    payload = json.loads(out)
    assert [r["round"] for r in payload["rounds"]] == [1, 2, 3]
    assert payload["status"] == "finished" and 0 < payload["rounds"][-1]["test_accuracy"] <= 1
    code, out = invoke("show", "cli-test", "--store", str(store), "--clients")
    assert code == 0 and "per-client metrics" in out and "examples" in out
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


USER_TOML = """
rounds = 4
[data]
dataset = "digits"
num_clients = 10
[model]
name = "mlp"
[sampler]
clients_per_round = 4
[client]
batch_size = 16
[[transforms]]
name = "my_lab.compress:SignEF"
[aggregator]
name = "my_lab.agg:Median"
[run]
name = "user-parts"
threads = 1
"""


def _stop_after_two(rnd: int, _metrics: object) -> None:
    if rnd == 2:
        raise KeyboardInterrupt


def test_user_parts_by_import_path_run_and_resume_from_the_cli(tmp_path: Path, store: Path) -> None:
    from potluck.config import ExperimentConfig
    from potluck.orchestrator import run_experiment
    from potluck.store.sqlite import RunStore

    exp = tmp_path / "user.toml"
    exp.write_text(USER_TOML)
    code, out = invoke("run", str(exp), "--store", str(store / "full"))
    assert code == 0, out
    with pytest.raises(KeyboardInterrupt):  # the same run, interrupted after round 2
        cfg = ExperimentConfig.from_toml(exp)
        run_experiment(cfg.build(), RunStore(store / "cut"), on_round=_stop_after_two)
    code, out = invoke("resume", "user-parts", "--store", str(store / "cut"))
    assert code == 0 and "resuming run" in out, out
    with RunStore(store / "full") as full, RunStore(store / "cut") as cut:
        a, b = (s.rounds(s.resolve("user-parts")) for s in (full, cut))
        learned = [{k: v for k, v in r.metrics.items() if k != "round_seconds"} for r in a]
        assert learned == [{k: v for k, v in r.metrics.items() if k != "round_seconds"} for r in b]


def test_a_python_run_of_named_pieces_resumes_from_the_cli(store: Path) -> None:
    """Built in Python from a model class, a federation builder and a user aggregator, all
    named by import path: the stored config rebuilds it, so ``potluck resume`` can."""
    import torch
    from my_lab.agg import Median
    from my_lab.task import TumourNet

    from potluck import Experiment, Federation, Task, run_experiment
    from potluck.algorithms import fedavg
    from potluck.store.sqlite import RunStore

    exp = Experiment(
        Task(TumourNet),
        Federation.load("my_lab.task:hospitals"),
        fedavg(clients_per_round=3, lr=0.1, aggregator=Median()),
        rounds=4,
        threads=1,
        name="from-python",
    )
    full = run_experiment(exp)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(exp, RunStore(store), on_round=_stop_after_two)
    with RunStore(store) as st:
        config = st.get_run(st.resolve("from-python")).config
    assert "not_resumable" not in config
    assert config["task"]["model"] == "my_lab.task:TumourNet"
    assert config["data"] == {"federation": "my_lab.task:hospitals"}
    code, out = invoke("resume", "from-python", "--store", str(store))
    assert code == 0, out
    with RunStore(store) as st:
        _, ckpt = st.latest_checkpoint(st.resolve("from-python"))
    assert torch.equal(ckpt.tensors["global"], full.weights)


def test_a_python_run_with_unnamed_pieces_says_what_to_name(store: Path) -> None:
    import torch

    from potluck import Experiment, Federation, Task, run_experiment
    from potluck.algorithms import fedavg
    from potluck.store.sqlite import RunStore

    clients = [(torch.randn(20, 4), torch.arange(20) % 2) for _ in range(3)]
    exp = Experiment(
        Task(lambda: torch.nn.Linear(4, 2)),
        Federation.from_client_data(clients),
        fedavg(clients_per_round=2),
        rounds=2,
        name="lambda-run",
    )
    with pytest.raises(KeyboardInterrupt):
        run_experiment(exp, RunStore(store), on_round=lambda r, m: _stop_after_two(r + 1, m))
    code, out = invoke("resume", "lambda-run", "--store", str(store))
    flat = " ".join(out.split())
    assert code == 2
    assert "task: the model factory" in flat
    assert "<lambda> is a lambda: define a named function at module level" in flat
    assert "Federation.load('pkg.module:build')" in flat
    assert "potluck.resume_experiment" in flat
