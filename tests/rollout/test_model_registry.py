"""The model registry's state machine: register, promote, roll back, the audit log; its
refusals; its copies verified; and the ``potluck models`` commands on a real run."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from potluck.cli import app
from potluck.orchestrator import Experiment
from potluck.rollout.registry import ModelRegistry, RegistryError
from potluck.store.checkpoint import Checkpoint
from potluck.store.sqlite import RunStore


def _store_with_run(root: Path, rounds: int = 2) -> tuple[RunStore, str]:
    store = RunStore(root)
    run = store.create_run({"algorithm": {"name": "fedavg"}}, name="src")
    for r in range(1, rounds + 1):
        ckpt = Checkpoint({"weights": torch.full((4,), float(r))}, {})
        store.commit_round(run, r, {"test_accuracy": r / 10}, checkpoint=ckpt)
    return store, run


def test_register_promote_and_roll_back(tmp_path: Path) -> None:
    store, run = _store_with_run(tmp_path)
    reg = ModelRegistry(store)
    v1 = reg.register("m", run, round=1, note="first")
    assert (v1.version, v1.round, v1.stage, v1.parent) == (1, 1, "registered", None)
    assert v1.metrics == {"test_accuracy": 0.1}
    assert torch.equal(v1.load().tensors["weights"], torch.full((4,), 1.0))
    reg.promote("m", 1)
    v2 = reg.register("m", run)  # the newest checkpoint: round 2
    assert (v2.version, v2.round, v2.parent) == (2, 2, 1)  # lineage: production when made
    reg.promote("m", 2, reason="better")
    assert [(v.version, v.stage) for v in reg.versions("m")] == [(1, "archived"),
                                                                 (2, "production")]  # fmt: skip
    back = reg.rollback("m", reason="regressed")
    assert (back.version, back.stage) == (1, "production")
    assert reg.get("m", 2).stage == "archived"
    log = reg.audit("m")
    assert [(e.action, e.version) for e in log] == [
        ("register", 1), ("promote", 1), ("register", 2), ("promote", 2), ("rollback", 1)
    ]  # fmt: skip
    assert log[-1].detail == {"from": 2, "reason": "regressed"}
    assert log[0].detail == {"run": run, "round": 1, "note": "first"}


def test_refusals_name_what_is_wrong(tmp_path: Path) -> None:
    store, run = _store_with_run(tmp_path)
    reg = ModelRegistry(store)
    with pytest.raises(RegistryError, match="model name"):
        reg.register("../evil", run)
    with pytest.raises(RegistryError, match="no checkpoint of round 7"):
        reg.register("m", run, round=7)
    bare = store.create_run({})
    with pytest.raises(RegistryError, match="has no checkpoint"):
        reg.register("m", bare)
    with pytest.raises(RegistryError, match="no model 'm' version 1"):
        reg.promote("m", 1)
    with pytest.raises(RegistryError, match="no production version"):
        reg.rollback("m")
    reg.register("m", run)
    reg.promote("m", 1)
    with pytest.raises(RegistryError, match="already in production"):
        reg.promote("m", 1)
    with pytest.raises(RegistryError, match="only version ever promoted"):
        reg.rollback("m")
    assert [e.action for e in reg.audit()] == ["register", "promote"]  # refusals change nothing


def test_a_version_is_a_verified_copy_that_outlives_the_runs_checkpoints(tmp_path: Path) -> None:
    store, run = _store_with_run(tmp_path)
    reg = ModelRegistry(store)
    v = reg.register("m", run)
    for f in (store.run_dir(run) / "checkpoints").iterdir():
        f.unlink()
    assert torch.equal(v.load().tensors["weights"], torch.full((4,), 2.0))
    v.path.write_bytes(v.path.read_bytes()[:-1] + b" ")
    with pytest.raises(RegistryError, match="does not verify"):
        v.load()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["promote", "rollback"]), st.integers(1, 3)),
                max_size=12))  # fmt: skip
def test_at_most_one_production_version_whatever_happens(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int]]
) -> None:
    store, run = _store_with_run(tmp_path_factory.mktemp("reg"), rounds=1)
    reg = ModelRegistry(store)
    for _ in range(3):
        reg.register("m", run)
    for op, version in ops:
        with contextlib.suppress(RegistryError):
            reg.promote("m", version) if op == "promote" else reg.rollback("m")
        stages = [v.stage for v in reg.versions("m")]
        assert stages.count("production") <= 1
    actions = [e.action for e in reg.audit("m")]
    production = reg.production("m")
    if production is not None:  # the log's last promotion or rollback is what is live
        last = [e for e in reg.audit("m") if e.action in ("promote", "rollback")][-1]
        assert last.version == production.version
    else:
        assert "promote" not in actions
    store.close()


def test_the_models_commands_on_a_run(tmp_path: Path) -> None:
    runs = str(tmp_path / "runs")
    exp = tmp_path / "e.toml"
    exp.write_text(
        "rounds = 2\n[data]\ndataset = 'digits'\nnum_clients = 6\n[model]\nname = 'logreg'\n"
        "[sampler]\nclients_per_round = 3\n[run]\nthreads = 1\nname = 'base'\n"
    )
    cli = CliRunner()
    assert cli.invoke(app, ["run", str(exp), "--store", runs]).exit_code == 0
    out = cli.invoke(app, ["models", "register", "base", "--name", "digits", "--store", runs])
    assert out.exit_code == 0 and "digits v1 (registered)" in out.output, out.output
    out = cli.invoke(app, ["models", "promote", "digits", "1", "--store", runs])
    assert out.exit_code == 0 and "production" in out.output
    listed = cli.invoke(app, ["models", "list", "--store", runs])
    assert "digits" in listed.output and "production" in listed.output
    log = cli.invoke(app, ["models", "log", "digits", "--store", runs])
    assert "register" in log.output and "promote" in log.output
    bad = cli.invoke(app, ["models", "rollback", "digits", "--store", runs])
    assert bad.exit_code == 2 and "only version ever promoted" in bad.output
    args = ["--round", "1", "--store", runs]
    assert cli.invoke(app, ["models", "register", "base", "--name", "digits", *args]).exit_code == 0
    out = cli.invoke(app, ["models", "canary", "digits", "2", "--fraction", "1", "--threshold",
                           "1", "--store", runs])  # fmt: skip
    assert out.exit_code == 0 and "digits v2: promoted to production" in out.output, out.output
    assert "canary - production" in out.output
    out = cli.invoke(app, ["models", "ab", "digits", "2", "1", "--store", runs])
    assert out.exit_code == 0 and "6 clients" in out.output and "Wilcoxon p =" in out.output
    log = cli.invoke(app, ["models", "log", "digits", "--store", runs])
    assert " ab " in log.output and "winner" in log.output


def _canary_setup(root: Path) -> tuple[ModelRegistry, Experiment]:
    from potluck import Experiment, Federation, Task
    from potluck.algorithms import fedavg

    g = torch.Generator().manual_seed(2)
    x = torch.randn(40 * 20, 2, generator=g)
    y = (x[:, 0] > 0).long()
    fed = Federation.from_client_data([(x[i::20], y[i::20]) for i in range(20)], test_fraction=0.5)
    exp = Experiment(Task(lambda: torch.nn.Linear(2, 2)), fed, fedavg(clients_per_round=2), 3)
    good = torch.tensor([-5.0, 0.0, 5.0, 0.0, 0.0, 0.0])
    store = RunStore(root)
    run = store.create_run({})
    weak = good + torch.tensor([0.0, 3.0, 0.0, -3.0, 0.0, 0.0])
    for r, w in enumerate((weak, good, -good), start=1):  # round 3: an injected regression
        store.commit_round(run, r, {}, checkpoint=Checkpoint({"global": w}, {}))
    reg = ModelRegistry(store)
    for r in (1, 2, 3):
        reg.register("m", run, round=r)
    reg.promote("m", 1)
    return reg, exp


def test_a_canary_that_regresses_is_rolled_back_and_a_better_one_promoted(tmp_path: Path) -> None:
    reg, exp = _canary_setup(tmp_path)
    bad = reg.canary("m", 3, exp, fraction=0.25, threshold=0.02)
    assert not bad.promoted and bad.version.stage == "archived"
    assert bad.comparison.clients == 5 and bad.comparison.mean_difference < -0.02
    assert reg.production("m").version == 1  # type: ignore[union-attr]  # production untouched
    good = reg.canary("m", 2, exp, fraction=0.25, threshold=0.02)
    assert good.promoted and good.version.stage == "production"
    assert reg.get("m", 1).stage == "archived"
    actions = [(e.action, e.version) for e in reg.audit("m")][4:]
    assert actions == [("canary", 3), ("canary_rollback", 3), ("canary", 2), ("promote", 2)]
    with pytest.raises(RegistryError, match="archived, not registered"):
        reg.canary("m", 3, exp)
    with pytest.raises(RegistryError, match="fraction"):
        reg.canary("m", 3, exp, fraction=0.0)


def test_models_ab_personal_compares_a_version_with_its_runs_personal_models(
    tmp_path: Path,
) -> None:
    runs = str(tmp_path / "runs")
    exp = tmp_path / "e.toml"
    exp.write_text(
        "rounds = 2\n[data]\ndataset = 'digits'\nnum_clients = 6\n[data.partition]\n"
        "kind = 'shards'\nshards_per_client = 1\n[model]\nname = 'logreg'\n[algorithm]\n"
        "name = 'ditto'\nlam = 0.01\n[sampler]\nclients_per_round = 6\n[client]\nepochs = 2\n"
        "[run]\nthreads = 1\nname = 'pers'\n"
    )
    cli = CliRunner()
    assert cli.invoke(app, ["run", str(exp), "--store", runs]).exit_code == 0
    assert (
        cli.invoke(app, ["models", "register", "pers", "--name", "d", "--store", runs]).exit_code
        == 0
    )
    out = cli.invoke(app, ["models", "ab", "d", "1", "--personal", "--store", runs])
    assert out.exit_code == 0, out.output
    assert "d: 6 clients: global" in out.output and "personal is better" in out.output
    log = cli.invoke(app, ["models", "log", "d", "--store", runs])
    assert "against=personal" in log.output
    both = cli.invoke(app, ["models", "ab", "d", "1", "1", "--personal", "--store", runs])
    assert both.exit_code == 2 and "VERSION_B or --personal" in both.output
