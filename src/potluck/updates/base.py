"""Update transforms: the default hooks, L2 clipping and keeping layers local; the
broadcast's half-precision downlink.

A transform's ``encode`` runs on the client (with its own client state, e.g. an
error-feedback residual), ``decode`` on the server per message, ``decode_aggregate`` on the
aggregate (with its server state). Transforms apply in order on the client and in reverse on
the server.

Example:
    >>> import torch
    >>> from potluck.core.message import Message
    >>> from potluck.core.parts import part_context
    >>> ctx = part_context(0, 1, "transforms.0.clip", client=0)
    >>> m = Message(arrays={"delta": torch.tensor([3.0, 4.0])}, scalars={"num_examples": 1})
    >>> out, _ = ClipNorm(1.0).encode(m, {}, ctx)
    >>> [round(v, 6) for v in out.arrays["delta"].tolist()]
    [0.6, 0.8]
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import torch

from potluck.core.message import Message, MessageError
from potluck.core.params import ParamSpec
from potluck.core.parts import Context, Need, State
from potluck.core.registry import register


class Transform:
    """Defaults for every ``Transform`` hook: stateless identity in both directions.

    Example:
        >>> from potluck.core.message import Message
        >>> m = Message()
        >>> Transform().decode(m, None) is m
        True
    """

    def bind(self, spec: ParamSpec) -> Any:
        """This transform for a model with parameters ``spec``."""
        return self

    def server_init(self, w: torch.Tensor) -> State:
        return {}

    def encode(self, message: Message, state: State, ctx: Context) -> tuple[Message | None, State]:
        """The update on its way out (``None``: the client drops out of the round here)."""
        return message, state

    def decode(self, message: Message, ctx: Context) -> Message:
        return message

    def decode_aggregate(
        self, aggregate: torch.Tensor, state: State, ctx: Context
    ) -> tuple[torch.Tensor, State]:
        return aggregate, state


@register("transform", "clip")
@dataclass(frozen=True)
class ClipNorm(Transform):
    """Scale the update ``delta`` so its L2 norm is at most ``max_norm`` (direction kept).

    The clipping step of DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private
    Recurrent Language Models", ICLR) and a simple robustness guard on its own; it bounds
    the sensitivity that a noise transform after it needs. ``per_layer``: each of the
    model's ``L`` parameter tensors is clipped to ``max_norm / sqrt(L)`` instead (the paper's
    per-layer clipping, equal shares), so the whole update still has norm at most
    ``max_norm``.
    """

    max_norm: float
    per_layer: bool = False
    numels: tuple[int, ...] = field(default=(), init=False, compare=False, repr=False)
    gives: ClassVar[frozenset[str]] = frozenset({Need.BOUNDED_SENSITIVITY})

    def __post_init__(self) -> None:
        if not self.max_norm > 0:
            raise ValueError(f"ClipNorm.max_norm must be > 0, got {self.max_norm}")

    def bind(self, spec: ParamSpec) -> ClipNorm:
        bound = replace(self)
        object.__setattr__(bound, "numels", spec.numels)
        return bound

    def encode(self, message: Message, state: State, ctx: Context) -> tuple[Message, State]:
        delta = message.arrays["delta"]
        norm = float(torch.linalg.vector_norm(delta))
        if self.per_layer:
            clipped = self._per_layer(delta)
        else:
            clipped = delta * (min(1.0, self.max_norm / norm) if norm > 0 else 1.0)
        arrays = {**message.arrays, "delta": clipped}
        scalars = {**message.scalars, "clip_norm_before": norm}
        return replace(message, arrays=arrays, scalars=scalars), state

    def _per_layer(self, delta: torch.Tensor) -> torch.Tensor:
        if sum(self.numels) != delta.numel():
            raise RuntimeError("per-layer ClipNorm must be bound to the model's ParamSpec first")
        share = self.max_norm / len(self.numels) ** 0.5
        layers = torch.split(delta, list(self.numels))
        norms = torch.stack([torch.linalg.vector_norm(x) for x in layers])
        scales = torch.clamp(share / torch.clamp(norms, min=1e-30), max=1.0)
        return torch.cat([x * s for x, s in zip(layers, scales, strict=True)])


@register("transform", "keep_local")
@dataclass(frozen=True)
class KeepLocal(Transform):
    """Send only the coordinates of ``delta`` outside the layers named by ``layers``
    (parameter-name prefixes; default: the last layer); the server puts zeros there. With
    FedPer the personal head never changes globally, so its zeros need not travel.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> keep = KeepLocal().bind(ParamSpec.from_module(net))
        >>> from potluck.core.parts import part_context
        >>> ctx = part_context(0, 1, "transforms.0.keep_local", client=0)
        >>> sent, _ = keep.encode(Message({"delta": torch.arange(9.0)}), {}, ctx)
        >>> sent.arrays["delta"].tolist(), keep.decode(sent, ctx).arrays["delta"].tolist()
        ([0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 0.0, 0.0, 0.0])
    """

    layers: tuple[str, ...] = ()
    mask: torch.Tensor | None = field(default=None, init=False, compare=False, repr=False)

    def bind(self, spec: ParamSpec) -> KeepLocal:
        bound = replace(self)
        object.__setattr__(bound, "mask", spec.layer_mask(self.layers))
        return bound

    def _mask(self) -> torch.Tensor:
        if self.mask is None:
            raise RuntimeError("KeepLocal must be bound to a model's ParamSpec (bind)")
        return self.mask

    def encode(self, message: Message, state: State, ctx: Context) -> tuple[Message, State]:
        shared = message.arrays["delta"][~self._mask()]
        return replace(message, arrays={**message.arrays, "delta": shared}), state

    def decode(self, message: Message, ctx: Context) -> Message:
        mask = self._mask()
        sent = message.arrays.get("delta")
        shared = int((~mask).sum())
        if not isinstance(sent, torch.Tensor) or sent.shape != (shared,):
            got = tuple(sent.shape) if isinstance(sent, torch.Tensor) else type(sent).__name__
            raise MessageError(f"keep_local: delta must have shape ({shared},), got {got}")
        full = torch.zeros(len(mask), dtype=sent.dtype)
        full[~mask] = sent
        return replace(message, arrays={**message.arrays, "delta": full})


@register("downlink", "cast")
@dataclass(frozen=True)
class Cast:
    """Send the broadcast's float32 arrays as ``dtype`` (half the bytes down); each client
    casts them back to float32 before training, so the rounding of the weights is the only
    change. Updates are computed against the rounded weights the client received.

    Example:
        >>> down = Cast("bfloat16")
        >>> sent = down.encode(Message({"w": torch.tensor([1.0, 1.00390625])}))
        >>> sent.nbytes, down.decode(sent).arrays["w"].tolist()
        (4, [1.0, 1.0])
    """

    dtype: Literal["bfloat16", "float16"] = "bfloat16"

    def encode(self, message: Message) -> Message:
        target = getattr(torch, self.dtype)
        arrays = {
            k: v.to(target) if v.dtype == torch.float32 else v for k, v in message.arrays.items()
        }
        return replace(message, arrays=arrays)

    def decode(self, message: Message) -> Message:
        source = getattr(torch, self.dtype)
        arrays = {
            k: v.to(torch.float32) if v.dtype == source else v for k, v in message.arrays.items()
        }
        return replace(message, arrays=arrays)
