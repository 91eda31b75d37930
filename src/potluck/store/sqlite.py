"""The run store: one SQLite database (WAL mode) plus a directory of checkpoint files per run.

Layout under ``root``::

    potluck.db                                       runs, rounds, metrics, checkpoint index
    potluck.db-wal, potluck.db-shm                   SQLite's write-ahead log and its index
    runs/<run_id>/checkpoints/round-000001.safetensors

A round is committed atomically: its checkpoint file is written (atomically) first, then one
transaction inserts the round, its metrics, every client's metrics and the checkpoint row
with the file's SHA-256 (schema 5). A crash in between leaves an orphan file that the next
commit of that round overwrites; a crash while the file is written leaves a temporary
``.round-NNNNNN.safetensors.<hex>.tmp``, removed when the run is next written to.
``resume_point`` verifies a checkpoint against its row (checksum, and the round in its
metadata) and refuses a damaged one unless told to fall back to an older one.

Committed rounds live in ``potluck.db-wal`` until SQLite copies them into ``potluck.db``;
the store does so (``PRAGMA wal_checkpoint(TRUNCATE)``) when a run finishes or fails. A copy
of a store taken at any other time must include ``potluck.db-wal`` and ``potluck.db-shm``.
A damaged or unreadable database raises ``StoreError`` naming the file and what to do.

Metrics are stored one value per row in ``REAL`` columns, so ``inf`` round-trips and SQLite
turns ``NaN`` into ``NULL``, which reads back as ``float("nan")``.

Example:
    >>> import tempfile
    >>> with RunStore(tempfile.mkdtemp()) as store:
    ...     run_id = store.create_run({"lr": 0.1}, name="demo")
    ...     store.commit_round(run_id, 1, {"train_loss": 0.5}, [(7, {"train_loss": 0.4})])
    ...     info = store.get_run(store.resolve("demo"))
    ...     (info.last_round, store.rounds(run_id)[0].metrics, store.client_metrics(run_id))
    (1, {'train_loss': 0.5}, [(1, 7, {'train_loss': 0.4})])
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import math
import numbers
import os
import re
import secrets
import socket
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

import torch

from potluck.store.checkpoint import (
    Checkpoint,
    CheckpointError,
    DamagedCheckpointError,
    parse_checkpoint,
    save_checkpoint,
)

_log = logging.getLogger("potluck")

STATUSES = ("running", "finished", "failed")
DB_NAME = "potluck.db"
_CKPT_DIR = "checkpoints"
_CKPT_FILE = re.compile(r"round-(\d+)\.safetensors")
_TMP_FILE = re.compile(r"\.round-\d+\.safetensors\.[0-9a-f]+\.tmp")  # core.files.atomic_write
_BUSY_TIMEOUT_S = 30.0
_WAL_CHECKPOINT_WAIT_S = 1.0  # how long a finishing run waits for readers of an old snapshot

# Schema migrations: entry i upgrades ``PRAGMA user_version`` from i to i + 1.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        f"""CREATE TABLE runs (
            id INTEGER PRIMARY KEY,
            run_id TEXT NOT NULL UNIQUE,
            name TEXT NOT NULL,
            created_at TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN {STATUSES!r}),
            config TEXT NOT NULL,
            summary TEXT NOT NULL DEFAULT '{{}}'
        )""",
        "CREATE INDEX runs_name ON runs (name)",
        """CREATE TABLE rounds (
            run INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            round INTEGER NOT NULL CHECK (round >= 1),
            committed_at TEXT NOT NULL,
            PRIMARY KEY (run, round)
        ) WITHOUT ROWID""",
        """CREATE TABLE round_metrics (
            run INTEGER NOT NULL,
            round INTEGER NOT NULL,
            name TEXT NOT NULL,
            value REAL,
            UNIQUE (run, round, name),
            FOREIGN KEY (run, round) REFERENCES rounds (run, round) ON DELETE CASCADE
        )""",
        """CREATE TABLE client_metrics (
            run INTEGER NOT NULL,
            round INTEGER NOT NULL,
            client INTEGER NOT NULL,
            name TEXT NOT NULL,
            value REAL,
            UNIQUE (run, round, client, name),
            FOREIGN KEY (run, round) REFERENCES rounds (run, round) ON DELETE CASCADE
        )""",
        """CREATE TABLE checkpoints (
            run INTEGER NOT NULL,
            round INTEGER NOT NULL,
            path TEXT NOT NULL,
            PRIMARY KEY (run, round),
            FOREIGN KEY (run, round) REFERENCES rounds (run, round) ON DELETE CASCADE
        ) WITHOUT ROWID""",
    ),
    (
        """CREATE TABLE client_state (
            run INTEGER NOT NULL,
            round INTEGER NOT NULL,
            client INTEGER NOT NULL,
            name TEXT NOT NULL,
            data BLOB NOT NULL,
            UNIQUE (run, client, name, round),
            FOREIGN KEY (run, round) REFERENCES rounds (run, round) ON DELETE CASCADE
        )""",
    ),
    (
        """CREATE TABLE client_health (
            run INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            name TEXT NOT NULL,
            client INTEGER NOT NULL,
            last_seen REAL,
            rounds_completed INTEGER NOT NULL DEFAULT 0,
            failures INTEGER NOT NULL DEFAULT 0,
            latency_s REAL,
            bytes_sent INTEGER NOT NULL DEFAULT 0,
            bytes_received INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            PRIMARY KEY (run, name)
        ) WITHOUT ROWID""",
    ),
    (  # client state of any part: any dtype and shape (before: 1-D float32 only)
        "ALTER TABLE client_state ADD COLUMN dtype TEXT NOT NULL DEFAULT 'float32'",
        "ALTER TABLE client_state ADD COLUMN shape TEXT",
    ),
    (  # each checkpoint file's SHA-256 (hex); NULL for checkpoints committed before schema 5
        "ALTER TABLE checkpoints ADD COLUMN sha256 TEXT",
    ),
    (  # the model registry (rollout.registry): versions and the audit log of their changes
        """CREATE TABLE models (
            name TEXT NOT NULL,
            version INTEGER NOT NULL CHECK (version >= 1),
            run INTEGER NOT NULL REFERENCES runs (id),
            round INTEGER NOT NULL,
            stage TEXT NOT NULL
                CHECK (stage IN ('registered', 'canary', 'production', 'archived')),
            metrics TEXT NOT NULL,
            parent INTEGER,
            path TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            created_at TEXT NOT NULL,
            PRIMARY KEY (name, version)
        ) WITHOUT ROWID""",
        "CREATE UNIQUE INDEX models_production ON models (name) WHERE stage = 'production'",
        """CREATE TABLE model_audit (
            id INTEGER PRIMARY KEY,
            at TEXT NOT NULL,
            name TEXT NOT NULL,
            version INTEGER NOT NULL,
            action TEXT NOT NULL,
            detail TEXT NOT NULL
        )""",
    ),
)
STATE_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.uint8,
        torch.bool,
    )
}
HEALTH_FIELDS = (
    "name",
    "client",
    "last_seen",
    "rounds_completed",
    "failures",
    "latency_s",
    "bytes_sent",
    "bytes_received",
    "last_error",
)
_IN_CHUNK = 500


class UnknownRunError(KeyError):
    """No run matches a reference."""

    def __str__(self) -> str:
        return str(self.args[0])


class AmbiguousRunError(ValueError):
    """More than one run matches a reference."""


class StoreError(RuntimeError):
    """The run store's database is damaged or cannot be opened or read; the message names
    the file and what to do."""


class RunBusyError(RuntimeError):
    """The run is executing in another process (its lock is held); the message names it."""


_SQLITE_DAMAGED = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
_SQLITE_UNREADABLE = (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN)


def _store_error(db: Path, err: sqlite3.DatabaseError, *, opening: bool) -> StoreError | None:
    """The ``StoreError`` that ``err`` means for the database ``db`` (``None``: not damage).

    Corruption and unreadable files always are; while opening, any SQLite error is.
    """
    code = (getattr(err, "sqlite_errorcode", None) or -1) & 0xFF
    copy = (
        f"A copy of a store must include {db.name}-wal and {db.name}-shm beside {db.name}, "
        f"or be taken after `sqlite3 {db} 'PRAGMA wal_checkpoint'` (then {db.name} alone "
        "holds every committed round)"
    )
    if code in _SQLITE_DAMAGED:
        return StoreError(
            f"the run store database {db} is damaged ({err}). Restore it from a copy. {copy}. "
            f"The checkpoint files under runs/ are separate; `sqlite3 {db} .recover | sqlite3 "
            "NEW.db` may salvage rows"
        )
    if code in _SQLITE_UNREADABLE or opening:
        verb = "opened" if opening else "read"
        return StoreError(
            f"the run store database {db} cannot be {verb} ({err}). Check that the file and "
            "its directory are readable and writable and the disk has room; if the file is "
            f"damaged, restore it from a copy. {copy}"
        )
    return None


def _open_error(db: Path, err: sqlite3.DatabaseError) -> StoreError:
    store_err = _store_error(db, err, opening=True)
    assert store_err is not None
    return store_err


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _guarded(
    method: Callable[Concatenate[RunStore, _P], _R],
) -> Callable[Concatenate[RunStore, _P], _R]:
    """``method`` with SQLite's errors for a damaged or unreadable database raised as
    ``StoreError``."""

    @functools.wraps(method)
    def guarded(self: RunStore, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as err:
            store_err = _store_error(self.root / DB_NAME, err, opening=False)
            if store_err is None:
                raise
            raise store_err from err

    return guarded


@dataclass(frozen=True)
class RunInfo:
    """One run as recorded; ``last_round`` is 0 until round 1 is committed. ``status`` is
    ``running``, ``finished``, ``failed``, or ``interrupted``: recorded as running, but no
    process executes it any more (``RunStore.executing``; resume it)."""

    run_id: str
    name: str
    created_at: str
    status: str
    config: dict[str, Any]
    last_round: int
    summary: dict[str, Any]
    run_dir: Path


@dataclass(frozen=True)
class RoundRecord:
    """One committed round and its server-side metrics."""

    round: int
    metrics: dict[str, float]
    committed_at: str


@dataclass(frozen=True)
class ClientSummary:
    """One client's metrics over a run: the rounds it has metrics in (``rounds``, from
    ``first_round`` to ``last_round``), and per metric how many finite values it has
    (``count``), their sum and its latest value."""

    client: int
    rounds: int
    first_round: int
    last_round: int
    count: dict[str, int]
    sum: dict[str, float]
    last: dict[str, float]

    def mean(self, name: str) -> float:
        """The metric's mean over the client's rounds (NaN if it has none)."""
        n = self.count.get(name, 0)
        return self.sum[name] / n if n else math.nan


@dataclass(frozen=True)
class ResumePoint:
    """Where a resume starts: after ``round`` (0: from the beginning), from ``checkpoint``,
    the verified file at ``path`` (both ``None`` for round 0).

    ``checksum`` is ``False`` for a checkpoint committed before schema 5, which has no
    recorded SHA-256 and is verified by its safetensors structure and round only.
    ``skipped`` are the newer checkpoints that failed verification and were passed over
    (only with ``fallback``); the rounds after ``round`` are recomputed.
    """

    round: int
    checkpoint: Checkpoint | None
    path: Path | None
    checksum: bool
    skipped: tuple[DamagedCheckpointError, ...] = ()


class RunStore:
    """Runs, rounds, per-client metrics and checkpoints under one ``root`` directory.

    ``keep_checkpoints=k`` keeps only the newest ``k`` checkpoints of a run (files and rows).
    Many processes may open the same root (one ``RunStore`` per thread); readers never block
    the writer, and writers wait for each other up to 30 s.

    Example:
        >>> import tempfile
        >>> store = RunStore(tempfile.mkdtemp(), keep_checkpoints=2)
        >>> store.list_runs()
        []
        >>> store.close()
    """

    def __init__(self, root: str | Path, *, keep_checkpoints: int | None = None) -> None:
        if keep_checkpoints is not None and keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be None or >= 1, got {keep_checkpoints}")
        self.root = Path(root)
        self.keep_checkpoints = keep_checkpoints
        self._writing: set[str] = set()  # runs whose stray temporary files are removed
        self._held: dict[str, int] = {}  # runs executing here: their lock files' descriptors
        self.root.mkdir(parents=True, exist_ok=True)
        db = self.root / DB_NAME
        try:
            self._conn = sqlite3.connect(db, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.DatabaseError as err:
            raise _open_error(db, err) from err
        try:
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = FULL")
            self._conn.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except BaseException as exc:
            self._conn.close()
            if isinstance(exc, sqlite3.DatabaseError):
                raise _open_error(db, exc) from exc
            raise

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Close the database connection (and release the runs this store executes)."""
        for run_id in list(self._held):
            self.release(run_id)
        self._conn.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- runs ------------------------------------------------------------------------------

    @_guarded
    def create_run(self, config: Mapping[str, Any], name: str | None = None) -> str:
        """Record a new ``running`` run, create its directory and hold it (``hold``: it
        executes in this process until ``finish``, a final ``set_status``, ``release`` or
        ``close``); return its id.

        The id is ``YYYYMMDD-HHMMSS-<6 hex>`` (UTC); ``name`` defaults to the id. A name
        another run has is disambiguated: the run is named ``<name>-2`` (or the next free
        number), and a warning says so.

        Example:
            >>> import tempfile
            >>> with RunStore(tempfile.mkdtemp()) as store:
            ...     first, second = store.create_run({}, "demo"), store.create_run({}, "demo")
            ...     store.get_run(first).name, store.get_run(second).name
            ('demo', 'demo-2')
        """
        now = datetime.now(UTC)
        run_id = f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
        config_json = _to_json(dict(config), "config")
        self.run_dir(run_id).mkdir(parents=True, exist_ok=True)
        self.hold(run_id)  # before the row exists, so that no reader sees it interrupted
        try:
            with self._transaction():
                given = name or run_id
                name = self._free_name(given)
                if name != given:
                    _log.warning("run name %r is taken; this run is named %r", given, name)
                self._conn.execute(
                    "INSERT INTO runs (run_id, name, created_at, status, config)"
                    " VALUES (?, ?, ?, 'running', ?)",
                    (run_id, name, now.isoformat(timespec="seconds"), config_json),
                )
        except BaseException:
            self.release(run_id)
            raise
        return run_id

    def _free_name(self, name: str) -> str:
        """``name``, or ``name-<k>`` for the smallest k >= 2 no run has (in the transaction
        that inserts the run, so two processes cannot both take it)."""
        taken = {
            row[0]
            for row in self._conn.execute(
                "SELECT name FROM runs"
                " WHERE name = ?1 OR substr(name, 1, length(?1) + 1) = ?1 || '-'",
                (name,),
            )
        }
        if name not in taken:
            return name
        k = 2
        while f"{name}-{k}" in taken:
            k += 1
        return f"{name}-{k}"

    @_guarded
    def named(self, name: str) -> list[RunInfo]:
        """The runs created under ``name`` (named ``name``, or ``name-<k>`` after a
        disambiguation), newest first.

        Example:
            >>> import tempfile
            >>> with RunStore(tempfile.mkdtemp()) as store:
            ...     ids = [store.create_run({}, n) for n in ("exp", "exp", "other", "exp-x")]
            ...     [r.name for r in store.named("exp")]
            ['exp-2', 'exp']
        """
        return [
            r
            for r in self.list_runs()
            if r.name == name or re.fullmatch(re.escape(name) + r"-[0-9]+", r.name)
        ]

    def hold(self, run_id: str) -> None:
        """Mark run ``run_id`` as executing in this process: an exclusive ``flock`` on its
        lock file, which the operating system releases when the process ends however it
        ends. ``RunBusyError`` (naming the process) if another process holds it.

        Example:
            >>> import tempfile
            >>> a, b = RunStore(d := tempfile.mkdtemp()), RunStore(d)
            >>> run = a.create_run({})
            >>> b.hold(run)  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            potluck.store.sqlite.RunBusyError: run ... is still executing (pid ...)...
            >>> a.close(); b.hold(run); b.get_run(run).status
            'running'
            >>> b.close(); RunStore(d).get_run(run).status
            'interrupted'
        """
        if run_id in self._held:
            return
        path = self._lock_path(run_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunBusyError(
                f"run {run_id} is still executing ({holder}): wait for it to end, or stop"
                " that process first"
            ) from None
        since = datetime.now(UTC).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {since}".encode(), 0)
        self._held[run_id] = fd

    def release(self, run_id: str) -> None:
        """Stop holding run ``run_id`` (idempotent); a run still ``running`` then reads as
        ``interrupted``."""
        fd = self._held.pop(run_id, None)
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def executing(self, run_id: str) -> bool:
        """Whether some process (this one included) holds run ``run_id``."""
        if run_id in self._held:
            return True
        try:
            fd = os.open(self._lock_path(run_id), os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # also drops the shared lock just taken
        return False

    def _lock_path(self, run_id: str) -> Path:
        return self.run_dir(run_id) / ".lock"

    def run_dir(self, run_id: str) -> Path:
        """The directory of run ``run_id`` (``root/runs/<run_id>``)."""
        return self.root / "runs" / run_id

    @_guarded
    def resolve(self, ref: str) -> str:
        """The run id that ``ref`` names: an exact id, a unique id prefix or a unique name.

        Raises ``UnknownRunError`` (a ``KeyError``) or ``AmbiguousRunError`` (a ``ValueError``)
        whose message lists the candidates.
        """
        rows = self._conn.execute(
            "SELECT run_id FROM runs WHERE run_id = ?1"
            " OR (?1 != '' AND substr(run_id, 1, length(?1)) = ?1) OR name = ?1"
            " ORDER BY id DESC",
            (ref,),
        ).fetchall()
        ids = [r[0] for r in rows]
        if ref in ids:
            return ref
        if len(ids) == 1:
            return str(ids[0])
        if ids:
            raise AmbiguousRunError(f"run reference {ref!r} is ambiguous; it matches: {ids}")
        recent = [r.run_id for r in self.list_runs()[:5]]
        raise UnknownRunError(f"no run matches {ref!r}; most recent runs: {recent}")

    @_guarded
    def get_run(self, run_id: str) -> RunInfo:
        """The run with id exactly ``run_id`` (``UnknownRunError`` if none)."""
        row = self._conn.execute(_RUN_SELECT + " WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise UnknownRunError(f"no run with id {run_id!r} in {self.root}")
        return self._run_info(row)

    @_guarded
    def list_runs(self) -> list[RunInfo]:
        """All runs, newest first."""
        rows = self._conn.execute(_RUN_SELECT + " ORDER BY id DESC").fetchall()
        return [self._run_info(r) for r in rows]

    @_guarded
    def set_status(self, run_id: str, status: str) -> None:
        """Set the status of run ``run_id`` to one of ``STATUSES``; on ``finished`` or
        ``failed`` the write-ahead log is copied into ``potluck.db`` (``_checkpoint_wal``)."""
        _check_status(status)
        with self._transaction():
            self._run_key(run_id)
            self._conn.execute("UPDATE runs SET status = ? WHERE run_id = ?", (status, run_id))
        if status != "running":
            self.release(run_id)
            self._checkpoint_wal()

    @_guarded
    def finish(self, run_id: str, status: str, summary: Mapping[str, Any]) -> None:
        """Record the final ``status`` and ``summary`` (JSON-serialisable) of a run; the
        write-ahead log is then copied into ``potluck.db`` (``_checkpoint_wal``)."""
        _check_status(status)
        summary_json = _to_json(dict(summary), "summary")
        with self._transaction():
            self._run_key(run_id)
            self._conn.execute(
                "UPDATE runs SET status = ?, summary = ? WHERE run_id = ?",
                (status, summary_json, run_id),
            )
        if status != "running":
            self.release(run_id)
            self._checkpoint_wal()

    # -- rounds ----------------------------------------------------------------------------

    @_guarded
    def commit_round(
        self,
        run_id: str,
        round: int,
        metrics: Mapping[str, float],
        client_metrics: Sequence[tuple[int, Mapping[str, float]]] = (),
        checkpoint: Checkpoint | None = None,
        client_states: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
    ) -> None:
        """Commit round ``round`` (which must be ``last_round + 1``) atomically.

        Writes the checkpoint file (if any) first, then one transaction with the round, its
        metrics, the clients' metrics, the clients' new persistent state vectors and the
        checkpoint row with the file's SHA-256; then prunes old checkpoints if
        ``keep_checkpoints`` is set. The checkpoint's metadata gets ``"round": round`` (one
        that says another round is refused). Metric values must be real numbers (``NaN``
        reads back as ``nan``). With a checkpoint, client-state versions no resume can need
        any more are dropped in the same transaction.
        """
        round_rows = _metric_rows(metrics, f"round {round} metrics")
        client_rows = _client_rows(client_metrics, round)
        state_rows = _state_rows(client_states or {}, round)
        if checkpoint is not None:
            checkpoint = _with_round(checkpoint, round)
        self._check_next_round(self._run_key(run_id), run_id, round)
        relpath = digest = None
        if checkpoint is not None:
            if run_id not in self._writing:
                self.remove_stray_files(run_id)
            relpath = f"{_CKPT_DIR}/round-{round:06d}.safetensors"
            digest = save_checkpoint(self.run_dir(run_id) / relpath, checkpoint)
        with self._transaction():
            key = self._run_key(run_id)
            self._check_next_round(key, run_id, round)
            self._insert_round(key, round, round_rows, client_rows, relpath, digest)
            self._conn.executemany(
                "INSERT INTO client_state (run, round, client, name, data, dtype, shape)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(key, round, *row) for row in state_rows],
            )
            if relpath is not None:
                self._drop_superseded_states(key, round)
        if checkpoint is not None and self.keep_checkpoints is not None:
            self._prune(run_id, self.keep_checkpoints)

    @_guarded
    def rounds(self, run_id: str, after: int = 0) -> list[RoundRecord]:
        """The committed rounds of a run after round ``after``, in order, with their metrics
        (read through the primary key: the rounds before ``after`` are not scanned)."""
        key = self._run_key(run_id)
        records = {
            rnd: RoundRecord(rnd, {}, at)
            for rnd, at in self._conn.execute(
                "SELECT round, committed_at FROM rounds WHERE run = ? AND round > ? ORDER BY round",
                (key, after),
            )
        }
        for rnd, name, value in self._conn.execute(
            "SELECT round, name, value FROM round_metrics WHERE run = ? AND round > ?"
            " ORDER BY round, rowid",
            (key, after),
        ):
            if rnd in records:  # a round committed between the two reads waits for the next
                records[rnd].metrics[name] = _from_sql(value)
        return list(records.values())

    @_guarded
    def client_metrics(
        self, run_id: str, round: int | None = None
    ) -> list[tuple[int, int, dict[str, float]]]:
        """``(round, client_id, metrics)`` per client, in commit order; one round or all.

        A client committed with an empty metrics dict has no row and is not listed.
        """
        key = self._run_key(run_id)
        sql = "SELECT round, client, name, value FROM client_metrics WHERE run = ?"
        args: tuple[int, ...] = (key,)
        if round is not None:
            sql, args = sql + " AND round = ?", (key, round)
        out: dict[tuple[int, int], dict[str, float]] = {}
        for rnd, client, name, value in self._conn.execute(sql + " ORDER BY round, rowid", args):
            out.setdefault((rnd, client), {})[name] = _from_sql(value)
        return [(rnd, client, m) for (rnd, client), m in out.items()]

    @_guarded
    def client_summary(self, run_id: str) -> list[ClientSummary]:
        """Per client, in the order of their ids: the rounds it has metrics in, and per
        metric its count, sum and latest value, aggregated by SQLite.

        Example:
            >>> import tempfile
            >>> with RunStore(tempfile.mkdtemp()) as store:
            ...     run = store.create_run({})
            ...     store.commit_round(run, 1, {}, [(3, {"loss": 1.0})])
            ...     store.commit_round(run, 2, {}, [(3, {"loss": 0.5, "acc": 0.9})])
            ...     (s,) = store.client_summary(run)
            ...     s.client, s.rounds, s.mean("loss"), s.last["acc"]
            (3, 2, 0.75, 0.9)
        """
        key = self._run_key(run_id)
        out = {
            client: ClientSummary(client, rounds, first, last, {}, {}, {})
            for client, rounds, first, last in self._conn.execute(
                "SELECT client, COUNT(DISTINCT round), MIN(round), MAX(round) FROM client_metrics"
                " WHERE run = ? GROUP BY client ORDER BY client",
                (key,),
            )
        }
        # one pass: with a single MAX() in the select, SQLite takes the bare column
        # ``value`` from the row holding the maximum (the client's latest round)
        for client, name, count, total, _, last in self._conn.execute(
            "SELECT client, name, COUNT(value), SUM(value), MAX(round), value"
            " FROM client_metrics WHERE run = ? GROUP BY client, name",
            (key,),
        ):
            summary = out[client]
            summary.count[name], summary.sum[name] = count, _from_sql(total)
            summary.last[name] = _from_sql(last)
        return list(out.values())

    @_guarded
    def first_client_metrics(self, run_id: str, prefix: str) -> dict[int, dict[str, float]]:
        """Per client, its metrics named ``<prefix>...`` of the first round it has any.

        Example:
            >>> import tempfile
            >>> with RunStore(tempfile.mkdtemp()) as store:
            ...     run = store.create_run({})
            ...     store.commit_round(run, 1, {}, [(3, {"h_0": 0.5, "loss": 1.0})])
            ...     store.commit_round(run, 2, {}, [(3, {"h_0": 0.7}), (4, {"h_0": 0.1})])
            ...     store.first_client_metrics(run, "h_")
            {3: {'h_0': 0.5}, 4: {'h_0': 0.1}}
        """
        if not re.fullmatch(r"[A-Za-z0-9_]+", prefix):
            raise ValueError(f"a metric prefix is letters, digits and _, got {prefix!r}")
        key = self._run_key(run_id)
        out: dict[int, dict[str, float]] = {}
        first: dict[int, int] = {}
        for rnd, client, name, value in self._conn.execute(
            "SELECT round, client, name, value FROM client_metrics WHERE run = ? AND name GLOB ?"
            " ORDER BY round, rowid",
            (key, prefix + "*"),
        ):
            if first.setdefault(client, rnd) == rnd:
                out.setdefault(client, {})[name] = _from_sql(value)
        return out

    @_guarded
    def client_states(self, run_id: str, clients: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """Each client's newest committed state tensors (an empty dict for a new client)."""
        key = self._run_key(run_id)
        found: dict[int, dict[str, torch.Tensor]] = {}
        wanted = sorted({int(c) for c in clients})
        for start in range(0, len(wanted), _IN_CHUNK):
            chunk = wanted[start : start + _IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = self._conn.execute(
                "SELECT client, name, MAX(round), data, dtype, shape FROM client_state"
                f" WHERE run = ? AND client IN ({marks}) GROUP BY client, name",
                (key, *chunk),
            )
            for client, name, _, data, dtype, shape in rows:
                found.setdefault(client, {})[name] = _state_tensor(data, dtype, shape)
        return [found.get(int(c), {}) for c in clients]

    @_guarded
    def clients_with_state(self, run_id: str) -> list[int]:
        """The clients that have committed state in run ``run_id``, ascending."""
        key = self._run_key(run_id)
        rows = self._conn.execute(
            "SELECT DISTINCT client FROM client_state WHERE run = ? ORDER BY client", (key,)
        )
        return [int(r[0]) for r in rows]

    @_guarded
    def update_health(self, run_id: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """Insert or replace deployed clients' health rows (keys: ``HEALTH_FIELDS``; ``name``
        is the client's certificate name, ``client`` its id, ``last_seen`` a Unix time)."""
        key = self._run_key(run_id)
        marks = ",".join("?" * (len(HEALTH_FIELDS) + 1))
        values = [(key, *(row.get(f) for f in HEALTH_FIELDS)) for row in rows]
        with self._transaction():
            self._conn.executemany(
                f"INSERT OR REPLACE INTO client_health (run, {', '.join(HEALTH_FIELDS)})"
                f" VALUES ({marks})",
                values,
            )

    @_guarded
    def health(self, run_id: str) -> list[dict[str, Any]]:
        """Deployed clients' health rows, by client id (empty for simulations)."""
        rows = self._conn.execute(
            f"SELECT {', '.join(HEALTH_FIELDS)} FROM client_health WHERE run = ?"
            " ORDER BY client, name",
            (self._run_key(run_id),),
        )
        return [dict(zip(HEALTH_FIELDS, row, strict=True)) for row in rows]

    def latest_checkpoint(
        self, run_id: str, *, fallback: bool = False
    ) -> tuple[int, Checkpoint] | None:
        """``(round, checkpoint)`` of the newest recorded checkpoint, verified, or ``None``
        if the run has none; see ``resume_point`` (``DamagedCheckpointError`` if the newest
        one does not verify, unless ``fallback``)."""
        point = self.resume_point(run_id, fallback=fallback)
        return None if point.checkpoint is None else (point.round, point.checkpoint)

    @_guarded
    def resume_point(self, run_id: str, *, fallback: bool = False) -> ResumePoint:
        """The newest recorded checkpoint of run ``run_id``, verified against its row: the
        file must read as a potluck checkpoint, its metadata round must be the row's round
        and its SHA-256 the recorded one (rows from before schema 5 have none: they are
        verified by structure and round only: ``checksum=False``).

        If the newest does not verify, ``DamagedCheckpointError`` names the file, the round
        and what is wrong, and says which earlier checkpoint verifies and how to resume
        from it; with ``fallback=True`` that earlier one is returned instead (``skipped``
        lists the damaged ones; round 0 if none verifies). A run without checkpoints
        resumes from round 0.
        """
        key = self._run_key(run_id)
        rows = self._conn.execute(
            "SELECT round, path, sha256 FROM checkpoints WHERE run = ? ORDER BY round DESC",
            (key,),
        ).fetchall()
        damaged: list[DamagedCheckpointError] = []
        point = ResumePoint(0, None, None, checksum=False)
        for rnd, relpath, digest in rows:
            path = self.run_dir(run_id) / relpath
            try:
                ckpt = _verified(path, run_id, rnd, digest)
            except DamagedCheckpointError as err:
                damaged.append(err)
                continue
            point = ResumePoint(rnd, ckpt, path, checksum=digest is not None)
            break
        if not damaged:
            return point
        if not fallback:
            raise _refusal(run_id, damaged, point, self._last_round(key))
        return ResumePoint(
            point.round, point.checkpoint, point.path, point.checksum, tuple(damaged)
        )

    def remove_stray_files(self, run_id: str) -> list[Path]:
        """Remove the temporary files (``.round-NNNNNN.safetensors.<hex>.tmp``) that a kill
        while a checkpoint was being written left in run ``run_id``'s checkpoint directory,
        never a complete checkpoint; return their paths.

        ``commit_round`` and ``truncate_after`` do this the first time this store writes
        to a run (and ``resume_experiment`` before it resumes one): only one process writes
        to a run at a time.
        """
        self._writing.add(run_id)
        ckpt_dir = self.run_dir(run_id) / _CKPT_DIR
        if not ckpt_dir.is_dir():
            return []
        removed = []
        for path in sorted(ckpt_dir.iterdir()):
            if _TMP_FILE.fullmatch(path.name) and path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
        if removed:
            names = ", ".join(p.name for p in removed)
            _log.info("run %s: removed stray temporary checkpoint files: %s", run_id, names)
        return removed

    @_guarded
    def truncate_after(self, run_id: str, round: int) -> None:
        """Delete everything of rounds ``> round`` (rows in one transaction, then files)."""
        if round < 0:
            raise ValueError(f"round must be >= 0, got {round}")
        if run_id not in self._writing:
            self.remove_stray_files(run_id)
        with self._transaction():
            key = self._run_key(run_id)
            self._conn.execute("DELETE FROM rounds WHERE run = ? AND round > ?", (key, round))
        for rnd, path in _checkpoint_files(self.run_dir(run_id)):
            if rnd > round:
                path.unlink(missing_ok=True)

    # -- internals -------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One ``BEGIN IMMEDIATE`` ... ``COMMIT``; rolled back on any exception."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _insert_round(
        self,
        key: int,
        round: int,
        round_rows: list[tuple[str, float]],
        client_rows: list[tuple[int, str, float]],
        relpath: str | None,
        digest: str | None,
    ) -> None:
        """The inserts of one round; the caller holds the transaction."""
        conn = self._conn
        conn.execute("INSERT INTO rounds VALUES (?, ?, ?)", (key, round, _now()))
        conn.executemany(
            "INSERT INTO round_metrics VALUES (?, ?, ?, ?)",
            [(key, round, n, v) for n, v in round_rows],
        )
        conn.executemany(
            "INSERT INTO client_metrics VALUES (?, ?, ?, ?, ?)",
            [(key, round, c, n, v) for c, n, v in client_rows],
        )
        if relpath is not None:
            conn.execute(
                "INSERT INTO checkpoints (run, round, path, sha256) VALUES (?, ?, ?, ?)",
                (key, round, relpath, digest),
            )

    def _drop_superseded_states(self, key: int, round: int) -> None:
        """Delete state versions older than each client's newest version at ``round``."""
        self._conn.execute(
            "DELETE FROM client_state WHERE run = ? AND round < ("
            " SELECT MAX(n.round) FROM client_state AS n WHERE n.run = client_state.run"
            " AND n.client = client_state.client AND n.name = client_state.name"
            " AND n.round <= ?)",
            (key, round),
        )

    def _checkpoint_wal(self) -> None:
        """Copy the write-ahead log into ``potluck.db`` and empty it, so that ``potluck.db``
        alone holds every committed round. Waits at most ``_WAL_CHECKPOINT_WAIT_S`` for
        other connections (a reader of an older snapshot, another run's writer); after that
        the log is left for a later checkpoint."""
        wait_ms, usual_ms = int(_WAL_CHECKPOINT_WAIT_S * 1000), int(_BUSY_TIMEOUT_S * 1000)
        self._conn.execute(f"PRAGMA busy_timeout = {wait_ms}")
        try:
            busy, _, _ = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.OperationalError as err:  # busy or locked: best effort
            busy = f"{err}"
        finally:
            self._conn.execute(f"PRAGMA busy_timeout = {usual_ms}")
        if busy:
            _log.info("%s: the write-ahead log was not fully checkpointed (busy)", self.root)

    def _migrate(self) -> None:
        with self._transaction():
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(_MIGRATIONS):
                raise StoreError(
                    f"{self.root / DB_NAME} has schema version {version}; this potluck "
                    f"understands up to {len(_MIGRATIONS)} (upgrade potluck)"
                )
            for step in _MIGRATIONS[version:]:
                for statement in step:
                    self._conn.execute(statement)
            self._conn.execute(f"PRAGMA user_version = {len(_MIGRATIONS)}")

    def _run_key(self, run_id: str) -> int:
        row = self._conn.execute("SELECT id FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise UnknownRunError(f"no run with id {run_id!r} in {self.root}")
        return int(row[0])

    def _check_next_round(self, key: int, run_id: str, round: int) -> None:
        expected = self._last_round(key) + 1
        if round != expected:
            raise ValueError(f"run {run_id}: expected round {expected}, got {round}")

    def _last_round(self, key: int) -> int:
        row = self._conn.execute("SELECT MAX(round) FROM rounds WHERE run = ?", (key,)).fetchone()
        return int(row[0] or 0)

    def _run_info(self, row: tuple[Any, ...]) -> RunInfo:
        """A ``RunInfo`` from a row of ``_RUN_SELECT``."""
        run_id, name, created_at, status, config, summary, last_round = row
        if status == "running" and not self.executing(run_id):
            status = "interrupted"  # its process died (or ended without a final status)
        return RunInfo(
            run_id=run_id,
            name=name,
            created_at=created_at,
            status=status,
            config=json.loads(config),
            last_round=last_round,
            summary=json.loads(summary),
            run_dir=self.run_dir(run_id),
        )

    def _prune(self, run_id: str, keep: int) -> None:
        """Drop all but the newest ``keep`` checkpoints: rows first, then files."""
        with self._transaction():
            key = self._run_key(run_id)
            old = self._conn.execute(
                "SELECT round, path FROM checkpoints WHERE run = ?"
                " ORDER BY round DESC LIMIT -1 OFFSET ?",
                (key, keep),
            ).fetchall()
            self._conn.executemany(
                "DELETE FROM checkpoints WHERE run = ? AND round = ?", [(key, r) for r, _ in old]
            )
        for _, relpath in old:
            (self.run_dir(run_id) / relpath).unlink(missing_ok=True)


_RUN_SELECT = (
    "SELECT run_id, name, created_at, status, config, summary,"
    " (SELECT COALESCE(MAX(round), 0) FROM rounds WHERE run = runs.id) FROM runs"
)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")


def _to_json(value: dict[str, Any], what: str) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{what} must be JSON-serialisable: {err}") from None


def _metric_rows(metrics: Mapping[str, Any], where: str) -> list[tuple[str, float]]:
    """Validate a metrics mapping into ``(name, value)`` rows."""
    rows: list[tuple[str, float]] = []
    for name, value in metrics.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"{where}: metric names must be non-empty strings, got {name!r}")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(
                f"{where}: metric {name!r} must be a real number, got {type(value).__name__}"
            )
        rows.append((name, float(value)))
    return rows


def _client_rows(
    client_metrics: Sequence[tuple[int, Mapping[str, Any]]], round: int
) -> list[tuple[int, str, float]]:
    """Validate per-client metrics into ``(client_id, name, value)`` rows."""
    rows: list[tuple[int, str, float]] = []
    seen: set[int] = set()
    for client, metrics in client_metrics:
        if isinstance(client, bool) or not isinstance(client, numbers.Integral):
            raise TypeError(f"round {round}: client ids must be integers, got {client!r}")
        if client in seen:
            raise ValueError(f"round {round}: client {client} has metrics twice")
        seen.add(client)
        where = f"round {round} client {client}"
        rows += [(int(client), n, v) for n, v in _metric_rows(metrics, where)]
    return rows


def _state_rows(
    states: Mapping[int, Mapping[str, torch.Tensor]], round: int
) -> list[tuple[int, str, bytes, str, str | None]]:
    """``(client, name, bytes, dtype, shape)`` rows (shape ``None`` for 1-D); tensors of the
    ``STATE_DTYPES``, finite where floating point."""
    rows: list[tuple[int, str, bytes, str, str | None]] = []
    for client, named in states.items():
        if isinstance(client, bool) or not isinstance(client, numbers.Integral):
            raise TypeError(f"round {round}: client state key must be an int, got {client!r}")
        for name, t in named.items():
            where = f"round {round}: state {name!r} of client {client}"
            dtype = str(t.dtype).removeprefix("torch.") if isinstance(t, torch.Tensor) else None
            if dtype not in STATE_DTYPES:
                raise TypeError(f"{where} must be a tensor of {sorted(STATE_DTYPES)}")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{where} contains NaN or Inf")
            data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            shape = None if t.dim() == 1 else json.dumps(list(t.shape))
            rows.append((int(client), name, data, dtype, shape))
    return rows


def _state_tensor(data: bytes, dtype: str, shape: str | None) -> torch.Tensor:
    if not data:
        flat = torch.empty(0, dtype=STATE_DTYPES[dtype])
    else:
        flat = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(STATE_DTYPES[dtype])
    return flat if shape is None else flat.reshape(json.loads(shape))


def _with_round(ckpt: Checkpoint, round: int) -> Checkpoint:
    """``ckpt`` with ``"round": round`` in its metadata (refused if it names another)."""
    stated = ckpt.meta.get("round", round)
    if isinstance(stated, bool) or stated != round:
        raise ValueError(f"round {round}: the checkpoint's metadata says round {stated!r}")
    return ckpt if "round" in ckpt.meta else Checkpoint(ckpt.tensors, {**ckpt.meta, "round": round})


def _verified(path: Path, run_id: str, round: int, digest: str | None) -> Checkpoint:
    """The checkpoint at ``path`` if it verifies against its row (``round``, SHA-256
    ``digest`` or ``None``), else ``DamagedCheckpointError`` saying what is wrong."""
    ckpt: Checkpoint | None = None
    problems: list[tuple[str, str]] = []  # (reason, detail)
    try:
        data = path.read_bytes()
    except OSError as err:
        detail = "the file is missing" if isinstance(err, FileNotFoundError) else str(err)
        problems.append(("unreadable", detail))
    else:
        try:
            ckpt = parse_checkpoint(data, path)
        except CheckpointError as err:
            detail = str(err).removeprefix(f"checkpoint {path} ")
            problems.append(("unreadable", f"the file {detail}"))
        if ckpt is not None:
            stated = ckpt.meta.get("round")
            if stated is None:
                problems.append(("round mismatch", "its metadata has no round"))
            elif isinstance(stated, bool) or stated != round:
                problems.append(
                    ("round mismatch", f"its metadata says round {stated!r}, not {round}")
                )
        if digest is not None:
            actual = hashlib.sha256(data).hexdigest()
            if actual != digest:
                problems.append(
                    (
                        "checksum mismatch",
                        f"its SHA-256 is {actual[:16]}..., the store recorded {digest[:16]}...",
                    )
                )
    if not problems:
        assert ckpt is not None
        return ckpt
    what = "; ".join(f"{reason}: {detail}" for reason, detail in problems)
    problem = f"checkpoint {path} (round {round} of run {run_id}) is damaged: {what}"
    raise DamagedCheckpointError(problem, path=path, round=round, reason=problems[0][0])


def _refusal(
    run_id: str, damaged: list[DamagedCheckpointError], point: ResumePoint, last: int
) -> DamagedCheckpointError:
    """The error that refuses to resume past ``damaged[0]``, saying how to fall back to
    ``point`` (the newest checkpoint that verifies, or round 0)."""
    newest = damaged[0]
    also = ""
    if len(damaged) > 1:
        others = ", ".join(f"round {e.round} ({e.reason})" for e in damaged[1:])
        also = f"Older checkpoints that are damaged too: {others}. "
    how = f"`potluck resume {run_id} --fallback` (Python: resume_experiment(..., fallback=True))"
    if point.checkpoint is not None:
        advice = (
            f"{also}The newest earlier checkpoint that verifies is round {point.round} "
            f"({point.path}): to resume after round {point.round}, recomputing "
            f"{_rounds(point.round + 1, last)}, run {how}; or restore {newest.path.name} from "
            "a copy and resume as usual"
        )
    else:
        advice = (
            f"{also}No earlier checkpoint of the run verifies: {how} restarts it from round "
            f"1, recomputing {_rounds(1, last)}; or restore {newest.path.name} from a copy "
            "and resume as usual"
        )
    return DamagedCheckpointError(
        newest.problem,
        path=newest.path,
        round=newest.round,
        reason=newest.reason,
        advice=advice,
        earlier=point.round if point.checkpoint is not None else None,
        last_round=last,
    )


def _rounds(first: int, last: int) -> str:
    """``"round 7"`` or ``"rounds 7-9"``."""
    return f"round {first}" if first >= last else f"rounds {first}-{last}"


def _from_sql(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _checkpoint_files(run_dir: Path) -> Iterator[tuple[int, Path]]:
    """``(round, path)`` of every checkpoint file in ``run_dir``, recorded or orphaned."""
    ckpt_dir = run_dir / _CKPT_DIR
    if not ckpt_dir.is_dir():
        return
    for path in ckpt_dir.iterdir():
        match = _CKPT_FILE.fullmatch(path.name)
        if match:
            yield int(match.group(1)), path
