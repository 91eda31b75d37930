"""Synchronous rounds on real time in a deployment: the ``[clock]`` deadline and
over-selection that a simulation applies on the virtual clock, applied to the answers as
they really arrive.

The ``train`` tasks go out at once (``GrpcEngine.submit``); the round keeps the first
``target`` usable answers in the order they came and closes every other task then: the
members still training are ``over_selected`` (Bonawitz et al. 2019, "Towards Federated
Learning at Scale: System Design", MLSys: the server selects 130 % of the target and
keeps the first 100 %), and a late answer is refused as any answer to a closed task is.
With ``deadline_s`` the round stops waiting after that many seconds (instead of
``deploy.round_timeout_s``); what has not come by then is ``dropped_late``.

The virtual clock's other policies need the devices' profiles (``late = "partial"``
estimates what fits the deadline from them, ``server_s`` and ``start_hour`` are virtual
time, ``adaptive_*`` read speeds and memory): a deployment refuses them up front
(:func:`check_deployable`).

Example:
    >>> from potluck.core.clock import ClockPolicy
    >>> check_deployable(ClockPolicy(deadline_s=30.0, over_selection=0.3))
    >>> check_deployable(ClockPolicy(deadline_s=30.0, late="partial"))
    Traceback (most recent call last):
    ...
    ValueError: clock.late = "partial": in a deployment the devices are real: ...
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from potluck.core.clock import ClockPolicy
from potluck.core.message import Message
from potluck.core.records import Reply

if TYPE_CHECKING:
    from potluck.orchestrator import RoundStages

_VIRTUAL_ONLY = {
    "late": ("partial", "the share of work that fits is estimated from device profiles"),
    "server_s": (None, "the server's time is its real time"),
    "start_hour": (None, "a deployment starts at the real time of day"),
    "adaptive_work": (True, "local work by speed needs the devices' profiles"),
    "adaptive_batch": (True, "batch sizes by memory need the devices' profiles"),
}


def check_deployable(policy: ClockPolicy) -> None:
    """Refuse the parts of ``policy`` that only exist on the virtual clock."""
    defaults = ClockPolicy()
    for name, (bad, why) in _VIRTUAL_ONLY.items():
        value = getattr(policy, name)
        if value != getattr(defaults, name) and (bad is None or value == bad):
            shown = f'"{value}"' if isinstance(value, str) else value
            raise ValueError(
                f"clock.{name} = {shown}: in a deployment the devices are real: {why}; a "
                "deployment applies deadline_s and over_selection on real time"
            )


@dataclass
class Outcome:
    """How a real-time ``train`` stage ended: the members kept, over-selected and late."""

    kept: list[int] = field(default_factory=list)
    over_selected: list[int] = field(default_factory=list)
    late: list[int] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        return {
            "over_selected": float(len(self.over_selected)),
            "dropped_late": float(len(self.late)),
        }


def first_answers(
    stages: RoundStages,
    stage: str,
    shared: Message,
    payloads: Mapping[int, Message],
    policy: ClockPolicy,
    *,
    target: int,
) -> tuple[dict[int, Reply], Outcome]:
    """Stage ``stage`` sent to every member at once; the first ``target`` usable answers
    kept (all of them with ``target`` 0) within ``policy.deadline_s`` (default: the
    engine's round timeout); every other task closed."""
    engine: Any = stages.engine
    timeout_s = policy.deadline_s or float(engine.round_timeout_s)
    job = stages.job(stage, shared, payloads)
    tasks = engine.submit(job, timeout=timeout_s)
    pending, outcome = list(tasks), Outcome()
    kept: dict[int, Reply] = {}
    want = target or len(tasks)
    end = time.monotonic() + timeout_s
    while pending and len(kept) < want:
        left = end - time.monotonic()
        done = engine.collect(pending, max(left, 0.0))
        for task, reply in done:
            pending.remove(task)
            if reply is None:  # expired: the deadline passed, or its client was not there
                outcome.late.append(task.client)
                stages.received(job, {task.client: None})
            elif len(kept) < want:
                kept.update(stages.received(job, {task.client: reply}))
            else:  # answered in the same instant as the last one kept
                outcome.over_selected.append(task.client)
                stages.received(job, {task.client: None})
        if not done and left <= 0:
            break
    over = len(kept) >= want
    engine.cancel(pending, over)
    for task in pending:
        stages.received(job, {task.client: None})
        (outcome.over_selected if over else outcome.late).append(task.client)
    outcome.kept = sorted(kept)
    stages.members = stages.members[[int(c) in kept for c in stages.members]]
    return kept, outcome
