"""The SecAgg+ protocol (Bell et al. 2020, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS; on the complete graph it is SecAgg, Bonawitz et al. 2017,
"Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS), as the client's
and the server's halves of four stages over messages of named arrays.

1. *Advertise keys* (client): two fresh X25519 key pairs, ``c`` to encrypt shares and ``s``
   to agree pairwise masks; the public keys go to the server. The server draws the graph
   over the clients that answered (``U1``) and sends each its neighbours' public keys.
2. *Share keys* (client): a fresh 32-byte self-mask seed ``b``; ``t``-of-``k`` Shamir shares
   of ``s_sk`` and ``b`` for its ``k`` neighbours, each pair of shares encrypted for its
   neighbour (ChaCha20-Poly1305 under their ``c`` key, bound to the round, sender and
   receiver), and a SHA-256 commitment to ``b``. The server routes each ciphertext to its
   receiver, if the receiver answered too (``U2``).
3. *Masked input* (client, the round's ``train`` upload): the encoded input plus the
   self-mask ``PRG(b)`` plus, for each neighbour ``v`` in ``U2``, ``+PRG(s_uv)`` if
   ``u < v`` else ``-PRG(s_uv)``, all modulo ``2^bits``. The pairwise masks of two
   surviving neighbours cancel in the sum. Those who answer are ``U3``.
4. *Unmasking* (client): given ``U3`` and the dropped ``U2 \\ U3``, each survivor decrypts
   the shares it holds and reveals, per neighbour, the share of ``b`` if it survived or of
   ``s_sk`` if it dropped, never both. The server reconstructs each needed secret from
   ``t`` shares of the responders (``U4``), checks it against its commitment (``b``) or its
   public key (``s_sk``), and removes the survivors' self-masks and the pairwise masks the
   survivors added with dropped neighbours.

``t`` is the ``threshold`` (a fraction of the ``k`` neighbours each client has in the graph
drawn over ``U1``, or a count). The round aborts (``RoundAborted``, nothing released)
exactly when so few clients advertised keys that ``t`` exceeds ``k``, or a secret that must be
reconstructed (``b_u`` of each ``u`` in ``U3``; ``s_sk_v`` of each ``v`` in ``U2 \\ U3`` with
a neighbour in ``U3``) has fewer than ``t`` holders among the responders, or when a share
fails authentication (the receiver names its sender) or does not reconstruct. The server
aborts as soon as that is certain: after the masked input, before any share is revealed, if
fewer than ``t`` holders survived. Clients check too (Bell et al.): one with fewer than
``t`` neighbours among the senders of shares, or among the survivors, does not go on.

Trust model: an honest-but-curious server (it follows the protocol and routes messages
faithfully but would like to learn individual inputs) and clients that follow it; the graph
is public and drawn by the server. Against a server that lies about who dropped (to
different clients) Bonawitz et al. add a consistency round with signatures, which is not
built here.

Example (client 1's first two stages, by hand):
    >>> from potluck.core.parts import part_context
    >>> ctx = part_context(0, 1, "transforms.0.secagg", client=1)
    >>> answer, state = advertise()
    >>> sorted(answer.arrays), sorted(state)
    (['c_pk', 's_pk'], ['c_sk', 's_sk'])
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from potluck.core.message import Message, MessageError
from potluck.core.parts import Context, RoundAborted, State
from potluck.secagg import crypto, shamir
from potluck.secagg.encoding import SIGNED, Encoding

BOX_BYTES = crypto.NONCE_BYTES + 2 * shamir.SHARE_BYTES + crypto.TAG_BYTES
KEY = crypto.KEY_BYTES
WITHHELD = {"num_examples": 1, "num_steps": 0, "weight": 1.0}  # the sum carries the weights
_SHARE, _MASK, _SELF = b"share", b"mask", b"self"


# ---- conversions -----------------------------------------------------------------------


def _tensor(data: bytes | np.ndarray) -> torch.Tensor:
    arr = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else data
    return torch.from_numpy(np.array(arr, copy=True))


def _bytes(t: torch.Tensor) -> bytes:
    return t.numpy().tobytes()


def _ids(values: Iterable[int]) -> torch.Tensor:
    return torch.tensor(sorted(int(v) for v in values), dtype=torch.int64).reshape(-1)


def array(
    message: Message, name: str, dtype: torch.dtype, shape: tuple[int, ...], who: str
) -> torch.Tensor:
    """``message``'s array ``name``, checked to be ``dtype`` of ``shape`` (-1: any length)."""
    t = message.arrays.get(name)
    if isinstance(t, torch.Tensor) and _fits(t, dtype, shape):
        return t
    got = None if t is None else (t.dtype, tuple(t.shape))
    raise MessageError(f"{who}: array {name!r} must be {dtype} of shape {shape}, got {got}")


def _fits(t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> bool:
    if t.dtype != dtype or t.dim() != len(shape):
        return False
    return all(s in (-1, got) for s, got in zip(shape, t.shape, strict=True))


# ---- the client's half -----------------------------------------------------------------


def advertise() -> tuple[Message, State]:
    """Stage 1: fresh key pairs; the public keys to the server, the private ones kept."""
    c_sk, c_pk = crypto.keypair()
    s_sk, s_pk = crypto.keypair()
    return (
        Message({"c_pk": _tensor(c_pk), "s_pk": _tensor(s_pk)}),
        {"c_sk": _tensor(c_sk), "s_sk": _tensor(s_sk)},
    )


def share_keys(shared: Message, state: State, ctx: Context) -> tuple[Message, State]:
    """Stage 2: shares of ``s_sk`` and of a fresh self-mask seed ``b`` for each neighbour
    (the payload in ``ctx.inbox``: their ids and public keys), encrypted for it."""
    me, rnd, who = _me(ctx), ctx.round, f"secagg share stage of client {ctx.client}"
    payload = ctx.inbox or Message()
    neighbours = array(payload, "neighbours", torch.int64, (-1,), who)
    m = len(neighbours)
    c_pk = array(payload, "c_pk", torch.uint8, (m, KEY), who)
    s_pk = array(payload, "s_pk", torch.uint8, (m, KEY), who)
    t = int(shared.scalars.get("threshold", 0))
    ids = [int(v) for v in neighbours]
    if me in ids or len(set(ids)) != m or t < 1:
        raise MessageError(f"{who}: neighbours {ids} or threshold {t} are not a valid graph")
    b = os.urandom(shamir.SECRET_BYTES)
    xs = [v + 1 for v in ids]
    sk_shares = shamir.split(_bytes(state["s_sk"]), xs, t)
    b_shares = shamir.split(b, xs, t)
    c_sk = crypto.private_key(_bytes(state["c_sk"]))
    boxes = bytearray()
    for v, pk, y_sk, y_b in zip(ids, c_pk.numpy(), sk_shares, b_shares, strict=True):
        key = crypto.agree(c_sk, pk.tobytes(), _SHARE, rnd)
        plain = shamir.to_bytes(y_sk) + shamir.to_bytes(y_b)
        boxes += crypto.seal(key, plain, crypto.associated(rnd, me, v))
    ciphertexts = np.frombuffer(bytes(boxes), dtype=np.uint8).reshape(m, BOX_BYTES)
    answer = Message(
        {"ciphertexts": _tensor(ciphertexts), "b_hash": _tensor(hashlib.sha256(b).digest())}
    )
    kept = {
        **state,
        "b": _tensor(b),
        "neighbours": neighbours.clone(),
        "c_pk": c_pk.clone(),
        "s_pk": s_pk.clone(),
        "threshold": torch.tensor(t, dtype=torch.int64),
    }
    return answer, kept


def mask_input(
    message: Message, state: State, ctx: Context, encoding: Encoding
) -> tuple[Message | None, State]:
    """Stage 3: the encoded update plus its masks; ``None`` (the client goes no further) if
    fewer than ``t`` neighbours sent it shares. The shares received are kept for stage 4."""
    me, rnd, who = _me(ctx), ctx.round, f"secagg masked input of client {ctx.client}"
    inbox = ctx.inbox or Message()
    senders = array(inbox, "senders", torch.int64, (-1,), who)
    boxes = array(inbox, "ciphertexts", torch.uint8, (len(senders), BOX_BYTES), who)
    position = _positions(state["neighbours"])
    strangers = [int(s) for s in senders if int(s) not in position]
    if strangers or len(set(senders.tolist())) != len(senders):
        raise MessageError(f"{who}: shares from {strangers or 'a sender twice'}, not neighbours")
    if len(senders) < int(state["threshold"]):
        return None, state
    weight = float(message.scalars.get("weight", 0.0))
    y = encoding.encode(message.arrays["delta"].numpy(), weight, ctx.rng("rounding"))
    y += crypto.expand(crypto.derive(_bytes(state["b"]), _SELF, rnd), len(y), encoding.bits)
    s_sk, s_pk = crypto.private_key(_bytes(state["s_sk"])), state["s_pk"].numpy()
    for v in senders.tolist():
        key = crypto.agree(s_sk, s_pk[position[v]].tobytes(), _MASK, rnd)
        mask = crypto.expand(key, len(y), encoding.bits)
        if me < v:
            y += mask
        else:
            y -= mask
    upload = Message({"delta": torch.from_numpy(y.view(SIGNED[encoding.bits]))}, WITHHELD)
    return upload, {**state, "senders": senders.clone(), "ciphertexts": boxes.clone()}


def unmask(shared: Message, state: State, ctx: Context) -> Message | None:
    """Stage 4: per neighbour that sent shares, the share of its ``b`` if it survived or of
    its ``s_sk`` if it dropped (never both), and the senders whose shares failed
    authentication; ``None`` if fewer than ``t`` neighbours survived."""
    me, rnd, who = _me(ctx), ctx.round, f"secagg unmask stage of client {ctx.client}"
    survivors = set(array(shared, "survivors", torch.int64, (-1,), who).tolist())
    dropped = set(array(shared, "dropped", torch.int64, (-1,), who).tolist())
    if me not in survivors or me in dropped or survivors & dropped:
        raise MessageError(f"{who}: the survivors and the dropped overlap or leave me out")
    neighbours = state["neighbours"].tolist()
    if len(survivors.intersection(neighbours)) < int(state["threshold"]):
        return None
    position = _positions(state["neighbours"])
    c_sk, c_pk = crypto.private_key(_bytes(state["c_sk"])), state["c_pk"].numpy()
    revealed: dict[str, list[tuple[int, bytes]]] = {"b": [], "sk": []}
    invalid = []
    boxes = state["ciphertexts"].numpy()
    for sender, box in zip(state["senders"].tolist(), boxes, strict=True):
        if sender not in survivors and sender not in dropped:
            continue
        key = crypto.agree(c_sk, c_pk[position[sender]].tobytes(), _SHARE, rnd)
        plain = crypto.unseal(key, box.tobytes(), crypto.associated(rnd, sender, me))
        if plain is None:
            invalid.append(sender)
        elif sender in survivors:
            revealed["b"].append((sender, plain[shamir.SHARE_BYTES :]))
        else:
            revealed["sk"].append((sender, plain[: shamir.SHARE_BYTES]))
    arrays = {"invalid": _ids(invalid)}
    for kind, pairs in revealed.items():
        arrays[f"{kind}_from"] = torch.tensor([s for s, _ in pairs], dtype=torch.int64)
        rows = np.frombuffer(b"".join(y for _, y in pairs), dtype=np.uint8)
        arrays[f"{kind}_shares"] = _tensor(rows.reshape(len(pairs), shamir.SHARE_BYTES))
    return Message(arrays)


def _me(ctx: Context) -> int:
    if ctx.client is None:
        raise ValueError("a secagg client stage needs the client's id in its context")
    return int(ctx.client)


def _positions(ids: torch.Tensor) -> dict[int, int]:
    return {int(v): i for i, v in enumerate(ids.tolist())}


# ---- the server's half -----------------------------------------------------------------


@dataclass(frozen=True)
class Graph:
    """The round's graph over ``u1`` (row ``i`` of ``table``: the neighbours of ``u1[i]``)."""

    u1: np.ndarray
    table: np.ndarray

    def neighbours(self, client: int) -> np.ndarray:
        return self.table[int(np.searchsorted(self.u1, client))]


def key_payloads(
    graph: Graph, keys: Mapping[int, Message]
) -> tuple[dict[int, Message], torch.Tensor]:
    """Each client's share-stage payload (its neighbours and their public keys) and every
    ``s`` public key of ``u1`` (row per client), which the server keeps for unmasking."""
    c_pk = torch.stack([keys[int(c)].arrays["c_pk"] for c in graph.u1])
    s_pk = torch.stack([keys[int(c)].arrays["s_pk"] for c in graph.u1])
    payloads = {}
    for i, c in enumerate(graph.u1.tolist()):
        rows = np.searchsorted(graph.u1, graph.table[i])
        payloads[c] = Message(
            {"neighbours": torch.from_numpy(graph.table[i].copy()), "c_pk": c_pk[rows],
             "s_pk": s_pk[rows]}
        )  # fmt: skip
    return payloads, s_pk


def route_shares(graph: Graph, answers: Mapping[int, Message]) -> dict[int, Message]:
    """Each sharer's inbox: the ciphertexts addressed to it by the other sharers."""
    received: dict[int, list[tuple[int, torch.Tensor]]] = {int(c): [] for c in answers}
    for sender, answer in sorted(answers.items()):
        boxes = answer.arrays["ciphertexts"]
        for receiver, box in zip(graph.neighbours(sender).tolist(), boxes, strict=True):
            if receiver in received:
                received[receiver].append((sender, box))
    return {
        c: Message(
            {
                "senders": torch.tensor([s for s, _ in pairs], dtype=torch.int64),
                "ciphertexts": torch.stack([b for _, b in pairs])
                if pairs
                else torch.zeros(0, BOX_BYTES, dtype=torch.uint8),
            }
        )
        for c, pairs in received.items()
    }


def needed(graph: Graph, u2: Sequence[int], u3: Sequence[int]) -> list[tuple[str, int]]:
    """The secrets the server must reconstruct: ``("b", u)`` per survivor, ``("sk", v)``
    per client that shared keys, dropped, and has a surviving neighbour."""
    alive = set(u3)
    out = [("b", u) for u in sorted(alive)]
    for v in sorted(set(u2) - alive):
        if alive.intersection(graph.neighbours(v).tolist()):
            out.append(("sk", v))
    return out


def short_of_holders(
    graph: Graph, secrets: Sequence[tuple[str, int]], holders: set[int], t: int, who: str
) -> str | None:
    """Why some secret has fewer than ``t`` of its shares held by ``holders`` (``who``
    they are), or ``None``."""
    for kind, owner in secrets:
        have = len(holders.intersection(graph.neighbours(owner).tolist()))
        if have < t:
            what = "self-mask seed" if kind == "b" else "mask key"
            return (
                f"client {owner}'s {what} has {have} shares held by {who}, fewer than the "
                f"threshold t = {t}"
            )
    return None


def collect_shares(
    graph: Graph, answers: Mapping[int, Message], u2: Sequence[int], rnd: int
) -> dict[tuple[str, int], list[tuple[int, int]]]:
    """The revealed shares by secret: ``(kind, owner) -> [(x, y)]``. A receiver that found
    a share it could not authenticate aborts the round, naming the sender."""
    shares: dict[tuple[str, int], list[tuple[int, int]]] = {}
    sharers = set(u2)
    for responder, answer in sorted(answers.items()):
        who = f"secagg unmask answer of client {responder}"
        bad = array(answer, "invalid", torch.int64, (-1,), who).tolist()
        if bad:
            raise RoundAborted(
                f"client {responder} received shares from client {bad[0]} that fail "
                f"authentication in round {rnd} (tampered or replayed)"
            )
        mine = set(graph.neighbours(responder).tolist()) & sharers
        for kind in ("b", "sk"):
            owners = array(answer, f"{kind}_from", torch.int64, (-1,), who).tolist()
            rows = array(answer, f"{kind}_shares", torch.uint8, (len(owners), -1), who)
            for owner, row in zip(owners, rows.numpy(), strict=True):
                if owner not in mine:
                    raise MessageError(f"{who}: a share of client {owner}, not its neighbour")
                y = shamir.from_bytes(row.tobytes())
                shares.setdefault((kind, owner), []).append((responder + 1, y))
    return shares


def mask_total(
    graph: Graph,
    secrets: Sequence[tuple[str, int]],
    shares: Mapping[tuple[str, int], list[tuple[int, int]]],
    commitments: Mapping[int, bytes],
    s_pk: torch.Tensor,
    survivors: set[int],
    t: int,
    length: int,
    rnd: int,
    bits: int,
) -> np.ndarray:
    """The sum of the masks left in the survivors' inputs: their self-masks and the pairwise
    masks they added with dropped neighbours, from the reconstructed secrets."""
    total = np.zeros(length, dtype=crypto.DTYPES[bits])
    public = s_pk.numpy()
    # the first t + 1 responders: on a dense graph most secrets are rebuilt from t of them
    base = tuple(sorted({x for points in shares.values() for x, _ in points})[: t + 1])
    for kind, owner in secrets:
        points = sorted(shares.get((kind, owner), []))
        if len(points) < t:
            raise RoundAborted(f"client {owner}'s shares: {len(points)} revealed, below t = {t}")
        try:
            secret = shamir.combine(points[:t], base)
        except ValueError:
            secret = b""
        if kind == "b":
            if hashlib.sha256(secret).digest() != commitments[owner]:
                raise RoundAborted(f"client {owner}'s self-mask seed does not reconstruct")
            total += crypto.expand(crypto.derive(secret, _SELF, rnd), length, bits)
            continue
        row = int(np.searchsorted(graph.u1, owner))
        if len(secret) != KEY or crypto.public_key(secret) != public[row].tobytes():
            raise RoundAborted(f"client {owner}'s mask key does not reconstruct")
        key = crypto.private_key(secret)
        for u in survivors.intersection(graph.neighbours(owner).tolist()):
            peer = public[int(np.searchsorted(graph.u1, u))].tobytes()
            mask = crypto.expand(crypto.agree(key, peer, _MASK, rnd), length, bits)
            if u < owner:  # what survivor u added for the pair (u, owner)
                total += mask
            else:
                total -= mask
    return total
