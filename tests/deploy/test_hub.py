"""The ``Hub`` alone: tasks reach their clients, answers reach the round loop, and nothing
else wakes anyone (no gRPC; the clients are threads)."""

from __future__ import annotations

import secrets
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from potluck.deploy import server, wire
from potluck.deploy.server import Hub, Refused, Revocations, Task


def task(cid: int, rnd: int = 1) -> Task:
    task_id = secrets.token_bytes(16)
    env = wire.Envelope("task", "run", round=rnd, task_id=task_id, scalars={"stage": "train"})
    return Task(task_id, cid, "train", rnd, wire.Encoded((wire.encode(env),), b""))


def answer_of(t: Task) -> wire.Envelope:
    return wire.Envelope("reply", "run", round=t.round, task_id=t.task_id)


def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def waiting(hub: Hub, cid: int) -> bool:
    """Whether a thread is blocked in ``next_task`` for client ``cid``."""
    wake = hub._polls.get(cid)
    return wake is not None and len(wake._waiters) > 0  # type: ignore[attr-defined]


def test_answers_do_not_wake_clients_polling_for_the_next_round() -> None:
    names = ["a", "b", "c"]
    hub = Hub("run", 3, admit=names)
    for name in names:
        hub.join(name)
    got: dict[str, Any] = {}
    idle = [
        threading.Thread(target=lambda n=n: got.update({n: hub.next_task(n, 30)})) for n in "bc"
    ]
    for t in idle:
        t.start()
    until(lambda: waiting(hub, 1) and waiting(hub, 2))
    wakeups = {1: 0, 2: 0}
    for cid in wakeups:  # count each time a poller goes back to waiting
        wake = hub._polls[cid]
        inner = wake.wait

        def counted(timeout: float | None = None, cid: int = cid, inner: Any = inner) -> bool:
            wakeups[cid] += 1
            return bool(inner(timeout))

        wake.wait = counted  # type: ignore[method-assign]

    def client_a() -> None:
        t = hub.next_task("a", 10)
        assert t is not None
        hub.answer("a", answer_of(t))

    worker = threading.Thread(target=client_a)
    worker.start()
    answers = hub.run([task(0)], timeout=10)
    worker.join()
    assert answers[0] is not None and answers[0].kind == "reply"
    until(lambda: waiting(hub, 1) and waiting(hub, 2))  # a woken poller is back by now
    assert wakeups == {1: 0, 2: 0}  # a's task and answer woke neither b nor c
    hub.finish()
    for t in idle:
        t.join(5)
    assert got == {"b": None, "c": None}  # told the run is over


def test_each_task_reaches_its_own_client_and_every_answer_comes_back() -> None:
    names = [f"c{i}" for i in range(20)]
    hub = Hub("run", len(names), admit=names)
    seen: dict[str, list[int]] = {n: [] for n in names}

    def client(name: str) -> None:
        hub.join(name)
        while (t := hub.next_task(name, 30)) is not None:  # None once the run is over
            seen[name].append(t.client)
            hub.answer(name, answer_of(t))

    threads = [threading.Thread(target=client, args=(n,)) for n in names]
    for t in threads:
        t.start()
    hub.wait_for_clients(len(names), 10)
    for rnd in (1, 2):
        answers = hub.run([task(cid, rnd) for cid in range(len(names))], timeout=10)
        assert [a.round if a else None for a in answers] == [rnd] * len(names)
    hub.finish()
    for t in threads:
        t.join(10)
    assert seen == {n: [i, i] for i, n in enumerate(names)}
    assert all(h["rounds_completed"] == 2 for h in hub.snapshot())


def test_a_task_for_a_client_that_does_not_poll_is_closed_at_the_deadline() -> None:
    hub = Hub("run", 2, admit=["a", "b"])
    hub.join("a")
    hub.join("b")
    t0 = time.monotonic()
    assert hub.run([task(0)], timeout=0.3) == [None]
    assert time.monotonic() - t0 < 5
    health = {h["name"]: h for h in hub.snapshot()}
    assert health["a"]["failures"] == 1 and "never polled" in health["a"]["last_error"]


def test_a_stopped_hub_wakes_its_pollers_and_hands_out_nothing_more() -> None:
    """``stop`` (the server fails or shuts down before the run finished) is not ``finish``:
    waiting and later polls get no task, and the hub says why it stopped."""
    hub = Hub("run", 2, admit=["a", "b"])
    hub.join("a")
    hub.join("b")
    got: dict[str, Any] = {}
    poller = threading.Thread(target=lambda: got.update(b=hub.next_task("b", 30)))
    poller.start()
    until(lambda: waiting(hub, 1))
    queued = task(0)
    with hub._cv:  # a task still queued for a when the server stops
        hub._queues.setdefault(0, deque()).append(queued)
    hub.stop("the server failed (RuntimeError)")
    poller.join(5)
    assert not poller.is_alive() and got == {"b": None}
    assert hub.next_task("a", 30) is None  # not handed out after the stop
    assert hub.stopped == "the server failed (RuntimeError)" and not hub.finished
    assert hub.stop_reason("a") == hub.stopped
    with pytest.raises(Refused, match="not on the admission list"):
        hub.stop_reason("intruder")  # told nothing


def test_a_task_polled_but_lost_is_sent_again_and_answered_once() -> None:
    hub = Hub("run", 1, admit=["a"])
    hub.join("a")
    t = task(0)
    answers: list[Any] = []
    loop = threading.Thread(target=lambda: answers.extend(hub.run([t], 30)))
    loop.start()
    until(lambda: t.task_id in hub._open)
    sent = [hub.next_task("a", 0.05) for _ in range(server.MAX_SENDS + 1)]
    assert sent[:-1] == [t] * server.MAX_SENDS  # as if each reply never reached the client
    assert sent[-1] is None  # and no more
    hub.answer("a", answer_of(t))
    with pytest.raises(Refused, match="already answered"):
        hub.answer("a", answer_of(t))
    loop.join(10)
    assert [a.task_id for a in answers] == [t.task_id]
    assert hub.next_task("a", 0.05) is None  # answered: nothing is sent again


def test_receive_limits_follow_the_task_in_hand() -> None:
    hub = Hub("run", 2, admit=["a", "b"], reply_factor=4.0)
    hub.join("a")
    hub.join("b")
    t = task(0)
    threading.Thread(target=lambda: hub.run([t], 30), daemon=True).start()
    until(lambda: t.task_id in hub._open)
    assert hub.receive_limit("a") == hub.receive_limit("b") == server.CONTROL_BYTES
    hub.next_task("a", 5)
    expected = 4 * t.payload.nbytes + server.REPLY_SLACK_BYTES
    assert hub.receive_limit("a") == hub.receive_limit(None) == expected
    assert hub.receive_limit("b") == server.CONTROL_BYTES  # not its task
    hub.answer("a", answer_of(t))
    assert hub.receive_limit("a") == server.CONTROL_BYTES


def test_clients_that_may_not_take_part_are_refused_before_they_send() -> None:
    revoked = Path(tempfile.mkdtemp()) / "revoked.txt"
    revoked.write_text("b\n")
    hub = Hub("run", 3, admit=["a", "b"], revoked=Revocations(revoked))
    hub.admissible("a")
    for name, why in (("b", "revoked"), ("c", "admission list"), ("", "no client name")):
        with pytest.raises(Refused, match=why):
            hub.admissible(name)
    open_hub = Hub("run", 1)
    open_hub.join("a")
    open_hub.admissible("a")
    with pytest.raises(Refused, match="full"):
        open_hub.admissible("b")


def test_cancelled_tasks_refuse_late_answers_and_the_end_waits_for_busy_clients() -> None:
    """An over-selected client is not counted as failing, a late one is; both are waited
    for at the end (they are still working) until they come back, or the time is up."""
    hub = Hub("run", 3, admit=["a", "b", "c"])
    for name in "abc":
        hub.join(name)
    tasks = [task(cid) for cid in range(3)]
    hub.submit(tasks, timeout=30)
    issued = [hub.next_task(name, 1) for name in "abc"]
    assert issued == tasks
    hub.answer("a", answer_of(tasks[0]))
    assert [t.client for t in hub.collect(tasks, 1)] == [0]
    hub.cancel(tasks[1:2], over_selected=True)
    hub.cancel(tasks[2:], over_selected=False)
    assert hub.health["b"].failures == 0 and hub.health["c"].failures == 1
    assert "missed the deadline" in (hub.health["c"].last_error or "")
    with pytest.raises(Refused, match="expired or already answered"):
        hub.answer("b", answer_of(tasks[1]))  # b is back: the end need not wait for it
    hub.finish()
    assert hub.wait_for_busy(0.05) == 1  # c has not come back
    threading.Timer(0.1, lambda: hub.next_task("c", 0)).start()
    assert hub.wait_for_busy(10) == 0
