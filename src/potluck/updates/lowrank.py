"""Low-rank uploads: PowerSGD (Vogels, Karimireddy, Jaggi 2019, "PowerSGD: Practical
Low-Rank Gradient Compression for Distributed Optimization", NeurIPS), adapted to federated
learning, where each client uploads once per round.

Each parameter tensor of ``e = delta + residual`` is viewed as a matrix ``M`` (``n x m``: its
first dimension by the product of the rest, so conv kernels too). The client runs one step of
power (subspace) iteration from its previous ``Q`` (``m x r``): ``P = M Q``, ``P`` made
orthonormal (reduced QR), ``Q = M^T P``, and sends ``P`` and ``Q``; the server decodes
``P Q^T``, the projection of ``M`` onto the span of ``P``. **Error feedback** keeps what the
compression lost, ``residual = M - P Q^T``, as client state and adds it to the next delta
(the paper's Algorithm 2). **Warm start** keeps ``Q`` as client state for the client's next
round, so the power iteration continues across rounds (the paper's reuse of the previous
``Q``) and ``P Q^T`` converges to the best rank-``r`` approximation of a steady ``M``. A
tensor is compressed only where ``r (n + m) < n m`` (so never 1-D tensors such as biases,
nor a matrix with ``min(n, m) <= r``): the others are sent as they are, as the paper does,
and the encoding is never larger than the raw update.

The message holds one float32 ``delta``: in the model's parameter order, each compressed
tensor's ``P`` (row-major ``n x r``) then ``Q`` (``m x r``), or the tensor's raw values. Its
length follows from the server's own ``ParamSpec`` and ``rank``, never from the client.

Example:
    >>> import torch
    >>> from potluck.core.message import Message
    >>> from potluck.core.params import ParamSpec
    >>> from potluck.core.parts import part_context
    >>> low = PowerSGD(rank=1).bind(ParamSpec(("w", "b"), ((4, 4), (2,))))
    >>> ctx = part_context(0, 1, "transforms.0.powersgd", client=0)
    >>> w = torch.outer(torch.tensor([1.0, 2.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 3.0, 1.0]))
    >>> delta = torch.cat([w.reshape(-1), torch.tensor([0.5, -0.5])])
    >>> sent, state = low.encode(Message({"delta": delta}), {}, ctx)
    >>> sent.nbytes  # P (4 x 1) and Q (4 x 1) of w, the 2 biases: 10 float32, not 18
    40
    >>> out = low.decode(sent, ctx).arrays["delta"]
    >>> bool(torch.allclose(out, delta, atol=1e-5)), sorted(state)  # a rank-1 w: exact
    (True, ['q', 'residual'])
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from math import prod
from typing import ClassVar

import torch

from potluck.core.message import Message, MessageError
from potluck.core.params import ParamSpec
from potluck.core.parts import Context, Need, State
from potluck.core.registry import register
from potluck.updates.base import Transform


@dataclass(frozen=True)
class Block:
    """One parameter tensor viewed as an ``n x m`` matrix, and whether it is sent as its
    rank-``rank`` factors (``low_rank``) or as it is.

    Example:
        >>> Block.of((64, 32, 5, 5), 2), Block.of((64,), 2).sent
        (Block(n=64, m=800, rank=2, low_rank=True), 64)
    """

    n: int
    m: int
    rank: int
    low_rank: bool

    @classmethod
    def of(cls, shape: tuple[int, ...], rank: int) -> Block:
        n, m = (shape[0], prod(shape[1:])) if shape else (1, 1)
        return cls(n, m, rank, rank * (n + m) < n * m)

    @property
    def numel(self) -> int:
        return self.n * self.m

    @property
    def q_size(self) -> int:
        """Length of this tensor's warm-start ``Q`` (0 if sent raw)."""
        return self.m * self.rank if self.low_rank else 0

    @property
    def sent(self) -> int:
        """float32 values this tensor takes in the message: ``r (n + m)`` or ``n m``."""
        return self.rank * (self.n + self.m) if self.low_rank else self.numel


def blocks(spec: ParamSpec, rank: int) -> tuple[Block, ...]:
    """The matrix view of each of ``spec``'s tensors, in order.

    Example:
        >>> [b.sent for b in blocks(ParamSpec(("w", "b"), ((10, 64), (10,))), 2)]
        [148, 10]
    """
    return tuple(Block.of(shape, rank) for shape in spec.shapes)


@register("transform", "powersgd")
@dataclass(frozen=True)
class PowerSGD(Transform):
    """Rank-``rank`` PowerSGD compression of each parameter tensor of the delta, one power
    iteration step per upload, with error feedback (``error_feedback``, client state
    ``residual``) and the previous round's ``Q`` as the start (``warm_start``, client state
    ``q``: every compressed tensor's ``Q``, flat). Without a stored ``Q`` (a client's first
    upload, or ``warm_start = false``) the start is drawn i.i.d. standard normal from the
    part's stream for the round and the client.

    Bytes up: ``4 r (n + m)`` per compressed tensor, ``4 n m`` per other tensor.
    """

    rank: int = 2
    error_feedback: bool = True
    warm_start: bool = True
    layout: tuple[Block, ...] = field(default=(), init=False, compare=False, repr=False)
    needs: ClassVar[frozenset[str]] = frozenset({Need.LAST_TRANSFORM})
    # deployed, a site keeps its residual (and warm start) to itself: it never travels
    site_state: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"powersgd.rank must be an integer >= 1, got {self.rank!r}")

    def bind(self, spec: ParamSpec) -> PowerSGD:
        bound = replace(self)
        object.__setattr__(bound, "layout", blocks(spec, self.rank))
        return bound

    @property
    def client_state(self) -> dict[str, str]:
        """Names and dtypes of the client state (none with both options off)."""
        kept = {"q": self.warm_start, "residual": self.error_feedback}
        return {name: "float32" for name, on in kept.items() if on}

    def client_state_shapes(self, spec: ParamSpec) -> dict[str, tuple[int, ...]]:
        layout = blocks(spec, self.rank)
        shapes = {"q": (sum(b.q_size for b in layout),), "residual": (spec.size,)}
        return {name: shapes[name] for name in self.client_state}

    def _layout(self) -> tuple[Block, ...]:
        if not self.layout:
            raise RuntimeError("powersgd must be bound to the model's ParamSpec first (bind)")
        return self.layout

    @property
    def size(self) -> int:
        """Length of the dense delta."""
        return sum(b.numel for b in self._layout())

    @property
    def encoded_size(self) -> int:
        """Length of the encoded ``delta``: the factors and the raw tensors."""
        return sum(b.sent for b in self._layout())

    @property
    def q_size(self) -> int:
        return sum(b.q_size for b in self._layout())

    def _start(self, state: State, ctx: Context) -> torch.Tensor:
        """The ``Q``'s power iteration starts from: the stored ones, or fresh Gaussians."""
        stored = state.get("q") if self.warm_start else None
        if stored is None:
            return torch.randn(self.q_size, generator=ctx.generator("q"))
        if stored.shape != (self.q_size,):
            raise ValueError(
                f"powersgd: client state 'q' has shape {tuple(stored.shape)}, not ({self.q_size},)"
            )
        return stored

    def encode(self, message: Message, state: State, ctx: Context) -> tuple[Message, State]:
        delta = message.arrays["delta"]
        if delta.shape != (self.size,):
            raise ValueError(f"powersgd: delta has shape {tuple(delta.shape)}, not ({self.size},)")
        e = delta + state["residual"] if self.error_feedback and "residual" in state else delta
        xs = torch.split(e, [b.numel for b in self.layout])
        starts = torch.split(self._start(state, ctx), [b.q_size for b in self.layout])
        sent, approx, qs = [], [], []
        for b, x, start in zip(self.layout, xs, starts, strict=True):
            if not b.low_rank:
                sent.append(x)
                approx.append(x)
                continue
            m = x.view(b.n, b.m)
            p = torch.linalg.qr(m @ start.view(b.m, b.rank)).Q
            q = m.T @ p
            sent += [p.reshape(-1), q.reshape(-1)]
            approx.append((p @ q.T).reshape(-1))
            qs.append(q.reshape(-1))
        after: State = {}
        if self.warm_start and qs:
            after["q"] = torch.cat(qs)
        if self.error_feedback:
            after["residual"] = e - torch.cat(approx)
        return replace(message, arrays={**message.arrays, "delta": torch.cat(sent)}), after

    def decode(self, message: Message, ctx: Context) -> Message:
        sent, length = message.arrays.get("delta"), self.encoded_size
        if not isinstance(sent, torch.Tensor) or sent.dtype != torch.float32:
            got = sent.dtype if isinstance(sent, torch.Tensor) else type(sent).__name__
            raise MessageError(f"powersgd: 'delta' must be the float32 factors, got {got}")
        if sent.shape != (length,):
            raise MessageError(
                f"powersgd: 'delta' must hold {length} values (each tensor's P and Q of rank "
                f"{self.rank}, or its raw values), got shape {tuple(sent.shape)}"
            )
        if not bool(torch.isfinite(sent).all()):
            raise MessageError("powersgd: 'delta' contains NaN or Inf")
        dense = []
        for b, x in zip(self.layout, torch.split(sent, [b.sent for b in self.layout]), strict=True):
            if b.low_rank:
                p, q = x[: b.n * b.rank].view(b.n, b.rank), x[b.n * b.rank :].view(b.m, b.rank)
                x = (p @ q.T).reshape(-1)
            dense.append(x)
        delta = torch.cat(dense)
        if not bool(torch.isfinite(delta).all()):
            raise MessageError("powersgd: the decoded delta P Q^T overflows float32")
        return replace(message, arrays={**message.arrays, "delta": delta})
