"""The deployment server: a gRPC coordinator and the ``grpc`` engine that uses it.

The round loop is the simulation's (``orchestrator.run_experiment``); only the engine differs.
``GrpcEngine.run_stage`` turns each member's part of a stage (``train``, ``evaluate``, a
part's own) into a *task* (the stage's shared message, the member's payload and state, and
a fresh random task id; ``records.task_message``) and waits until every member has answered
or the round deadline passes. Clients dial out and long-poll (``poll``), work, and answer
(``reply``, or ``declined`` for a client that drops out of the stage); nothing is pushed to
them, so sites behind NAT or firewalls that only allow outgoing connections can take part.
When the run has finished, polls are answered ``done`` (``Hub.finish``); when the server
stops before that (its round loop failed, or it is shutting down), joins and polls are
answered ``stopped`` with a ``reason`` (``Hub.stop``), and the sites keep reconnecting, so a
restarted server that resumes the run gets them back.

Every request is one envelope (``wire.Envelope``) streamed in chunks over a single RPC,
``Coordinator.Call``. The server refuses, logs and counts, and otherwise ignores:

- malformed, truncated or oversized envelopes (``wire.WireError``);
- a client whose certificate name differs from the name it claims, a revoked name, or a name
  not on the admission list;
- an answer to a task that is not open for that client: unknown, from an earlier round
  (replayed), already answered, or past its deadline.

Bad contents of a well-formed answer (wrong shape or dtype, NaN or Inf) are refused by the
round loop, which treats a remote engine's clients as untrusted (``Engine.remote``). Late or
failed clients are recorded (``client_health`` in the run store) and dropped from the round;
the round completes with the rest, and the model moves only with at least
``deploy.min_updates`` updates.

Example:
    >>> hub = Hub("run-1", num_clients=2, admit=["site-a", "site-b"])
    >>> hub.join("site-b")
    1
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from potluck.client.program import ClientProgram, EvalResult
from potluck.core.message import Message
from potluck.core.records import RecordError, Reply, StageJob, reply_from_message, task_message
from potluck.deploy import wire
from potluck.deploy.guard import Busy, Guard, Stream
from potluck.store.sqlite import RunStore

log = logging.getLogger("potluck.deploy")
ANSWERS = ("reply", "declined")
CONTROL_BYTES = 64 << 10  # a join, a poll, a declined answer: a name and a few scalars
REPLY_SLACK_BYTES = 1 << 20  # beyond reply_factor x the task: metrics, names, encoding
MAX_SENDS = 3  # a task polled again before it is answered is sent again, this often in all
SPARE_THREADS = 16  # beyond the guard's streams: they refuse the streams over its limits


class Refused(Exception):
    """A request the server does not act on; the reason goes back to the client and the log."""


@dataclass
class Revocations:
    """Revoked client names from a file (one per line, ``#`` comments; the CA directory's
    ``revoked.txt``), re-read whenever it changes, so ``potluck certs revoke`` takes effect
    on a running server at the client's next request."""

    path: Path
    _mtime: float | None = None
    _names: frozenset[str] = frozenset()

    def names(self) -> frozenset[str]:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return frozenset()
        if mtime != self._mtime:
            lines = (line.strip() for line in self.path.read_text().splitlines())
            self._names = frozenset(n for n in lines if n and not n.startswith("#"))
            self._mtime = mtime
        return self._names


@dataclass
class ClientHealth:
    """What the server knows about one deployed client (stored per run)."""

    name: str
    client: int
    last_seen: float | None = None
    rounds_completed: int = 0
    failures: int = 0
    latency_s: float | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    last_error: str | None = None


@dataclass
class Task:
    """Work for one client: its encoded envelope, and its answer once it came."""

    task_id: bytes
    client: int
    op: str
    round: int
    payload: wire.Encoded
    issued: float | None = None
    sends: int = 0
    answer: wire.Envelope | None = None
    answered_at: float | None = None
    expires: float | None = None  # handed out without waiting (submit): closed after this


@dataclass
class Hub:
    """Thread-safe meeting point of the gRPC threads (clients) and the round loop (server).

    One lock, and a condition per waiter: the round loop waits on ``_cv`` (clients ready,
    answers in), each long-polling client on its own condition (a task for it, the end). An
    answer wakes the round loop only, and a task only its client: with one shared condition,
    each of a round's K answers would wake every client already polling for the next round
    (O(K^2) wake-ups per round).
    """

    run_id: str
    num_clients: int
    admit: Sequence[str] | None = None
    revoked: Revocations | None = None
    health: dict[str, ClientHealth] = field(default_factory=dict)
    liveness_s: float = 60.0
    reply_factor: float = 4.0  # an answer may be this many times its task's size (+ slack)
    finished: bool = False
    stopped: str | None = None  # why the server stopped before the run finished

    def __post_init__(self) -> None:
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)  # the round loop's
        self._polls: dict[int, threading.Condition] = {}  # each polling client's
        self._queues: dict[int, deque[Task]] = {}
        self._open: dict[bytes, Task] = {}
        self._issued: dict[int, Task] = {}  # each client's task in hand, until answered
        self._names: dict[int, str] = {h.client: n for n, h in self.health.items()}
        self._ready: set[str] = set()  # clients that polled this server: loaded, working
        self._owed: set[int] = set()  # clients busy with a task closed unanswered

    # -- called by the gRPC threads ------------------------------------------------------------

    def admissible(self, name: str) -> None:
        """Refuse (``Refused``) a client that may not take part at all: revoked, not admitted,
        or new to a full federation. Checked when its stream opens, before it sends anything."""
        with self._cv:
            self._check(name)
            full = len(self.health) >= self.num_clients
            if self.admit is None and name not in self.health and full:
                raise Refused(f"the federation is full ({self.num_clients} clients)")

    def receive_limit(self, name: str | None) -> int:
        """The most bytes a message from ``name`` (None: any client) can legitimately need
        now: ``reply_factor`` times its largest task in hand plus ``REPLY_SLACK_BYTES`` (the
        update, the client's new state and metrics), or ``CONTROL_BYTES`` without one."""
        with self._cv:
            if name is None:
                sizes = [t.payload.nbytes for t in self._issued.values()]
            else:
                own = self._issued.get(self.health[name].client) if name in self.health else None
                sizes = [own.payload.nbytes] if own is not None else []
        if not sizes:
            return CONTROL_BYTES
        return int(self.reply_factor * max(sizes)) + REPLY_SLACK_BYTES

    def join(self, name: str) -> int:
        """The client id of ``name`` (refused if not admitted, revoked, or the federation is
        full). Ids come from the admission list's order, else from the order of first join."""
        with self._cv:
            self._check(name)
            if name not in self.health:
                cid = self._new_id(name)
                self.health[name] = ClientHealth(name, cid)
                self._names[cid] = name
                log.info("client %r joined as client %d", name, cid)
            self._seen(name)
            self._cv.notify_all()
            return self.health[name].client

    def next_task(self, name: str, timeout: float) -> Task | None:
        """The client's next task, waiting up to ``timeout`` seconds for one."""
        deadline = time.monotonic() + timeout
        with self._cv:
            self._check(name)
            cid = self._joined(name)
            if name not in self._ready:
                self._ready.add(name)
                self._cv.notify_all()
            lost = self._issued.get(cid)
            if lost is not None and lost.sends < MAX_SENDS and self.stopped is None:
                lost.sends += 1
                log.info("client %d (%r) polls again: its task of round %d is sent again",
                         cid, name, lost.round)  # fmt: skip
                self.health[name].bytes_sent += lost.payload.nbytes
                return lost  # it never got it (or lost it): the same task, the same id
            queue = self._queues.setdefault(cid, deque())
            wake = self._poll_condition(cid)
            while not queue and not self.over:
                self._seen(name)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                wake.wait(left)
            self._seen(name)
            if not queue or self.stopped is not None:
                return None
            task = queue.popleft()
            task.issued, task.sends = time.monotonic(), 1
            self._issued[cid] = task
            self.health[name].bytes_sent += task.payload.nbytes
            return task

    def answer(self, name: str, env: wire.Envelope) -> None:
        """Accept a client's answer to one of its open tasks, or raise ``Refused``."""
        with self._cv:
            self._check(name)
            cid = self._joined(name)
            self._seen(name)
            task = self._open.get(env.task_id)
            if task is None or task.issued is None:
                raise Refused(
                    f"answer to an unknown, expired or already answered task (round {env.round})"
                )
            if task.client != cid:
                raise Refused(f"task belongs to client {task.client}, not to {cid} ({name!r})")
            if env.round != task.round or env.kind not in ANSWERS:
                raise Refused(f"answer does not match its task (round {task.round}, {task.op})")
            task.answer, task.answered_at = env, time.monotonic()
            del self._open[env.task_id]
            self._issued.pop(cid, None)
            health = self.health[name]
            health.bytes_received += env.nbytes
            health.latency_s = time.monotonic() - task.issued
            self._cv.notify_all()

    # -- called by the round loop --------------------------------------------------------------

    def wait_for_clients(self, n: int, timeout: float) -> None:
        """Block until ``n`` clients are ready: joined and polling this server (a site polls
        once it has loaded its data; a resumed run's clients count once they are back);
        ``TimeoutError`` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while len(self._ready) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"only {len(self._ready)} of the {n} clients needed joined in {timeout} s"
                    )
                self._cv.wait(left)

    def run(self, tasks: list[Task], timeout: float) -> list[wire.Envelope | None]:
        """Hand out ``tasks`` and collect their answers; None for a client that did not answer
        by the deadline (its task is closed: a late answer is refused)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            live = self._live()
            for task in tasks:
                if task.client not in live:
                    continue  # closed below as failed: nobody would take it
                self._open[task.task_id] = task
                self._queues.setdefault(task.client, deque()).append(task)
                self._poll_condition(task.client).notify_all()
            while any(t.answer is None and t.task_id in self._open for t in tasks):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            for task in tasks:
                self._close(task)
        return [t.answer for t in tasks]

    def submit(self, tasks: list[Task], timeout: float) -> None:
        """Hand out ``tasks`` without waiting for them (the asynchronous driver); each is
        closed as failed if not answered ``timeout`` s from now, or at once if its client is
        not live. ``collect`` gives their answers as they come."""
        with self._cv:
            live, expires = self._live(), time.monotonic() + timeout
            for task in tasks:
                task.expires = expires
                if task.client not in live:
                    task.expires = time.monotonic()  # closed at the next collect
                    continue
                self._open[task.task_id] = task
                self._queues.setdefault(task.client, deque()).append(task)
                self._poll_condition(task.client).notify_all()

    def collect(self, tasks: Sequence[Task], timeout: float) -> list[Task]:
        """Wait up to ``timeout`` s until one of ``tasks`` is answered or expired; those that
        are, closed, answered ones first in the order their answers came."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                now = time.monotonic()
                done = [t for t in tasks if t.answer is not None or (t.expires or 0.0) <= now]
                if done or now >= deadline:
                    break
                soonest = min((t.expires or deadline for t in tasks), default=deadline)
                self._cv.wait(max(0.0, min(deadline, soonest) - now))
            for task in done:
                self._close(task)
        return sorted(done, key=lambda t: (t.answered_at is None, t.answered_at or 0.0))

    def cancel(self, tasks: Sequence[Task], over_selected: bool) -> None:
        """Close ``tasks`` now (a later answer is refused): an unanswered one failed its
        client, unless the round had its answers without it (``over_selected``)."""
        with self._cv:
            for task in tasks:
                self._close(task, over_selected)

    def live_clients(self) -> set[int]:
        """Ids of the clients seen recently (``liveness_s``) that poll this server."""
        with self._cv:
            ready = {self.health[n].client for n in self._ready if n in self.health}
            return self._live() & ready

    def _live(self) -> set[int]:
        """Ids of the clients seen within ``liveness_s`` (a polling client is seen at least
        once per poll timeout)."""
        now = time.time()
        return {
            h.client
            for h in self.health.values()
            if h.last_seen is not None and now - h.last_seen <= self.liveness_s
        }

    def snapshot(self) -> list[dict[str, Any]]:
        with self._cv:
            return [asdict(h) for h in self.health.values()]

    @property
    def over(self) -> bool:
        """Whether this server hands out no more tasks (the run finished, or it stopped)."""
        return self.finished or self.stopped is not None

    def finish(self) -> None:
        """The run has finished: pending and future polls are answered ``done``."""
        with self._cv:
            self.finished = True
            self._wake_all()

    def wait_for_busy(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for the clients still working on a task that was closed
        unanswered (over-selected, late) to come back and hear the run's end; how many did
        not."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._owed and (left := deadline - time.monotonic()) > 0:
                self._cv.wait(left)
            return len(self._owed)

    def stop(self, reason: str) -> None:
        """The server stops before the run finished (``reason``: why, sent to the clients):
        pending and future joins and polls are answered ``stopped``, so the sites reconnect
        (to a restarted server that resumes the run) instead of ending."""
        with self._cv:
            if self.finished:
                return
            self.stopped = reason
            self._wake_all()

    def stop_reason(self, name: str) -> str | None:
        """Why the server stopped (None while it runs), told only to client ``name`` if it
        may take part (else ``Refused``)."""
        with self._cv:
            if self.stopped is not None:
                self._check(name)
            return self.stopped

    def _wake_all(self) -> None:
        self._cv.notify_all()
        for wake in self._polls.values():
            wake.notify_all()

    # -- internals -----------------------------------------------------------------------------

    def _poll_condition(self, cid: int) -> threading.Condition:
        wake = self._polls.get(cid)
        if wake is None:
            wake = self._polls[cid] = threading.Condition(self._lock)
        return wake

    def _close(self, task: Task, over_selected: bool = False) -> None:
        was_open = self._open.pop(task.task_id, None) is not None
        if self._issued.get(task.client) is task:
            del self._issued[task.client]
        queue = self._queues.get(task.client)
        if queue is not None and task in queue:
            queue.remove(task)
        name = self._names.get(task.client)
        if name is None:
            return
        health = self.health[name]
        if task.answer is not None:
            health.rounds_completed += task.op == "train"
            return
        if task.issued is not None:
            self._owed.add(task.client)  # still working on it, as far as we know
        if over_selected:
            log.info("client %d (%r) over-selected in round %d", task.client, name, task.round)
            return
        health.failures += 1
        if task.issued is not None:
            why = "missed the deadline"
        elif was_open:
            why = "never polled"
        else:
            why = "not connected"
        health.last_error = f"round {task.round} {task.op}: {why}"
        log.warning("client %d (%r) %s in round %d", task.client, name, why, task.round)

    def _check(self, name: str) -> None:
        if not name:
            raise Refused("no client name")
        if self.revoked is not None and name in self.revoked.names():
            raise Refused(f"client {name!r} is revoked")
        if self.admit is not None and name not in self.admit:
            raise Refused(f"client {name!r} is not on the admission list")

    def _new_id(self, name: str) -> int:
        if self.admit is not None:
            return list(self.admit).index(name)
        cid = len(self.health)
        if cid >= self.num_clients:
            raise Refused(f"the federation is full ({self.num_clients} clients)")
        return cid

    def _joined(self, name: str) -> int:
        if name not in self.health:
            raise Refused(f"client {name!r} has not joined")
        return self.health[name].client

    def _seen(self, name: str) -> None:
        health = self.health[name]
        health.last_seen = time.time()
        if health.client in self._owed:
            self._owed.discard(health.client)
            self._cv.notify_all()


# ---- the gRPC servicer --------------------------------------------------------------------


class Coordinator:
    """``Coordinator.Call``: one request envelope in, one reply envelope out.

    Before a stream's first chunk is read, its client (the certificate's name) must be one
    that may take part (``Hub.admissible``) and get a slot (``Guard.open``); its message must
    then arrive whole within the guard's deadline and be no larger than what the client's
    task in hand can need (``Hub.receive_limit``, at most ``max_bytes``); the reply must be
    taken within the deadline too."""

    def __init__(
        self,
        hub: Hub,
        config: str,
        *,
        insecure: bool = False,
        poll_timeout_s: float = 20.0,
        max_bytes: int = wire.DEFAULT_MAX_BYTES,
        guard: Guard | None = None,
    ) -> None:
        self.hub, self.config, self.insecure = hub, config, insecure
        self.poll_timeout_s, self.max_bytes = poll_timeout_s, max_bytes
        self.guard = guard or Guard(total=256, per_client=4, timeout_s=60.0)

    def Call(self, request: Iterable[bytes], context: Any) -> Iterator[bytes]:  # gRPC's name
        peer = context.peer()
        certified = self._certified(context)  # known before the message is read
        try:
            if not self.insecure:
                self.hub.admissible(self._identity(None, certified))
            stream = self.guard.open(certified, context)
        except (Refused, Busy) as exc:
            yield from wire.send(self._refuse(peer, certified, str(exc)))
            return
        with stream:
            yield from self._serve(stream, request, peer, certified)

    def _serve(
        self, stream: Stream, request: Iterable[bytes], peer: str, certified: str | None
    ) -> Iterator[bytes]:
        limit = min(self.max_bytes, self.hub.receive_limit(certified))
        stream.arm("receiving the message")
        try:
            env = wire.receive(request, limit, verify=self.insecure)  # TLS authenticates
        except wire.WireError as exc:
            reply: wire.Envelope | wire.Encoded = self._refuse(
                peer, certified, f"malformed message: {exc}"
            )
        except grpc.RpcError:  # the client went away, or the guard cut the stream
            self._cut(stream, peer, certified)
            return
        else:
            stream.disarm()
            try:
                name = self._identity(env, certified)
                reply = self._handle(name, env)
            except Refused as exc:
                reply = self._refuse(peer, certified or env.client, str(exc), env)
        stream.arm("sending the reply")
        try:
            if isinstance(reply, wire.Encoded):  # a task: the round's weights encoded once
                yield from wire.send_encoded(reply)
            else:
                yield from wire.send(reply)
        finally:
            stream.disarm()
            self._cut(stream, peer, certified)

    def _cut(self, stream: Stream, peer: str, name: str | None) -> None:
        if stream.cut is not None:
            log.warning("cut stream from %s (%s): %s", name or "?", peer, stream.cut)
            self._noted(name, f"cut: {stream.cut}")

    def _certified(self, context: Any) -> str | None:
        """The client name in the peer's TLS certificate (None without TLS)."""
        if self.insecure:
            return None
        names = context.auth_context().get("x509_common_name") or []
        return names[0].decode() if names else None

    def _identity(self, env: wire.Envelope | None, certified: str | None) -> str:
        if self.insecure and env is not None:
            return env.client
        if certified is None:
            raise Refused("no client certificate")
        if env is not None and env.client and env.client != certified:
            raise Refused(
                f"client claims to be {env.client!r} but its certificate is {certified!r}"
            )
        return certified

    def _handle(self, name: str, env: wire.Envelope) -> wire.Envelope | wire.Encoded:
        hub = self.hub
        if env.kind in ("join", "poll") and hub.stop_reason(name) is not None:
            return self._stopped()
        if env.kind == "join":
            cid = hub.join(name)
            scalars: dict[str, int | float | str] = {"client_id": cid, "config": self.config}
            return wire.Envelope("welcome", hub.run_id, client=name, scalars=scalars)
        if env.kind == "poll":
            task = hub.next_task(name, self.poll_timeout_s)
            if task is not None:
                return task.payload
            if hub.stopped is not None:
                return self._stopped()
            return wire.Envelope("done" if hub.finished else "wait", hub.run_id)
        if env.kind in ANSWERS:
            if env.run_id != hub.run_id:
                raise Refused(f"answer for run {env.run_id!r}, this is {hub.run_id!r}")
            hub.answer(name, env)
            return wire.Envelope("ack", hub.run_id, round=env.round)
        raise Refused(f"unknown request kind {env.kind!r}")

    def _stopped(self) -> wire.Envelope:
        reason = self.hub.stopped or "stopped"
        return wire.Envelope("stopped", self.hub.run_id, scalars={"reason": reason})

    def _refuse(
        self, peer: str, name: str | None, reason: str, env: wire.Envelope | None = None
    ) -> wire.Envelope:
        kind = env.kind if env is not None else "message"
        log.warning("refused %s from %s (%s): %s", kind, name or "?", peer, reason)
        self._noted(name, reason)
        return wire.Envelope("refused", self.hub.run_id, scalars={"reason": reason})

    def _noted(self, name: str | None, reason: str) -> None:
        """``reason`` as client ``name``'s last error (if it is a member)."""
        if name in self.hub.health:
            with self.hub._cv:
                self.hub.health[name].last_error = reason


# ---- the engine ---------------------------------------------------------------------------


class GrpcEngine:
    """Clients across the network: each round's work goes out as tasks through the ``Hub``."""

    name = "grpc"
    remote = True

    def __init__(self, program: ClientProgram, hub: Hub, *, round_timeout_s: float) -> None:
        self.program, self.hub = program, hub
        self.round_timeout_s = round_timeout_s
        self.store: RunStore | None = None
        self.run_id = ""

    def attach(self, store: RunStore, run_id: str) -> None:
        """Record client health in ``store`` under ``run_id`` (called by the round loop)."""
        self.store, self.run_id = store, run_id

    def run_stage(self, job: StageJob) -> list[Reply | None]:
        tasks = self._tasks(job)
        answers = self.hub.run(tasks, self.round_timeout_s)
        self._report()
        return [_reply(a) for a in answers]

    def submit(self, job: StageJob, timeout: float | None = None) -> list[Task]:
        """``job``'s tasks handed out without waiting (the asynchronous driver, a round on
        real time), each closed after ``timeout`` s (default: the round timeout)."""
        tasks = self._tasks(job)
        self.hub.submit(tasks, self.round_timeout_s if timeout is None else timeout)
        return tasks

    def cancel(self, tasks: Sequence[Task], over_selected: bool) -> None:
        """Close the submitted ``tasks`` not answered yet (a later answer is refused)."""
        self.hub.cancel(tasks, over_selected)
        self._report()

    def collect(self, tasks: Sequence[Task], timeout: float) -> list[tuple[Task, Reply | None]]:
        """The submitted ``tasks`` answered or expired within ``timeout`` s, in the order the
        answers came, each with its reply (None: no answer by its deadline, or declined)."""
        done = self.hub.collect(tasks, timeout)
        if done:
            self._report()
        return [(t, _reply(t.answer)) for t in done]

    def live_clients(self) -> set[int]:
        return self.hub.live_clients()

    def _tasks(self, job: StageJob) -> list[Task]:
        tasks = []
        shared: wire.Prefix | None = None
        for k, cid in enumerate(job.clients):
            common, own = task_message(job, k)
            if shared is None:  # the stage's shared message, encoded and hashed once
                shared = wire.Prefix(
                    wire.Envelope("task", arrays=common.arrays, scalars=common.scalars)
                )
            tasks.append(
                self._task(shared, int(cid), job.stage, job.round, own.arrays, own.scalars)
            )
        return tasks

    def evaluate_test(self, w: torch.Tensor, rows: np.ndarray | None = None) -> EvalResult:
        """Centralised evaluation on the server (its copy of the test set)."""
        return self.program.evaluate_test(w, rows)

    def close(self) -> None:
        """Record client health. The round loop closes its engine whether the run finished
        or failed; ``run_server``, which knows which, tells the clients (``Hub.finish`` or
        ``Hub.stop``)."""
        self._report()

    def _task(
        self,
        shared: wire.Prefix,
        cid: int,
        op: str,
        round: int,
        arrays: Mapping[str, torch.Tensor],
        scalars: Mapping[str, int | float | str] | None = None,
    ) -> Task:
        """Client ``cid``'s task: the shared prefix, then its own fields (a fresh task id)."""
        task_id = secrets.token_bytes(16)
        own = wire.Envelope(
            "task",
            self.hub.run_id,
            round=round,
            task_id=task_id,
            arrays=arrays,
            scalars={"stage": op, **(scalars or {})},
        )
        return Task(task_id, cid, op, round, shared.extend(own))

    def _report(self) -> None:
        if self.store is not None:
            self.store.update_health(self.run_id, self.hub.snapshot())


def _reply(env: wire.Envelope | None) -> Reply | None:
    """A member's answer: its reply, None if it declined or did not answer, or a refused
    reply if it sent something that is not a reply record."""
    if env is None or env.kind == "declined":
        return None
    try:
        return reply_from_message(env.message())
    except RecordError as exc:
        return Reply(Message(), refused=f"the answer of client {env.client!r}: {exc}")


def serve(
    coordinator: Coordinator, listen: str, credentials: Any | None
) -> tuple[grpc.Server, int]:
    """Start a gRPC server for ``coordinator`` on ``listen`` (TLS ``credentials`` or, if None,
    plaintext); the started ``grpc.Server`` and the bound port (``listen`` may ask for 0).

    It has a thread per stream its guard admits, plus ``SPARE_THREADS`` that refuse the
    streams beyond (at once: they need not wait for a stalled one to end); streams beyond
    those gRPC itself turns away (``RESOURCE_EXHAUSTED``), and the clients retry."""
    threads = coordinator.guard.total + SPARE_THREADS
    options = [
        ("grpc.max_receive_message_length", 4 * wire.DEFAULT_CHUNK_BYTES),
        ("grpc.max_send_message_length", 4 * wire.DEFAULT_CHUNK_BYTES),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads),
        options=options,
        maximum_concurrent_rpcs=threads,
    )
    server.add_generic_rpc_handlers((wire.handler(coordinator.Call),))
    if credentials is None:
        port = server.add_insecure_port(listen)
    else:
        port = server.add_secure_port(listen, credentials)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    server.start()
    return server, port
