"""``potluck server``: run an experiment with real clients over gRPC, recorded like a simulation.

Example:
    >>> ServerTLS(Path("s.pem"), Path("s.key"), Path("ca.pem")).cert.name
    's.pem'
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from potluck.client.program import ClientProgram
from potluck.config import ExperimentConfig
from potluck.deploy.client import config_id
from potluck.deploy.server import (
    ClientHealth,
    Coordinator,
    GrpcEngine,
    Hub,
    Revocations,
    serve,
)
from potluck.orchestrator import RoundCallback, RunResult, resume_experiment, run_experiment
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
    (so a restarted server carries on; the clients reconnect by themselves)."""
    dep = cfg.deploy
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"engine": "grpc"})})
    experiment = cfg.build()
    config = json.dumps(experiment.config, sort_keys=True)
    store = RunStore(cfg.run.store)
    resume_id = _unfinished(store, cfg.run.name)
    health = _stored_health(store, resume_id)
    hub = Hub(
        config_id(config),
        cfg.data.num_clients,
        dep.admit,
        Revocations(revoked) if revoked else None,
        health,
        liveness_s=2 * dep.poll_timeout_s + 5,
    )
    coordinator = Coordinator(
        hub,
        config,
        insecure=tls is None,
        poll_timeout_s=dep.poll_timeout_s,
        max_bytes=int(dep.max_message_mb * 2**20),
    )
    if tls is None:
        log.warning("INSECURE: no TLS, clients are not authenticated (--insecure)")
    server, port = serve(coordinator, dep.listen, tls.credentials() if tls else None)
    log.info("listening on %s (port %d), run %s", dep.listen, port, hub.run_id)
    if on_listening is not None:
        on_listening(port)

    def engine(program: ClientProgram) -> GrpcEngine:
        return GrpcEngine(program, hub, round_timeout_s=dep.round_timeout_s)

    try:
        hub.wait_for_clients(dep.min_clients, dep.join_timeout_s)
        if resume_id is not None:
            log.info("resuming run %s", resume_id)
            return resume_experiment(experiment, store, resume_id, on_round=on_round, engine=engine)
        return run_experiment(experiment, store, on_round=on_round, engine=engine)
    finally:
        hub.finish()
        time.sleep(min(dep.poll_timeout_s, 2.0))  # let waiting polls hear "done"
        server.stop(grace=1.0).wait()
        store.close()


def _unfinished(store: RunStore, name: str | None) -> str | None:
    if not name:
        return None
    runs = [r for r in store.list_runs() if r.name == name]
    if runs and runs[-1].status != "finished":
        return runs[-1].run_id
    return None


def _stored_health(store: RunStore, run_id: str | None) -> dict[str, ClientHealth]:
    if run_id is None:
        return {}
    return {row["name"]: ClientHealth(**row) for row in store.health(run_id)}
