"""Serving a registered model to deployed clients, with canaries among them that roll back
by themselves.

A ``ModelServer`` is a coordinator like ``potluck server``'s (the same ``Hub``, mutual TLS,
admission list and revocations; the sites run the same ``potluck client``, with
``--model-out`` where they keep the model), for a model instead of a training run. Its
config is that of the run the production version came from (``deploy`` settings overridden
by the caller), so each site builds the program that evaluates that model on its own data.
It runs two kinds of stage on the ``grpc`` engine:

- ``install`` (``deploy.installed``): a version's weights, with its name, number and digest;
  each site checks them, keeps them and answers with the digest it wrote, so the server
  knows which version each site runs (``installed``);
- ``evaluate``: the simulation's, a version's weights evaluated on each site's local test
  split (the sums refused unless well formed, as in a training run).

``serve_models`` puts them together. The production version is installed on every site
that is there; with a canary (``CanaryPlan``), a seeded fraction of the sites installs the
canary instead, evaluates production and the canary on its local test data, and the
registry concludes (``ModelRegistry.conclude_canary``, the paired test of ``monitor.ab``):
promoted, the canary is installed on the other sites too; regressed past the threshold,
it is rolled back and production is installed on its sites again. With ``follow`` the
server keeps serving until stopped: a site that joins later, and every site after a
promote or rollback made elsewhere (``potluck models promote``), gets the production
version. Every installation and decision is in the registry's audit log.

Example (shell):
    potluck models serve digits --canary 4 --fraction 0.2 --threshold 0.01 \\
        --cert server.pem --key server.key --client-ca ca.pem
    potluck client --server hub:50051 --data site.npz --model-out model.safetensors \\
        --cert client-a.pem --key client-a.key --ca ca.pem
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal

import numpy as np
import torch

from potluck.client.program import ClientProgram, EvalResult, parse_evaluation
from potluck.config import ExperimentConfig
from potluck.core.message import Message, MessageError, Scalar
from potluck.core.records import EVALUATE, ClientState, Reply, StageJob, by_namespace
from potluck.deploy.client import config_id
from potluck.deploy.installed import INSTALL, weights_digest
from potluck.deploy.server import (
    ClientHealth,
    GrpcEngine,
    serve,
)
from potluck.deployment import ServerTLS, coordinate
from potluck.monitor.ab import ABResult, paired_test
from potluck.rollout.registry import (
    CanaryResult,
    ModelRegistry,
    ModelVersion,
    RegistryError,
    canary_cohort,
)

log = logging.getLogger("potluck.rollout")
RETRY_S = 60.0  # a site whose installation failed is offered the same version again after


@dataclass(frozen=True)
class CanaryPlan:
    """A canary of registered ``version``: tried on a seeded ``fraction`` of the sites,
    rolled back if its mean accuracy there falls more than ``threshold`` below production's."""

    version: int
    fraction: float = 0.1
    threshold: float = 0.01
    seed: int = 0


@dataclass
class ServeResult:
    """What a model server did: the version each site runs, the sites whose last
    installation failed (and why), and the canary's outcome."""

    installed: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    canary: CanaryResult | None = None
    ab: ABResult | None = None


class ModelServer:
    """A coordinator serving model ``name`` (see the module's docstring); a context manager
    that stops its gRPC server on exit (the sites told ``done`` after ``finish``, else
    ``stopped``, so they reconnect to the next one)."""

    def __init__(
        self,
        registry: ModelRegistry,
        name: str,
        *,
        tls: ServerTLS | None,
        overrides: Sequence[str] = (),
        revoked: Path | None = None,
    ) -> None:
        production = registry.production(name)
        if production is None:
            raise RegistryError(f"{name} has no production version to serve")
        stored = registry.store.get_run(production.run_id).config
        self.cfg = ExperimentConfig.from_dict(stored, list(overrides))
        experiment = self.cfg.build()
        self.program: ClientProgram = experiment.algorithm.client_program(
            experiment.task, experiment.federation, seed=experiment.seed
        )
        self.registry, self.name, self.tls = registry, name, tls
        self.result = ServeResult()
        dep = self.cfg.deploy
        config = json.dumps(experiment.config, sort_keys=True)
        # a site keeps the client id it had in the run (its personal state is stored under it)
        known = {row["name"]: ClientHealth(**row) for row in
                 registry.store.health(production.run_id)}  # fmt: skip
        self.coordinator = coordinate(self.cfg, config_id(f"{config}\nmodels/{name}"),
                                      config, known, tls, revoked)  # fmt: skip
        self.hub, self.guard = self.coordinator.hub, self.coordinator.guard
        self.engine = GrpcEngine(self.program, self.hub, round_timeout_s=dep.round_timeout_s)
        self._server: object | None = None
        self._step = 0  # the wire's round number: one per stage
        self._weights: dict[int, torch.Tensor] = {}
        self._tried: dict[str, tuple[int, float]] = {}  # site -> (version, when) last offered

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> int:
        """Listen (``deploy.listen``); the bound port."""
        if self.tls is None:
            log.warning("INSECURE: no TLS, clients are not authenticated (--insecure)")
        creds = self.tls.credentials() if self.tls else None
        self._server, port = serve(self.coordinator, self.cfg.deploy.listen, creds)
        log.info("serving model %s on %s (port %d)", self.name, self.cfg.deploy.listen, port)
        return port

    def wait_for_sites(self) -> None:
        """Block until ``deploy.min_clients`` sites are polling (``TimeoutError`` after
        ``deploy.join_timeout_s``)."""
        self.hub.wait_for_clients(self.cfg.deploy.min_clients, self.cfg.deploy.join_timeout_s)

    def finish(self) -> None:
        """The serving is over: the sites are told ``done``."""
        self.hub.finish()

    def __enter__(self) -> ModelServer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.hub.finished:
            self.hub.stop("the model server is shutting down")
        time.sleep(min(self.cfg.deploy.poll_timeout_s, 2.0))  # waiting polls hear the end
        if self._server is not None:
            self._server.stop(grace=1.0).wait()  # type: ignore[attr-defined]
        self.guard.stop()

    # -- stages --------------------------------------------------------------------------------

    def sites(self) -> dict[int, str]:
        """The live sites (polling this server): client id -> name."""
        live = self.hub.live_clients()
        return {h["client"]: h["name"] for h in self.hub.snapshot() if h["client"] in live}

    def install(self, version: ModelVersion, clients: Iterable[int]) -> dict[str, str]:
        """Install ``version`` on ``clients``; the sites that did not, with why."""
        ids = sorted(int(c) for c in clients)
        if not ids:
            return {}
        w = self.weights(version)
        digest = weights_digest(w)
        scalars: dict[str, Scalar] = {"model": self.name, "version": version.version,
                                      "digest": digest}  # fmt: skip
        names = self._names()
        failed: dict[str, str] = {}
        for cid, reply in zip(ids, self._stage(INSTALL, Message({"w": w}, scalars), ids),
                              strict=True):  # fmt: skip
            site = names[cid]
            self._tried[site] = (version.version, time.monotonic())
            why = _install_refusal(reply, version.version, digest)
            if why is None:
                self.result.installed[site] = version.version
                self.result.failed.pop(site, None)
            else:
                failed[site] = self.result.failed[site] = why
                log.warning("site %r did not install %s v%d: %s", site, self.name,
                            version.version, why)  # fmt: skip
        self.registry.record("serve", version, {"sites": len(ids) - len(failed),
                                                "failed": sorted(failed)[:20]})  # fmt: skip
        return failed

    def evaluate(
        self,
        version: ModelVersion,
        clients: Iterable[int],
        states: Mapping[int, ClientState] | None = None,
    ) -> dict[int, dict[str, EvalResult]]:
        """``version`` on ``clients``' local test data (with their client ``states``, as a
        training run's evaluation sends them): the sums of each site whose answer is well
        formed (``global``, and ``personal`` where a state gives a personal model); the
        others refused and logged."""
        ids = sorted(int(c) for c in clients)
        names, out = self._names(), {}
        given = states or {}
        replies = self._stage(EVALUATE, Message({"w": self.weights(version)}), ids,
                              [given.get(c, {}) for c in ids])  # fmt: skip
        for cid, reply in zip(ids, replies, strict=True):
            if reply is None:
                continue
            try:
                if reply.refused:
                    raise MessageError(reply.refused)
                if reply.message.arrays or reply.state:
                    raise MessageError("an evaluation answer carries no arrays or state")
                out[cid] = parse_evaluation(reply.message, f"site {names[cid]!r}")
            except MessageError as exc:
                log.warning("refused the evaluation of site %r: %s", names[cid], exc)
        return out

    def ab(self, a: ModelVersion, b: ModelVersion | None = None, alpha: float = 0.05) -> ABResult:
        """A/B evaluation on every live site's local test data (``monitor.ab``'s paired
        test): versions ``a`` and ``b``, or without ``b`` the global model of ``a`` against
        each site's personalised model (from its client state in ``a``'s run, sent with the
        task). Recorded in the audit log."""
        sites = sorted(self.sites())
        if b is None:
            if self.program.personal is None:
                raise RegistryError(f"{self.name}'s algorithm keeps no personal models")
            flat = self.registry.store.client_states(a.run_id, sites)
            states = {c: by_namespace(s) for c, s in zip(sites, flat, strict=True) if s}
            got = self.evaluate(a, states, states)
            rows = [(c, r["global"].accuracy, r["personal"].accuracy)
                    for c, r in got.items() if "personal" in r and r["global"].n]  # fmt: skip
        else:
            ga, gb = self.evaluate(a, sites), self.evaluate(b, sites)
            rows = [(c, ga[c]["global"].accuracy, gb[c]["global"].accuracy)
                    for c in sites if c in ga and c in gb and ga[c]["global"].n]  # fmt: skip
        if len(rows) < 2:
            raise RegistryError(f"an A/B test needs two sites that answered, {len(rows)} did")
        result = paired_test(rows, alpha)
        against = "personal" if b is None else a.version
        self.registry.record("ab", b or a, {"against": against, "p_value": result.p_value,
                                            "winner": result.winner, "deployed_sites": len(rows),
                                            "difference": result.mean_difference})  # fmt: skip
        return result

    def canary(self, plan: CanaryPlan) -> CanaryResult | None:
        """Run ``plan`` on the live sites (see the module's docstring); None if it ended
        undecided (fewer than two sites evaluated both versions: production kept)."""
        reg, sites = self.registry, self.sites()
        self.weights(reg.get(self.name, plan.version))  # refused first if it does not fit
        cohort = canary_cohort(list(sites), plan.fraction, plan.seed, plan.version)
        current, candidate = reg.begin_canary(self.name, plan.version, plan.fraction,
                                              plan.threshold, len(cohort))  # fmt: skip
        rest = [c for c in sites if c not in cohort]
        try:
            self.install(current, rest)
            self.install(candidate, cohort)
            a, b = ({c: r["global"] for c, r in self.evaluate(v, cohort).items()}
                    for v in (current, candidate))  # fmt: skip
            rows = [(c, a[c].accuracy, b[c].accuracy) for c in cohort
                    if c in a and c in b and a[c].n]  # fmt: skip
            if len(rows) < 2:
                reg.abandon_canary(self.name, plan.version, f"{len(rows)} sites evaluated both")
                self.install(current, cohort)
                return None
            out = reg.conclude_canary(self.name, plan.version, paired_test(rows),
                                      plan.threshold, deployed_sites=len(rows))  # fmt: skip
        except BaseException:
            if reg.get(self.name, plan.version).stage == "canary":
                reg.abandon_canary(self.name, plan.version, "the model server stopped")
            raise
        if out.promoted:
            self.install(out.version, rest)
        else:
            self.install(current, cohort)
        self.result.canary = out
        return out

    def production(self) -> ModelVersion:
        """The production version now (``RegistryError`` if there is none)."""
        current = self.registry.production(self.name)
        if current is None:
            raise RegistryError(f"{self.name} has no production version")
        return current

    def serve_production(self) -> None:
        """Install the production version on the live sites that do not run it (a site whose
        installation failed is offered it again after ``RETRY_S``)."""
        current = self.registry.production(self.name)
        if current is None:
            return
        now, stale = time.monotonic(), []
        for cid, site in self.sites().items():
            tried = self._tried.get(site)
            fresh = tried is not None and tried[0] == current.version and now - tried[1] < RETRY_S
            if self.result.installed.get(site) != current.version and not fresh:
                stale.append(cid)
        self.install(current, stale)

    def follow(self, stop: threading.Event, interval_s: float = 1.0) -> None:
        """Keep the live sites on the production version until ``stop`` is set."""
        while not stop.wait(interval_s):
            self.serve_production()

    def weights(self, version: ModelVersion) -> torch.Tensor:
        """``version``'s global weights, verified, checked against the served task."""
        if version.version not in self._weights:
            w = version.load().tensors.get("global")
            size = self.program.spec.size
            if w is None or w.dtype != torch.float32 or tuple(w.shape) != (size,):
                got = "none" if w is None else f"{w.dtype} {tuple(w.shape)}"
                raise RegistryError(f"{version.name} v{version.version}: global weights "
                                    f"{got}; the served task needs float32 ({size},)")  # fmt: skip
            self._weights[version.version] = w
        return self._weights[version.version]

    def _stage(
        self,
        stage: str,
        shared: Message,
        ids: list[int],
        states: Sequence[ClientState] | None = None,
    ) -> list[Reply | None]:
        self._step += 1
        job = StageJob(stage, self._step, shared, np.array(ids, dtype=np.int64),
                       tuple(Message() for _ in ids),
                       tuple(states) if states is not None else tuple({} for _ in ids))  # fmt: skip
        return self.engine.run_stage(job)

    def _names(self) -> dict[int, str]:
        return {h["client"]: h["name"] for h in self.hub.snapshot()}


def serve_models(
    registry: ModelRegistry,
    name: str,
    *,
    tls: ServerTLS | None,
    overrides: Sequence[str] = (),
    revoked: Path | None = None,
    canary: CanaryPlan | None = None,
    ab: int | Literal["personal"] | None = None,
    follow: threading.Event | None = None,
    on_listening: Callable[[int], object] | None = None,
) -> ServeResult:
    """Serve ``name`` to the deployed sites: production installed everywhere, ``canary``
    tried and concluded first; with ``follow``, keep serving until it is set (see the
    module's docstring). ``ab``: first an A/B evaluation of that version (or of the
    sites' personal models: ``"personal"``) against production (``ServeResult.ab``). The
    sites are told ``done`` when it ends normally."""
    with ModelServer(registry, name, tls=tls, overrides=overrides, revoked=revoked) as server:
        port = server.start()
        if on_listening is not None:
            on_listening(port)
        server.wait_for_sites()
        if ab is not None:
            current = server.production()
            other = None if ab == "personal" else registry.get(name, int(ab))
            server.result.ab = server.ab(current, other) if other else server.ab(current)
        if canary is not None:
            server.canary(canary)
        server.serve_production()
        if follow is not None:
            server.follow(follow, interval_s=min(1.0, server.cfg.deploy.poll_timeout_s))
        server.finish()
        return server.result


def _install_refusal(reply: Reply | None, version: int, digest: str) -> str | None:
    """Why ``reply`` does not confirm the installation (None if it does)."""
    if reply is None:
        return "declined or did not answer"
    if reply.refused:
        return reply.refused
    got = reply.message.scalars
    if reply.message.arrays or reply.state:
        return "its answer carries arrays or state"
    if got.get("version") != version or got.get("digest") != digest:
        return f"it answered for version {got.get('version')!r} with another digest"
    return None
