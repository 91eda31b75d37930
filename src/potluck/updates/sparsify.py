"""Sparsified uploads with error feedback: top-k and random-k, and Deep Gradient
Compression's momentum correction.

Each client sends ``k = max(1, ceil(fraction * d))`` of the ``d`` coordinates of its delta:
the ``k`` largest in magnitude (``TopK``) or ``k`` drawn uniformly (``RandomK``). With error
feedback it keeps what it did not send as client state and adds it to its next delta:
``e = delta + residual``, send ``sparse(e)``, ``residual = e - sparse(e)`` (Stich, Cordonnier,
Jaggi 2018, "Sparsified SGD with Memory", NeurIPS: with the memory, k-sparsified SGD
converges at the rate of plain SGD). ``TopK(momentum=m)`` is Deep Gradient Compression's
momentum correction with momentum factor masking (Lin, Han, Mao, Wang, Dally 2018, "Deep
Gradient Compression", ICLR): ``u = m * u + delta``, ``v = v + u``, send the top-k of ``v``,
and zero ``u`` and ``v`` where it was sent; with ``m = 0`` that is plain error feedback.

The message holds the ``k`` kept values as the float32 ``delta`` and their coordinates as
``delta/index``, coded by ``potluck.updates.indices`` (about 8.1 bits an index at 1 %). The
server takes ``d`` from the model and ``k`` from its own settings, never from the client, and
puts the values back into a dense delta. ``RandomK`` draws its coordinates from the part's
stream for the round and the client (every engine and a resumed run draw the same); it sends
them anyway, so the server need not know the seed (it could redraw them and save the index
bytes, a saving left for later).

Example:
    >>> import torch
    >>> from potluck.core.message import Message
    >>> from potluck.core.params import ParamSpec
    >>> from potluck.core.parts import part_context
    >>> top = TopK(fraction=0.25).bind(ParamSpec(("w",), ((8,),)))
    >>> ctx = part_context(0, 1, "transforms.0.top_k", client=0)
    >>> delta = torch.tensor([0.1, -3.0, 0.2, 0.0, 2.0, 0.0, -0.1, 0.3])
    >>> sent, state = top.encode(Message({"delta": delta}), {}, ctx)
    >>> sent.arrays["delta"].tolist(), sent.nbytes  # 2 float32 values, a header and a bitmap byte
    ([-3.0, 2.0], 10)
    >>> top.decode(sent, ctx).arrays["delta"].tolist()
    [0.0, -3.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0]
    >>> [round(v, 6) for v in state["residual"].tolist()]
    [0.1, 0.0, 0.2, 0.0, 0.0, 0.0, -0.1, 0.3]
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import ClassVar, Self

import numpy as np
import torch

from potluck.core.message import Message, MessageError
from potluck.core.params import ParamSpec
from potluck.core.parts import Context, Need, State
from potluck.core.registry import register
from potluck.updates.base import Transform
from potluck.updates.indices import decode_indices, encode_indices

INDEX = "delta/index"  # the coded coordinates of the kept values, next to them


def kept(fraction: float, size: int) -> int:
    """``k = max(1, ceil(fraction * size))``, the fraction read as the decimal it is written
    as (so ``0.07`` of 100 is 7, not the 8 of its binary float's product).

    Example:
        >>> kept(0.07, 100), math.ceil(0.07 * 100), kept(0.01, 50), kept(1.0, 3)
        (7, 8, 1, 3)
    """
    return max(1, math.ceil(Fraction(repr(fraction)) * size))


@dataclass(frozen=True)
class Sparsifier(Transform, ABC):
    """What ``TopK`` and ``RandomK`` share: the bound size, error feedback, the message's
    coding and the server's hostile-input checks. A subclass picks the coordinates
    (``select``) and may accumulate its own way (``accumulate``)."""

    fraction: float = 0.01
    error_feedback: bool = True
    size: int = field(default=0, init=False, compare=False, repr=False)
    label: ClassVar[str] = "sparsify"
    needs: ClassVar[frozenset[str]] = frozenset({Need.LAST_TRANSFORM})
    # deployed, a site keeps its residual (and warm start) to itself: it never travels
    site_state: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"{self.label}.fraction must be in (0, 1], got {self.fraction}")

    def bind(self, spec: ParamSpec) -> Self:
        bound = replace(self)
        object.__setattr__(bound, "size", spec.size)
        return bound

    @property
    def k(self) -> int:
        """Coordinates sent per update."""
        if not self.size:
            raise RuntimeError(f"{self.label} must be bound to the model's ParamSpec (bind)")
        return kept(self.fraction, self.size)

    @property
    def client_state(self) -> dict[str, str]:
        """Names and dtypes of the client state (none without error feedback)."""
        return {"residual": "float32"} if self.error_feedback else {}

    def client_state_shapes(self, spec: ParamSpec) -> dict[str, tuple[int, ...]]:
        return {name: (spec.size,) for name in self.client_state}

    def accumulate(self, delta: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """What is sparsified, and the client state before the sent coordinates are zeroed
        in it: ``e = delta + residual`` (error feedback) or ``delta`` itself."""
        if not self.error_feedback:
            return delta, {}
        e = delta + state.get("residual", torch.zeros_like(delta))
        return e, {"residual": e}

    @abstractmethod
    def select(self, e: torch.Tensor, ctx: Context) -> torch.Tensor:
        """The ``k`` coordinates to send, sorted (int64)."""

    def encode(self, message: Message, state: State, ctx: Context) -> tuple[Message, State]:
        delta = message.arrays["delta"]
        if delta.shape != (self.size,):
            raise ValueError(
                f"{self.label}: delta has shape {tuple(delta.shape)}, not ({self.size},)"
            )
        e, before = self.accumulate(delta, state)
        idx = self.select(e, ctx)
        values = e[idx]
        after = {}
        for name, t in before.items():  # what was sent leaves the memory
            t = t.clone()
            t[idx] = 0.0
            after[name] = t
        index = torch.from_numpy(encode_indices(idx.numpy(), self.size))
        return replace(message, arrays={**message.arrays, "delta": values, INDEX: index}), after

    def decode(self, message: Message, ctx: Context) -> Message:
        values, index, k = message.arrays.get("delta"), message.arrays.get(INDEX), self.k
        if not isinstance(values, torch.Tensor) or values.dtype != torch.float32:
            got = values.dtype if isinstance(values, torch.Tensor) else type(values).__name__
            raise MessageError(f"{self.label}: 'delta' must be the float32 kept values, got {got}")
        if values.shape != (k,):
            raise MessageError(
                f"{self.label}: 'delta' must hold k = {k} values, got shape {tuple(values.shape)}"
            )
        if not bool(torch.isfinite(values).all()):
            raise MessageError(f"{self.label}: 'delta' contains NaN or Inf")
        if not isinstance(index, torch.Tensor):
            raise MessageError(f"{self.label}: missing the coded coordinates {INDEX!r}")
        try:
            idx = decode_indices(index.contiguous().numpy(), self.size, k)
        except MessageError as exc:
            raise MessageError(f"{self.label}: {INDEX!r}: {exc}") from None
        dense = torch.zeros(self.size, dtype=torch.float32)
        dense[torch.from_numpy(idx)] = values
        arrays = {name: v for name, v in message.arrays.items() if name != INDEX}
        arrays["delta"] = dense
        return replace(message, arrays=arrays)


@register("transform", "top_k")
@dataclass(frozen=True)
class TopK(Sparsifier):
    """Send the ``k`` coordinates of largest magnitude (ties: torch's ``topk`` order). Its
    contraction, ``||e - top_k(e)||^2 <= (1 - k/d) ||e||^2`` (Stich et al.'s Lemma), is what
    error feedback needs. ``momentum`` (needs ``error_feedback``): DGC's momentum correction
    and factor masking, client state ``u`` and ``v`` instead of ``residual``.

    Bytes up: ``4 k`` for the values plus the index coding's (at most ``1 + ceil(d / 8)``).
    """

    momentum: float = 0.0
    label: ClassVar[str] = "top_k"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.momentum < 1:
            raise ValueError(f"top_k.momentum must be in [0, 1), got {self.momentum}")
        if self.momentum and not self.error_feedback:
            raise ValueError(
                "top_k.momentum needs error_feedback = true: DGC's momentum correction "
                "accumulates what was not sent"
            )

    @property
    def client_state(self) -> dict[str, str]:
        if self.momentum:
            return {"u": "float32", "v": "float32"}
        return super().client_state

    def accumulate(self, delta: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """DGC: ``u = m u + delta`` (momentum), ``v = v + u`` (accumulation); ``v`` is
        sparsified. Without momentum, plain error feedback."""
        if not self.momentum:
            return super().accumulate(delta, state)
        u = self.momentum * state.get("u", torch.zeros_like(delta)) + delta
        v = state.get("v", torch.zeros_like(delta)) + u
        return v, {"u": u, "v": v}

    def select(self, e: torch.Tensor, ctx: Context) -> torch.Tensor:
        return torch.topk(e.abs(), self.k, sorted=False).indices.sort().values


@register("transform", "random_k")
@dataclass(frozen=True)
class RandomK(Sparsifier):
    """Send ``k`` coordinates drawn uniformly without replacement from the part's stream for
    the round and the client, unscaled (Stich et al.'s rand-k with memory; its contraction
    holds in expectation: ``E ||e - rand_k(e)||^2 = (1 - k/d) ||e||^2``).

    Bytes up: as ``TopK``'s.
    """

    label: ClassVar[str] = "random_k"

    def select(self, e: torch.Tensor, ctx: Context) -> torch.Tensor:
        drawn = ctx.rng("coordinates").choice(self.size, self.k, replace=False, shuffle=False)
        return torch.from_numpy(np.sort(drawn).astype(np.int64))
