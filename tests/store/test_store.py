"""The run store: runs, rounds, client metrics, checkpoints, atomicity and crash safety."""

from __future__ import annotations

import logging
import math
import re
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from potluck.store import (
    AmbiguousRunError,
    Checkpoint,
    DamagedCheckpointError,
    RunStore,
    UnknownRunError,
    load_checkpoint,
)
from potluck.store.sqlite import DB_NAME, RunBusyError


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RunStore]:
    with RunStore(tmp_path / "store") as s:
        yield s


def _ckpt(rnd: int) -> Checkpoint:
    return Checkpoint({"global": torch.full((5,), float(rnd))}, {"round": rnd})


def _clients(rnd: int, n: int = 4) -> list[tuple[int, dict[str, float]]]:
    return [(c, {"train_loss": rnd + c / 10, "num_examples": 10 + c}) for c in range(n)]


def _commit(store: RunStore, run_id: str, rounds: range, ckpt: bool = True) -> None:
    for r in rounds:
        store.commit_round(
            run_id, r, {"train_loss": 1 / r}, _clients(r), _ckpt(r) if ckpt else None
        )


def _ckpt_files(store: RunStore, run_id: str) -> list[str]:
    ckpt_dir = store.get_run(run_id).run_dir / "checkpoints"
    return sorted(p.name for p in ckpt_dir.glob("round-*.safetensors"))


def _common_prefix(a: str, b: str) -> str:
    n = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
    return a[:n]


# -- runs ------------------------------------------------------------------------------------


def test_create_get_and_list_runs(store: RunStore) -> None:
    a = store.create_run({"lr": 0.1, "nested": {"k": [1, 2]}}, name="first")
    b = store.create_run({"lr": 0.2})
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", a)
    info = store.get_run(a)
    assert info.run_id == a and info.name == "first" and info.status == "running"
    assert info.config == {"lr": 0.1, "nested": {"k": [1, 2]}}
    assert info.last_round == 0 and info.summary == {}
    assert info.run_dir == store.root / "runs" / a and info.run_dir.is_dir()
    assert info.created_at.endswith("+00:00")
    assert store.get_run(b).name == b
    assert [r.run_id for r in store.list_runs()] == [b, a]
    assert (store.root / DB_NAME).is_file()


def test_finish_and_set_status(store: RunStore) -> None:
    run = store.create_run({})
    store.set_status(run, "failed")
    assert store.get_run(run).status == "failed"
    store.finish(run, "finished", {"test_accuracy": 0.9, "rounds": 3})
    info = store.get_run(run)
    assert (info.status, info.summary) == ("finished", {"test_accuracy": 0.9, "rounds": 3})
    with pytest.raises(ValueError, match="status must be one of"):
        store.set_status(run, "paused")
    with pytest.raises(UnknownRunError, match="nope"):
        store.set_status("nope", "failed")


def test_resolve_exact_prefix_and_name(store: RunStore) -> None:
    a = store.create_run({}, name="baseline")
    b = store.create_run({}, name="dp")
    assert store.resolve(a) == a
    unique = len(_common_prefix(a, b)) + 1
    assert store.resolve(a[:unique]) == a and store.resolve(b[:unique]) == b
    assert store.resolve("baseline") == a and store.resolve("dp") == b


def test_resolve_ambiguous_prefix_lists_candidates(store: RunStore) -> None:
    a, b = store.create_run({}), store.create_run({})
    prefix = _common_prefix(a, b)
    with pytest.raises(AmbiguousRunError) as err:
        store.resolve(prefix)
    assert a in str(err.value) and b in str(err.value)
    assert isinstance(err.value, ValueError)


def test_a_taken_name_is_disambiguated(store: RunStore, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="potluck"):
        a, b, c = (store.create_run({}, name="same") for _ in range(3))
    assert [store.get_run(r).name for r in (a, b, c)] == ["same", "same-2", "same-3"]
    assert "run name 'same' is taken; this run is named 'same-2'" in caplog.text
    assert (store.resolve("same"), store.resolve("same-3")) == (a, c)
    assert [r.run_id for r in store.named("same")] == [c, b, a]
    other = store.create_run({}, name="same-x")  # not one of the family
    assert store.get_run(other).name == "same-x" and len(store.named("same")) == 3


def test_resolve_ambiguous_name_and_unknown(store: RunStore) -> None:
    a = store.create_run({})
    b = store.create_run({}, name=a[:9])  # a name that is also an id prefix
    with pytest.raises(AmbiguousRunError, match=a):
        store.resolve(a[:9])
    with pytest.raises(UnknownRunError) as err:
        store.resolve("zzz")
    assert isinstance(err.value, KeyError)
    assert "'zzz'" in str(err.value) and b in str(err.value)
    with pytest.raises(UnknownRunError):
        store.resolve("")
    with pytest.raises(UnknownRunError, match="zzz"):
        store.get_run("zzz")


# -- rounds ----------------------------------------------------------------------------------


def test_commit_rounds_in_sequence(store: RunStore) -> None:
    run = store.create_run({})
    _commit(store, run, range(1, 4), ckpt=False)
    assert store.get_run(run).last_round == 3
    recs = store.rounds(run)
    assert [r.round for r in recs] == [1, 2, 3]
    assert [r.metrics for r in recs] == [{"train_loss": 1 / r} for r in (1, 2, 3)]
    assert all(r.committed_at for r in recs)
    for bad in (0, 3, 5):
        with pytest.raises(ValueError, match=f"expected round 4, got {bad}"):
            store.commit_round(run, bad, {"x": 1.0})
    assert store.get_run(run).last_round == 3


def test_metric_values_round_trip(store: RunStore) -> None:
    run = store.create_run({})
    metrics = {"z": 1.5, "a": 3, "nan": math.nan, "inf": math.inf, "tiny": 1e-300}
    store.commit_round(run, 1, metrics)
    got = store.rounds(run)[0].metrics
    assert list(got) == list(metrics)  # insertion order kept
    assert got["z"] == 1.5 and got["a"] == 3.0 and isinstance(got["a"], float)
    assert math.isnan(got["nan"]) and got["inf"] == math.inf and got["tiny"] == 1e-300
    store.commit_round(run, 2, {})
    assert store.rounds(run)[1].metrics == {}


def test_non_numeric_metrics_are_rejected(store: RunStore) -> None:
    run = store.create_run({})
    with pytest.raises(TypeError, match="'loss' must be a real number, got str"):
        store.commit_round(run, 1, {"loss": "0.5"})
    with pytest.raises(TypeError, match="round 1 client 3: metric 'acc'"):
        store.commit_round(run, 1, {}, [(3, {"acc": None})], _ckpt(1))
    with pytest.raises(ValueError, match="client 2 has metrics twice"):
        store.commit_round(run, 1, {}, [(2, {"a": 1.0}), (2, {"a": 2.0})])
    assert store.rounds(run) == [] and store.client_metrics(run) == []
    assert not (store.get_run(run).run_dir / "checkpoints").exists()


def test_client_metrics_round_trip(store: RunStore) -> None:
    run = store.create_run({})
    clients1 = [(9, {"loss": 0.5, "n": 10}), (2, {"loss": math.nan, "n": 3})]
    clients2 = [(c, {"loss": c / 100}) for c in range(300)]
    store.commit_round(run, 1, {}, clients1)
    store.commit_round(run, 2, {}, clients2)
    got1 = store.client_metrics(run, 1)
    assert [(r, c) for r, c, _ in got1] == [(1, 9), (1, 2)]
    assert got1[0][2] == {"loss": 0.5, "n": 10.0} and math.isnan(got1[1][2]["loss"])
    assert store.client_metrics(run, 2) == [(2, c, m) for c, m in clients2]
    assert len(store.client_metrics(run)) == 302
    assert store.client_metrics(run, 3) == []


def test_runs_are_independent(store: RunStore) -> None:
    a, b = store.create_run({}), store.create_run({})
    _commit(store, a, range(1, 3))
    _commit(store, b, range(1, 2))
    assert [r.round for r in store.rounds(b)] == [1]
    assert {r for r, _, _ in store.client_metrics(b)} == {1}
    assert store.get_run(a).last_round == 2


# -- checkpoints -----------------------------------------------------------------------------


def test_latest_checkpoint_is_newest_loadable(store: RunStore) -> None:
    run = store.create_run({})
    assert store.latest_checkpoint(run) is None
    store.commit_round(run, 1, {}, checkpoint=_ckpt(1))
    store.commit_round(run, 2, {})
    store.commit_round(run, 3, {}, checkpoint=_ckpt(3))
    store.commit_round(run, 4, {})
    found = store.latest_checkpoint(run)
    assert found is not None
    rnd, ckpt = found
    assert rnd == 3 and ckpt.meta == {"round": 3}
    assert torch.equal(ckpt.tensors["global"], torch.full((5,), 3.0))
    assert _ckpt_files(store, run) == ["round-000001.safetensors", "round-000003.safetensors"]
    # a damaged newest file is refused; only with fallback does it give the previous one
    (store.get_run(run).run_dir / "checkpoints" / "round-000003.safetensors").write_bytes(b"x")
    with pytest.raises(DamagedCheckpointError, match=r"round-000003\.safetensors"):
        store.latest_checkpoint(run)
    found = store.latest_checkpoint(run, fallback=True)
    assert found is not None and found[0] == 1


def test_truncate_after_removes_rows_and_files(store: RunStore) -> None:
    run = store.create_run({})
    _commit(store, run, range(1, 5))
    store.truncate_after(run, 2)
    assert [r.round for r in store.rounds(run)] == [1, 2]
    assert {r for r, _, _ in store.client_metrics(run)} == {1, 2}
    assert _ckpt_files(store, run) == ["round-000001.safetensors", "round-000002.safetensors"]
    found = store.latest_checkpoint(run)
    assert found is not None and found[0] == 2
    assert store.get_run(run).last_round == 2
    _commit(store, run, range(3, 4))  # the run continues from round 3
    store.truncate_after(run, 0)
    assert store.rounds(run) == [] and store.client_metrics(run) == []
    assert _ckpt_files(store, run) == [] and store.latest_checkpoint(run) is None
    with pytest.raises(ValueError, match=">= 0"):
        store.truncate_after(run, -1)


def test_keep_checkpoints_prunes_old_ones(tmp_path: Path) -> None:
    with RunStore(tmp_path, keep_checkpoints=2) as store:
        run = store.create_run({})
        _commit(store, run, range(1, 6))
        store.commit_round(run, 6, {})  # no checkpoint: nothing pruned
        assert _ckpt_files(store, run) == [
            "round-000004.safetensors",
            "round-000005.safetensors",
        ]
        store.truncate_after(run, 4)
        found = store.latest_checkpoint(run)
        assert found is not None and found[0] == 4
        assert len(store.rounds(run)) == 4
    with pytest.raises(ValueError, match="keep_checkpoints"):
        RunStore(tmp_path, keep_checkpoints=0)


# -- atomicity and concurrency ---------------------------------------------------------------


def test_failure_inside_transaction_leaves_nothing(store: RunStore) -> None:
    run = store.create_run({})
    _commit(store, run, range(1, 2))
    raw = sqlite3.connect(store.root / DB_NAME)
    raw.execute(
        "CREATE TRIGGER fail BEFORE INSERT ON checkpoints BEGIN SELECT RAISE(ABORT, 'boom'); END"
    )
    raw.commit()
    with pytest.raises(sqlite3.DatabaseError, match="boom"):
        store.commit_round(run, 2, {"train_loss": 0.1}, _clients(2), _ckpt(2))
    # the round row and client rows were inserted before the failure and rolled back
    assert [r.round for r in store.rounds(run)] == [1]
    assert store.client_metrics(run, 2) == []
    assert store.get_run(run).last_round == 1
    found = store.latest_checkpoint(run)
    assert found is not None and found[0] == 1
    assert "round-000002.safetensors" in _ckpt_files(store, run)  # orphan file
    raw.execute("DROP TRIGGER fail")
    raw.commit()
    raw.close()
    store.commit_round(run, 2, {"train_loss": 0.2}, _clients(2), Checkpoint({}, {"new": True}))
    found = store.latest_checkpoint(run)
    assert found is not None and found[0] == 2 and found[1].meta == {"new": True, "round": 2}
    assert store.rounds(run)[1].metrics == {"train_loss": 0.2}


def test_second_store_sees_commits_and_reads_during_write(tmp_path: Path) -> None:
    with RunStore(tmp_path) as writer, RunStore(tmp_path) as reader:
        run = writer.create_run({"x": 1}, name="shared")
        assert reader.resolve("shared") == run
        _commit(writer, run, range(1, 3))
        assert reader.get_run(run).last_round == 2
        assert len(reader.client_metrics(run, 2)) == 4
        raw = sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)
        raw.execute("BEGIN IMMEDIATE")  # a writer holds the lock ...
        raw.execute("DELETE FROM round_metrics")
        assert reader.rounds(run)[0].metrics == {"train_loss": 1.0}  # ... readers go on
        raw.execute("ROLLBACK")
        raw.close()
        found = reader.latest_checkpoint(run)
        assert found is not None and found[0] == 2


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    RunStore(tmp_path).close()
    raw = sqlite3.connect(tmp_path / DB_NAME)
    raw.execute("PRAGMA user_version = 99")
    raw.close()
    with pytest.raises(RuntimeError, match="schema version 99"):
        RunStore(tmp_path)


_WRITER = textwrap.dedent(
    """
    import os, sys, torch
    import potluck.store.sqlite as sq
    from potluck.store import Checkpoint, RunStore

    root, run_id, die_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    real_save = sq.save_checkpoint

    def save_then_maybe_die(path, ckpt):
        digest = real_save(path, ckpt)
        if ckpt.meta["round"] == die_at:
            os._exit(3)  # crash between the checkpoint file and the transaction
        return digest

    sq.save_checkpoint = save_then_maybe_die
    store = RunStore(root)
    rnd = store.get_run(run_id).last_round
    while True:
        rnd += 1
        clients = [(c, {"loss": rnd + c, "n": c}) for c in range(50)]
        ckpt = Checkpoint({"global": torch.full((20_000,), float(rnd))}, {"round": rnd})
        store.commit_round(run_id, rnd, {"train_loss": float(rnd)}, clients, ckpt)
    """
)


def _assert_consistent(root: Path, run_id: str) -> int:
    """Every committed round has all its client rows and a loadable checkpoint."""
    with RunStore(root) as store:
        last = store.get_run(run_id).last_round
        assert [r.round for r in store.rounds(run_id)] == list(range(1, last + 1))
        for r in range(1, last + 1):
            clients = store.client_metrics(run_id, r)
            assert [c for _, c, _ in clients] == list(range(50))
            path = store.get_run(run_id).run_dir / "checkpoints" / f"round-{r:06d}.safetensors"
            ckpt = load_checkpoint(path)
            assert ckpt.meta == {"round": r}
            assert torch.equal(ckpt.tensors["global"], torch.full((20_000,), float(r)))
        found = store.latest_checkpoint(run_id)
        assert found is not None and found[0] == last
        return last


def _writer(root: Path, run_id: str, die_at: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", _WRITER, str(root), run_id, str(die_at)])


def test_killed_writer_leaves_consistent_store(tmp_path: Path) -> None:
    with RunStore(tmp_path) as store:
        run_id = store.create_run({})
    # 1. the writer crashes right after writing round 3's checkpoint file
    proc = _writer(tmp_path, run_id, die_at=3)
    assert proc.wait(timeout=60) == 3
    assert _assert_consistent(tmp_path, run_id) == 2
    # 2. a new writer overwrites the orphan, then is SIGKILLed at an arbitrary moment
    proc = _writer(tmp_path, run_id, die_at=-1)
    with RunStore(tmp_path) as reader:
        deadline = time.monotonic() + 60
        while reader.get_run(run_id).last_round < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
    proc.kill()
    proc.wait(timeout=10)
    last = _assert_consistent(tmp_path, run_id)
    assert last >= 6
    # 3. the run goes on from the next round
    with RunStore(tmp_path) as store:
        store.commit_round(run_id, last + 1, {"train_loss": 0.0})
        assert store.get_run(run_id).last_round == last + 1


def test_client_health_rows_are_upserted_per_name(store: RunStore) -> None:
    run_id = store.create_run({"x": 1})
    assert store.health(run_id) == []
    row = {"name": "site-b", "client": 1, "last_seen": 1.5e9, "rounds_completed": 2}
    store.update_health(run_id, [row, {"name": "site-a", "client": 0, "failures": 1}])
    store.update_health(run_id, [{**row, "rounds_completed": 3, "last_error": "late"}])
    got = store.health(run_id)
    assert [h["name"] for h in got] == ["site-a", "site-b"]  # by client id
    assert got[1]["rounds_completed"] == 3 and got[1]["last_error"] == "late"
    assert got[0]["failures"] == 1 and got[0]["bytes_sent"] == 0


HOLDER = """
import sys, time
from potluck.store.sqlite import RunStore
store = RunStore(sys.argv[1])
run = sys.argv[2] if len(sys.argv) > 2 else store.create_run({})
store.hold(run)
print(run, flush=True)
time.sleep(120)
"""


def _holder(root: Path, *run: str) -> tuple[subprocess.Popen[str], str]:
    """A process that holds a run (a new one, or ``run``) until it is killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root), *run],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def test_a_run_whose_process_died_reads_interrupted(tmp_path: Path) -> None:
    """A run executes while its process holds it; once that process is killed the run reads
    ``interrupted`` in any store, and holding it again makes it ``running`` here."""
    proc, run = _holder(tmp_path)
    try:
        with RunStore(tmp_path) as st:
            assert st.executing(run) and st.get_run(run).status == "running"
            with pytest.raises(
                RunBusyError, match=rf"run {run} is still executing \(pid {proc.pid}"
            ):
                st.hold(run)
            proc.kill()
            proc.wait()
            assert not st.executing(run)
            assert [i.status for i in st.list_runs()] == ["interrupted"]
            st.hold(run)
            assert st.get_run(run).status == "running"
            assert RunStore(tmp_path).get_run(run).status == "running"  # seen from elsewhere
            st.set_status(run, "failed")  # a final status releases it
            assert not st.executing(run) and st.get_run(run).status == "failed"
    finally:
        proc.kill()
        proc.wait()


def test_closing_a_store_releases_its_runs(tmp_path: Path) -> None:
    st = RunStore(tmp_path)
    run = st.create_run({})
    st.close()
    with RunStore(tmp_path) as other:
        assert other.get_run(run).status == "interrupted" and not other.executing(run)


def test_a_restarted_deployment_continues_the_newest_run_of_its_name(tmp_path: Path) -> None:
    """``run.name`` names a deployment's family of runs: after a finished one, the next is
    ``<name>-2``, and a server restarted while it runs continues that one."""
    from potluck.config import ExperimentConfig
    from potluck.deployment import rounds_done

    cfg = ExperimentConfig.from_dict({"run": {"store": str(tmp_path), "name": "deployed"}})
    with RunStore(tmp_path) as store:
        first = store.create_run({}, name="deployed")
        store.commit_round(first, 1, {}, [])
        store.finish(first, "finished", {})
        second = store.create_run({}, name="deployed")
        for rnd in (1, 2):
            store.commit_round(second, rnd, {}, [])
        store.set_status(second, "failed")
    assert RunStore(tmp_path).get_run(second).name == "deployed-2"
    assert rounds_done(cfg) == 2  # the newest, unfinished: not the first, finished one
