"""The records of a stage: what the server hands an engine, and each client's answer.

A round runs one or more *stages* (``train``, ``evaluate``, a protocol's own). For a stage
the server hands the engine one ``StageJob``: the stage's name, the round, one ``shared``
message every member receives (the broadcast) and, per member, its own ``payload`` and its
persistent client state (per part namespace). Each member answers with one ``Reply`` (its
upload and its new client state), or ``None`` if it dropped out.

Every engine and the wire move these with the same packing (``pack_job`` / ``unpack_job``,
``pack_replies`` / ``unpack_replies``): named tensors ``"<k>/p/<name>"`` (payload),
``"<k>/s/<namespace>/<name>"`` (state), ``"<k>/m/<name>"`` (upload) and per-member
scalars, so nothing is pickled and no engine has a packing of its own. Names that come back
are checked (``RecordError``), since a remote member may send anything.

Example:
    >>> import numpy as np
    >>> reply = Reply(Message({"delta": torch.ones(2)}, {"num_examples": 3}),
    ...               {"terms.0.scaffold": {"c_i": torch.zeros(2)}})
    >>> back = unpack_replies(*pack_replies([reply, None]))
    >>> back[1] is None, back[0].message.scalars, sorted(back[0].state["terms.0.scaffold"])
    (True, {'num_examples': 3}, ['c_i'])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from potluck.core.message import Message, MessageError, Scalar

State = dict[str, torch.Tensor]
ClientState = Mapping[str, State]  # part namespace -> that part's tensors
TRAIN, EVALUATE = "train", "evaluate"
_SEP = "/"
_DECLINED = "__declined__"


class RecordError(MessageError):
    """A packed record that does not unpack: a name or scalar of the wrong form."""


@dataclass(frozen=True)
class StageJob:
    """One stage for a set of clients: ``clients[k]`` receives ``shared`` and
    ``payloads[k]``, with its state ``states[k]``."""

    stage: str
    round: int
    shared: Message
    clients: np.ndarray
    payloads: tuple[Message, ...]
    states: tuple[ClientState, ...]

    def __post_init__(self) -> None:
        k = len(self.clients)
        if len(self.payloads) != k or len(self.states) != k:
            raise ValueError(
                f"StageJob {self.stage!r}: payloads and states need one entry per client ({k})"
            )

    def subset(self, positions: np.ndarray) -> StageJob:
        """The job of the members at ``positions``."""
        idx = [int(p) for p in positions]
        return StageJob(
            self.stage,
            self.round,
            self.shared,
            self.clients[positions],
            tuple(self.payloads[i] for i in idx),
            tuple(self.states[i] for i in idx),
        )


@dataclass(frozen=True)
class Reply:
    """A client's answer to one stage: its upload and its new persistent state (only the
    namespaces it changed). ``refused``: why an answer that arrived cannot be used (a remote
    engine's record that does not unpack); the round counts it as refused, not failed."""

    message: Message
    state: Mapping[str, State] = field(default_factory=dict)
    refused: str | None = None


@dataclass(frozen=True)
class Packed:
    """Members' tensors in one flat mapping, their scalars in a list (one dict each)."""

    tensors: dict[str, torch.Tensor]
    scalars: list[dict[str, Scalar]]


def pack_job(job: StageJob) -> Packed:
    """The members' payloads and states of ``job`` (``shared`` travels on its own)."""
    tensors: dict[str, torch.Tensor] = {}
    for k, (payload, state) in enumerate(zip(job.payloads, job.states, strict=True)):
        tensors.update(_flat(k, payload.arrays, state))
    return Packed(tensors, [dict(p.scalars) for p in job.payloads])


def unpack_job(
    stage: str, round: int, shared: Message, clients: np.ndarray, packed: Packed
) -> StageJob:
    """Inverse of ``pack_job``."""
    n = len(clients)
    arrays, states = _unflat(packed.tensors, n, "p")
    payloads = tuple(
        Message(a, s) for a, s in zip(arrays, _scalars(packed.scalars, n), strict=True)
    )
    return StageJob(stage, round, shared, clients, payloads, tuple(states))


def pack_replies(
    replies: Sequence[Reply | None],
) -> tuple[dict[str, torch.Tensor], list[dict[str, Scalar]]]:
    """Replies as one flat tensor mapping and a list of scalars (a dropout: one marker)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: list[dict[str, Scalar]] = []
    for k, reply in enumerate(replies):
        if reply is None:
            scalars.append({_DECLINED: 1})
            continue
        tensors.update(_flat(k, reply.message.arrays, reply.state, kind="m"))
        scalars.append(dict(reply.message.scalars))
    return tensors, scalars


def unpack_replies(
    tensors: Mapping[str, torch.Tensor], scalars: Sequence[Mapping[str, Scalar]]
) -> list[Reply | None]:
    """Inverse of ``pack_replies``; ``RecordError`` for names of another form."""
    n = len(scalars)
    arrays, states = _unflat(tensors, n, "m")
    out: list[Reply | None] = []
    for k in range(n):
        if _DECLINED in scalars[k]:
            out.append(None)
        else:
            out.append(Reply(Message(arrays[k], dict(scalars[k])), states[k]))
    return out


def reply_to_message(reply: Reply) -> Message:
    """One reply as one flat message (what a deployed client sends).

    Example:
        >>> r = Reply(Message({"delta": torch.ones(1)}, {"n": 1}), {"a": {"x": torch.zeros(1)}})
        >>> sorted(reply_to_message(r).arrays)
        ['0/m/delta', '0/s/a/x']
    """
    tensors, scalars = pack_replies([reply])
    return Message(tensors, scalars[0])


def reply_from_message(message: Message) -> Reply:
    """Inverse of ``reply_to_message``."""
    reply = unpack_replies(message.arrays, [message.scalars])[0]
    if reply is None:
        raise RecordError("a declined reply carries no upload")
    return reply


def task_message(job: StageJob, k: int) -> tuple[Message, Message]:
    """Member ``k``'s task as two messages: the shared part (``"b/<name>"``, the same for
    every member, so it is encoded once) and its own (``pack_job`` of that member)."""
    shared = Message(
        {f"b{_SEP}{n}": t for n, t in job.shared.arrays.items()},
        {f"b{_SEP}{n}": v for n, v in job.shared.scalars.items()},
    )
    packed = pack_job(job.subset(np.array([k])))
    own = Message(packed.tensors, {f"0{_SEP}p{_SEP}{n}": v for n, v in packed.scalars[0].items()})
    return shared, own


def job_from_task(stage: str, round: int, client: int, message: Message) -> StageJob:
    """The one-member job a deployed client received (inverse of ``task_message``, both parts
    merged into ``message``); ``RecordError`` for names of another form.

    Example:
        >>> job = StageJob("train", 2, Message({"w": torch.zeros(2)}), np.array([5]),
        ...                (Message(scalars={"work": 0.5}),), ({},))
        >>> shared, own = task_message(job, 0)
        >>> both = Message({**shared.arrays, **own.arrays}, {**shared.scalars, **own.scalars})
        >>> back = job_from_task("train", 2, 5, both)
        >>> sorted(back.shared.arrays), back.payloads[0].scalars, back.clients.tolist()
        (['w'], {'work': 0.5}, [5])
    """
    shared_arrays = {k[2:]: v for k, v in message.arrays.items() if k.startswith("b" + _SEP)}
    own_arrays = {k: v for k, v in message.arrays.items() if not k.startswith("b" + _SEP)}
    shared_scalars: dict[str, Scalar] = {}
    own_scalars: dict[str, Scalar] = {}
    for key, value in message.scalars.items():
        if key.startswith("b" + _SEP):
            shared_scalars[key[2:]] = value
        elif key.startswith(f"0{_SEP}p{_SEP}"):
            own_scalars[key[4:]] = value
    packed = Packed(own_arrays, [own_scalars])
    shared = Message(shared_arrays, shared_scalars)
    return unpack_job(stage, round, shared, np.array([client], dtype=np.int64), packed)


def by_namespace(flat: Mapping[str, torch.Tensor]) -> dict[str, State]:
    """A client's state as the run store keeps it (``"<namespace>/<name>"``) by part.

    Example:
        >>> sorted(by_namespace({"terms.0.ditto/personal": torch.zeros(1)}))
        ['terms.0.ditto']
    """
    out: dict[str, State] = {}
    for name, t in flat.items():
        ns, _, key = name.partition(_SEP)
        out.setdefault(ns, {})[key] = t
    return out


def _flat(
    k: int, arrays: Mapping[str, torch.Tensor], state: ClientState, kind: str = "p"
) -> dict[str, torch.Tensor]:
    out = {f"{k}{_SEP}{kind}{_SEP}{name}": t for name, t in arrays.items()}
    for ns, tensors in state.items():
        if _SEP in ns or not ns:
            raise RecordError(f"part namespace {ns!r} must be non-empty without '/'")
        out.update({f"{k}{_SEP}s{_SEP}{ns}{_SEP}{name}": t for name, t in tensors.items()})
    return out


def _unflat(
    tensors: Mapping[str, torch.Tensor], n: int, kind: str
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, State]]]:
    arrays: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    states: list[dict[str, State]] = [{} for _ in range(n)]
    for key, t in tensors.items():
        index, _, rest = key.partition(_SEP)
        what, _, name = rest.partition(_SEP)
        if not index.isdigit() or not 0 <= int(index) < n or not name:
            raise RecordError(f"record name {key!r} is not '<member>/{kind}|s/<name>'")
        k = int(index)
        if what == kind:
            arrays[k][name] = t
        elif what == "s":
            ns, _, item = name.partition(_SEP)
            if not ns or not item:
                raise RecordError(f"state name {key!r} is not '<member>/s/<part>/<name>'")
            states[k].setdefault(ns, {})[item] = t
        else:
            raise RecordError(f"record name {key!r}: unknown kind {what!r}")
    return arrays, states


def _scalars(scalars: Sequence[Mapping[str, Scalar]], n: int) -> list[dict[str, Scalar]]:
    if len(scalars) != n:
        raise RecordError(f"{len(scalars)} scalar records for {n} members")
    return [dict(s) for s in scalars]
