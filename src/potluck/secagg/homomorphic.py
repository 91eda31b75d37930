"""Homomorphic aggregation for cross-silo federations: the ``CKKS`` transform (its client half
encrypts the weighted update under the round's public key; its server half runs the key and
decryption stages and decodes the mean) and the ``CKKSSum`` aggregator (adds the ciphertexts,
nothing else). CKKS (Cheon et al. 2017) through TenSEAL (``potluck.secagg.ckks``; the
optional extra ``potluck[he]``).

The stages map onto a round:

========================  ==========================================================
round loop                CKKS
========================  ==========================================================
``before_train``          stage ``keys``: the key holder makes a fresh key pair and
                          sends the public context; the server leaves it for every
                          member and tells the aggregator
``train``                 ``encode``: clip, weight, encrypt (``N/2`` slots per
                          ciphertext); ``decode`` checks each row's key fingerprint
``aggregate``             ``CKKSSum`` adds the ciphertexts under the public context
``after_aggregate``       stage ``decrypt``: the key holder decrypts the sum, checks its
                          count and adds flooding noise
``decode_aggregate``      the weighted mean ``clip * sum_j / sum_weight``
========================  ==========================================================

Trust model: the *key holder* is one client (``key_holder``, else the round's lowest-numbered
member), never the server. Each round it makes a fresh key pair, sends the server the public
key only, keeps the secret key in its own client state for the round's stages (never stored,
never sent) and decrypts one ciphertext with it: the sum, and only if it counts the
``contributors`` the server announced, at least ``min_clients``. The server holds the public
context, adds ciphertexts (IND-CPA secure under Ring-LWE) and learns the released sum. TenSEAL
(like SEAL) has no threshold or multiparty decryption, and its key generation cannot be
seeded, so the key is not shared among clients: a server that colludes with the key holder, or
one that sends it an individual ciphertext to decrypt instead of the sum, learns an update;
the server is honest-but-curious and does not collude. A client that encrypts under another
key is refused by name if it says so (the row's fingerprint); one that lies makes the
decrypted count wrong and the round aborts. Released CKKS decryptions can reveal the secret
key (Li and Micciancio 2021, "On the Security of Homomorphic Encryption on Approximate
Numbers", EUROCRYPT), and with it every update of the round: the key holder adds Gaussian
noise of standard deviation ``flooding`` (per slot, from the OS's entropy) to what it
releases, far above the CKKS error (noise flooding, the mitigation of PALISADE / OpenFHE,
heuristic rather than the provable bound of Li, Micciancio, Schultz and Sorrell 2022).

No dropouts in SecAgg's sense: a member that leaves before uploading is not in the sum, which
is then the others' (no mask to remove); the key holder leaving aborts the round
(``RoundAborted``: the model does not move). Clients withhold their data size and loss, as
with SecAgg.

Example:
    >>> from potluck.algorithms import fedavg
    >>> algo = fedavg(clients_per_round=4, transforms=(CKKS(),), aggregator=CKKSSum())
    >>> [ns for ns, _ in algo.parts()][3:5]
    ['transforms.0.ckks', 'aggregator']
    >>> fedavg(transforms=(CKKS(),))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: algorithm 'fedavg' cannot run: transforms.0.ckks (CKKS) needs the ciphertexts...
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch

from potluck.core.message import Message, MessageError
from potluck.core.params import ParamSpec
from potluck.core.parts import Context, Need, RoundAborted, State
from potluck.core.registry import register
from potluck.secagg import ckks
from potluck.secagg.protocol import WITHHELD, array
from potluck.updates.base import Transform

_COUNT_SLACK = 0.25  # how far the decrypted count may be from an integer


@register("transform", "ckks")
@dataclass(frozen=True)
class CKKS(Transform):
    """CKKS homomorphic aggregation: ``key_holder`` (a client id; ``None``: each round's
    lowest-numbered member), ``clip_range`` and ``max_weight`` (each slot of an update,
    ``(w / max_weight) * clip(delta, -c, c) / c``, is in [-1, 1]), ``min_clients`` (the key
    holder decrypts no smaller sum), ``flooding`` (the standard deviation of the noise the key
    holder adds per slot), and the CKKS parameters (``potluck.secagg.ckks``)."""

    key_holder: int | None = None
    clip_range: float = 1.0
    max_weight: float = 1000.0
    min_clients: int = 2
    flooding: float = 2.0**-24
    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 60)
    scale_bits: int = 50
    size: int = field(default=0, init=False, compare=False, repr=False)  # the model's d
    secret_state: ClassVar[bool] = True
    client_state: ClassVar[dict[str, str]] = {"secret_context": "uint8", "decrypted": "int64"}
    needs: ClassVar[frozenset[str]] = frozenset(
        {Need.CIPHERTEXT_SUM, Need.ONLY_THE_DELTA, Need.LAST_TRANSFORM}
    )
    gives: ClassVar[frozenset[str]] = frozenset({Need.ONLY_THE_SUM, Need.CIPHERTEXT_UPDATES})

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff_mod_bit_sizes", tuple(self.coeff_mod_bit_sizes))
        if self.key_holder is not None and not self.key_holder >= 0:
            raise ValueError(f"key_holder must be a client id >= 0, got {self.key_holder}")
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            raise ValueError(f"clip_range must be a finite number > 0, got {self.clip_range}")
        if not (math.isfinite(self.max_weight) and self.max_weight > 0):
            raise ValueError(f"max_weight must be a finite number > 0, got {self.max_weight}")
        if self.min_clients < 1:
            raise ValueError(f"min_clients must be >= 1, got {self.min_clients}")
        if not (math.isfinite(self.flooding) and self.flooding > 0):
            raise ValueError(
                f"flooding must be a finite standard deviation > 0 (the raw decryption would "
                f"let the server recover the key), got {self.flooding}"
            )
        self.parameters().check()

    def parameters(self, where: str = "ckks") -> ckks.Parameters:
        return ckks.Parameters(
            self.poly_modulus_degree, self.coeff_mod_bit_sizes, self.scale_bits, where
        )

    def bind(self, spec: ParamSpec) -> CKKS:
        ckks.tenseal()  # the extra is missing: say so before the run starts
        bound = replace(self)
        object.__setattr__(bound, "size", spec.size)
        return bound

    @property
    def length(self) -> int:
        """The values a client encrypts: ``d`` weighted coordinates, the weight, a count."""
        if not self.size:
            raise RuntimeError("CKKS must be bound to a model's ParamSpec (bind)")
        return self.size + 2

    def encoded_delta(self, size: int) -> tuple[int, torch.dtype]:
        """The upload: a row of ciphertexts (``potluck.secagg.ckks``) as bytes."""
        return self.parameters().row_length(size + 2), torch.uint8

    def slots(self, delta: np.ndarray, weight: float, where: str) -> np.ndarray:
        """The ``d + 2`` values a client encrypts: ``a * clip(delta, -c, c) / c`` with
        ``a = weight / max_weight``, then ``a`` and a count of 1.

        Example:
            >>> CKKS(clip_range=2.0, max_weight=10.0).slots(np.array([1.0, -4.0]), 5.0, "x")
            array([ 0.25, -0.5 ,  0.5 ,  1.  ])
        """
        if not (math.isfinite(weight) and 0 <= weight <= self.max_weight):
            raise ValueError(
                f"{where}: an aggregation weight must be in [0, max_weight = "
                f"{self.max_weight:g}], got {weight:g}: raise max_weight"
            )
        a = weight / self.max_weight
        clipped = np.clip(delta.astype(np.float64), -self.clip_range, self.clip_range)
        return np.concatenate([clipped * (a / self.clip_range), [a, 1.0]])

    # ---- the client's half -------------------------------------------------------------

    def client_stage(
        self, stage: str, shared: Message, state: State, ctx: Context
    ) -> tuple[Message | None, State]:
        if stage == "keys":
            if ctx.client != int(shared.scalars.get("key_holder", -1)):
                return Message(), {}
            secret, public = ckks.keygen(self.parameters())
            answer = Message({"public_context": _tensor(public)})
            return answer, {"secret_context": _tensor(secret)}
        if stage == "decrypt":
            if "secret_context" in state:
                return self._decrypt(shared, state, ctx)
            if ctx.inbox is not None and "sum" in ctx.inbox.arrays:
                return None, {}  # the key holder lost its key (a site restarted mid-round)
            return Message(), {}
        raise ValueError(f"CKKS has no client stage {stage!r}")

    def _decrypt(self, shared: Message, state: State, ctx: Context) -> tuple[Message, State]:
        """The key holder's one decryption of the round: the sum, if it counts the announced
        ``contributors`` (at least ``min_clients``), released with flooding noise."""
        ns, who = str(ctx.stream[0]), f"the key holder, client {ctx.client}"
        if "decrypted" in state:
            raise MessageError(f"{ns}: {who}, decrypts one sum per key")
        m = int(shared.scalars.get("contributors", 0))
        if m < self.min_clients:
            why = (
                f"a sum of {m} updates, fewer than min_clients = {self.min_clients}, would "
                "reveal an update"
            )
            return _refusal(why), state
        params = self.parameters(ns)
        context = ckks.load(_bytes(state["secret_context"]), params, who, secret=True)
        length = params.row_length(self.length)
        row = array(ctx.inbox or Message(), "sum", torch.uint8, (length,), who).numpy()
        z = ckks.decrypt(context, row, self.length, who)
        done = {**state, "decrypted": torch.tensor(1, dtype=torch.int64)}
        if abs(z[-1] - m) > _COUNT_SLACK:
            why = (
                f"the sum counts {z[-1]:.4g} updates, not the {m} announced (an update was "
                "not encrypted under this round's key)"
            )
            return _refusal(why), done
        released = z + ckks.gaussian(z.size, self.flooding)
        return Message({"sum": torch.from_numpy(released)}), done

    def encode(self, message: Message, state: State, ctx: Context) -> tuple[Message | None, State]:
        ns, who = str(ctx.stream[0]), f"the ckks encoding of client {ctx.client}"
        inbox = ctx.inbox or Message()
        public = array(inbox, "public_context", torch.uint8, (-1,), who)
        key = array(inbox, "fingerprint", torch.uint8, (32,), who)
        params = self.parameters(ns)
        context = ckks.load(_bytes(public), params, who)
        if ckks.fingerprint(_bytes(public)) != _bytes(key):
            raise MessageError(f"{who}: the public context does not match its fingerprint")
        weight = float(message.scalars.get("weight", 0.0))
        values = self.slots(message.arrays["delta"].numpy(), weight, ns)
        row = ckks.encrypt(context, values, params, _bytes(key))
        return Message({"delta": torch.from_numpy(row)}, WITHHELD), state

    # ---- the server's half -------------------------------------------------------------

    def before_train(self, stages: Any, state: State, ctx: Context) -> State:
        """The key holder's fresh public context, left for every member and the aggregator."""
        ns = str(ctx.stream[0])
        params = self.parameters(ns)
        members = [int(c) for c in stages.members]
        params.check_capacity(len(members))
        if not members:
            return {}
        holder = min(members) if self.key_holder is None else self.key_holder
        if holder not in members:
            raise RoundAborted(f"{ns}: the key holder, client {holder}, is not in the cohort")
        answers = stages.run("keys", Message(scalars={"key_holder": holder}))
        if holder not in answers:
            raise RoundAborted(f"{ns}: the key holder, client {holder}, sent no key")
        who = f"{ns}: the key holder, client {holder}"
        public = array(answers[holder], "public_context", torch.uint8, (-1,), who)
        ckks.load(_bytes(public), params, who)  # public, of these parameters
        key = _tensor(ckks.fingerprint(_bytes(public)))
        for c in stages.members:
            stages.leave(int(c), Message({"public_context": public, "fingerprint": key}))
        stages.tell_aggregator(Message({"public_context": public}))
        stages.report("key_holder", holder)
        return {"key_holder": torch.tensor(holder), "fingerprint": key}

    def decode(self, message: Message, ctx: Context) -> Message:
        """Refuse an update not encrypted under the round's key (its fingerprint), by name."""
        ns, who = str(ctx.stream[0]), f"update from client {ctx.client}"
        expected = (ctx.inbox or Message()).arrays.get("fingerprint")
        if expected is None:
            raise MessageError(f"{ns}: {who}: the client was given no key this round")
        row = array(message, "delta", torch.uint8, (-1,), who).numpy()
        key = ckks.unpack(row, f"{ns}: {who}").key
        if key != _bytes(expected):
            raise MessageError(
                f"{ns}: {who} is encrypted under another key or context (fingerprint "
                f"{key.hex()[:12]}, this round's is {_bytes(expected).hex()[:12]})"
            )
        return message

    def after_train(self, stages: Any, state: State, ctx: Context) -> State:
        """Those who uploaded are the sum's contributors; the key holder must be one of them
        (it decrypts next)."""
        if "key_holder" not in state:
            return state
        holder = int(state["key_holder"])
        members = [int(c) for c in stages.members]
        if holder not in members:
            raise RoundAborted(
                f"{ctx.stream[0]}: the key holder, client {holder}, left the round before "
                "the decryption"
            )
        stages.report("contributors", len(members))
        return {**state, "contributors": torch.tensor(len(members))}

    def after_aggregate(
        self, stages: Any, aggregate: torch.Tensor, state: State, ctx: Context
    ) -> State:
        """The key holder's decryption of the encrypted sum (and nothing else)."""
        ns = str(ctx.stream[0])
        if "contributors" not in state:
            raise RoundAborted(f"{ns}: no key for this aggregate")
        holder, m = int(state["key_holder"]), int(state["contributors"])
        shared = Message(scalars={"contributors": m})
        answers = stages.run("decrypt", shared, {holder: Message({"sum": aggregate})})
        answer = answers.get(holder)
        if answer is None:
            raise RoundAborted(f"{ns}: the key holder, client {holder}, did not decrypt")
        if "refused" in answer.scalars:
            raise RoundAborted(f"{ns}: the key holder refused: {answer.scalars['refused']}")
        who = f"{ns}: the key holder, client {holder}"
        total = array(answer, "sum", torch.float64, (self.length,), who)
        return {"sum": total, "contributors": state["contributors"]}

    def decode_aggregate(
        self, aggregate: torch.Tensor, state: State, ctx: Context
    ) -> tuple[torch.Tensor, State]:
        ns = str(ctx.stream[0])
        if "sum" not in state:
            raise RoundAborted(f"{ns}: no decrypted sum for this aggregate")
        z, m = state["sum"].numpy(), int(state["contributors"])
        if abs(z[-1] - m) > _COUNT_SLACK:
            raise RoundAborted(f"{ns}: the decrypted sum counts {z[-1]:.4g}, not {m} updates")
        if not z[-2] > 0:
            raise RoundAborted(f"{ns}: the summed weight is {z[-2]:.3g}: nothing to divide by")
        mean = z[:-2] * (self.clip_range / z[-2])
        return torch.from_numpy(mean.astype(np.float32)), {}


@register("aggregator", "ckks_sum")
@dataclass(frozen=True)
class CKKSSum:
    """The homomorphic sum of the round's CKKS ciphertexts, under the public context the
    ``ckks`` transform tells it (``ctx.inbox``); the weights are inside the sum. With
    ``CKKS`` only."""

    needs: ClassVar[frozenset[str]] = frozenset({Need.CIPHERTEXT_UPDATES})
    gives: ClassVar[frozenset[str]] = frozenset({Need.CIPHERTEXT_SUM})

    def init(self, w: torch.Tensor) -> State:
        return {}

    def aggregate(
        self, deltas: torch.Tensor, weights: torch.Tensor, state: State, ctx: Context
    ) -> tuple[torch.Tensor, State]:
        if deltas.dtype != torch.uint8 or deltas.dim() != 2:
            raise ValueError(
                f"ckks_sum adds (K, L) uint8 rows of ciphertexts, got {deltas.dtype} of shape "
                f"{tuple(deltas.shape)}"
            )
        public = (ctx.inbox or Message()).arrays.get("public_context")
        if public is None:
            raise ValueError("ckks_sum: no public context this round (the ckks transform tells it)")
        blob = _bytes(public)
        context = ckks.load(blob, None, "ckks_sum: the round's public context")
        total = ckks.add(context, deltas.numpy(), ckks.fingerprint(blob), "ckks_sum")
        return torch.from_numpy(total), state


def _tensor(blob: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(blob, dtype=np.uint8).copy())


def _bytes(t: torch.Tensor) -> bytes:
    return t.numpy().tobytes()


def _refusal(why: str) -> Message:
    return Message(scalars={"refused": why})
