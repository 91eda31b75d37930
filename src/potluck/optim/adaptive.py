"""Adaptive server optimizers: FedAdagrad, FedAdam and FedYogi.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan (2021), "Adaptive Federated
Optimization", ICLR, Algorithm 2. With ``Δ_t = mean_delta`` (the negative pseudo-gradient)::

    m_t = β1 m_{t-1} + (1 - β1) Δ_t
    v_t = v_{t-1} + Δ_t²                                   FedAdagrad
    v_t = β2 v_{t-1} + (1 - β2) Δ_t²                       FedAdam
    v_t = v_{t-1} - (1 - β2) Δ_t² sign(v_{t-1} - Δ_t²)     FedYogi
    w_{t+1} = w_t + η m_t / (sqrt(v_t) + τ)

As in the paper there is no bias correction. ``m`` starts at zero and ``v`` at ``τ²``, the
smallest value Algorithm 2 allows (``v_{-1} ≥ τ²``). All three share one implementation and
differ only in ``_second_moment``. The state (``"m"``, ``"v"``) holds float tensors shaped
like ``w``, so it checkpoints with safetensors.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import KW_ONLY, dataclass

import torch

from potluck.core.parts import Context, State
from potluck.core.registry import register


@dataclass(frozen=True)
class _AdaptiveServer(ABC):
    """Algorithm 2 of Reddi et al. (2021) with the second-moment rule left to subclasses."""

    lr: float = 0.1
    _: KW_ONLY
    beta1: float = 0.9
    tau: float = 1e-3

    def __post_init__(self) -> None:
        name = type(self).__name__
        if not 0 < self.lr < math.inf:
            raise ValueError(f"{name} lr must be in (0, inf), got {self.lr}")
        if not 0 <= self.beta1 < 1:
            raise ValueError(f"{name} beta1 must be in [0, 1), got {self.beta1}")
        if not 0 < self.tau < math.inf:
            raise ValueError(f"{name} tau must be in (0, inf), got {self.tau}")

    def init(self, w: torch.Tensor) -> State:
        return {"m": torch.zeros_like(w), "v": torch.full_like(w, self.tau**2)}

    def step(
        self, w: torch.Tensor, mean_delta: torch.Tensor, state: State, ctx: Context | None = None
    ) -> tuple[torch.Tensor, State]:
        m = self.beta1 * state["m"] + (1 - self.beta1) * mean_delta
        v = self._second_moment(state["v"], mean_delta.square())
        return w + self.lr * m / (v.sqrt() + self.tau), {"m": m, "v": v}

    @abstractmethod
    def _second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        """``v_t`` from ``v_{t-1}`` and ``Δ_t²``."""


@dataclass(frozen=True, kw_only=True)
class _DecayingSecondMoment(_AdaptiveServer, ABC):
    """Adds the second-moment decay ``beta2`` shared by FedAdam and FedYogi."""

    beta2: float = 0.99

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.beta2 < 1:
            raise ValueError(f"{type(self).__name__} beta2 must be in [0, 1), got {self.beta2}")


@register("server", "adagrad")
@dataclass(frozen=True)
class ServerAdagrad(_AdaptiveServer):
    """FedAdagrad (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2).

    ``v <- v + Δ²``; ``m`` and the weight update are as in the module docstring.

    Example:
        >>> opt = ServerAdagrad(lr=0.1)
        >>> w0 = torch.zeros(2)
        >>> w, state = opt.step(w0, torch.tensor([0.5, -1.0]), opt.init(w0))
        >>> [round(x, 4) for x in w.tolist()]
        [0.01, -0.01]
    """

    def _second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return v + delta_sq


@register("server", "adam")
@dataclass(frozen=True)
class ServerAdam(_DecayingSecondMoment):
    """FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2).

    ``v <- β2 v + (1 - β2) Δ²``, without bias correction.

    Example:
        >>> opt = ServerAdam(lr=0.1)
        >>> w0 = torch.zeros(2)
        >>> w, state = opt.step(w0, torch.tensor([0.5, -1.0]), opt.init(w0))
        >>> [round(x, 4) for x in w.tolist()]
        [0.098, -0.099]
    """

    def _second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v + (1 - self.beta2) * delta_sq


@register("server", "yogi")
@dataclass(frozen=True)
class ServerYogi(_DecayingSecondMoment):
    """FedYogi (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2).

    ``v <- v - (1 - β2) Δ² sign(v - Δ²)``: ``v`` moves additively towards ``Δ²`` (Adam moves
    multiplicatively), so it grows more slowly after a spike and forgets it more slowly.

    Example:
        >>> opt = ServerYogi(lr=0.1)
        >>> w0 = torch.zeros(2)
        >>> w, state = opt.step(w0, torch.tensor([0.5, -1.0]), opt.init(w0))
        >>> [round(x, 4) for x in w.tolist()]
        [0.098, -0.099]
    """

    def _second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return v - (1 - self.beta2) * delta_sq * torch.sign(v - delta_sq)
