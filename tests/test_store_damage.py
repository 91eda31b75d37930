"""Damaged run stores and checkpoints (issue 13, findings 5, 6 and 7): checkpoints are
verified against their SHA-256 and round before a resume, which refuses a damaged one unless
told to fall back; a damaged database is a clear error, not a traceback; a finished run lives
in ``potluck.db`` alone; temporary files of a killed checkpoint write are removed."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from potluck import resume_experiment, run_experiment
from potluck.cli import app
from potluck.config import ExperimentConfig
from potluck.orchestrator import TIMING_METRICS
from potluck.store import Checkpoint, DamagedCheckpointError, ResumePoint, RunStore, StoreError
from potluck.store.sqlite import _MIGRATIONS, DB_NAME

runner = CliRunner()

SMALL = {
    "rounds": 4,
    "data": {"dataset": "digits", "num_clients": 10, "partition": {"kind": "iid"}},
    "model": {"name": "mlp"},
    "sampler": {"clients_per_round": 3},
    "client": {"epochs": 1, "batch_size": 16, "lr": 0.1},
    "evaluation": {"federated_clients": 3},
    "run": {"threads": 1, "name": "damage"},
}


class Stop(Exception):
    """Stands in for a kill after a given round."""


def _stop_after(rnd: int) -> Callable[[int, object], None]:
    def on_round(r: int, _metrics: object) -> None:
        if r == rnd:
            raise Stop

    return on_round


def _learning(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in m.items() if k not in TIMING_METRICS} for m in history]


def _ckpt_path(store: RunStore, run_id: str, rnd: int) -> Path:
    return store.run_dir(run_id) / "checkpoints" / f"round-{rnd:06d}.safetensors"


def _flip_low_bit(path: Path) -> None:
    """Flip the lowest bit of the last float32 of the file: a value changes by one ulp and
    the file still parses, with the right round."""
    data = bytearray(path.read_bytes())
    data[-4] ^= 1
    path.write_bytes(bytes(data))


def _flat(text: str) -> str:
    """Output without whitespace (rich wraps long lines, even inside paths)."""
    return "".join(text.split())


def _interrupted(
    tmp_path: Path, after: int, config: dict[str, Any] = SMALL
) -> tuple[RunStore, str]:
    """A stored run of ``config`` stopped after round ``after``."""
    store = RunStore(tmp_path / "store")
    with pytest.raises(Stop):
        run_experiment(
            ExperimentConfig.from_dict(config).build(), store, on_round=_stop_after(after)
        )
    (info,) = store.list_runs()
    assert info.last_round == after and info.status == "failed"
    return store, info.run_id


def _store_with_rounds(root: Path, rounds: int = 3) -> tuple[RunStore, str]:
    store = RunStore(root)
    run_id = store.create_run({})
    for r in range(1, rounds + 1):
        ckpt = Checkpoint({"global": torch.linspace(0, 1, 50) * r}, {"round": r})
        store.commit_round(run_id, r, {"train_loss": 1 / r}, [(0, {"n": 1.0})], ckpt)
    return store, run_id


# -- finding 5: checksums and rounds ---------------------------------------------------------


def test_each_checkpoint_row_holds_the_files_sha256_and_round(tmp_path: Path) -> None:
    store, run_id = _store_with_rounds(tmp_path)
    rows = store._conn.execute("SELECT round, path, sha256 FROM checkpoints").fetchall()
    assert [r for r, _, _ in rows] == [1, 2, 3]
    for rnd, relpath, digest in rows:
        data = (store.run_dir(run_id) / relpath).read_bytes()
        assert digest == hashlib.sha256(data).hexdigest(), rnd
    assert store._conn.execute("PRAGMA user_version").fetchone()[0] == len(_MIGRATIONS) == 6
    point = store.resume_point(run_id)
    assert (point.round, point.checksum, point.skipped) == (3, True, ())
    assert point.path == _ckpt_path(store, run_id, 3)
    # the metadata gets the round; one that names another round is refused
    store.commit_round(run_id, 4, {}, checkpoint=Checkpoint({"global": torch.ones(2)}, {}))
    assert store.resume_point(run_id).checkpoint.meta == {"round": 4}
    with pytest.raises(ValueError, match="metadata says round 9"):
        store.commit_round(run_id, 5, {}, checkpoint=Checkpoint({}, {"round": 9}))
    assert store.get_run(run_id).last_round == 4
    store.close()


def test_a_flipped_bit_in_the_latest_checkpoint_is_refused(tmp_path: Path) -> None:
    store, run_id = _store_with_rounds(tmp_path)
    path = _ckpt_path(store, run_id, 3)
    _flip_low_bit(path)
    with pytest.raises(DamagedCheckpointError) as info:
        store.latest_checkpoint(run_id)
    err = info.value
    assert (err.path, err.round, err.reason, err.earlier, err.last_round) == (
        path,
        3,
        "checksum mismatch",
        2,
        3,
    )
    message = str(err)
    assert str(path) in message and "round 3" in message and "checksum mismatch" in message
    assert "newest earlier checkpoint that verifies is round 2" in message
    assert f"potluck resume {run_id} --fallback" in message and "fallback=True" in message
    point = store.resume_point(run_id, fallback=True)
    assert point.round == 2 and [e.round for e in point.skipped] == [3]
    assert torch.equal(point.checkpoint.tensors["global"], torch.linspace(0, 1, 50) * 2)
    store.close()


def test_an_older_checkpoint_copied_over_the_latest_is_a_round_mismatch(tmp_path: Path) -> None:
    store, run_id = _store_with_rounds(tmp_path)
    shutil.copyfile(_ckpt_path(store, run_id, 2), _ckpt_path(store, run_id, 3))
    with pytest.raises(DamagedCheckpointError, match="round mismatch") as info:
        store.resume_point(run_id)
    assert info.value.reason == "round mismatch" and info.value.round == 3
    assert "its metadata says round 2, not 3" in str(info.value)
    store.close()


def test_a_truncated_or_missing_latest_checkpoint_is_refused(tmp_path: Path) -> None:
    store, run_id = _store_with_rounds(tmp_path)
    path = _ckpt_path(store, run_id, 3)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DamagedCheckpointError, match="unreadable") as info:
        store.resume_point(run_id)
    assert info.value.reason == "unreadable" and str(path) in str(info.value)
    path.unlink()
    with pytest.raises(DamagedCheckpointError, match="the file is missing"):
        store.resume_point(run_id)
    # every checkpoint damaged: fallback restarts from round 0, refusing says so
    for rnd in (1, 2):
        _flip_low_bit(_ckpt_path(store, run_id, rnd))
    with pytest.raises(DamagedCheckpointError, match="No earlier checkpoint of the run verifies"):
        store.resume_point(run_id)
    point = store.resume_point(run_id, fallback=True)
    assert (point.round, point.checkpoint) == (0, None)
    assert [e.round for e in point.skipped] == [3, 2, 1]
    store.close()


def test_rows_from_before_checksums_are_verified_by_structure_and_round(tmp_path: Path) -> None:
    """A store of schema 4 gets the ``sha256`` column; its old rows have none and say so."""
    root = tmp_path / "old"
    root.mkdir()
    raw = sqlite3.connect(root / DB_NAME, isolation_level=None)
    for step in _MIGRATIONS[:4]:
        for statement in step:
            raw.execute(statement)
    raw.execute("PRAGMA user_version = 4")
    raw.execute("INSERT INTO runs VALUES (1, 'old-run', 'old', 'x', 'failed', '{}', '{}')")
    for rnd in (1, 2):
        raw.execute("INSERT INTO rounds VALUES (1, ?, 'x')", (rnd,))
        relpath = f"checkpoints/round-{rnd:06d}.safetensors"
        raw.execute("INSERT INTO checkpoints VALUES (1, ?, ?)", (rnd, relpath))
    raw.close()
    from potluck.store import save_checkpoint

    for rnd in (1, 2):
        path = root / "runs" / "old-run" / "checkpoints" / f"round-{rnd:06d}.safetensors"
        save_checkpoint(path, Checkpoint({"global": torch.full((3,), float(rnd))}, {"round": rnd}))
    with RunStore(root) as store:
        assert store._conn.execute("PRAGMA user_version").fetchone()[0] == 6
        point = store.resume_point("old-run")
        assert (point.round, point.checksum) == (2, False) and point.path is not None
        # without a checksum a flipped bit goes unnoticed, a wrong round does not
        _flip_low_bit(point.path)
        assert store.resume_point("old-run").round == 2
        shutil.copyfile(point.path, point.path.with_name("round-000001.safetensors"))
        store.truncate_after("old-run", 1)
        with pytest.raises(DamagedCheckpointError, match="round mismatch"):
            store.resume_point("old-run")


def test_a_flipped_bit_refuses_resume_and_fallback_equals_an_uninterrupted_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = ExperimentConfig.from_dict(SMALL)
    full = run_experiment(cfg.build())
    store, run_id = _interrupted(tmp_path, after=3)
    path = _ckpt_path(store, run_id, 3)
    _flip_low_bit(path)
    with pytest.raises(DamagedCheckpointError, match="checksum mismatch") as info:
        resume_experiment(cfg.build(), store, run_id)
    assert str(path) in str(info.value) and info.value.earlier == 2
    assert store.get_run(run_id).last_round == 3  # nothing was discarded
    assert path.exists()
    with caplog.at_level("WARNING", logger="potluck"):
        resumed = resume_experiment(cfg.build(), store, run_id, fallback=True)
    assert f"run {run_id}: resuming after round 2" in caplog.text
    assert f"{path} (round 3 of run {run_id}) is damaged: checksum mismatch" in caplog.text
    assert torch.equal(resumed.weights, full.weights)
    assert _learning(resumed.history) == _learning(full.history)
    assert store.get_run(run_id).status == "finished"
    assert store.resume_point(run_id).round == 4  # verifies: round 3 was recomputed
    store.close()


def test_on_resume_and_the_cli_tell_the_round_actually_used(tmp_path: Path) -> None:
    config = {**SMALL, "run": {**SMALL["run"], "checkpoint_every": 2}}
    store, run_id = _interrupted(tmp_path / "py", after=3, config=config)  # checkpoint: 2
    seen: list[ResumePoint] = []
    resume_experiment(
        ExperimentConfig.from_dict(config).build(), store, run_id, on_resume=seen.append
    )
    assert [(p.round, p.checksum, p.skipped) for p in seen] == [(2, True, ())]
    store.close()
    store, run_id = _interrupted(tmp_path / "cli", after=3, config=config)
    result = runner.invoke(app, ["resume", run_id, "--store", str(store.root)])
    assert result.exit_code == 0, result.output
    assert f"resuming run {run_id} after round 2" in " ".join(result.output.split())
    store.close()


# -- finding 7: stray temporary files ---------------------------------------------------------


def test_stray_temporary_files_are_removed_on_resume_never_a_checkpoint(tmp_path: Path) -> None:
    cfg = ExperimentConfig.from_dict(SMALL)
    store, run_id = _interrupted(tmp_path, after=2)
    ckpt_dir = store.run_dir(run_id) / "checkpoints"
    stray = [
        ckpt_dir / ".round-000001.safetensors.1234abcd.tmp",
        ckpt_dir / ".round-000003.safetensors.0badf00d.tmp",  # killed while writing round 3
    ]
    for path in stray:
        path.write_bytes(b"half a checkpoint")
    other = ckpt_dir / "notes.tmp"  # not a name the store writes
    other.write_text("not ours")
    assert store.remove_stray_files(run_id) == stray
    for path in stray:
        path.write_bytes(b"half a checkpoint")
    fresh = RunStore(store.root)  # a new store, as a resuming process opens
    resume_experiment(cfg.build(), fresh, run_id)
    assert not any(p.exists() for p in stray) and other.exists()
    names = sorted(p.name for p in ckpt_dir.iterdir())
    assert names == ["notes.tmp", *(f"round-{r:06d}.safetensors" for r in range(1, 5))]
    fresh.close()
    store.close()


def test_the_first_write_of_a_store_to_a_run_removes_its_stray_files(tmp_path: Path) -> None:
    store, run_id = _store_with_rounds(tmp_path, rounds=2)
    store.close()
    stray = _ckpt_path(store, run_id, 3).with_name(".round-000003.safetensors.abcdef01.tmp")
    stray.write_bytes(b"partial")
    with RunStore(tmp_path) as again:
        again.get_run(run_id)  # reading leaves it alone
        assert stray.exists()
        again.commit_round(run_id, 3, {}, checkpoint=Checkpoint({"global": torch.ones(1)}, {}))
        assert not stray.exists() and _ckpt_path(again, run_id, 3).exists()
        assert again.resume_point(run_id).round == 3


# -- finding 6: damaged databases and the write-ahead log -------------------------------------


def _garbage(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / DB_NAME).write_bytes(b"this is not a database, just some bytes" * 100)


def _malformed(root: Path) -> str:
    """A store whose header is intact but whose tables are overwritten; returns its run id."""
    store, run_id = _store_with_rounds(root)
    store.close()  # the last connection checkpoints the log into potluck.db
    db = root / DB_NAME
    data = bytearray(db.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    data[page:] = b"\xa5" * (len(data) - page)
    db.write_bytes(bytes(data))
    return run_id


def test_a_damaged_database_is_a_store_error_naming_the_file(tmp_path: Path) -> None:
    _garbage(tmp_path / "garbage")
    with pytest.raises(StoreError) as info:
        RunStore(tmp_path / "garbage")
    message = str(info.value)
    assert str(tmp_path / "garbage" / DB_NAME) in message and "is damaged" in message
    assert "potluck.db-wal" in message and "PRAGMA wal_checkpoint" in message
    run_id = _malformed(tmp_path / "malformed")
    with RunStore(tmp_path / "malformed") as store, pytest.raises(StoreError) as info:
        store.get_run(run_id)
    message = str(info.value)
    assert "database disk image is malformed" in message and "Restore it from a copy" in message


@pytest.mark.parametrize("damage", ["garbage", "malformed"])
@pytest.mark.parametrize(
    "command", [["runs"], ["show", "RUN"], ["show", "RUN", "--json"], ["resume", "RUN"]]
)
def test_the_cli_reports_a_damaged_store_without_a_traceback(
    tmp_path: Path, damage: str, command: list[str]
) -> None:
    root = tmp_path / "store"
    run_id = "nope"
    if damage == "garbage":
        _garbage(root)
    else:
        run_id = _malformed(root)
    args = [a.replace("RUN", run_id) for a in command]
    result = runner.invoke(app, [*args, "--store", str(root)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    flat = _flat(result.output)
    assert flat.startswith("error:") and _flat(str(root / DB_NAME)) in flat
    assert "Restoreitfromacopy" in flat and "potluck.db-wal" in flat


def test_a_finished_run_lives_in_potluck_db_alone(tmp_path: Path) -> None:
    store, run_id = _store_with_rounds(tmp_path / "live")
    # while the run is running its rounds are in potluck.db-wal: the main file lacks them
    early = tmp_path / "early"
    early.mkdir()
    shutil.copyfile(tmp_path / "live" / DB_NAME, early / DB_NAME)
    with RunStore(early) as copy:
        assert [r.last_round for r in copy.list_runs() if r.run_id == run_id] != [3]
    store.finish(run_id, "finished", {"test_accuracy": 0.5})
    assert (tmp_path / "live" / f"{DB_NAME}-wal").stat().st_size == 0
    late = tmp_path / "late"
    late.mkdir()
    shutil.copyfile(tmp_path / "live" / DB_NAME, late / DB_NAME)  # the store is still open
    with RunStore(late) as copy:
        (info,) = copy.list_runs()
        assert (info.run_id, info.status, info.last_round) == (run_id, "finished", 3)
    # a failed run too
    other = store.create_run({})
    store.commit_round(other, 1, {"x": 1.0})
    store.set_status(other, "failed")
    assert (tmp_path / "live" / f"{DB_NAME}-wal").stat().st_size == 0
    store.close()


def test_a_finished_run_is_listed_from_a_copy_of_potluck_db_alone(tmp_path: Path) -> None:
    cfg = ExperimentConfig.from_dict({**SMALL, "rounds": 2})
    store = RunStore(tmp_path / "live")
    result = run_experiment(cfg.build(), store)  # the store stays open, as in a server
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copyfile(tmp_path / "live" / DB_NAME, copy / DB_NAME)
    out = runner.invoke(app, ["runs", "--store", str(copy)])
    assert out.exit_code == 0 and result.run_id in out.output and "finished" in out.output
    store.close()


# -- the CLI's resume on a damaged checkpoint ------------------------------------------------


def test_cli_resume_refuses_a_damaged_checkpoint_and_falls_back_when_told(tmp_path: Path) -> None:
    cfg = ExperimentConfig.from_dict(SMALL)
    full = run_experiment(cfg.build())
    store, run_id = _interrupted(tmp_path, after=3)
    path = _ckpt_path(store, run_id, 3)
    _flip_low_bit(path)
    root = str(store.root)
    result = runner.invoke(app, ["resume", run_id, "--store", root])
    flat = _flat(result.output)
    assert result.exit_code == 2, result.output
    assert flat.startswith("error:") and _flat(str(path)) in flat and "checksummismatch" in flat
    assert f"potluckresume{run_id}--fallback" in flat
    assert store.get_run(run_id).last_round == 3
    result = runner.invoke(app, ["resume", run_id, "--store", root, "--fallback"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"resuming run {run_id} after round 2" in text and "recomputing round 3" in text
    assert "checksum mismatch" in text  # the warning names what was skipped
    assert torch.equal(store.latest_checkpoint(run_id)[1].tensors["global"], full.weights)
    store.close()
