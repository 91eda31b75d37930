"""Gradient terms: the members of local training's chain, each with its server half.

Local training is a base optimizer (``LocalSGD``) plus a chain of terms. Each term has its
own state namespace, so terms compose: ``(FedProx(mu=0.1), Scaffold())`` trains with both
corrections. A term's client half runs ``begin`` (its working state from its client state
and the broadcast), ``start`` (where training starts), ``gradient`` (a pure correction of
each step's gradient, which the vectorized engine ``vmap`` s over clients) and ``finish``
(what it uploads and its new client state); its server half ``server_init``, ``broadcast``
and ``server_update`` (how it moves the aggregate and its server state).

``Term`` gives every hook its do-nothing default, so a new term writes only what it changes.
A term that declares ``Need.PER_EXAMPLE_GRADIENTS`` (DP-SGD, ``privacy.dp_sgd``) also makes
each step's gradient from the per-example ones (``batches``, ``draw``, ``reduce``).

Example:
    >>> import torch
    >>> term = FedProx(mu=1.0)
    >>> work = term.begin(None, torch.zeros(2), {}, {})
    >>> term.gradient(torch.tensor([1.0, -1.0]), torch.zeros(2), work).tolist()
    [1.0, -1.0]
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from potluck.core.params import ParamSpec
from potluck.core.parts import (
    ClientView,
    Context,
    Contributions,
    LocalOptimizer,
    LocalResult,
    Need,
    State,
    TermOutput,
)
from potluck.core.registry import register


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


class Term:
    """Defaults for every ``GradientTerm`` hook: no state, no correction, nothing uploaded.
    A term that keeps client state may declare it (``client_state``: name -> dtype, and
    ``client_state_shapes(spec)``: name -> shape for a model of parameters ``spec``), so the
    server refuses anything else a member sends.

    Example:
        >>> import torch
        >>> Term().gradient(torch.zeros(1), torch.ones(1), {}).tolist()
        [1.0]
    """

    uploads: ClassVar[tuple[str, ...]] = ()
    upload_scalars: ClassVar[tuple[str, ...]] = ()

    def bind(self, spec: ParamSpec, optimizer: LocalOptimizer) -> Any:
        """This term for a model with parameters ``spec`` trained by ``optimizer``."""
        return self

    def server_init(self, w: torch.Tensor) -> State:
        return {}

    def broadcast(self, state: State) -> State:
        return {}

    def begin(
        self, client: ClientView, w_global: torch.Tensor, broadcast: State, state: State
    ) -> State:
        return {}

    def start(self, w: torch.Tensor, work: State) -> torch.Tensor:
        return w

    def gradient(self, w: torch.Tensor, grad: torch.Tensor, work: State) -> torch.Tensor:
        return grad

    # the per-example hooks, used only for a term that declares Need.PER_EXAMPLE_GRADIENTS

    def batches(
        self, n: int, batch_len: int, total: int, gen: torch.Generator
    ) -> Iterator[torch.Tensor]:
        """The examples of each step: by default the shuffled epochs of ``batch_order``."""
        from potluck.client.program import batch_order

        return batch_order(n, batch_len, total, gen)

    def draw(self, gen: torch.Generator, d: int) -> torch.Tensor:
        """What ``reduce`` draws for a step: by default nothing."""
        return torch.zeros(0)

    def reduce(
        self,
        w: torch.Tensor,
        grads: torch.Tensor,
        mask: torch.Tensor,
        draw: torch.Tensor,
        work: State,
    ) -> torch.Tensor:
        """The step's gradient from its (B, d) per-example ones: by default their mean over
        the real examples (the batch-mean gradient of a mean loss)."""
        return (mask @ grads) / mask.sum().clamp(min=1.0)

    def finish(self, client: ClientView, result: LocalResult, work: State) -> TermOutput:
        return TermOutput()

    def server_update(
        self, state: State, aggregate: torch.Tensor, contributions: Contributions, ctx: Context
    ) -> tuple[torch.Tensor, State]:
        return aggregate, state

    def personalize(self, w_global: torch.Tensor, state: State) -> torch.Tensor | None:
        return None


@register("term", "fedprox")
@dataclass(frozen=True)
class FedProx(Term):
    """FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks", MLSys):
    the local objective adds ``mu/2 ||w - w_global||^2``, so the gradient gains
    ``mu (w - w_global)``. Partial work from stragglers is aggregated, not dropped (the
    ``fedprox`` algorithm sets ``Stragglers(mode="partial")``)."""

    mu: float = 0.01

    def __post_init__(self) -> None:
        if not self.mu >= 0:
            raise ValueError(f"FedProx mu must be >= 0, got {self.mu}")

    def begin(
        self, client: ClientView, w_global: torch.Tensor, broadcast: State, state: State
    ) -> State:
        return {"anchor": w_global}

    def gradient(self, w: torch.Tensor, grad: torch.Tensor, work: State) -> torch.Tensor:
        return grad + self.mu * (w - work["anchor"])


@register("term", "scaffold")
@dataclass(frozen=True)
class Scaffold(Term):
    """SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for
    Federated Learning", ICML), option II control variates.

    Client ``i`` corrects each gradient by ``c - c_i``; after ``K`` steps of rate ``lr`` it
    sets ``c_i+ = c_i - c + (w_global - w) / (K lr)`` and uploads ``delta_c = c_i+ - c_i``.
    The server moves ``c += |S| / N * mean(delta_c)``. ``c_i`` persists per client.

    With local momentum (not in the paper; NIID-Bench uses 0.9) the corrected gradient goes
    through the momentum buffer like any gradient, so ``K`` is replaced by the
    momentum-weighted step count ``effective_steps(K, momentum)``: ``(w_global - w) / lr``
    sums the gradients with those weights, and dividing by ``K`` would overestimate the mean
    gradient by up to ``1 / (1 - momentum)`` and make the correction diverge.
    ``momentum=None`` (the default) takes the local optimizer's.
    """

    momentum: float | None = None
    uploads: ClassVar[tuple[str, ...]] = ("delta_c",)
    client_state: ClassVar[dict[str, str]] = {"c_i": "float32"}

    def client_state_shapes(self, spec: ParamSpec) -> dict[str, tuple[int, ...]]:
        return {"c_i": (spec.size,)}

    def bind(self, spec: ParamSpec, optimizer: LocalOptimizer) -> Scaffold:
        return self if self.momentum is not None else replace(self, momentum=optimizer.momentum)

    def server_init(self, w: torch.Tensor) -> State:
        return {"c": torch.zeros_like(w)}

    def broadcast(self, state: State) -> State:
        return {"c": state["c"]}

    def begin(
        self, client: ClientView, w_global: torch.Tensor, broadcast: State, state: State
    ) -> State:
        c = broadcast["c"]
        return {"c": c, "c_i": state.get("c_i", torch.zeros_like(c))}

    def gradient(self, w: torch.Tensor, grad: torch.Tensor, work: State) -> torch.Tensor:
        return grad + work["c"] - work["c_i"]

    def finish(self, client: ClientView, result: LocalResult, work: State) -> TermOutput:
        c, c_i = work["c"], work["c_i"]
        if result.steps == 0:
            return TermOutput(arrays={"delta_c": torch.zeros_like(c)}, state={"c_i": c_i})
        scale = effective_steps(result.steps, self.momentum or 0.0) * client.optimizer.lr
        c_new = c_i - c + (result.w_global - result.w) / scale
        return TermOutput(arrays={"delta_c": c_new - c_i}, state={"c_i": c_new})

    def server_update(
        self, state: State, aggregate: torch.Tensor, contributions: Contributions, ctx: Context
    ) -> tuple[torch.Tensor, State]:
        delta_c = torch.stack([a["delta_c"] for a in contributions.arrays]).mean(0)
        c = state["c"] + len(contributions.arrays) / ctx.num_clients * delta_c
        return aggregate, {"c": c}


@register("term", "fednova")
@dataclass(frozen=True)
class FedNova(Term):
    """FedNova (Wang et al. 2020, "Tackling the Objective Inconsistency Problem in
    Heterogeneous Federated Optimization", NeurIPS): normalised averaging.

    Client ``i`` with ``tau_i`` local steps of SGD with momentum ``rho`` uploads
    ``delta_i / a_i`` with ``a_i = (tau_i - rho (1 - rho^tau_i) / (1 - rho)) / (1 - rho)``
    (``a_i = tau_i`` without momentum). The server rescales the weighted mean of the
    normalised updates by ``tau_eff = sum_i p_i a_i``, so clients that took more steps do
    not pull the model towards their own optimum. ``momentum=None`` (the default) takes the
    local optimizer's.
    """

    momentum: float | None = None
    upload_scalars: ClassVar[tuple[str, ...]] = ("a",)

    def __post_init__(self) -> None:
        if self.momentum is not None and not 0 <= self.momentum < 1:
            raise ValueError(f"FedNova momentum must be in [0, 1), got {self.momentum}")

    def bind(self, spec: ParamSpec, optimizer: LocalOptimizer) -> FedNova:
        return self if self.momentum is not None else replace(self, momentum=optimizer.momentum)

    def normaliser(self, steps: int) -> float:
        """``a_i`` for ``steps`` local steps."""
        return effective_steps(steps, self.momentum or 0.0)

    def finish(self, client: ClientView, result: LocalResult, work: State) -> TermOutput:
        a = self.normaliser(result.steps)
        delta = result.delta / a if a > 0 else torch.zeros_like(result.delta)
        return TermOutput(delta=delta, scalars={"a": a})

    def server_update(
        self, state: State, aggregate: torch.Tensor, contributions: Contributions, ctx: Context
    ) -> tuple[torch.Tensor, State]:
        a = torch.tensor([float(s["a"]) for s in contributions.scalars], dtype=torch.float64)
        p = contributions.weights.to(torch.float64) / contributions.weights.sum()
        return aggregate * float((p * a).sum()), state


@register("term", "qffl")
@dataclass(frozen=True)
class QFFL(Term):
    """q-FFL as q-FedAvg (Li, Sanjabi, Beirami, Smith 2020, "Fair Resource Allocation in
    Federated Learning", ICLR): minimise ``sum_k p_k F_k^(q+1) / (q+1)``, which weights
    clients with larger loss more as ``q`` grows (``q = 0`` is FedAvg's objective).

    With ``L = 1 / lr``, client ``k`` computes ``dW = L (w_global - w_local)``,
    ``Delta_k = F_k(w_global)^q dW`` and ``h_k = q F_k^(q-1) ||dW||^2 + L F_k^q``; the server
    steps ``w <- w - sum_k Delta_k / sum_k h_k``. Here each client uploads
    ``delta = -Delta_k / h_k`` with aggregation weight ``h_k``, so the weighted mean
    aggregator and server SGD with rate 1 perform exactly that step (a declared need).
    """

    q: float = 1.0
    needs: ClassVar[frozenset[str]] = frozenset({Need.PLAIN_SERVER_STEP, Need.WEIGHTED_UPDATES})
    gives: ClassVar[frozenset[str]] = frozenset({Need.READS_DATA})  # its loss at w_global

    def __post_init__(self) -> None:
        if not self.q >= 0:
            raise ValueError(f"q-FFL q must be >= 0, got {self.q}")

    def begin(
        self, client: ClientView, w_global: torch.Tensor, broadcast: State, state: State
    ) -> State:
        return {"global_loss": torch.tensor(client.train_loss(w_global))}

    def finish(self, client: ClientView, result: LocalResult, work: State) -> TermOutput:
        loss = max(float(work["global_loss"]), 1e-10)
        lipschitz = 1.0 / client.optimizer.lr
        d_w = lipschitz * (result.w_global - result.w)
        h = self.q * loss ** (self.q - 1) * float(d_w @ d_w) + lipschitz * loss**self.q
        return TermOutput(delta=-(loss**self.q) * d_w / h, weight=h)
