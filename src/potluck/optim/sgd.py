"""Server SGD on the pseudo-gradient ``-mean_delta``, optionally with momentum.

With ``lr=1`` and no momentum this is FedAvg's update ``w <- w + mean_delta``
(McMahan et al. 2017); with momentum it is FedAvgM (Hsu, Qi, Brown 2019, "Measuring the
Effects of Non-Identical Data Distribution for Federated Visual Classification"):
``v <- beta v + mean_delta; w <- w + lr v``.

Example:
    >>> import torch
    >>> opt = ServerSGD(lr=1.0)
    >>> w, state = opt.step(torch.zeros(2), torch.tensor([0.5, -1.0]), opt.init(torch.zeros(2)))
    >>> w.tolist()
    [0.5, -1.0]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from potluck.core.parts import Context, Need, State
from potluck.core.registry import register


@register("server", "sgd")
@dataclass(frozen=True)
class ServerSGD:
    """``w <- w - lr * m`` with ``m = momentum * m + g`` and pseudo-gradient ``g = -delta``."""

    lr: float = 1.0
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"server lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"server momentum must be in [0, 1), got {self.momentum}")

    @property
    def gives(self) -> frozenset[str]:
        """The plain step ``w + mean_delta`` when ``lr`` is 1 without momentum."""
        plain = self.lr == 1.0 and not self.momentum
        return frozenset({Need.PLAIN_SERVER_STEP}) if plain else frozenset()

    def init(self, w: torch.Tensor) -> State:
        return {"momentum": torch.zeros_like(w)} if self.momentum else {}

    def step(
        self, w: torch.Tensor, mean_delta: torch.Tensor, state: State, ctx: Context | None = None
    ) -> tuple[torch.Tensor, State]:
        if not self.momentum:
            return w + self.lr * mean_delta, state
        m = self.momentum * state["momentum"] + mean_delta
        return w + self.lr * m, {"momentum": m}
