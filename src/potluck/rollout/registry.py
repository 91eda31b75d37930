"""The model registry: a run's checkpoint registered as a versioned model, with its metrics
and lineage, promoted to production and rolled back, every change in an audit log.

Models live in the run store's database (tables ``models`` and ``model_audit``); a
registered version's checkpoint is copied to ``models/<name>/v<version>.safetensors`` under
the store root with its SHA-256, so pruning or deleting the run keeps the model. Each name
has at most one ``production`` version; promoting another archives the one before it, and
``rollback`` restores the production version before the current one. A ``canary`` is a new
version tried on a seeded fraction of the clients next to production (``canary``): it is
promoted unless its accuracy on those clients' local test data falls more than
``threshold`` below production's, in which case it is rolled back (archived) automatically.

Example:
    >>> import tempfile, torch
    >>> from potluck.store.checkpoint import Checkpoint
    >>> store = RunStore(tempfile.mkdtemp())
    >>> run = store.create_run({"algorithm": {"name": "fedavg"}})
    >>> ckpt = Checkpoint({"weights": torch.zeros(3)}, {})
    >>> store.commit_round(run, 1, {"test_accuracy": 0.5}, checkpoint=ckpt)
    >>> models = ModelRegistry(store)
    >>> models.register("digits", run).version
    1
    >>> models.promote("digits", 1).stage
    'production'
    >>> [e.action for e in models.audit("digits")]
    ['register', 'promote']
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from potluck.store.checkpoint import Checkpoint, load_checkpoint
from potluck.store.sqlite import RunStore

if TYPE_CHECKING:
    from potluck.monitor.ab import ABResult
    from potluck.orchestrator import Experiment

STAGES = ("registered", "canary", "production", "archived")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class RegistryError(ValueError):
    """A registry request that cannot be carried out (unknown model, bad name, ...)."""


@dataclass(frozen=True)
class ModelVersion:
    """One registered version: where it came from and what it scored."""

    name: str
    version: int
    run_id: str
    round: int
    stage: str
    metrics: dict[str, float]
    parent: int | None  # the production version when this one was registered
    path: Path
    sha256: str
    created_at: str

    def load(self) -> Checkpoint:
        """The version's checkpoint, verified against its recorded SHA-256."""
        if sha256_file(self.path) != self.sha256:
            raise RegistryError(f"{self.name} v{self.version}: {self.path} does not verify")
        return load_checkpoint(self.path)


@dataclass(frozen=True)
class AuditEntry:
    at: str
    name: str
    version: int
    action: str
    detail: dict[str, Any]


@dataclass(frozen=True)
class CanaryResult:
    """A canary's outcome: the version after it (``production`` or ``archived``)."""

    version: ModelVersion
    promoted: bool
    comparison: ABResult


class ModelRegistry:
    """Versions of named models over a ``RunStore`` (see the module's docstring)."""

    def __init__(self, store: RunStore) -> None:
        self.store = store
        self.root = store.root / "models"

    def register(
        self, name: str, run_ref: str, round: int | None = None, note: str = ""
    ) -> ModelVersion:
        """Register run ``run_ref``'s checkpoint of ``round`` (its newest by default) as the
        next version of ``name``."""
        if not _NAME.fullmatch(name):
            raise RegistryError(f"model name {name!r}: letters, digits, '_', '.', '-' only")
        store = self.store
        run_id = store.resolve(run_ref)
        source = self._checkpoint(run_id, round)
        rnd, path, digest = source
        metrics = next((r.metrics for r in store.rounds(run_id, rnd - 1) if r.round == rnd), {})
        conn = store._conn
        with store._transaction():
            row = conn.execute("SELECT MAX(version) FROM models WHERE name = ?", (name,))
            version = int(row.fetchone()[0] or 0) + 1
            parent = self._production_version(name)
            target = self.root / name / f"v{version}.safetensors"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            if sha256_file(target) != digest:
                target.unlink()
                raise RegistryError(f"{path} changed while it was copied")
            conn.execute(
                "INSERT INTO models (name, version, run, round, stage, metrics, parent, path,"
                " sha256, created_at) VALUES (?, ?, ?, ?, 'registered', ?, ?, ?, ?, ?)",
                (name, version, store._run_key(run_id), rnd, json.dumps(_finite(metrics)),
                 parent, str(target.relative_to(store.root)), digest, _now()),
            )  # fmt: skip
            self._log(name, version, "register", {"run": run_id, "round": rnd, "note": note})
        return self.get(name, version)

    def promote(self, name: str, version: int, reason: str = "") -> ModelVersion:
        """Make ``version`` the production version of ``name`` (the current one archived)."""
        target = self.get(name, version)
        if target.stage == "production":
            raise RegistryError(f"{name} v{version} is already in production")
        with self.store._transaction():
            self._set_production(name, version)
            self._log(name, version, "promote", {"reason": reason})
        return self.get(name, version)

    def rollback(self, name: str, reason: str = "") -> ModelVersion:
        """Archive ``name``'s production version and restore the one promoted before it."""
        current = self.production(name)
        if current is None:
            raise RegistryError(f"{name} has no production version to roll back")
        promoted = [e.version for e in self.audit(name) if e.action in ("promote", "rollback")]
        earlier = [v for v in promoted if v != current.version]
        if not earlier:
            raise RegistryError(f"{name} v{current.version} is the only version ever promoted")
        with self.store._transaction():
            self._set_production(name, earlier[-1])
            self._log(name, earlier[-1], "rollback", {"from": current.version, "reason": reason})
        return self.get(name, earlier[-1])

    def record(self, action: str, version: ModelVersion, detail: dict[str, Any]) -> None:
        """Add an entry to the audit log (an evaluation, say) without changing a stage."""
        with self.store._transaction():
            self._log(version.name, version.version, action, detail)

    def canary(
        self,
        name: str,
        version: int,
        experiment: Experiment,
        fraction: float = 0.1,
        threshold: float = 0.01,
        seed: int = 0,
    ) -> CanaryResult:
        """Roll ``version`` out to a seeded ``fraction`` of ``experiment``'s clients next to
        the production version, compare the two on those clients' local test data
        (``monitor.ab``) and promote it, or roll it back when its mean accuracy there is more
        than ``threshold`` below production's. (``rollout.serving`` does the same with
        deployed clients.)"""
        from potluck.monitor.ab import ab_test

        fed = experiment.federation
        pool = [c for c in range(fed.num_clients) if len(fed.client(c).y_test) > 0]
        cohort = canary_cohort(pool, fraction, seed, version)
        current, candidate = self.begin_canary(name, version, fraction, threshold, len(cohort))
        weights = [v.load().tensors["global"] for v in (current, candidate)]
        result = ab_test(experiment, weights[0], weights[1], clients=cohort)
        return self.conclude_canary(name, version, result, threshold)

    def begin_canary(
        self, name: str, version: int, fraction: float, threshold: float, clients: int
    ) -> tuple[ModelVersion, ModelVersion]:
        """Put registered ``version`` in the ``canary`` stage, tried on ``clients`` clients;
        the production version and the canary."""
        if not 0 < fraction <= 1 or threshold < 0:
            raise RegistryError(f"canary: fraction in (0, 1] and threshold >= 0 needed, got "
                                f"{fraction} and {threshold}")  # fmt: skip
        current, candidate = self.production(name), self.get(name, version)
        if current is None:
            raise RegistryError(f"{name} has no production version to compare a canary with")
        if candidate.stage != "registered":
            raise RegistryError(f"{name} v{version} is {candidate.stage}, not registered")
        detail = {"fraction": fraction, "threshold": threshold, "clients": clients,
                  "against": current.version}  # fmt: skip
        with self.store._transaction():
            self._set_stage(name, version, "canary")
            self._log(name, version, "canary", detail)
        return current, self.get(name, version)

    def conclude_canary(
        self, name: str, version: int, result: ABResult, threshold: float, **detail: Any
    ) -> CanaryResult:
        """End ``version``'s canary on its comparison with production (``result``: production
        as A, the canary as B): promoted, or archived (rolled back) when its mean accuracy is
        more than ``threshold`` below production's."""
        if self.get(name, version).stage != "canary":
            raise RegistryError(f"{name} v{version} is not in a canary")
        regressed = result.mean_difference < -threshold
        figures = {"difference": result.mean_difference, "p_value": result.p_value,
                   "production_accuracy": result.accuracy_a,
                   "canary_accuracy": result.accuracy_b, **detail}  # fmt: skip
        with self.store._transaction():
            if regressed:
                self._set_stage(name, version, "archived")
                self._log(name, version, "canary_rollback", figures)
            else:
                self._set_production(name, version)
                self._log(name, version, "promote", {**figures, "reason": "canary passed"})
        return CanaryResult(self.get(name, version), not regressed, result)

    def abandon_canary(self, name: str, version: int, reason: str) -> ModelVersion:
        """End ``version``'s canary undecided (too few clients answered, the server stopped):
        registered again, production untouched."""
        if self.get(name, version).stage != "canary":
            raise RegistryError(f"{name} v{version} is not in a canary")
        with self.store._transaction():
            self._set_stage(name, version, "registered")
            self._log(name, version, "canary_abandoned", {"reason": reason})
        return self.get(name, version)

    def get(self, name: str, version: int) -> ModelVersion:
        row = self.store._conn.execute(_SELECT + " WHERE m.name = ? AND m.version = ?",
                                       (name, version)).fetchone()  # fmt: skip
        if row is None:
            raise RegistryError(f"no model {name!r} version {version}")
        return self._version(row)

    def versions(self, name: str | None = None) -> list[ModelVersion]:
        """Every version (of ``name``), by name and version."""
        where, args = (" WHERE m.name = ?", (name,)) if name else ("", ())
        rows = self.store._conn.execute(_SELECT + where + " ORDER BY m.name, m.version", args)
        return [self._version(r) for r in rows]

    def from_run(self, run_id: str) -> list[ModelVersion]:
        """The versions registered from run ``run_id``, by name and version."""
        rows = self.store._conn.execute(
            _SELECT + " WHERE r.run_id = ? ORDER BY m.name, m.version", (run_id,)
        )
        return [self._version(r) for r in rows]

    def production(self, name: str) -> ModelVersion | None:
        version = self._production_version(name)
        return None if version is None else self.get(name, version)

    def audit(self, name: str | None = None) -> list[AuditEntry]:
        """The changes (of ``name``), oldest first."""
        where, args = (" WHERE name = ?", (name,)) if name else ("", ())
        rows = self.store._conn.execute(
            "SELECT at, name, version, action, detail FROM model_audit" + where + " ORDER BY id",
            args,
        )
        return [AuditEntry(at, n, v, a, json.loads(d)) for at, n, v, a, d in rows]

    def _checkpoint(self, run_id: str, round: int | None) -> tuple[int, Path, str]:
        store = self.store
        if round is None:
            point = store.resume_point(run_id)
            if point.checkpoint is None or point.path is None:
                raise RegistryError(f"run {run_id} has no checkpoint to register")
            round = point.round
        row = store._conn.execute(
            "SELECT path, sha256 FROM checkpoints WHERE run = ? AND round = ?",
            (store._run_key(run_id), round),
        ).fetchone()
        if row is None:
            raise RegistryError(f"run {run_id} has no checkpoint of round {round}")
        path = store.run_dir(run_id) / row[0]
        digest = sha256_file(path)
        if row[1] is not None and digest != row[1]:
            raise RegistryError(f"run {run_id}'s checkpoint {path} does not verify")
        return round, path, digest

    def _production_version(self, name: str) -> int | None:
        row = self.store._conn.execute(
            "SELECT version FROM models WHERE name = ? AND stage = 'production'", (name,)
        ).fetchone()
        return None if row is None else int(row[0])

    def _set_stage(self, name: str, version: int, stage: str) -> None:
        self.store._conn.execute(
            "UPDATE models SET stage = ? WHERE name = ? AND version = ?", (stage, name, version)
        )

    def _set_production(self, name: str, version: int) -> None:
        conn = self.store._conn
        conn.execute(
            "UPDATE models SET stage = 'archived' WHERE name = ? AND stage = 'production'",
            (name,),
        )
        conn.execute(
            "UPDATE models SET stage = 'production' WHERE name = ? AND version = ?",
            (name, version),
        )

    def _log(self, name: str, version: int, action: str, detail: dict[str, Any]) -> None:
        self.store._conn.execute(
            "INSERT INTO model_audit (at, name, version, action, detail) VALUES (?, ?, ?, ?, ?)",
            (_now(), name, version, action, json.dumps(detail)),
        )

    def _version(self, row: tuple[Any, ...]) -> ModelVersion:
        name, version, run_id, rnd, stage, metrics, parent, path, digest, created = row
        return ModelVersion(name, version, run_id, rnd, stage, json.loads(metrics), parent,
                            self.store.root / path, digest, created)  # fmt: skip


_SELECT = (
    "SELECT m.name, m.version, r.run_id, m.round, m.stage, m.metrics, m.parent, m.path,"
    " m.sha256, m.created_at FROM models AS m JOIN runs AS r ON r.id = m.run"
)


def canary_cohort(pool: Sequence[int], fraction: float, seed: int, version: int) -> list[int]:
    """The clients of ``pool`` that try ``version`` in a canary: a ``fraction`` of them (at
    least two, the fewest a paired comparison needs), drawn by ``seed`` and the version.

    Example:
        >>> canary_cohort(range(10), 0.3, seed=0, version=2)
        [0, 2, 7]
    """
    if not 0 < fraction <= 1:
        raise RegistryError(f"canary: fraction must be in (0, 1], got {fraction}")
    pool = sorted(int(c) for c in pool)
    if len(pool) < 2:
        raise RegistryError(f"a canary needs at least two clients, {len(pool)} available")
    k = min(len(pool), max(2, round(fraction * len(pool))))
    rng = np.random.default_rng([seed, version])
    return sorted(int(c) for c in rng.choice(pool, k, replace=False))


def sha256_file(path: Path) -> str:
    """The SHA-256 (hex) of the file at ``path``."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _finite(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: (v if v == v and abs(v) != float("inf") else None) for k, v in metrics.items()}
