"""Deployment entry points: ``potluck server`` (an experiment with real clients over gRPC,
recorded like a simulation) and the program a ``potluck client`` site runs.

This module sits at the orchestrator's level: it puts the round loop together with the
``deploy`` package (transport, wire format, certificates), which knows nothing of either.

Example:
    >>> ServerTLS(Path("s.pem"), Path("s.key"), Path("ca.pem")).cert.name
    's.pem'
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from potluck.attacks.poisoning import Attack
from potluck.client.program import ClientProgram
from potluck.config import ExperimentConfig
from potluck.core.task import Task
from potluck.deploy.client import config_id
from potluck.deploy.guard import Guard
from potluck.deploy.memory import reuse_freed_memory
from potluck.deploy.server import (
    ClientHealth,
    Coordinator,
    GrpcEngine,
    Hub,
    Revocations,
    serve,
)
from potluck.monitor import DriftScenario, Monitoring, summary_options
from potluck.orchestrator import RoundCallback, RunResult, resume_experiment, run_experiment
from potluck.privacy.ledger import PrivacyBudget, check_deployable, prepare
from potluck.store.sqlite import RunStore

log = logging.getLogger("potluck.deploy")


@dataclass(frozen=True)
class ServerTLS:
    """PEM files: the server's certificate and key, and the CA that signs client certificates."""

    cert: Path
    key: Path
    client_ca: Path

    def credentials(self) -> Any:
        import grpc

        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=self.client_ca.read_bytes(),
            require_client_auth=True,
        )


def run_server(
    cfg: ExperimentConfig,
    *,
    tls: ServerTLS | None,
    revoked: Path | None = None,
    on_round: RoundCallback | None = None,
    on_listening: Any = None,
) -> RunResult:
    """Serve ``cfg``'s experiment until its last round; ``tls=None`` is plaintext (loud);
    ``revoked``: a file of revoked client names (the CA directory's ``revoked.txt``).

    A run with the same ``run.name`` that did not finish is resumed from its last checkpoint
    (so a restarted server carries on; the clients reconnect by themselves). The clients are
    told ``done`` only when the run finished; if the round loop fails or the server is
    interrupted first, they are told ``stopped`` (with a reason) and keep reconnecting."""
    dep = cfg.deploy
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"engine": "grpc"})})
    experiment = cfg.build()
    check_deployable(experiment.algorithm)  # before anyone joins
    config = json.dumps(experiment.config, sort_keys=True)
    store = RunStore(cfg.run.store)
    resume_id = _unfinished(store, cfg.run.name)
    health = _stored_health(store, resume_id)
    coordinator = coordinate(cfg, config_id(config), config, health, tls, revoked)
    hub, guard = coordinator.hub, coordinator.guard
    if tls is None:
        log.warning("INSECURE: no TLS, clients are not authenticated (--insecure)")
    if dep.reuse_memory and reuse_freed_memory():  # before gRPC's threads start
        log.info("malloc: an arena per core, freed buffers kept for reuse (deploy.reuse_memory)")
    server, port = serve(coordinator, dep.listen, tls.credentials() if tls else None)
    log.info("listening on %s (port %d), run %s", dep.listen, port, hub.run_id)
    if on_listening is not None:
        on_listening(port)

    def engine(program: ClientProgram) -> GrpcEngine:
        return GrpcEngine(program, hub, round_timeout_s=dep.round_timeout_s)

    started = False
    try:
        hub.wait_for_clients(dep.min_clients, dep.join_timeout_s)
        started = True
        if resume_id is not None:
            log.info("resuming run %s", resume_id)
            result = resume_experiment(
                experiment, store, resume_id, on_round=on_round, engine=engine, progress=False
            )
        else:
            result = run_experiment(
                experiment, store, on_round=on_round, engine=engine, progress=False
            )
        hub.finish()  # only a finished run tells the clients they are done
        if hub.wait_for_busy(dep.round_timeout_s):
            log.warning("finished without telling sites still busy with a closed task")
        return result
    except BaseException as exc:
        reason = _stop_reason(exc, started)
        log.error("stopping run %s before it finished: %s", hub.run_id, reason)
        hub.stop(reason)  # the clients keep reconnecting, to a server that resumes the run
        raise
    finally:
        time.sleep(min(dep.poll_timeout_s, 2.0))  # let waiting polls hear "done" or "stopped"
        server.stop(grace=1.0).wait()
        guard.stop()
        store.close()


def coordinate(
    cfg: ExperimentConfig,
    run_id: str,
    config: str,
    health: dict[str, ClientHealth],
    tls: ServerTLS | None,
    revoked: Path | None,
) -> Coordinator:
    """The coordinator of ``cfg``'s deployment (its ``Hub`` and ``Guard`` inside), telling
    joining sites ``config``: ``run_id`` on the wire, ``health`` the sites known already
    (their client ids kept), ``revoked`` a file of revoked names. Used by ``run_server`` and
    by the model server (``rollout.serving``)."""
    dep = cfg.deploy
    hub = Hub(
        run_id,
        cfg.data.num_clients,
        dep.admit,
        Revocations(revoked) if revoked else None,
        health,
        liveness_s=2 * dep.poll_timeout_s + 5,
        reply_factor=dep.reply_factor,
    )
    guard = Guard(
        total=dep.max_streams or max(256, dep.max_streams_per_client * cfg.data.num_clients),
        per_client=dep.max_streams_per_client,
        timeout_s=dep.receive_timeout_s,
    )
    return Coordinator(
        hub,
        config,
        insecure=tls is None,
        poll_timeout_s=dep.poll_timeout_s,
        max_bytes=int(dep.max_message_mb * 2**20),
        guard=guard,
    )


def _stop_reason(exc: BaseException, started: bool) -> str:
    """What the clients are told when the server stops early: the kind of failure, not its
    message (which may hold the server's paths or data).

    Example:
        >>> _stop_reason(RuntimeError("/srv/secret: disk full"), started=True)
        'the server failed (RuntimeError)'
    """
    if isinstance(exc, KeyboardInterrupt | SystemExit):
        return "the server is shutting down"
    if not started and isinstance(exc, TimeoutError):
        return "too few clients joined"
    return f"the server failed ({type(exc).__name__})"


def rounds_done(cfg: ExperimentConfig) -> int:
    """Rounds already committed by the unfinished run ``run_server`` would resume (else 0).

    Example:
        >>> rounds_done(ExperimentConfig.from_dict({"run": {"store": "none"}}))
        0
    """
    if not cfg.run.name or not Path(cfg.run.store).exists():
        return 0
    with RunStore(cfg.run.store) as store:
        run_id = _unfinished(store, cfg.run.name)
        return store.get_run(run_id).last_round if run_id else 0


def _unfinished(store: RunStore, name: str | None) -> str | None:
    """The newest run created under ``name`` (``run.name``), if it did not finish: the run
    a restarted server continues."""
    if not name:
        return None
    runs = store.named(name)
    if runs and runs[0].status != "finished":
        return runs[0].run_id
    return None


def _stored_health(store: RunStore, run_id: str | None) -> dict[str, ClientHealth]:
    if run_id is None:
        return {}
    return {row["name"]: ClientHealth(**row) for row in store.health(run_id)}


# ---- the site's side ----


def load_task(ref: str) -> Task:
    """The ``Task`` named by ``module:attribute`` (a Task, or a callable returning one).

    Example:
        >>> load_task("nope")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: --task must look like my_pkg.module:task, got 'nope'
    """
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--task must look like my_pkg.module:task, got {ref!r}")
    obj = getattr(importlib.import_module(module_name), attr)
    task = obj if isinstance(obj, Task) else obj()
    if not isinstance(task, Task):
        raise ValueError(f"{ref} is {type(task).__name__}, not a potluck Task")
    return replace(task, ref=ref)


def load_site_data(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` from an ``.npz`` file with arrays ``x`` and ``y`` (features: floats become
    float32, integers such as token ids int64; integer labels), checked for shape, dtype and
    finiteness."""
    with np.load(path, allow_pickle=False) as npz:
        missing = {"x", "y"} - set(npz.files)
        if missing:
            raise ValueError(f"{path}: missing arrays {sorted(missing)} (has {npz.files})")
        x, y = npz["x"], npz["y"]
    integer = np.issubdtype(x.dtype, np.integer) and x.dtype != np.uint8
    x = x.astype(np.int64 if integer else np.float32)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or len(y) != len(x):
        raise ValueError(f"{path}: y must be 1-D integer labels, one per row of x")
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: x contains NaN or Inf")
    return x, y.astype(np.int64)


def check_site_attack(attack: Attack) -> None:
    """Refuse an attack a deployed site cannot run: one that crafts with the other clients'
    updates (a colluding or omniscient one), which a site never sees."""
    if attack.colludes:
        raise ValueError(
            f"attack: {type(attack).__name__} crafts with the other clients' updates "
            f"({attack.knowledge}), which a deployed site never sees; a malicious site runs "
            "attacks on its own data and update (label_flip, sign_flip, scaling, gaussian, "
            "backdoor)"
        )


def site_program(
    config: ExperimentConfig | dict[str, Any],
    client_id: int,
    *,
    task: Task | None = None,
    data: tuple[np.ndarray, np.ndarray] | None = None,
    attack: Attack | None = None,
) -> ClientProgram:
    """The program a site runs: the simulation's, over this site's data.

    ``data=None`` takes the site's data from the experiment's own (simulated) federation:
    client ``client_id``'s partition, which makes a deployment reproduce a simulation
    exactly (used by the tests and for trying a deployment out). The algorithm is the one
    the server's experiment runs: a private mechanism's noise calibrated to the budget's
    ``target_epsilon`` and bound to the expected cohort (``privacy.prepare``), so a site's
    local or distributed noise is what the server accounts. A config whose DP noise follows
    from its seed is refused here too (``check_deployable``).

    A site of the simulated federation (``data=None``) also undergoes the config's
    ``[drift]``; a site's own data drifts as it does.

    The server's ``run.device`` is not the site's: a site trains where ``potluck client
    --device`` (``ClientProgram.place``) puts it.

    With an ``attack`` the site is malicious (``potluck client --attack``): it poisons its
    data and crafts its updates as the attack's attackers do in simulation. An attack that
    needs the other clients' updates (a colluding one) is refused: a site sees only its own.
    """
    if not isinstance(config, ExperimentConfig):  # a site trains where it was told to
        run = {k: v for k, v in config.get("run", {}).items() if k != "device"}
        config = {**config, "run": run} if "run" in config else config
    cfg = config if isinstance(config, ExperimentConfig) else ExperimentConfig.from_dict(config)
    from potluck.data.federation import Federation
    from potluck.data.partition import Partition
    from potluck.data.sources import ArrayDataset, DataSource

    if data is None:
        federation = cfg.build_federation()
    else:
        x, y = data
        n = cfg.data.num_clients
        if not 0 <= client_id < n:
            raise ValueError(f"client id {client_id} outside the federation of {n}")
        offsets = np.array([0] * (client_id + 1) + [len(y)] * (n - client_id))
        num_classes = int(y.max()) + 1 if len(y) else 1
        empty = ArrayDataset(np.zeros((0, *x.shape[1:]), np.float32), np.zeros(0, np.int64))
        source = DataSource("site", ArrayDataset(x, y), empty, num_classes, tuple(x.shape[1:]))
        federation = Federation(
            source,
            Partition(np.arange(len(y)), offsets),
            test_fraction=cfg.data.test_fraction,
            seed=cfg.seed,
        )
    if task is None:  # the config's: [task] by import path, or the built-in [model]
        task = cfg.build_task(federation)
    torch.set_num_threads(cfg.run.threads or 1)  # as the simulation computes
    # as the server's experiment has it: noise calibrated to the budget, cohort bound
    budget = PrivacyBudget(**cfg.privacy.model_dump()) if cfg.privacy else PrivacyBudget()
    algorithm = prepare(cfg.algorithm_parts(), cfg.data.num_clients, cfg.rounds, budget)
    check_deployable(algorithm)  # the site's own examples' noise (DP-SGD) too
    if attack is not None:
        check_site_attack(attack)
    monitoring = Monitoring(**cfg.monitoring.model_dump())
    monitoring.check_deployable()
    return algorithm.client_program(
        task,
        federation,
        seed=cfg.seed,
        finetune_epochs=cfg.evaluation.finetune_epochs,
        attack=attack,
        attackers=None if attack is None else [client_id],
        summaries=summary_options(monitoring),
        drift=DriftScenario(**cfg.drift.model_dump()) if cfg.drift and data is None else None,
    )
