"""FetchSGD: count-sketched updates, with momentum and error accumulation on the server in
sketch space (Rothchild, Panda, Ullah, Ivkin, Stoica, Braverman, Gonzalez, Arora 2020,
"FetchSGD: Communication-Efficient Federated Learning with Sketching", ICML).

Each client uploads the count sketch ``S(delta)`` (``rows x cols`` floats) and keeps no
state. A count sketch is linear, so the weighted mean of the sketches the aggregator forms is
the sketch of the mean update. On the server, per round (the paper's Algorithm 1, with the
clients' deltas in place of gradients, so the learning rate is theirs):

    S_u = rho * S_u + S(mean delta)        momentum, in sketch space
    S_e = S_e + lr * S_u                   error accumulation, in sketch space
    Delta = top_k(U(S_e))                  the k largest coordinates the sketch estimates
    S_e = S_e - S(Delta); S_u = 0 in the buckets of Delta's coordinates

``U`` estimates each coordinate as the median over the rows of its signed bucket. ``Delta``
is what the server optimizer applies. The deltas are already steps (the clients' learning
rate is in them), so the defaults ``momentum = 0.9, lr = 0.1`` keep the steady-state step at
``lr / (1 - momentum) = 1`` delta; ``lr = 1`` with momentum 0.9 would take ten. The hashes
are drawn once per run from the part's stream (every client and the server use the same
ones). A sketch recovers heavy coordinates: it needs ``cols`` well above the ``k`` it
unsketches, and deltas whose mass sits in few coordinates.

Example:
    >>> from potluck.core.params import ParamSpec
    >>> from potluck.core.parts import part_context
    >>> f = FetchSGD(rows=3, cols=64, top_k=0.02, lr=1.0).bind(ParamSpec(("w",), ((1000,),)))
    >>> ctx = part_context(0, 1, "transforms.0.fetchsgd", client=0)
    >>> delta = torch.zeros(1000); delta[[3, 500]] = torch.tensor([2.0, -1.0])
    >>> sent, _ = f.encode(Message({"delta": delta}), {}, ctx)
    >>> sent.arrays["delta"].shape  # 3 rows of 64 buckets: 5 times fewer floats
    torch.Size([192])
    >>> state = f.server_init(torch.zeros(1000))
    >>> step, state = f.decode_aggregate(sent.arrays["delta"], state, ctx)
    >>> step.nonzero().flatten().tolist(), step[[3, 500]].tolist()
    ([3, 500], [2.0, -1.0])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch

from potluck.core.message import Message
from potluck.core.params import ParamSpec
from potluck.core.parts import Context, Need, State
from potluck.core.registry import register
from potluck.core.seeding import Seeds
from potluck.updates.base import Transform


@register("transform", "fetchsgd")
@dataclass(frozen=True)
class FetchSGD(Transform):
    """Count-sketch uploads (``rows`` x ``cols``), server momentum ``momentum``, step ``lr``
    and error accumulation in sketch space, ``top_k`` (a fraction of the coordinates) unsketched per
    round. Needs the weighted mean as the aggregator (linear: the mean of the sketches is the
    sketch of the mean) and to be the last transform."""

    rows: int = 5
    cols: int = 10_000
    top_k: float = 0.01
    momentum: float = 0.9
    lr: float = 0.1
    size: int = field(default=0, init=False, compare=False, repr=False)
    _hashes: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )
    needs: ClassVar[frozenset[str]] = frozenset({Need.LAST_TRANSFORM, Need.LINEAR_AGGREGATE})

    def __post_init__(self) -> None:
        if self.rows < 1 or self.rows % 2 == 0:
            raise ValueError(f"fetchsgd.rows must be odd and >= 1 (a median), got {self.rows}")
        if self.cols < 1:
            raise ValueError(f"fetchsgd.cols must be >= 1, got {self.cols}")
        if not 0 < self.top_k <= 1:
            raise ValueError(f"fetchsgd.top_k must be in (0, 1], got {self.top_k}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"fetchsgd.momentum must be in [0, 1), got {self.momentum}")
        if not self.lr > 0:
            raise ValueError(f"fetchsgd.lr must be > 0, got {self.lr}")

    def bind(self, spec: ParamSpec) -> FetchSGD:
        if self.rows * self.cols >= spec.size:
            raise ValueError(
                f"fetchsgd: a sketch of {self.rows} x {self.cols} = {self.rows * self.cols} "
                f"floats is no smaller than the update ({spec.size}): lower rows or cols"
            )
        bound = replace(self)
        object.__setattr__(bound, "size", spec.size)
        object.__setattr__(bound, "_hashes", {})
        if bound.k >= self.cols:
            raise ValueError(
                f"fetchsgd: top_k = {self.top_k} unsketches k = {bound.k} of the update's "
                f"{spec.size} coordinates from rows of {self.cols} buckets: a count sketch "
                "recovers fewer heavy coordinates than it has buckets (keep cols several "
                "times k): raise cols or lower top_k"
            )
        return bound

    def encoded_delta(self, size: int) -> tuple[int, torch.dtype]:
        """The upload: ``rows * cols`` float32 buckets."""
        return self.rows * self.cols, torch.float32

    @property
    def k(self) -> int:
        return max(1, math.ceil(self.top_k * self.size))

    def hashes(self, seed: int, ns: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Each coordinate's bucket in each row, as flat indices ``row * cols + bucket``
        (``rows x size``), and its sign; drawn once per run and kept."""
        if seed not in self._hashes:
            g = Seeds(seed).torch(ns, "hashes")
            buckets = torch.randint(0, self.cols, (self.rows, self.size), generator=g)
            offsets = torch.arange(self.rows).unsqueeze(1) * self.cols
            signs = 1.0 - 2.0 * torch.randint(0, 2, (self.rows, self.size), generator=g).float()
            self._hashes[seed] = (buckets + offsets, signs)
        return self._hashes[seed]

    def sketch(
        self, x: torch.Tensor, ctx: Context, where: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The count sketch of ``x`` (of the coordinates ``where`` only, if given)."""
        index, signs = self.hashes(ctx.seed, str(ctx.stream[0]))
        if where is not None:
            index, signs = index[:, where], signs[:, where]
        table = torch.zeros(self.rows * self.cols, dtype=torch.float32)
        return table.index_add_(0, index.reshape(-1), (signs * x).reshape(-1))

    def unsketch(self, table: torch.Tensor, ctx: Context) -> torch.Tensor:
        """Every coordinate's estimate: the median over the rows of its signed bucket."""
        index, signs = self.hashes(ctx.seed, str(ctx.stream[0]))
        return (signs * table[index]).median(dim=0).values

    def encode(self, message: Message, state: State, ctx: Context) -> tuple[Message, State]:
        table = self.sketch(message.arrays["delta"], ctx)
        return replace(message, arrays={**message.arrays, "delta": table}), state

    def server_init(self, w: torch.Tensor) -> State:
        zeros = torch.zeros(self.rows * self.cols, dtype=torch.float32)
        return {"momentum": zeros, "error": zeros.clone()}

    def decode_aggregate(
        self, aggregate: torch.Tensor, state: State, ctx: Context
    ) -> tuple[torch.Tensor, State]:
        s_u = self.momentum * state["momentum"] + aggregate
        s_e = state["error"] + self.lr * s_u
        estimate = self.unsketch(s_e, ctx)
        top = torch.topk(estimate.abs(), self.k).indices.sort().values
        step = torch.zeros(self.size, dtype=torch.float32)
        step[top] = estimate[top]
        s_e = s_e - self.sketch(step[top], ctx, where=top)
        index, _ = self.hashes(ctx.seed, str(ctx.stream[0]))
        s_u = s_u.clone()
        s_u[index[:, top].reshape(-1)] = 0.0
        return step, {"momentum": s_u, "error": s_e}
