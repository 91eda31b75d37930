"""A round of the real ``SecAgg`` part over in-memory messages, with the server's view
instrumented: ``View`` offers the server half what the round loop's ``PartStages`` offers
(``members``, ``round``, ``run``, ``leave``, ``report``) and nothing else, keeps each
client's state where only that client's code sees it, drops members before chosen stages,
and records every message the server half receives."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from potluck.core.message import Message
from potluck.core.params import ParamSpec
from potluck.core.parts import Context, RoundAborted, State, part_context
from potluck.secagg import SecAgg, SecureSum

NS = "transforms.0.secagg"
SEED = 0


def bound(part: SecAgg, d: int) -> SecAgg:
    return part.bind(ParamSpec(("w",), ((d,),)))


@dataclass
class View:
    part: SecAgg
    round: int
    members: np.ndarray
    drops: Mapping[str, set[int]] = field(default_factory=dict)
    states: dict[int, State] = field(default_factory=dict)  # each client's own
    inbox: dict[int, Message] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    seen: list[Message] = field(default_factory=list)  # what the server half received
    sent: list[Message] = field(default_factory=list)  # what it sent
    on_leave: Callable[[View, int, Message], Message] | None = None

    def ctx(self, client: int, inbox: Message | None = None) -> Context:
        return part_context(SEED, self.round, NS, client, inbox=inbox)

    def run(
        self,
        stage: str,
        shared: Message | None = None,
        payloads: Mapping[int, Message] | None = None,
    ) -> dict[int, Message]:
        shared, payloads = shared or Message(), payloads or {}
        self.sent += [shared, *payloads.values()]
        out = {}
        for c in (int(c) for c in self.members):
            if c in self.drops.get(stage, set()):
                continue
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
            message = self.on_leave(self, client, message)
        self.sent.append(message)
        self.inbox[int(client)] = message

    def report(self, name: str, value: float) -> None:
        self.metrics[name] = float(value)

    def train(self, inputs: Mapping[int, tuple[np.ndarray, float]]) -> dict[int, Message]:
        """The masked-input stage (the round loop's ``train`` stage, after training)."""
        out = {}
        for c in (int(c) for c in self.members):
            if c in self.drops.get("masked_input", set()):
                continue
            delta, weight = inputs[c]
            update = Message({"delta": torch.from_numpy(delta)}, {"weight": weight})
            upload, new = self.part.encode(update, self.states[c], self.ctx(c, self.inbox.get(c)))
            if upload is None:
                continue
            self.states[c] = new
            out[c] = upload
        self.members = np.array(sorted(out), dtype=np.int64)
        self.seen += out.values()
        return out


@dataclass
class Outcome:
    view: View
    server: State  # the server state after before_train
    uploads: dict[int, Message]
    total: np.ndarray | None = None  # the unmasked integer sum
    mean: torch.Tensor | None = None
    aborted: str | None = None
    aggregate: torch.Tensor | None = None


def secure_round(
    part: SecAgg,
    inputs: Mapping[int, tuple[np.ndarray, float]],
    drops: Mapping[str, set[int]] | None = None,
    rnd: int = 1,
    on_leave: Callable[[View, int, Message], Message] | None = None,
) -> Outcome:
    """One round: the part's server half and every client's half, as the round loop runs
    them; ``RoundAborted`` is caught into ``Outcome.aborted``."""
    view = View(part, rnd, np.array(sorted(inputs), dtype=np.int64), drops or {})
    view.on_leave = on_leave
    ctx = part_context(SEED, rnd, NS)
    out = Outcome(view, {}, {})
    try:
        out.server = part.before_train(view, {}, ctx)
        out.uploads = view.train(inputs)
        state = part.after_train(view, out.server, ctx)
        if not out.uploads:
            return out
        stack = torch.stack([out.uploads[c].arrays["delta"] for c in sorted(out.uploads)])
        out.aggregate, _ = SecureSum().aggregate(stack, torch.ones(len(stack)), {}, ctx)
        out.total = part.unmasked(out.aggregate, state)
        out.mean, _ = part.decode_aggregate(out.aggregate, state, ctx)
    except RoundAborted as exc:
        out.aborted = str(exc)
    return out


def inputs_for(clients: list[int], d: int, seed: int = 0) -> dict[int, tuple[np.ndarray, float]]:
    rng = np.random.default_rng(seed)
    return {
        c: (rng.uniform(-1, 1, d).astype(np.float32), float(rng.integers(1, 100))) for c in clients
    }


def encoded_sum(
    part: SecAgg, inputs: Mapping[int, tuple[np.ndarray, float]], clients: list[int], rnd: int = 1
) -> np.ndarray:
    """The plain sum modulo 2^bits of the clients' encodings, drawn as each client draws."""
    fp = part.encoding()
    total = np.zeros(len(next(iter(inputs.values()))[0]) + 2, dtype=fp.dtype)
    for c in clients:
        delta, weight = inputs[c]
        total += fp.encode(delta, weight, part_context(SEED, rnd, NS, c).rng("rounding"))
    return total
