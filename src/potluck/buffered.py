"""The asynchronous driver (FedBuff, FedAsync): the same parts as the synchronous rounds,
driven by virtual arrivals instead of a round barrier.

``concurrency`` clients are in flight at any time, each training from the model version it
was released with. Answers arrive in virtual time (``sampling.clock``: download, local
steps, upload, from the device profiles and the bytes really sent); each arrival is decoded
and checked as in a round, weighed by its staleness (``sampling.asynchrony``) and buffered;
a freed slot releases a new client with the current model. When the buffer holds ``buffer``
updates the server aggregates them and steps: one *step* is what the run store, the
checkpoint and the metrics call a round. Arrivals at one virtual instant are taken before
the releases of that instant, so the clients released after a step get the new model.

Engines train whatever set of
clients the driver releases: the clients released at one model version are trained
together, in one stage job, when the earliest of them could arrive before every update
already trained (its download and steps alone take longer than that, so that a batch of
releases is trained at once without changing any outcome). Round seeds are the version a
client trains from plus one, and a client is released at most once per version (nor again in
a step its update landed in: one update a client per step), so a run with ``buffer =
concurrency`` on identical devices is synchronous FedAvg.

Server state (slot ``async``): the virtual time, the in-flight clients (client, version,
release time, order) and the broadcasts (the global model and the terms' broadcasts, before
the downlink) of the versions they train from. A resume retrains the in-flight clients from
those (every draw is seeded), so it continues exactly.

Example: see ``tests/test_async.py`` and README "Asynchronous FL".
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from potluck.core.clock import KEPT
from potluck.core.parts import Context, State
from potluck.core.records import TRAIN, Reply, StageJob
from potluck.sampling.asynchrony import Asynchrony

if TYPE_CHECKING:
    from potluck.engines.base import Engine
    from potluck.orchestrator import PerClient, _Loop, _State, _Update

SLOT = "async"


@dataclass
class Flight:
    """A released client: what it trains from and, once trained, its answer."""

    order: int  # release order: ties in arrival break by it
    client: int
    version: int
    released_at: float
    update: _Update | None = None
    state: dict[str, State] = field(default_factory=dict)
    arrival: float = float("inf")
    outcome: str = KEPT
    timing: dict[str, float] = field(default_factory=dict)
    bytes_down: int = 0
    bytes_up: int = 0
    lower_bound: float = 0.0  # its arrival is no earlier (download and steps alone)
    work: float = 1.0  # its share of its local work (the clock's adaptive_work)
    batch: int | None = None  # its own batch size (the clock's adaptive_batch)


@dataclass
class Buffered:
    """An arrival in the server's buffer."""

    flight: Flight
    staleness: int


class AsyncDriver:
    """FedBuff's and FedAsync's step for a ``_Loop`` whose experiment has ``asynchrony``."""

    TIME, SPAN = "virtual_time_s", "round_virtual_s"  # the step's end and length

    def __init__(self, loop: _Loop, policy: Asynchrony) -> None:
        self.loop, self.policy = loop, policy
        self.restored = False  # False: restore the in-flight clients from the slot first
        self.pending: list[Flight] = []  # released, not trained yet
        self.heap: list[tuple[float, int, Flight]] = []  # trained, by (arrival, order)
        self.busy = np.zeros(loop.num_clients, dtype=bool)  # in flight
        self.released = np.zeros(loop.num_clients, dtype=bool)  # with the current version
        self.versions: dict[int, dict[str, torch.Tensor]] = {}  # broadcast arrays, w included
        self.now = 0.0
        self.order = 0
        self.fresh: dict[int, dict[str, State]] = {}  # consumed, not yet committed

    @property
    def flights(self) -> list[Flight]:
        """Every client in flight, in release order."""
        return sorted([*self.pending, *(f for _, _, f in self.heap)], key=lambda f: f.order)

    # ---- one step ------------------------------------------------------------------------

    def step(
        self, engine: Engine, state: _State, step: int
    ) -> tuple[_State, dict[str, float], PerClient, dict[int, dict[str, State]]]:
        """Run until ``buffer`` updates arrived, then aggregate and step the server."""
        t0 = time.perf_counter()
        started = self._restore(state)
        version = state.round
        self.versions[version] = self.loop._broadcast_arrays(state.w, state.slots)
        buffer: list[Buffered] = []
        dropped = {"failed": 0, "offline": 0, "stale": 0}
        releases = 0
        self.fresh = {}
        while len(buffer) < self.policy.buffer:
            releases += self._release(version, releases)
            self._train_due(engine)
            if not self.heap:
                raise RuntimeError("async: no client can be released (none is online)")
            self.now = max(self.now, self.heap[0][0])
            while self.heap and self.heap[0][0] <= self.now:  # this instant's arrivals
                self._land(heapq.heappop(self.heap)[2], version, buffer, dropped)
                if len(buffer) == self.policy.buffer:
                    break
                self._train_due(engine)
        self._train_due(engine, everything_of=version)  # before w_version is replaced
        out = self._server_step(engine, state, step, buffer, dropped, started)
        out[1]["round_seconds"] = time.perf_counter() - t0
        return out

    def _land(
        self, flight: Flight, version: int, buffer: list[Buffered], dropped: dict[str, int]
    ) -> None:
        self.busy[flight.client] = False
        self.released[flight.client] = True  # one update a client per step: not sent again
        staleness = version - flight.version
        if flight.outcome != KEPT:
            dropped[flight.outcome] += 1
        elif flight.update is None:  # refused when it was decoded
            dropped["failed"] += 1
        elif self.policy.max_staleness is not None and staleness > self.policy.max_staleness:
            dropped["stale"] += 1
        else:
            buffer.append(Buffered(flight, staleness))
            self.fresh[flight.client] = flight.state

    # ---- releasing and training ----------------------------------------------------------

    def _release(self, version: int, nth: int) -> int:
        """Release clients into the free slots at ``now`` (0 or 1 release events)."""
        free = self.policy.concurrency - len(self.pending) - len(self.heap)
        if free <= 0:
            return 0
        loop, clock = self.loop, self.loop.clock
        assert clock is not None
        online = clock.available(self.now)
        pool = np.arange(loop.num_clients) if online is None else online
        eligible = pool[~(self.busy[pool] | self.released[pool])].astype(np.int64)
        if not len(eligible):
            return 0
        k = min(free, len(eligible))
        sampler: Any = loop.exp.algorithm.sampler
        sampler = sampler.resized(k)
        stream = ("sampling", version + 1) if nth == 0 else ("sampling", version + 1, nth)
        ctx = Context(loop.exp.seed, version + 1, stream, num_clients=loop.num_clients,
                      available=eligible)  # fmt: skip
        chosen, _ = sampler.sample(loop.num_clients, {}, ctx)
        for c in chosen:
            self._launch(Flight(self.order, int(c), version, self.now))
            self.order += 1
        self.released[chosen] = True
        return 1

    def _launch(self, flight: Flight) -> None:
        """``flight`` in flight, untrained, with the earliest time it could arrive."""
        clock = self.loop.clock
        assert clock is not None
        d, c = clock.devices, flight.client
        flight.work = float(clock.work(flight.released_at, np.array([c]), {}, np.ones(1), 0)[0])
        flight.batch = self.loop._batch_sizes(np.array([c])).get(c)
        steps = self._steps(None, flight)
        flight.lower_bound = flight.released_at + float(d.latency_s[c]) + steps / float(d.speed[c])
        self.busy[c] = True
        self.pending.append(flight)

    def _train_due(self, engine: Engine, everything_of: int | None = None) -> None:
        """Train the untrained flights that could arrive before every trained one (all of
        them, or all of version ``everything_of``), one stage job per version."""
        while self.pending:
            if everything_of is None:
                first = self.heap[0][0] if self.heap else float("inf")
                if min(f.lower_bound for f in self.pending) > first:
                    return
                version = min(f.version for f in self.pending)
            else:
                version = everything_of
            batch = [f for f in self.pending if f.version == version]
            if not batch:
                return
            self.pending = [f for f in self.pending if f.version != version]
            self._train(engine, batch)
            for f in batch:
                heapq.heappush(self.heap, (f.arrival, f.order, f))

    def _job(self, engine: Engine, flights: list[Flight]) -> tuple[Any, StageJob]:
        """The ``train`` job of ``flights`` (all of one version, trained from it) and the
        ``RoundStages`` that count and check its answers; each member's client state
        includes what this step already consumed."""
        from potluck.orchestrator import RoundStages

        loop, version = self.loop, flights[0].version
        members = np.array([f.client for f in flights], dtype=np.int64)
        stages = RoundStages(loop, engine, version + 1, members)
        for c in members:
            stages.states[int(c)].update(self.fresh.get(int(c), {}))
        shared = loop._downlinked(self.versions[version])
        payloads = {f.client: loop._train_payload(f.work, {}, f.batch) for f in flights}
        return stages, stages.job(TRAIN, shared, payloads)

    def _train(self, engine: Engine, flights: list[Flight]) -> None:
        """One stage job: ``flights`` (all of one version) trained from that version."""
        loop, clock = self.loop, self.loop.clock
        assert clock is not None
        version = flights[0].version
        stages, job = self._job(engine, flights)
        answers = engine.run_stage(job)
        replies = stages.received(job, dict(zip((f.client for f in flights), answers, strict=True)))
        for f in flights:
            f.bytes_down = stages.bytes_down.get(f.client, 0)
        answered = [f for f in flights if f.client in replies]
        for f in flights:
            if f.client not in replies:  # declined: it frees its slot when it would answer
                f.outcome, f.arrival = "failed", f.released_at
        if not answered:
            return
        steps = np.array([self._steps(replies[f.client], f) for f in answered])
        down = np.array([stages.bytes_down.get(f.client, 0) for f in answered], np.float64)
        up = np.array([stages.bytes_up.get(f.client, 0) for f in answered], np.float64)
        m = np.array([f.client for f in answered], dtype=np.int64)
        starts = np.array([f.released_at for f in answered])
        settled = clock.settle_from(version + 1, starts, m, down, up, steps)
        updates = {
            u.client: u
            for u in loop._collect(version + 1, replies, stages.inbox, tolerant=engine.remote)
        }
        timings = settled.per_client()
        for i, f in enumerate(answered):
            f.arrival = float(settled.timing.arrival[i])
            f.outcome = str(settled.outcome[i])
            f.bytes_up = stages.bytes_up.get(f.client, 0)
            f.timing = timings[f.client]
            f.update = updates.get(f.client)
            f.state = {
                ns: stages.states[f.client][ns]
                for ns in stages.changed.get(f.client, set())
                if ns not in loop.secret
            }

    def _steps(self, reply: Reply | None, f: Flight) -> float:
        """``f``'s local steps (as its reply reports them, else as planned) in steps of the
        run's batch size (the clock's unit of speed)."""
        planned = self.loop.program.steps_for(f.client, f.work, f.batch)
        steps = planned if reply is None else reply.message.scalars.get("num_steps", planned)
        batch = {f.client: f.batch} if f.batch is not None else {}
        return float(steps) * self.loop._step_share(batch, f.client)

    # ---- the server's step -----------------------------------------------------------------

    def _server_step(
        self,
        engine: Engine,
        state: _State,
        step: int,
        buffer: list[Buffered],
        dropped: dict[str, int],
        started: float,
    ) -> tuple[_State, dict[str, float], PerClient, dict[int, dict[str, State]]]:
        from potluck.orchestrator import RoundStages, _merge_clients

        loop, flights = self.loop, self.flights
        slots = {ns: dict(s) for ns, s in state.slots.items()}
        members = np.array([b.flight.client for b in buffer], dtype=np.int64)
        stages = RoundStages(loop, engine, step, members)
        updates = [self._weighed(b, state.w) for b in buffer]
        new_state = loop._step(state, slots, updates, stages)
        needed = {f.version for f in flights}
        self.versions = {v: w for v, w in self.versions.items() if v in needed}
        self.released[:] = False
        new_state.slots[SLOT] = self._slot(new_state.round, flights)
        stale = [b.staleness for b in buffer]
        metrics = {
            "cohort_size": float(len(buffer)),
            "updates": float(len(buffer)),
            "train_loss": _mean_loss(buffer),
            "bytes_up": float(sum(b.flight.bytes_up for b in buffer)),
            "bytes_down": float(sum(b.flight.bytes_down for b in buffer)),
            "staleness_mean": float(np.mean(stale)),
            "staleness_max": float(np.max(stale)),
            "in_flight": float(len(flights)),
            self.TIME: self.now,
            self.SPAN: self.now - started,
            "dropped_failed": float(dropped["failed"]),
            "dropped_offline": float(dropped["offline"]),
            "dropped_stale": float(dropped["stale"]),
        }
        per_client: PerClient = [
            (
                b.flight.client,
                {
                    **(b.flight.update.metrics if b.flight.update else {}),
                    **b.flight.timing,
                    "staleness": float(b.staleness),
                    "bytes_up": float(b.flight.bytes_up),
                    "bytes_down": float(b.flight.bytes_down),
                },
            )
            for b in buffer
        ]
        client_states = {b.flight.client: b.flight.state for b in buffer if b.flight.state}
        if loop.exp.evaluation.due(step, loop.exp.rounds):
            evaluated, per_eval = loop._evaluate(engine, new_state.w, step, client_states)
            metrics.update(evaluated)
            per_client = _merge_clients(per_client, per_eval)
        return new_state, metrics, per_client, client_states

    def _weighed(self, b: Buffered, w: torch.Tensor) -> _Update:
        """The buffered update as the aggregator takes it: its delta (FedBuff) or its model
        minus the current one (FedAsync), times ``s(staleness)``."""
        u = b.flight.update
        assert u is not None
        delta = u.message.arrays["delta"]
        if self.policy.mix == "model":
            delta = self.versions[b.flight.version]["w"] + delta - w
        return u.with_arrays({"delta": delta * self.policy.weight(b.staleness)})

    # ---- server state ----------------------------------------------------------------------

    def _slot(self, version: int, flights: list[Flight]) -> State:
        out: State = {
            "now": torch.tensor(self.now, dtype=torch.float64),
            "order": torch.tensor(self.order, dtype=torch.int64),
            "clients": torch.tensor([f.client for f in flights], dtype=torch.int64),
            "versions": torch.tensor([f.version for f in flights], dtype=torch.int64),
            "released_at": torch.tensor([f.released_at for f in flights], dtype=torch.float64),
            "orders": torch.tensor([f.order for f in flights], dtype=torch.int64),
        }
        for v, arrays in self.versions.items():
            if v != version:
                out.update({f"at{v}/{name}": t for name, t in arrays.items()})
        return out

    def _restore(self, state: _State) -> float:
        """The in-flight clients from the slot on the first step of this process (a resume
        retrains them); the virtual time the step starts at."""
        if self.restored:
            return self.now
        self.restored = True
        slot = state.slots.get(SLOT, {})
        clock = self.loop.clock
        start = clock.now({}) if clock is not None else 0.0
        self.now = float(slot["now"]) if "now" in slot else start
        self.order = int(slot.get("order", torch.tensor(0)))
        if "clients" in slot:
            for c, v, t, o in zip(
                slot["clients"].tolist(),
                slot["versions"].tolist(),
                slot["released_at"].tolist(),
                slot["orders"].tolist(),
                strict=True,
            ):
                self._launch(Flight(int(o), int(c), int(v), float(t)))
        self.versions = {}
        for key, t in slot.items():
            if key.startswith("at"):
                v, name = key.removeprefix("at").split("/", 1)
                self.versions.setdefault(int(v), {})[name] = t
        return self.now


class RealTimeDriver(AsyncDriver):
    """The asynchronous driver deployed: a remote engine hands the releases out as tasks
    (``submit``) and gives the answers in the order they come (``collect``), so the server
    aggregates as updates arrive, with no round barrier. Releases go to live sites (those
    polling this server); a task unanswered within ``deploy.round_timeout_s`` frees its slot.
    A restarted server sends the tasks of the clients that were in flight again, from the
    versions in its checkpoint, so nothing is lost. Times are real seconds since the run
    started (``elapsed_s``)."""

    TIME, SPAN = "elapsed_s", "round_elapsed_s"
    POLL_S = 0.5

    def __init__(self, loop: _Loop, policy: Asynchrony, wait_s: float) -> None:
        super().__init__(loop, policy)
        self.wait_s = wait_s  # how long a step waits with nothing in flight
        self.open: dict[bytes, tuple[Flight, Any, Any]] = {}  # task id -> flight, task, stages
        self.unsent: list[Flight] = []  # in flight when the server stopped: sent again
        self.arrived: list[tuple[Flight, Any, Reply | None]] = []  # answered, not landed
        self.origin = time.monotonic()

    @property
    def flights(self) -> list[Flight]:
        live = [
            *self.unsent,
            *(f for f, _, _ in self.open.values()),
            *(f for f, _, _ in self.arrived),
        ]
        return sorted(live, key=lambda f: f.order)

    def step(
        self, engine: Engine, state: _State, step: int
    ) -> tuple[_State, dict[str, float], PerClient, dict[int, dict[str, State]]]:
        t0 = time.perf_counter()
        if not self.restored:
            self._restore(state)
            self.origin = time.monotonic() - self.now
        started = self.now
        version = state.round
        self.versions[version] = self.loop._broadcast_arrays(state.w, state.slots)
        buffer: list[Buffered] = []
        dropped = {"failed": 0, "offline": 0, "stale": 0}
        releases, idle = 0, time.monotonic()
        self.fresh = {}
        while len(buffer) < self.policy.buffer:
            if self.arrived:
                flight, stages, reply = self.arrived.pop(0)
                self._answered(flight, stages, reply)
                self._land(flight, version, buffer, dropped)
                continue
            self._send_again(engine)
            releases += self._release_live(engine, version, releases)
            if not self.open:
                if time.monotonic() - idle > self.wait_s:
                    raise RuntimeError(
                        f"async: no client to release for {self.wait_s:g} s (none is live)"
                    )
                time.sleep(self.POLL_S)
                continue
            idle = time.monotonic()
            tasks = [task for _, task, _ in self.open.values()]
            for task, reply in engine.collect(tasks, self.POLL_S):  # type: ignore[attr-defined]
                flight, _, stages = self.open.pop(task.task_id)
                self.arrived.append((flight, stages, reply))
        self.now = time.monotonic() - self.origin
        out = self._server_step(engine, state, step, buffer, dropped, started)
        out[1]["round_seconds"] = time.perf_counter() - t0
        return out

    def _launch(self, flight: Flight) -> None:
        """A client in flight when the server stopped: its task is sent again."""
        self.busy[flight.client] = True
        self.unsent.append(flight)

    def _send_again(self, engine: Engine) -> None:
        while self.unsent:
            version = self.unsent[0].version
            batch = [f for f in self.unsent if f.version == version]
            self.unsent = [f for f in self.unsent if f.version != version]
            self._submit(engine, batch)

    def _release_live(self, engine: Engine, version: int, nth: int) -> int:
        """Release live sites into the free slots (0 or 1 release events)."""
        free = self.policy.concurrency - len(self.flights)
        if free <= 0:
            return 0
        loop = self.loop
        live = np.array(sorted(engine.live_clients()), dtype=np.int64)  # type: ignore[attr-defined]
        eligible = live[~(self.busy[live] | self.released[live])] if len(live) else live
        if not len(eligible):
            return 0
        k = min(free, len(eligible))
        sampler: Any = loop.exp.algorithm.sampler
        stream = ("sampling", version + 1) if nth == 0 else ("sampling", version + 1, nth)
        ctx = Context(loop.exp.seed, version + 1, stream, num_clients=loop.num_clients,
                      available=eligible)  # fmt: skip
        chosen, _ = sampler.resized(k).sample(loop.num_clients, {}, ctx)
        batch = []
        for c in chosen:
            batch.append(Flight(self.order, int(c), version, time.monotonic() - self.origin))
            self.order += 1
            self.busy[int(c)] = True
        self.released[chosen] = True
        self._submit(engine, batch)
        return 1

    def _submit(self, engine: Engine, flights: list[Flight]) -> None:
        """One train job for ``flights`` (of one version), handed out without waiting."""
        stages, job = self._job(engine, flights)
        tasks = engine.submit(job)  # type: ignore[attr-defined]
        for f, task in zip(flights, tasks, strict=True):
            self.open[task.task_id] = (f, task, (stages, job))

    def _answered(self, flight: Flight, handle: Any, reply: Reply | None) -> None:
        """``flight``'s answer checked and decoded as a round's (``None``: none came)."""
        stages, job = handle
        c = flight.client
        replies = stages.received(job, {c: reply})
        flight.bytes_down = stages.bytes_down.get(c, 0)
        flight.bytes_up = stages.bytes_up.get(c, 0)
        if c not in replies:
            flight.outcome = "failed"
            return
        updates = self.loop._collect(job.round, replies, stages.inbox, tolerant=True)
        flight.update = updates[0] if updates else None
        flight.state = {
            ns: stages.states[c][ns]
            for ns in stages.changed.get(c, set())
            if ns not in self.loop.secret
        }


def _mean_loss(buffer: list[Buffered]) -> float:
    pairs = [
        (b.flight.update.metrics.get("train_loss"), b.flight.update.weight)
        for b in buffer
        if b.flight.update is not None
    ]
    known = [(loss, w) for loss, w in pairs if loss is not None]
    total = sum(w for _, w in known)
    return sum(loss * w for loss, w in known) / total if total else float("nan")


def check(loop: _Loop, policy: Asynchrony) -> None:
    """Refuse, up front, what the asynchronous driver cannot run."""
    exp, algo = loop.exp, loop.exp.algorithm
    problems = []
    sampler = algo.sampler
    if not (hasattr(sampler, "resized") and getattr(sampler, "samples_available", False)):
        name = type(sampler).__name__
        problems.append(f"the sampler {name} cannot release clients into free slots (uniform can)")
    if hasattr(sampler, "observe"):
        problems.append(f"the sampler {type(sampler).__name__} learns from whole rounds")
    if loop.staged or loop.finishing:
        problems.append(
            "a part with stages of its own (secure aggregation, the delta downlink) needs a "
            "round barrier"
        )
    if exp.privacy is not None:
        problems.append("the privacy accountant's sampling assumes synchronous rounds")
    if getattr(algo.stragglers, "fraction", 0):
        problems.append("stragglers: on a virtual clock slow devices are slow by their profiles")
    clock = exp.clock
    if clock is not None and (clock.deadline_s is not None or clock.over_selection):
        problems.append("clock.deadline_s and clock.over_selection are synchronous round policies")
    if policy.concurrency > loop.num_clients:
        problems.append(
            f"async.concurrency = {policy.concurrency} is more than the {loop.num_clients} clients"
        )
    if problems:
        raise ValueError("async: " + "; ".join(problems))
