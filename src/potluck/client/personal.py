"""Personalisation terms: FedPer (shared body, local head) and Ditto (a personal model
regularised towards the global one). Both keep per-client state across rounds and give each
client a personalised model for evaluation (``personalize``); an algorithm has at most one
(a declared gift, ``Need.PERSONAL_MODEL``).

Example:
    >>> import torch
    >>> from potluck.client.sgd import LocalSGD
    >>> from potluck.core.params import ParamSpec
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    >>> term = FedPer().bind(ParamSpec.from_module(net), LocalSGD())  # "1." stays local
    >>> int(term.mask.sum()), len(term.mask)
    (3, 9)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch

from potluck.client.terms import Term
from potluck.core.params import ParamSpec
from potluck.core.parts import ClientView, LocalOptimizer, LocalResult, Need, State, TermOutput
from potluck.core.registry import register


@register("term", "fedper")
@dataclass(frozen=True)
class FedPer(Term):
    """FedPer (Arivazhagan et al. 2019, "Federated Learning with Personalization Layers"):
    the layers named by ``personal_layers`` (name prefixes; default: the last layer) never
    leave the client. Each client trains body and head from the global body and its own head;
    the head's delta is zero, so the global head stays put (the ``fedper`` algorithm also
    adds ``KeepLocal``, so the head's coordinates are not even sent)."""

    personal_layers: tuple[str, ...] = ()
    mask: torch.Tensor | None = field(default=None, init=False, compare=False, repr=False)
    gives: ClassVar[frozenset[str]] = frozenset({Need.PERSONAL_MODEL})
    client_state: ClassVar[dict[str, str]] = {"head": "float32"}

    def client_state_shapes(self, spec: ParamSpec) -> dict[str, tuple[int, ...]]:
        return {"head": (int(self._mask().sum()),)}

    def bind(self, spec: ParamSpec, optimizer: LocalOptimizer) -> FedPer:
        bound = replace(self)
        object.__setattr__(bound, "mask", spec.layer_mask(self.personal_layers))
        return bound

    def _mask(self) -> torch.Tensor:
        if self.mask is None:
            raise RuntimeError("FedPer must be bound to a model's ParamSpec first (term.bind)")
        return self.mask

    def begin(
        self, client: ClientView, w_global: torch.Tensor, broadcast: State, state: State
    ) -> State:
        head = state.get("head")
        return {"head": w_global[self._mask()] if head is None else head}

    def start(self, w: torch.Tensor, work: State) -> torch.Tensor:
        w = w.clone()
        w[self._mask()] = work["head"]
        return w

    def finish(self, client: ClientView, result: LocalResult, work: State) -> TermOutput:
        mask = self._mask()
        delta = torch.where(mask, torch.zeros_like(result.delta), result.delta)
        return TermOutput(delta=delta, state={"head": result.w[mask].clone()})

    def personalize(self, w_global: torch.Tensor, state: State) -> torch.Tensor | None:
        if "head" not in state:
            return None
        return self.start(w_global, {"head": state["head"]})


@register("term", "ditto")
@dataclass(frozen=True)
class Ditto(Term):
    """Ditto (Li, Hu, Beirami, Smith 2021, "Ditto: Fair and Robust Federated Learning Through
    Personalization", ICML): the global model is trained as in FedAvg; each client also keeps
    a personal model ``v_k`` and, every time it is sampled, takes the same number of local
    steps on ``F_k(v) + lam/2 ||v - w_global||^2`` from its previous ``v_k`` (``lam = 0``:
    purely local models; large ``lam``: the global model)."""

    lam: float = 0.1
    # its personal model is trained on the client's data outside the local steps' gradients
    gives: ClassVar[frozenset[str]] = frozenset({Need.PERSONAL_MODEL, Need.READS_DATA})
    client_state: ClassVar[dict[str, str]] = {"personal": "float32"}

    def client_state_shapes(self, spec: ParamSpec) -> dict[str, tuple[int, ...]]:
        return {"personal": (spec.size,)}

    def __post_init__(self) -> None:
        if not self.lam >= 0:
            raise ValueError(f"Ditto lam must be >= 0, got {self.lam}")

    def begin(
        self, client: ClientView, w_global: torch.Tensor, broadcast: State, state: State
    ) -> State:
        return {"personal": state.get("personal", w_global), "anchor": w_global}

    def finish(self, client: ClientView, result: LocalResult, work: State) -> TermOutput:
        anchor, lam = work["anchor"], self.lam
        v, _, _ = client.local_steps(
            work["personal"], lambda v_, g: g + lam * (v_ - anchor), "personal"
        )
        return TermOutput(state={"personal": v})

    def personalize(self, w_global: torch.Tensor, state: State) -> torch.Tensor | None:
        return state.get("personal")
