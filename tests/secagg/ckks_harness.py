"""A round of the real ``CKKS`` transform and ``CKKSSum`` aggregator over in-memory messages,
as the round loop runs it, with the server's view instrumented: ``View`` offers the server
half what the round loop's ``PartStages`` offers (``members``, ``round``, ``run``, ``leave``,
``tell_aggregator``, ``report``) and nothing else, keeps each client's state where only that
client's code sees it, drops members before chosen stages, records every message the server
side receives and every state it keeps, and says (``CLIENT.running``) whether client code is
running, for tests that watch which side loads which key."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from potluck.core.message import Message
from potluck.core.params import ParamSpec
from potluck.core.parts import Context, RoundAborted, State, part_context
from potluck.secagg.homomorphic import CKKS, CKKSSum

NS = "transforms.0.ckks"
SEED = 0
Inputs = Mapping[int, tuple[np.ndarray, float]]
Tamper = Callable[[int, Message], Message]


@dataclass
class _Running:
    running: bool = False

    @contextmanager
    def client(self) -> Iterator[None]:
        self.running = True
        try:
            yield
        finally:
            self.running = False


CLIENT = _Running()


def bound(part: CKKS, d: int) -> CKKS:
    return part.bind(ParamSpec(("w",), ((d,),)))


@dataclass
class View:
    part: CKKS
    round: int
    members: np.ndarray
    drops: Mapping[str, set[int]] = field(default_factory=dict)
    states: dict[int, State] = field(default_factory=dict)  # each client's own
    inbox: dict[int, Message] = field(default_factory=dict)
    told: Message | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    seen: list[Message] = field(default_factory=list)  # what the server side received
    on_leave: Callable[[int, Message], Message] | None = None

    def ctx(self, client: int, inbox: Message | None = None) -> Context:
        return part_context(SEED, self.round, NS, client, inbox=inbox)

    def run(
        self,
        stage: str,
        shared: Message | None = None,
        payloads: Mapping[int, Message] | None = None,
    ) -> dict[int, Message]:
        shared, payloads = shared or Message(), payloads or {}
        out = {}
        for c in (int(c) for c in self.members):
            if c in self.drops.get(stage, set()):
                continue
            with CLIENT.client():
                answer, new = self.part.client_stage(
                    stage, shared, self.states.get(c, {}), self.ctx(c, payloads.get(c))
                )
            if answer is None:
                continue
            if new:
                self.states[c] = new
            out[c] = answer
        self.members = np.array(sorted(out), dtype=np.int64)
        self.seen += out.values()
        return out

    def leave(self, client: int, message: Message) -> None:
        if self.on_leave is not None:
            message = self.on_leave(int(client), message)
        self.inbox[int(client)] = message

    def tell_aggregator(self, message: Message) -> None:
        self.told = message

    def report(self, name: str, value: float) -> None:
        self.metrics[name] = float(value)

    def train(self, inputs: Inputs, tamper: Tamper | None) -> dict[int, Message]:
        """The ``train`` stage after training: each member's ``encode`` of its update."""
        out = {}
        for c in (int(c) for c in self.members):
            if c in self.drops.get("train", set()):
                continue
            delta, weight = inputs[c]
            update = Message({"delta": torch.from_numpy(delta)}, {"weight": weight})
            with CLIENT.client():
                upload, self.states[c] = self.part.encode(
                    update, self.states.get(c, {}), self.ctx(c, self.inbox.get(c))
                )
                assert upload is not None
                out[c] = upload if tamper is None else tamper(c, upload)
        self.members = np.array(sorted(out), dtype=np.int64)
        self.seen += out.values()
        return out


@dataclass
class Outcome:
    view: View
    uploads: dict[int, Message] = field(default_factory=dict)
    server: list[State] = field(default_factory=list)  # the server half's states, in order
    aggregate: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    aborted: str | None = None


def he_round(
    part: CKKS,
    inputs: Inputs,
    drops: Mapping[str, set[int]] | None = None,
    rnd: int = 1,
    on_leave: Callable[[int, Message], Message] | None = None,
    tamper: Tamper | None = None,
) -> Outcome:
    """One round: the part's server half, the aggregator and every client's half, as the
    round loop runs them (``decode`` of each upload with what was left for its client);
    ``RoundAborted`` is caught into ``Outcome.aborted``."""
    view = View(part, rnd, np.array(sorted(inputs), dtype=np.int64), drops or {})
    view.on_leave = on_leave
    ctx = part_context(SEED, rnd, NS)
    out = Outcome(view)
    try:
        state = part.before_train(view, {}, ctx)
        out.server.append(state)
        out.uploads = view.train(inputs, tamper)
        for c, upload in out.uploads.items():
            part.decode(upload, view.ctx(c, view.inbox.get(c)))
        state = part.after_train(view, state, ctx)
        out.server.append(state)
        stack = torch.stack([out.uploads[c].arrays["delta"] for c in sorted(out.uploads)])
        agg_ctx = part_context(SEED, rnd, "aggregator", inbox=view.told)
        out.aggregate, _ = CKKSSum().aggregate(stack, torch.ones(len(stack)), {}, agg_ctx)
        state = part.after_aggregate(view, out.aggregate, state, ctx)
        out.server.append(state)
        out.mean, _ = part.decode_aggregate(out.aggregate, state, ctx)
    except RoundAborted as exc:
        out.aborted = str(exc)
    return out


def inputs_for(clients: list[int], d: int, seed: int = 0) -> dict[int, tuple[np.ndarray, float]]:
    rng = np.random.default_rng(seed)
    return {
        c: (rng.uniform(-1, 1, d).astype(np.float32), float(rng.integers(1, 100))) for c in clients
    }


def weighted_mean(part: CKKS, inputs: Inputs, clients: list[int]) -> np.ndarray:
    """The plaintext weighted mean of the clipped updates (float64)."""
    c = part.clip_range
    deltas = np.stack([np.clip(inputs[k][0].astype(np.float64), -c, c) for k in clients])
    weights = np.array([inputs[k][1] for k in clients])
    return weights @ deltas / weights.sum()


def error_bound(part: CKKS, inputs: Inputs, clients: list[int], mean: np.ndarray) -> np.ndarray:
    """The stated error per coordinate of the decoded mean: each released slot is off by at
    most ``E`` (the CKKS bound of ``ckks.Parameters.error_bound`` plus 7 standard deviations
    of the flooding noise), so ``clip * S_j / W`` is off by at most ``(clip + |mean_j|) E /
    (W - E)``, ``W`` the summed ``weight / max_weight``."""
    e = part.parameters().error_bound(len(clients)) + 7 * part.flooding
    w = sum(inputs[k][1] for k in clients) / part.max_weight
    return (part.clip_range + np.abs(mean)) * e / (w - e)
