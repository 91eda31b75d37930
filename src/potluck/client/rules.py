"""Local training rules beyond plain SGD: terms that change the local gradient, keep
per-client state, send extra vectors, and adjust the aggregate on the server.

A rule has a client half, pure tensor functions an engine may run for one client or
``vmap`` over many (``begin``, ``gradient``, ``finish``), and a server half (``server_init``,
``broadcast``, ``server_update``). ``PlainRule`` is FedAvg's (nothing added).

Example:
    >>> import torch
    >>> rule = FedProx(mu=1.0)
    >>> state = rule.begin(torch.zeros(2), {}, {})
    >>> rule.gradient(torch.tensor([1.0, -1.0]), torch.zeros(2), state).tolist()
    [1.0, -1.0]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from potluck.core.params import ParamSpec

Tensors = dict[str, torch.Tensor]


def effective_steps(steps: int, momentum: float) -> float:
    """Total weight of the gradients in ``steps`` steps of SGD with heavy-ball ``momentum``:
    ``(steps - rho (1 - rho^steps) / (1 - rho)) / (1 - rho)``, or ``steps`` without momentum
    (Wang et al. 2020, FedNova, eq. for ``||a_i||_1``).

    Example:
        >>> effective_steps(4, 0.0), effective_steps(2, 0.5)
        (4.0, 2.5)
    """
    if momentum == 0:
        return float(steps)
    rho = momentum
    return (steps - rho * (1 - rho**steps) / (1 - rho)) / (1 - rho)


@dataclass(frozen=True)
class RuleOutput:
    """What ``finish`` returns: arrays to upload (``delta`` may be replaced), the client's new
    persistent state, and scalars to upload."""

    arrays: Tensors = field(default_factory=dict)
    state: Tensors = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Uploaded:
    """One client's decoded upload as the server half of a rule sees it."""

    arrays: Mapping[str, torch.Tensor]
    scalars: Mapping[str, int | float | str]


class LocalRule(Protocol):
    """The client's training rule (part 2 of an algorithm), with its server counterpart."""

    @property
    def name(self) -> str: ...

    @property
    def client_state(self) -> tuple[str, ...]:
        """Names of the per-client vectors kept across rounds."""
        ...

    @property
    def uploads(self) -> tuple[str, ...]:
        """Names of the extra (d,)-vectors each client sends besides ``delta``."""
        ...

    @property
    def needs_global_loss(self) -> bool:
        """Whether ``begin`` needs the client's training loss at the global model, passed in
        ``state["global_loss"]`` (a 0-d tensor)."""
        ...

    def server_init(self, w: torch.Tensor) -> Tensors: ...

    def broadcast(self, server_state: Tensors) -> Tensors: ...

    @property
    def personal_lambda(self) -> float | None:
        """Ditto-style rules: train a personal model ``state["personal"]`` after the global
        update, on ``F_k(v) + lambda/2 ||v - w_global||^2``; ``None`` for no such model."""
        ...

    def bind(self, spec: ParamSpec) -> LocalRule:
        """This rule for a model with parameters ``spec`` (e.g. to resolve layer names)."""
        ...

    def begin(self, w_global: torch.Tensor, broadcast: Tensors, state: Tensors) -> Tensors: ...

    def start(self, w_global: torch.Tensor, rule_state: Tensors) -> torch.Tensor:
        """Where local training starts (the global model, or it with personal layers)."""
        ...

    def personal_model(self, w_global: torch.Tensor, state: Tensors) -> torch.Tensor | None:
        """The client's personalised model for evaluation, or ``None`` if it has none."""
        ...

    def gradient(
        self, w: torch.Tensor, grad: torch.Tensor, rule_state: Tensors
    ) -> torch.Tensor: ...

    def finish(
        self, w_global: torch.Tensor, w: torch.Tensor, rule_state: Tensors, steps: int, lr: float
    ) -> RuleOutput: ...

    def server_update(
        self,
        server_state: Tensors,
        mean_delta: torch.Tensor,
        uploads: Sequence[Uploaded],
        weights: torch.Tensor,
        num_clients: int,
    ) -> tuple[torch.Tensor, Tensors]: ...


@dataclass(frozen=True, kw_only=True)
class PlainRule:
    """No correction: the local objective is the client's loss (FedAvg, FedSGD)."""

    name: str = "plain"
    client_state: tuple[str, ...] = ()
    uploads: tuple[str, ...] = ()
    needs_global_loss: bool = False
    personal_lambda: float | None = None

    def bind(self, spec: ParamSpec) -> LocalRule:
        return self

    def server_init(self, w: torch.Tensor) -> Tensors:
        return {}

    def broadcast(self, server_state: Tensors) -> Tensors:
        return {}

    def begin(self, w_global: torch.Tensor, broadcast: Tensors, state: Tensors) -> Tensors:
        return {}

    def start(self, w_global: torch.Tensor, rule_state: Tensors) -> torch.Tensor:
        return w_global

    def personal_model(self, w_global: torch.Tensor, state: Tensors) -> torch.Tensor | None:
        return None

    def gradient(self, w: torch.Tensor, grad: torch.Tensor, rule_state: Tensors) -> torch.Tensor:
        return grad

    def finish(
        self, w_global: torch.Tensor, w: torch.Tensor, rule_state: Tensors, steps: int, lr: float
    ) -> RuleOutput:
        return RuleOutput()

    def server_update(
        self,
        server_state: Tensors,
        mean_delta: torch.Tensor,
        uploads: Sequence[Uploaded],
        weights: torch.Tensor,
        num_clients: int,
    ) -> tuple[torch.Tensor, Tensors]:
        return mean_delta, server_state


@dataclass(frozen=True, kw_only=True)
class FedProx(PlainRule):
    """FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks", MLSys):
    the local objective adds ``mu/2 ||w - w_global||^2``, so the gradient gains
    ``mu (w - w_global)``. Partial work from stragglers is aggregated, not dropped (see
    ``potluck.sampling.Stragglers``)."""

    mu: float = 0.01
    name: str = "fedprox"

    def __post_init__(self) -> None:
        if self.mu < 0:
            raise ValueError(f"FedProx mu must be >= 0, got {self.mu}")

    def begin(self, w_global: torch.Tensor, broadcast: Tensors, state: Tensors) -> Tensors:
        return {"anchor": w_global}

    def gradient(self, w: torch.Tensor, grad: torch.Tensor, rule_state: Tensors) -> torch.Tensor:
        return grad + self.mu * (w - rule_state["anchor"])


@dataclass(frozen=True, kw_only=True)
class Scaffold(PlainRule):
    """SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for
    Federated Learning", ICML), option II control variates.

    Client ``i`` corrects each gradient by ``c - c_i``; after ``K`` steps of rate ``lr`` it
    sets ``c_i+ = c_i - c + (w_global - w) / (K lr)`` and uploads ``delta_c = c_i+ - c_i``.
    The server moves ``c += |S| / N * mean(delta_c)``. ``c_i`` persists per client.

    With local ``momentum`` (not in the paper; NIID-Bench uses 0.9) the corrected gradient
    goes through the momentum buffer like any gradient, so ``K`` is replaced by the
    momentum-weighted step count ``effective_steps(K, momentum)``: ``(w_global - w) / lr``
    sums the gradients with those weights, and dividing by ``K`` would overestimate the mean
    gradient by up to ``1 / (1 - momentum)`` and make the correction diverge.
    """

    momentum: float = 0.0
    name: str = "scaffold"
    client_state: tuple[str, ...] = ("c_i",)
    uploads: tuple[str, ...] = ("delta_c",)

    def server_init(self, w: torch.Tensor) -> Tensors:
        return {"c": torch.zeros_like(w)}

    def broadcast(self, server_state: Tensors) -> Tensors:
        return {"c": server_state["c"]}

    def begin(self, w_global: torch.Tensor, broadcast: Tensors, state: Tensors) -> Tensors:
        c = broadcast["c"]
        return {"c": c, "c_i": state.get("c_i", torch.zeros_like(c))}

    def gradient(self, w: torch.Tensor, grad: torch.Tensor, rule_state: Tensors) -> torch.Tensor:
        return grad + rule_state["c"] - rule_state["c_i"]

    def finish(
        self, w_global: torch.Tensor, w: torch.Tensor, rule_state: Tensors, steps: int, lr: float
    ) -> RuleOutput:
        c, c_i = rule_state["c"], rule_state["c_i"]
        if steps == 0:
            return RuleOutput(arrays={"delta_c": torch.zeros_like(c)}, state={"c_i": c_i})
        c_new = c_i - c + (w_global - w) / (effective_steps(steps, self.momentum) * lr)
        return RuleOutput(arrays={"delta_c": c_new - c_i}, state={"c_i": c_new})

    def server_update(
        self,
        server_state: Tensors,
        mean_delta: torch.Tensor,
        uploads: Sequence[Uploaded],
        weights: torch.Tensor,
        num_clients: int,
    ) -> tuple[torch.Tensor, Tensors]:
        delta_c = torch.stack([u.arrays["delta_c"] for u in uploads]).mean(0)
        c = server_state["c"] + len(uploads) / num_clients * delta_c
        return mean_delta, {"c": c}


@dataclass(frozen=True, kw_only=True)
class FedNova(PlainRule):
    """FedNova (Wang et al. 2020, "Tackling the Objective Inconsistency Problem in
    Heterogeneous Federated Optimization", NeurIPS): normalised averaging.

    Client ``i`` with ``tau_i`` local steps of SGD with momentum ``rho`` uploads
    ``delta_i / a_i`` with ``a_i = (tau_i - rho (1 - rho^tau_i) / (1 - rho)) / (1 - rho)``
    (``a_i = tau_i`` without momentum). The server rescales the weighted mean of the
    normalised updates by ``tau_eff = sum_i p_i a_i``, so clients that took more steps do
    not pull the model towards their own optimum.
    """

    momentum: float = 0.0
    name: str = "fednova"

    def __post_init__(self) -> None:
        if not 0 <= self.momentum < 1:
            raise ValueError(f"FedNova momentum must be in [0, 1), got {self.momentum}")

    def normaliser(self, steps: int) -> float:
        """``a_i`` for ``steps`` local steps."""
        return effective_steps(steps, self.momentum)

    def finish(
        self, w_global: torch.Tensor, w: torch.Tensor, rule_state: Tensors, steps: int, lr: float
    ) -> RuleOutput:
        a = self.normaliser(steps)
        delta = (w - w_global) / a if a > 0 else torch.zeros_like(w)
        return RuleOutput(arrays={"delta": delta}, scalars={"fednova_a": a})

    def server_update(
        self,
        server_state: Tensors,
        mean_delta: torch.Tensor,
        uploads: Sequence[Uploaded],
        weights: torch.Tensor,
        num_clients: int,
    ) -> tuple[torch.Tensor, Tensors]:
        a = torch.tensor([float(u.scalars["fednova_a"]) for u in uploads], dtype=torch.float64)
        p = weights.to(torch.float64) / weights.sum()
        tau_eff = float((p * a).sum())
        return mean_delta * tau_eff, server_state


@dataclass(frozen=True, kw_only=True)
class QFFL(PlainRule):
    """q-FFL as q-FedAvg (Li, Sanjabi, Beirami, Smith 2020, "Fair Resource Allocation in
    Federated Learning", ICLR): minimise ``sum_k p_k F_k^(q+1) / (q+1)``, which weights
    clients with larger loss more as ``q`` grows (``q = 0`` is FedAvg's objective).

    With ``L = 1 / lr``, client ``k`` computes ``dW = L (w_global - w_local)``,
    ``Delta_k = F_k(w_global)^q dW`` and ``h_k = q F_k^(q-1) ||dW||^2 + L F_k^q``; the server
    steps ``w <- w - sum_k Delta_k / sum_k h_k``. Here each client uploads
    ``delta = -Delta_k / h_k`` with aggregation weight ``h_k``, so the weighted mean
    aggregator and server SGD with rate 1 perform exactly that step.
    """

    q: float = 1.0
    name: str = "qffl"
    needs_global_loss: bool = True

    def __post_init__(self) -> None:
        if self.q < 0:
            raise ValueError(f"q-FFL q must be >= 0, got {self.q}")

    def begin(self, w_global: torch.Tensor, broadcast: Tensors, state: Tensors) -> Tensors:
        return {"global_loss": state["global_loss"]}

    def finish(
        self, w_global: torch.Tensor, w: torch.Tensor, rule_state: Tensors, steps: int, lr: float
    ) -> RuleOutput:
        loss = max(float(rule_state["global_loss"]), 1e-10)
        lipschitz = 1.0 / lr
        d_w = lipschitz * (w_global - w)
        h = self.q * loss ** (self.q - 1) * float(d_w @ d_w) + lipschitz * loss**self.q
        delta = -(loss**self.q) * d_w / h
        return RuleOutput(arrays={"delta": delta}, scalars={"weight": h})
