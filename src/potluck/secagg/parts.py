"""Secure aggregation as two parts of an algorithm: the ``SecAgg`` transform (its client half
masks the update, its server half runs the protocol's stages and unmasks the sum) and the
``SecureSum`` aggregator (the sum of the masked updates modulo ``2^bits``, nothing else).

The stages map onto a round (``potluck.secagg.protocol`` has the protocol itself):

========================  ==========================================================
round loop                SecAgg+
========================  ==========================================================
``before_train``          stage ``advertise`` (keys), the graph, stage ``share``
                          (encrypted shares), routed to the receivers' inboxes
``train``                 local training; ``encode``: fixed-point encoding and masks
                          (the masked input); ``SecureSum`` adds them up
``after_train``           stage ``unmask``: the secrets of survivors and dropouts
                          reconstructed, their masks summed into the server state
``decode_aggregate``      the masks removed, the weighted mean decoded
========================  ==========================================================

Each client's keys, seed and received shares live only in its own client state, which the
round loop keeps between the round's stages and never stores (``secret_state``); the
server half sees only the stages' answers and the masked inputs. A member may drop out
before any stage (``dropout`` simulates it, drawn from the member's own stream). When fewer
than ``t`` holders of a needed secret remain the round aborts (``RoundAborted``): the model
does not move and the run goes on. Clients withhold their data size and training loss (the
weights travel inside the sum), so ``train_loss`` is not reported.

The fixed-point settings (``clip_range``, ``quantization_bits``, ``bits``, ``max_weight``)
are described in ``potluck.secagg.encoding``; a cohort whose sum could overflow the modulus
is refused before its round, naming the setting to change.

Example:
    >>> from potluck.algorithms import fedavg
    >>> algo = fedavg(clients_per_round=10, transforms=(SecAgg(),), aggregator=SecureSum())
    >>> [ns for ns, _ in algo.parts()][3:5]
    ['transforms.0.secagg', 'aggregator']
    >>> fedavg(transforms=(SecAgg(),))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: algorithm 'fedavg' cannot run: transforms.0.secagg (SecAgg) needs the updates...
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch

from potluck.core.message import Message
from potluck.core.params import ParamSpec
from potluck.core.parts import Context, Need, RoundAborted, State
from potluck.core.registry import register
from potluck.secagg import protocol
from potluck.secagg.crypto import DTYPES
from potluck.secagg.encoding import SIGNED, Encoding, FixedPoint
from potluck.secagg.graph import degree, harary
from potluck.updates.base import Transform

STAGES = ("advertise", "share", "masked_input", "unmask")  # where a member may drop out
# the secret each stage needs from the one before (a deployed site that lost its secrets,
# restarted mid-round, has none of them and drops out)
_NEEDS = {"share": "c_sk", "masked_input": "b", "unmask": "senders"}
_TORCH = {32: torch.int32, 64: torch.int64}


@register("transform", "secagg")
@dataclass(frozen=True)
class SecAgg(Transform):
    """SecAgg+ (Bell et al. 2020) with ``neighbours`` per client (``"log"``: about
    ``log2 n``; ``"all"``: SecAgg, Bonawitz et al. 2017) and a ``threshold`` of shares (a
    fraction of the neighbours, or a count); the fixed-point encoding's ``clip_range``,
    ``quantization_bits``, modulus ``2^bits`` (32 or 64) and ``max_weight``; ``dropout``:
    each member's chance of leaving before each stage (simulation)."""

    neighbours: int | str = "log"
    threshold: int | float = 0.5
    clip_range: float = 1.0
    quantization_bits: int = 20
    bits: int = 32
    max_weight: float = 1000.0
    dropout: float = 0.0
    size: int = field(default=0, init=False, compare=False, repr=False)  # the model's d
    secret_state: ClassVar[bool] = True
    client_state: ClassVar[dict[str, str]] = {
        "c_sk": "uint8", "s_sk": "uint8", "b": "uint8", "neighbours": "int64", "c_pk": "uint8",
        "s_pk": "uint8", "threshold": "int64", "senders": "int64", "ciphertexts": "uint8",
    }  # fmt: skip
    needs: ClassVar[frozenset[str]] = frozenset(
        {Need.MODULAR_SUM, Need.ONLY_THE_DELTA, Need.LAST_TRANSFORM}
    )
    gives: ClassVar[frozenset[str]] = frozenset({Need.ONLY_THE_SUM, Need.INTEGER_UPDATES})

    def __post_init__(self) -> None:
        n = self.neighbours
        if isinstance(n, bool) or not (n in ("log", "all") or (isinstance(n, int) and n >= 1)):
            raise ValueError(f"neighbours must be 'log', 'all' or a count >= 1, got {n!r}")
        t = self.threshold
        if isinstance(t, bool) or not (
            (isinstance(t, int) and t >= 1) or (isinstance(t, float) and 0 < t <= 1)
        ):
            raise ValueError(
                f"threshold must be a fraction of the neighbours in (0, 1] or a count >= 1, "
                f"got {t!r}"
            )
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            raise ValueError(f"clip_range must be a finite number > 0, got {self.clip_range}")
        if self.bits not in DTYPES:
            raise ValueError(f"bits must be 32 or 64, got {self.bits}")
        if not 2 <= self.quantization_bits < self.bits:
            raise ValueError(
                f"quantization_bits must be in [2, bits = {self.bits}), got "
                f"{self.quantization_bits}"
            )
        if not (math.isfinite(self.max_weight) and self.max_weight > 0):
            raise ValueError(f"max_weight must be a finite number > 0, got {self.max_weight}")
        if not 0 <= self.dropout <= 1:
            raise ValueError(f"dropout must be in [0, 1], got {self.dropout}")

    def encoding(self, where: str = "secagg") -> Encoding:
        """The fixed-point encoding of the updates (``where`` names it in errors)."""
        return FixedPoint(
            self.clip_range, self.quantization_bits, self.bits, self.max_weight, where
        )

    def threshold_for(self, k: int) -> int:
        """``t``: the shares that rebuild a secret of a client with ``k`` neighbours (a
        fraction of them, at least 1, or the count given)."""
        if isinstance(self.threshold, float):
            return max(1, math.ceil(self.threshold * k))
        return self.threshold

    def check_cohort(self, n: int, where: str = "secagg") -> int:
        """Refuse settings that cannot work for a cohort of ``n`` (the sum could overflow; a
        threshold count above the neighbours); the number of neighbours ``k``."""
        self.encoding(where).check_capacity(n)
        k = degree(n, self.neighbours)
        if isinstance(self.threshold, int) and self.threshold > k:
            raise ValueError(
                f"{where}: threshold {self.threshold} is above the {k} neighbours of each of "
                f"{n} clients, so no secret could be rebuilt: lower threshold or raise "
                "neighbours"
            )
        return k

    def bind(self, spec: ParamSpec) -> SecAgg:
        bound = replace(self)
        object.__setattr__(bound, "size", spec.size)
        return bound

    def encoded_delta(self, size: int) -> tuple[int, torch.dtype]:
        """The masked input: ``size + 2`` integers modulo ``2^bits`` (with weight, count)."""
        return size + 2, _TORCH[self.bits]

    # ---- the client's half -------------------------------------------------------------

    def _drops(self, ctx: Context, stage: str, state: State) -> bool:
        """Whether the member leaves before ``stage``: it lost the secrets the stage needs,
        or (simulation) the ``dropout`` draw says so."""
        if stage in _NEEDS and _NEEDS[stage] not in state:
            return True
        return self.dropout > 0 and float(ctx.rng("dropout", stage).random()) < self.dropout

    def client_stage(
        self, stage: str, shared: Message, state: State, ctx: Context
    ) -> tuple[Message | None, State]:
        if stage not in STAGES or stage == "masked_input":
            raise ValueError(f"SecAgg has no client stage {stage!r}")
        if self._drops(ctx, stage, state):
            return None, {}
        if stage == "advertise":
            return protocol.advertise()
        if stage == "share":
            return protocol.share_keys(shared, state, ctx)
        return protocol.unmask(shared, state, ctx), {}

    def encode(self, message: Message, state: State, ctx: Context) -> tuple[Message | None, State]:
        if self._drops(ctx, "masked_input", state):
            return None, {}
        return protocol.mask_input(message, state, ctx, self.encoding(str(ctx.stream[0])))

    # ---- the server's half -------------------------------------------------------------

    def before_train(self, stages: Any, state: State, ctx: Context) -> State:
        """Advertise and share keys; route the shares to their receivers' inboxes."""
        ns = str(ctx.stream[0])
        k = self.check_cohort(len(stages.members), ns)
        keys = stages.run("advertise")
        stages.report("advertised", len(keys))
        if not keys:
            return {}
        for c, answer in keys.items():
            for name in ("c_pk", "s_pk"):
                protocol.array(answer, name, torch.uint8, (protocol.KEY,), _who(ns, c, "keys"))
        u1 = np.array(sorted(keys), dtype=np.int64)
        graph = protocol.Graph(u1, harary(u1, k, ctx.rng("graph")))
        k = graph.table.shape[1]  # fewer than asked if few advertised
        t = self.threshold_for(k)
        stages.report("neighbours", k)
        stages.report("threshold", t)
        if t > k:
            raise RoundAborted(
                f"{ns}: {len(u1)} clients advertised keys, so each has {k} neighbours, fewer "
                f"than the threshold t = {t}: no secret could be rebuilt"
            )
        payloads, s_pk = protocol.key_payloads(graph, keys)
        answers = stages.run("share", Message(scalars={"threshold": t}), payloads)
        for c, answer in answers.items():
            who = _who(ns, c, "shares")
            m = len(graph.neighbours(c))
            protocol.array(answer, "ciphertexts", torch.uint8, (m, protocol.BOX_BYTES), who)
            protocol.array(answer, "b_hash", torch.uint8, (protocol.KEY,), who)
        for c, inbox in protocol.route_shares(graph, answers).items():
            stages.leave(c, inbox)
        u2 = sorted(answers)
        stages.report("shared", len(u2))
        b_hash = [answers[c].arrays["b_hash"] for c in u2]
        return {
            "u1": torch.from_numpy(u1),
            "table": torch.from_numpy(graph.table),
            "s_pk": s_pk,
            "u2": torch.tensor(u2, dtype=torch.int64),
            "b_hash": torch.stack(b_hash) if b_hash else torch.zeros(0, 32, dtype=torch.uint8),
            "threshold": torch.tensor(t, dtype=torch.int64),
        }

    def after_train(self, stages: Any, state: State, ctx: Context) -> State:
        """Unmask: the secrets of the survivors and of the dropped clients reconstructed, the
        masks they left in the sum added up (the server state ``decode_aggregate`` uses)."""
        ns = str(ctx.stream[0])
        u3 = [int(c) for c in stages.members]
        stages.report("masked", len(u3))
        if not u3:
            return {}
        graph = protocol.Graph(state["u1"].numpy(), state["table"].numpy())
        u2, t = state["u2"].tolist(), int(state["threshold"])
        secrets = protocol.needed(graph, u2, u3)
        why = protocol.short_of_holders(graph, secrets, set(u3), t, "the survivors")
        if why:
            raise RoundAborted(f"{ns}: {why}; no share was revealed")
        dropped = sorted(set(u2) - set(u3))
        survivors = Message({"survivors": protocol._ids(u3), "dropped": protocol._ids(dropped)})
        answers = stages.run("unmask", survivors)
        stages.report("unmasked", len(answers))
        why = protocol.short_of_holders(graph, secrets, set(answers), t, "the responders")
        if why:
            raise RoundAborted(f"{ns}: {why}")
        shares = protocol.collect_shares(graph, answers, u2, ctx.round)
        commitments = {c: protocol._bytes(h) for c, h in zip(u2, state["b_hash"], strict=True)}
        if not self.size:
            raise RuntimeError("SecAgg must be bound to a model's ParamSpec (bind)")
        length = self.encoded_delta(self.size)[0]
        total = protocol.mask_total(
            graph, secrets, shares, commitments, state["s_pk"], set(u3), t, length,
            ctx.round, self.bits,
        )  # fmt: skip
        return {
            "mask": torch.from_numpy(total.view(SIGNED[self.bits])),
            "survivors": torch.tensor(len(u3), dtype=torch.int64),
        }

    def unmasked(self, aggregate: torch.Tensor, state: State) -> np.ndarray:
        """The sum of the survivors' encoded inputs (modulo ``2^bits``): ``aggregate`` less
        the masks; refused unless it counts exactly the survivors."""
        if "mask" not in state:
            raise RoundAborted("secagg: no unmasking for this aggregate (no masked input)")
        dtype = DTYPES[self.bits]
        total = aggregate.numpy().view(dtype) - state["mask"].numpy().view(dtype)
        count, expected = int(total[-1]), int(state["survivors"])
        if count != expected:
            raise RoundAborted(
                f"secagg: the unmasked sum counts {count} inputs, not the {expected} survivors "
                "(an update of a survivor was not aggregated)"
            )
        return total

    def decode_aggregate(
        self, aggregate: torch.Tensor, state: State, ctx: Context
    ) -> tuple[torch.Tensor, State]:
        total = self.unmasked(aggregate, state)
        try:
            mean = self.encoding(str(ctx.stream[0])).decode(total)
        except ValueError as exc:
            raise RoundAborted(f"secagg: {exc}") from None
        return torch.from_numpy(mean.astype(np.float32)), {}


@register("aggregator", "secagg_sum")
@dataclass(frozen=True)
class SecureSum:
    """The sum of the masked updates modulo ``2^bits`` of their integer type (int32: 32,
    int64: 64); the weights are inside the sum. With ``SecAgg`` only.

    Example:
        >>> from potluck.core.parts import part_context
        >>> x = torch.tensor([[2**31 - 1, 5], [3, -7]], dtype=torch.int32)
        >>> SecureSum().aggregate(x, torch.ones(2), {}, part_context(0, 1, "aggregator"))[0]
        tensor([-2147483646,          -2], dtype=torch.int32)
    """

    needs: ClassVar[frozenset[str]] = frozenset({Need.INTEGER_UPDATES})
    gives: ClassVar[frozenset[str]] = frozenset({Need.MODULAR_SUM})

    def init(self, w: torch.Tensor) -> State:
        return {}

    def aggregate(
        self, deltas: torch.Tensor, weights: torch.Tensor, state: State, ctx: Context
    ) -> tuple[torch.Tensor, State]:
        bits = {torch.int32: 32, torch.int64: 64}.get(deltas.dtype)
        if bits is None or deltas.dim() != 2:
            raise ValueError(
                f"secagg_sum adds (K, d) int32 or int64 masked updates, got {deltas.dtype} "
                f"of shape {tuple(deltas.shape)}"
            )
        unsigned = DTYPES[bits]
        total = deltas.numpy().view(unsigned).sum(axis=0, dtype=unsigned)
        return torch.from_numpy(total.view(SIGNED[bits])), state


def _who(ns: str, client: int, what: str) -> str:
    return f"{ns}: the {what} of client {client}"
