"""The run store: one SQLite database (WAL mode) plus a directory of checkpoint files per run.

Layout under ``root``::

    potluck.db                                       runs, rounds, metrics, checkpoint index
    runs/<run_id>/checkpoints/round-000001.safetensors

A round is committed atomically: its checkpoint file is written (atomically) first, then one
transaction inserts the round, its metrics, every client's metrics and the checkpoint row.
A crash in between leaves an orphan file that the next commit of that round overwrites.

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

import json
import math
import numbers
import re
import secrets
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from potluck.store.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint

STATUSES = ("running", "finished", "failed")
DB_NAME = "potluck.db"
_CKPT_DIR = "checkpoints"
_CKPT_FILE = re.compile(r"round-(\d+)\.safetensors")
_BUSY_TIMEOUT_S = 30.0

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


@dataclass(frozen=True)
class RunInfo:
    """One run as recorded; ``last_round`` is 0 until round 1 is committed."""

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
        self.root.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(
            self.root / DB_NAME, timeout=_BUSY_TIMEOUT_S, isolation_level=None
        )
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = FULL")
        self._conn.execute("PRAGMA foreign_keys = ON")
        self._migrate()

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Close the database connection."""
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

    def create_run(self, config: Mapping[str, Any], name: str | None = None) -> str:
        """Record a new ``running`` run and create its directory; return its id.

        The id is ``YYYYMMDD-HHMMSS-<6 hex>`` (UTC); ``name`` defaults to the id.
        """
        now = datetime.now(UTC)
        run_id = f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
        config_json = _to_json(dict(config), "config")
        with self._transaction():
            self._conn.execute(
                "INSERT INTO runs (run_id, name, created_at, status, config)"
                " VALUES (?, ?, ?, 'running', ?)",
                (run_id, name or run_id, now.isoformat(timespec="seconds"), config_json),
            )
        self.run_dir(run_id).mkdir(parents=True, exist_ok=True)
        return run_id

    def run_dir(self, run_id: str) -> Path:
        """The directory of run ``run_id`` (``root/runs/<run_id>``)."""
        return self.root / "runs" / run_id

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

    def get_run(self, run_id: str) -> RunInfo:
        """The run with id exactly ``run_id`` (``UnknownRunError`` if none)."""
        row = self._conn.execute(_RUN_SELECT + " WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise UnknownRunError(f"no run with id {run_id!r} in {self.root}")
        return self._run_info(row)

    def list_runs(self) -> list[RunInfo]:
        """All runs, newest first."""
        rows = self._conn.execute(_RUN_SELECT + " ORDER BY id DESC").fetchall()
        return [self._run_info(r) for r in rows]

    def set_status(self, run_id: str, status: str) -> None:
        """Set the status of run ``run_id`` to one of ``STATUSES``."""
        _check_status(status)
        with self._transaction():
            self._run_key(run_id)
            self._conn.execute("UPDATE runs SET status = ? WHERE run_id = ?", (status, run_id))

    def finish(self, run_id: str, status: str, summary: Mapping[str, Any]) -> None:
        """Record the final ``status`` and ``summary`` (JSON-serialisable) of a run."""
        _check_status(status)
        summary_json = _to_json(dict(summary), "summary")
        with self._transaction():
            self._run_key(run_id)
            self._conn.execute(
                "UPDATE runs SET status = ?, summary = ? WHERE run_id = ?",
                (status, summary_json, run_id),
            )

    # -- rounds ----------------------------------------------------------------------------

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
        checkpoint row; then prunes old checkpoints if ``keep_checkpoints`` is set. Metric
        values must be real numbers (``NaN`` reads back as ``nan``). With a checkpoint,
        client-state versions no resume can need any more are dropped in the same
        transaction.
        """
        round_rows = _metric_rows(metrics, f"round {round} metrics")
        client_rows = _client_rows(client_metrics, round)
        state_rows = _state_rows(client_states or {}, round)
        self._check_next_round(self._run_key(run_id), run_id, round)
        relpath = None
        if checkpoint is not None:
            relpath = f"{_CKPT_DIR}/round-{round:06d}.safetensors"
            save_checkpoint(self.run_dir(run_id) / relpath, checkpoint)
        with self._transaction():
            key = self._run_key(run_id)
            self._check_next_round(key, run_id, round)
            self._insert_round(key, round, round_rows, client_rows, relpath)
            self._conn.executemany(
                "INSERT INTO client_state (run, round, client, name, data, dtype, shape)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(key, round, *row) for row in state_rows],
            )
            if relpath is not None:
                self._drop_superseded_states(key, round)
        if checkpoint is not None and self.keep_checkpoints is not None:
            self._prune(run_id, self.keep_checkpoints)

    def rounds(self, run_id: str) -> list[RoundRecord]:
        """The committed rounds of a run, in order, with their metrics."""
        key = self._run_key(run_id)
        records = {
            rnd: RoundRecord(rnd, {}, at)
            for rnd, at in self._conn.execute(
                "SELECT round, committed_at FROM rounds WHERE run = ? ORDER BY round", (key,)
            )
        }
        for rnd, name, value in self._conn.execute(
            "SELECT round, name, value FROM round_metrics WHERE run = ? ORDER BY round, rowid",
            (key,),
        ):
            records[rnd].metrics[name] = _from_sql(value)
        return list(records.values())

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

    def clients_with_state(self, run_id: str) -> list[int]:
        """The clients that have committed state in run ``run_id``, ascending."""
        key = self._run_key(run_id)
        rows = self._conn.execute(
            "SELECT DISTINCT client FROM client_state WHERE run = ? ORDER BY client", (key,)
        )
        return [int(r[0]) for r in rows]

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

    def health(self, run_id: str) -> list[dict[str, Any]]:
        """Deployed clients' health rows, by client id (empty for simulations)."""
        rows = self._conn.execute(
            f"SELECT {', '.join(HEALTH_FIELDS)} FROM client_health WHERE run = ?"
            " ORDER BY client, name",
            (self._run_key(run_id),),
        )
        return [dict(zip(HEALTH_FIELDS, row, strict=True)) for row in rows]

    def latest_checkpoint(self, run_id: str) -> tuple[int, Checkpoint] | None:
        """``(round, checkpoint)`` of the newest recorded checkpoint that loads, or ``None``."""
        rows = self._conn.execute(
            "SELECT round, path FROM checkpoints WHERE run = ? ORDER BY round DESC",
            (self._run_key(run_id),),
        ).fetchall()
        for rnd, relpath in rows:
            try:
                return rnd, load_checkpoint(self.run_dir(run_id) / relpath)
            except (OSError, CheckpointError):
                continue
        return None

    def truncate_after(self, run_id: str, round: int) -> None:
        """Delete everything of rounds ``> round`` (rows in one transaction, then files)."""
        if round < 0:
            raise ValueError(f"round must be >= 0, got {round}")
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
            conn.execute("INSERT INTO checkpoints VALUES (?, ?, ?)", (key, round, relpath))

    def _drop_superseded_states(self, key: int, round: int) -> None:
        """Delete state versions older than each client's newest version at ``round``."""
        self._conn.execute(
            "DELETE FROM client_state WHERE run = ? AND round < ("
            " SELECT MAX(n.round) FROM client_state AS n WHERE n.run = client_state.run"
            " AND n.client = client_state.client AND n.name = client_state.name"
            " AND n.round <= ?)",
            (key, round),
        )

    def _migrate(self) -> None:
        with self._transaction():
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(_MIGRATIONS):
                raise RuntimeError(
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
