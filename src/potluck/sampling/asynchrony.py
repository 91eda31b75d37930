"""Asynchronous federated learning's policy: how many clients train at once, how many
updates the server buffers before it steps, and how an update's staleness (server steps
since the model it trained from) weighs it.

- **FedBuff** (Nguyen, Malik, Zhan, Yousefpour, Rabbat, Malek, Huba 2022, "Federated
  Learning with Buffered Asynchronous Aggregation", AISTATS): ``buffer = K`` updates, each
  delta scaled by ``1 / sqrt(1 + staleness)`` (``staleness = "polynomial"``, ``a = 0.5``),
  their mean applied by the server optimizer (momentum there is FedBuff's server momentum).
- **FedAsync** (Xie, Koyejo, Gupta 2019, "Asynchronous Federated Optimization", OPT
  workshop): ``buffer = 1`` and ``mix = "model"``: the server mixes in the client's model,
  ``w <- (1 - alpha_t) w + alpha_t x``, with ``alpha_t = alpha s(staleness)`` (``alpha``
  the server's learning rate); ``s`` constant, polynomial ``(1 + tau)^-a`` or hinge (1 up
  to ``b``, then ``1 / (a (tau - b) + 1)``). Its proximal term is the ``fedprox`` term.

Example:
    >>> p = Asynchrony(concurrency=8, buffer=2)
    >>> [round(p.weight(t), 3) for t in (0, 1, 3)]  # FedBuff's 1 / sqrt(1 + tau)
    [1.0, 0.707, 0.5]
    >>> Asynchrony(concurrency=16, staleness="hinge", a=1.0, b=2.0).weight(4)
    0.3333333333333333
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Asynchrony:
    """``concurrency`` clients train at once; the server steps every ``buffer`` updates;
    ``staleness``: the weight function (``a``, ``b`` its parameters); ``mix``: a buffered
    update is the client's ``"delta"`` (FedBuff) or its model minus the current global one
    (``"model"``, FedAsync); ``max_staleness``: older updates are dropped."""

    concurrency: int
    buffer: int = 10
    staleness: Literal["constant", "polynomial", "hinge"] = "polynomial"
    a: float = 0.5
    b: float = 4.0
    mix: Literal["delta", "model"] = "delta"
    max_staleness: int | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"async.concurrency must be >= 1, got {self.concurrency}")
        if not 1 <= self.buffer <= self.concurrency:
            raise ValueError(
                f"async.buffer must be in [1, concurrency = {self.concurrency}], got "
                f"{self.buffer} (a buffer the in-flight clients cannot fill never steps)"
            )
        if self.staleness not in ("constant", "polynomial", "hinge"):
            raise ValueError(
                f"async.staleness must be constant, polynomial or hinge, got {self.staleness!r}"
            )
        if not self.a >= 0 or not self.b >= 0:
            raise ValueError(f"async.a and async.b must be >= 0, got {self.a}, {self.b}")
        if self.mix not in ("delta", "model"):
            raise ValueError(f"async.mix must be 'delta' or 'model', got {self.mix!r}")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ValueError(f"async.max_staleness must be >= 0, got {self.max_staleness}")

    def weight(self, staleness: int) -> float:
        """``s(tau)``, the factor of an update ``staleness`` server steps old."""
        tau = float(staleness)
        if self.staleness == "constant":
            return 1.0
        if self.staleness == "polynomial":
            return float((1.0 + tau) ** -self.a)
        return 1.0 if tau <= self.b else 1.0 / (self.a * (tau - self.b) + 1.0)
