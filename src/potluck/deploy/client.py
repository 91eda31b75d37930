"""The deployment client: a site that joins a potluck server and trains on local data only.

A site dials the server, joins (the server answers with its client id and the experiment),
builds the same ``ClientProgram`` a simulation would (``program_for``: the experiment's model
or the user's task, the algorithm's client-side parts, the run seed, over its own data; see
``potluck.deployment.site_program``), then long-polls for tasks, each one member's part of a
stage (``records.job_from_task``): ``train`` (local steps from the global weights; the
answer is the encoded update and the client's new state), ``evaluate`` (loss and accuracy
sums on its local test split) or a part's own stage; the answer is the program's reply
(``records.reply_to_message``), or ``declined``. When the connection drops, or the server
says it ``stopped`` the run before finishing it (its round loop failed, or it is shutting
down), it reconnects with exponential backoff and jitter, so a restarted server that resumes
the run gets it back; only ``done`` (the run finished) ends it. It can be restarted at any
time: an answer it could not deliver is sent again after it joins again, and a task it
polled but never got is sent again at its next poll.

Example (shell):
    potluck client --server coordinator.example.org:50051 --data site.npz \\
        --cert client-site-a.pem --key client-site-a.key --ca ca.pem
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from potluck.client.program import ClientProgram
from potluck.core import records
from potluck.core.message import Message, MessageError
from potluck.deploy import wire
from potluck.deploy.installed import INSTALL, check_install, write_installed
from potluck.deploy.secrets import RoundSecrets

log = logging.getLogger("potluck.deploy")


@dataclass(frozen=True)
class ClientTLS:
    """PEM files: this client's certificate and key, and the federation CA's certificate."""

    cert: Path
    key: Path
    ca: Path

    def credentials(self) -> Any:
        import grpc

        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=self.key.read_bytes(),
            certificate_chain=self.cert.read_bytes(),
        )

    def name(self) -> str:
        """The client name in the certificate (its common name)."""
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not names:
            raise ValueError(f"{self.cert}: the certificate has no common name")
        return str(names[0].value)


def config_id(config: str) -> str:
    """The wire run id of an experiment: a fingerprint of its config (stable across server
    restarts, so sites keep their program when the server resumes).

    Example:
        >>> len(config_id('{"rounds": 3}'))
        16
    """
    return hashlib.sha256(config.encode()).hexdigest()[:16]


class Site:
    """One client process: join, poll, work, answer; reconnect when the server is away."""

    def __init__(
        self,
        server: str,
        *,
        name: str,
        tls: ClientTLS | None,
        program_for: Callable[[dict[str, Any], int], ClientProgram],
        server_name: str | None = None,
        backoff: tuple[float, float] = (0.5, 30.0),
        max_failures: int | None = None,
        model_out: Path | None = None,
    ) -> None:
        self.server, self.name, self.tls = server, name, tls
        self.model_out = model_out  # where a model server's install tasks are kept
        self.program_for, self.server_name = program_for, server_name
        self.backoff, self.max_failures = backoff, max_failures
        self._program: tuple[str, int, ClientProgram] | None = None
        self._secrets = RoundSecrets(())
        self._stub: Any = None
        self._delay, self._failures = backoff[0], 0
        self._pending: wire.Envelope | None = None  # an answer not yet delivered

    def run(self) -> int:
        """Work until the server says the run is done (0), or ``max_failures`` failures in a
        row (1): failed connections, refusals, or a server that stopped the run unfinished.
        A join the server welcomes ends the row."""
        self._delay, self._failures = self.backoff[0], 0
        while True:
            try:
                if self._session():
                    return 0
            except _Retry as exc:
                self._failures += 1
                if self.max_failures is not None and self._failures >= self.max_failures:
                    log.error("giving up after %d failed attempts: %s", self._failures, exc)
                    return 1
                wait = self._delay * random.uniform(0.5, 1.0)  # jitter only: not a secret
                log.warning("%s; reconnecting in %.1f s", exc, wait)
                time.sleep(wait)
                self._delay = min(self._delay * 2, self.backoff[1])
                self._stub = None

    # -- one session: join, then tasks until done or refused -----------------------------------

    def _session(self) -> bool:
        welcome = self._call(wire.Envelope("join", client=self.name))
        if welcome.kind == "stopped":
            raise _Retry(_stopped(welcome))
        if welcome.kind != "welcome":
            raise _Retry(f"join refused: {welcome.scalars.get('reason', welcome.kind)}")
        self._delay, self._failures = self.backoff[0], 0  # connected: a new row of failures
        program, cid = self._ensure_program(welcome)
        self._secrets.forget()  # the server may have restarted since the round's last stage
        log.info("joined run %s as client %d", welcome.run_id, cid)
        if self._pending is not None and self._pending.run_id == welcome.run_id:
            self._deliver()  # the connection failed while it was being sent
        while True:
            reply = self._call(wire.Envelope("poll", welcome.run_id, client=self.name))
            if reply.kind == "done":
                log.info("the server finished run %s", welcome.run_id)
                return True
            if reply.kind == "stopped":  # not done: a restarted server may resume the run
                raise _Retry(_stopped(reply))
            if reply.kind == "wait":
                continue
            if reply.kind == "refused":
                raise _Retry(f"poll refused: {reply.scalars.get('reason')}")
            if reply.kind != "task" or reply.run_id != welcome.run_id:
                raise _Retry(f"unexpected reply {reply.kind!r} for run {reply.run_id!r}")
            self._pending = self._work(program, cid, reply)
            self._deliver()

    def _deliver(self) -> None:
        """Send the pending answer; it stays pending if the connection fails (``_Retry``),
        and is sent again after the next join."""
        assert self._pending is not None
        ack = self._call(self._pending)
        self._pending = None
        if ack.kind != "ack":
            log.warning("answer refused: %s", ack.scalars.get("reason", ack.kind))

    def _ensure_program(self, welcome: wire.Envelope) -> tuple[ClientProgram, int]:
        cid = int(welcome.scalars["client_id"])
        if self._program is None or self._program[:2] != (welcome.run_id, cid):
            config = json.loads(str(welcome.scalars["config"]))
            program = self.program_for(config, cid)
            self._program = (welcome.run_id, cid, program)
            secret = [ns for ns, p in program.parts.items() if getattr(p, "secret_state", False)]
            lasting = [ns for ns, p in program.parts.items() if getattr(p, "site_state", False)]
            self._secrets = RoundSecrets(secret, lasting)
        return self._program[2], cid

    def _work(self, program: ClientProgram, cid: int, task: wire.Envelope) -> wire.Envelope:
        stage, t0 = str(task.scalars.get("stage", "")), time.perf_counter()
        if stage == INSTALL:
            return self._install(program, task)
        try:
            job = records.job_from_task(stage, task.round, cid, task.message())
            reply = program.run_stage(self._secrets.fill(task.run_id, job))[0]
        except (records.RecordError, MessageError, ValueError) as exc:
            raise _Retry(f"round {task.round}: cannot do stage {stage!r}: {exc}") from exc
        if reply is None:
            log.info("round %d: declined stage %s", task.round, stage)
            return self._answer("declined", task, {}, {})
        log.info("round %d: %s done in %.2f s", task.round, stage, time.perf_counter() - t0)
        message = records.reply_to_message(self._secrets.keep(task.run_id, task.round, reply))
        return self._answer("reply", task, dict(message.arrays), dict(message.scalars))

    def _install(self, program: ClientProgram, task: wire.Envelope) -> wire.Envelope:
        """Keep the model an ``install`` task serves (``deploy.installed``) at ``model_out``;
        declined without one, or if the model does not check."""
        if self.model_out is None:
            log.warning("round %d: a model was served, but this site keeps none "
                        "(no --model-out): declined", task.round)  # fmt: skip
            return self._answer("declined", task, {}, {})
        try:
            job = records.job_from_task(INSTALL, task.round, 0, task.message())
            got = check_install(job.shared, program.spec.size)
        except (records.RecordError, MessageError) as exc:
            log.error("round %d: refused the served model: %s", task.round, exc)
            return self._answer("declined", task, {}, {})
        digest = write_installed(self.model_out, got.name, got.version, got.weights)
        log.info("installed %s v%d at %s", got.name, got.version, self.model_out)
        scalars: dict[str, int | float | str] = {"version": got.version, "digest": digest}
        message = records.reply_to_message(records.Reply(Message(scalars=scalars)))
        return self._answer("reply", task, dict(message.arrays), dict(message.scalars))

    def _answer(
        self,
        kind: str,
        task: wire.Envelope,
        arrays: dict[str, torch.Tensor],
        scalars: dict[str, int | float | str],
    ) -> wire.Envelope:
        return wire.Envelope(
            kind,
            task.run_id,
            round=task.round,
            task_id=task.task_id,
            client=self.name,
            arrays=arrays,
            scalars=scalars,
        )

    # -- transport -----------------------------------------------------------------------------

    def _call(self, env: wire.Envelope) -> wire.Envelope:
        import grpc

        if self._stub is None:
            self._stub = wire.caller(self._channel())
        try:
            plain = self.tls is None  # over TLS the records are authenticated already
            return wire.receive(self._stub(wire.send(env, checksum=plain)), verify=plain)
        except grpc.RpcError as exc:
            code = exc.code().name if exc.code() else "UNKNOWN"
            raise _Retry(f"connection to {self.server} failed ({code}: {exc.details()})") from exc
        except wire.WireError as exc:
            raise _Retry(f"malformed reply from {self.server}: {exc}") from exc

    def _channel(self) -> Any:
        import grpc

        options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", 4 * wire.DEFAULT_CHUNK_BYTES),
            ("grpc.max_send_message_length", 4 * wire.DEFAULT_CHUNK_BYTES),
        ]
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        if self.tls is None:
            return grpc.insecure_channel(self.server, options=options)
        return grpc.secure_channel(self.server, self.tls.credentials(), options=options)


def _stopped(reply: wire.Envelope) -> str:
    return f"the server stopped run {reply.run_id} ({reply.scalars.get('reason', 'no reason')})"


class _Retry(Exception):
    """A failure the site recovers from by reconnecting."""
