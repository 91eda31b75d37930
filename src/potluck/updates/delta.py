"""The broadcast as a delta against each client's last model: only the coordinates of the
global weights that changed since the model a client last received travel, with their new
values, at indices coded as a bitmap or Rice-coded gaps (``updates.indices``); a client that
holds no model, or for which the delta would be larger, gets the whole model.

Sending new values rather than differences makes the reconstruction exact, bit for bit, and
idempotent: applying the values that changed since round ``s`` to any model a client received
in round ``s`` or later gives the current one. The server keeps, per coordinate, the round
it last changed in and, per client, the round of the model it holds (``-1``: none known); a
client keeps its last model (client state that stays on the site in a deployment,
``site_state``). Each client checks what it rebuilt against the SHA-256 of the global
weights, which travels in the shared message, and declines the round if they differ (a site
that lost its model, a server resumed from an older checkpoint); the server then sends it
the whole model next time.

Useful when few coordinates change between a client's visits: sparse server steps (top-k,
FetchSGD with plain server SGD), frozen layers, personal heads kept local, a cross-silo
federation whose clients take part every round. With dense steps (FedAvg with every
coordinate moving) every client gets the whole model, a few bytes of scalars more than
without it. Memory: one model per client that has taken part (its client state) and, on the
server, the last broadcast and an int32 per coordinate.

Example:
    >>> import numpy as np, torch
    >>> from potluck.core.message import Message
    >>> from potluck.core.parts import part_context
    >>> down, w = DeltaDownlink(), torch.zeros(1000)
    >>> def send(w, rnd, held):  # the server's half for client 0
    ...     ctx = part_context(0, rnd, "downlink.0.delta", num_clients=1)
    ...     shared, sent, state = down.encode_members(Message({"w": w}), [0], held, ctx)
    ...     return shared, sent[0], {**state, "held": torch.tensor([rnd])}
    >>> shared, first, held = send(w, 1, {})
    >>> sorted(first.arrays)  # it holds no model yet: the whole model
    ['w']
    >>> ctx = part_context(0, 1, "downlink.0.delta", client=0, inbox=first)
    >>> _, cache = down.decode_member(shared, {}, ctx)
    >>> w = w.clone(); w[[3, 500]] = 1.0
    >>> shared, second, held = send(w, 2, held)
    >>> sorted(second.arrays), second.wire_bytes < 100  # two values and their indices
    (['index', 'values'], True)
    >>> ctx = part_context(0, 2, "downlink.0.delta", client=0, inbox=second)
    >>> opened, cache = down.decode_member(shared, cache, ctx)
    >>> torch.equal(opened.arrays["w"], w), int(cache["round"])
    (True, 2)
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import torch

from potluck.core.message import Message, MessageError
from potluck.core.parts import Context, Need, State
from potluck.core.registry import register
from potluck.updates.indices import decode_indices, encode_indices

_log = logging.getLogger(__name__)

DIGEST = "w/sha256"  # the shared message's digest of the global weights
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@register("downlink", "delta")
@dataclass(frozen=True)
class DeltaDownlink:
    """Each client gets the global weights ``w`` as the coordinates that changed since the
    model it last received (their new values), or whole when it holds none or that is
    smaller. Last in the ``[[downlink]]`` chain: it sends whatever the downlinks before it
    made of ``w`` (bfloat16 after ``cast``: the changed bfloat16 values), exactly.
    """

    needs: ClassVar[frozenset[str]] = frozenset({Need.LAST_DOWNLINK})
    site_state: ClassVar[bool] = True  # a deployed site keeps its last model to itself

    def encode(self, message: Message) -> Message:
        return message  # per client: encode_members

    def decode(self, message: Message) -> Message:
        return message  # per client: decode_member

    # ---- server --------------------------------------------------------------------------

    def encode_members(
        self, shared: Message, members: Sequence[int], state: State, ctx: Context
    ) -> tuple[Message, dict[int, Message], State]:
        """``shared`` without ``w`` (its SHA-256 instead), each member's message, and the
        new server state (each member's held round set to unknown until it answers:
        ``after_train``)."""
        w = shared.arrays.get("w")
        if not isinstance(w, torch.Tensor) or w.dim() != 1:
            raise ValueError("downlink delta: the broadcast has no 1-D weights 'w' to send")
        changed_at = _changed_at(w, state, ctx.round)
        held = state.get("held")
        if held is None or held.shape != (ctx.num_clients,):
            held = torch.full((ctx.num_clients,), -1, dtype=torch.int64)
        full = Message({"w": w})
        by_base: dict[int, Message] = {}
        out: dict[int, Message] = {}
        for c in members:
            base = int(held[int(c)])
            if base < 0:
                out[int(c)] = full
                continue
            if base not in by_base:
                by_base[base] = _changes_since(w, changed_at, base, full)
            out[int(c)] = by_base[base]
        held = held.clone()
        held[torch.as_tensor(list(members), dtype=torch.int64)] = -1
        arrays = {k: v for k, v in shared.arrays.items() if k != "w"}
        scalars = {**shared.scalars, DIGEST: _digest(w)}
        new = {"previous": w.clone(), "changed_at": changed_at, "held": held}
        return Message(arrays, scalars), out, new

    def after_train(self, stages: Any, state: State, ctx: Context) -> State:
        """The members that answered the ``train`` stage (``stages.members``, of
        ``orchestrator.PartStages``) hold this round's model."""
        held = state["held"].clone()
        held[torch.as_tensor(stages.members, dtype=torch.int64)] = ctx.round
        return {**state, "held": held}

    # ---- client --------------------------------------------------------------------------

    def decode_member(self, shared: Message, cache: State, ctx: Context) -> tuple[Message, State]:
        """``shared`` with ``w`` rebuilt from this member's message (``ctx.inbox``) and its
        last model ``cache``, and the new cache; a ``MessageError`` if they do not give the
        weights the server sent (the member then declines the round)."""
        got = ctx.inbox or Message()
        digest = shared.scalars.get(DIGEST)
        if not isinstance(digest, str):
            raise MessageError(f"downlink delta: the broadcast carries no {DIGEST!r}")
        if "w" in got.arrays:
            w = got.arrays["w"]
            if not isinstance(w, torch.Tensor) or w.dim() != 1:
                raise MessageError("downlink delta: the whole model 'w' must be 1-D")
        else:
            w = _apply(got, cache)
        if _digest(w) != digest:
            raise MessageError(
                "downlink delta: the rebuilt weights do not match the server's SHA-256 (this "
                "client's last model is not the one the server assumed)"
            )
        arrays = {**shared.arrays, "w": w}
        scalars = {k: v for k, v in shared.scalars.items() if k != DIGEST}
        return replace(shared, arrays=arrays, scalars=scalars), {
            "w": w,
            "round": torch.tensor(ctx.round, dtype=torch.int64),
        }


def _changed_at(w: torch.Tensor, state: State, rnd: int) -> torch.Tensor:
    """Per coordinate, the round whose broadcast last changed it (bitwise)."""
    previous, changed_at = state.get("previous"), state.get("changed_at")
    if (
        previous is None
        or changed_at is None
        or (previous.dtype, previous.shape)
        != (
            w.dtype,
            w.shape,
        )
    ):
        return torch.full(w.shape, rnd, dtype=torch.int32)
    moved = _bits(w) != _bits(previous)
    return torch.where(moved, torch.tensor(rnd, dtype=torch.int32), changed_at)


def _changes_since(w: torch.Tensor, changed_at: torch.Tensor, base: int, full: Message) -> Message:
    """The values of ``w`` changed after round ``base`` at their coded indices, or ``full``
    if that message would be as large."""
    idx = torch.nonzero(changed_at > base).flatten()
    coded = torch.from_numpy(encode_indices(idx.numpy(), len(w)))
    sparse = Message({"index": coded, "values": w[idx]}, {"base": base, "count": len(idx)})
    return sparse if sparse.wire_bytes < full.wire_bytes else full


def _apply(got: Message, cache: State) -> torch.Tensor:
    """The cached model with the changed values of ``got`` written in."""
    old, held = cache.get("w"), cache.get("round")
    if old is None or held is None:
        raise MessageError("downlink delta: a delta arrived, but this client holds no model")
    base, count = got.scalars.get("base"), got.scalars.get("count")
    for name, v in (("base", base), ("count", count)):
        if isinstance(v, bool) or not isinstance(v, int) or v < -1:
            raise MessageError(f"downlink delta: bad {name} {v!r}")
    assert isinstance(base, int) and isinstance(count, int)
    if int(held) < base:
        raise MessageError(
            f"downlink delta: changes since round {base}, but this client holds round "
            f"{int(held)}'s model"
        )
    values, coded = got.arrays.get("values"), got.arrays.get("index")
    if (
        not isinstance(values, torch.Tensor)
        or values.dtype != old.dtype
        or values.shape != (count,)
    ):
        raise MessageError(f"downlink delta: values must be {count} of {old.dtype}")
    if not isinstance(coded, torch.Tensor):
        raise MessageError("downlink delta: no index coding")
    idx = decode_indices(np.asarray(coded.numpy()), len(old), count)
    w = old.clone()
    w[torch.from_numpy(idx)] = values
    return w


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bit patterns (so that -0.0, 0.0 and NaNs compare as what is sent)."""
    return t.contiguous().view(_INT_VIEW[t.element_size()])


def _digest(w: torch.Tensor) -> str:
    return hashlib.sha256(w.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
