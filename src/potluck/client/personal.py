"""Personalisation rules: FedPer (shared body, local head) and Ditto (a personal model
regularised towards the global one). Both keep per-client state across rounds and give
each client a personalised model for evaluation.

Example:
    >>> import torch
    >>> from potluck.core.params import ParamSpec
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    >>> rule = FedPer().bind(ParamSpec.from_module(net))  # the last layer ("1.") stays local
    >>> int(rule.mask.sum()), len(rule.mask)
    (3, 9)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from potluck.client.rules import PlainRule, RuleOutput, Tensors
from potluck.core.params import ParamSpec


def layer_mask(spec: ParamSpec, prefixes: tuple[str, ...]) -> torch.Tensor:
    """Boolean (d,) mask of the parameters whose names start with any of ``prefixes``;
    no prefixes means the last layer (the module owning the last parameter)."""
    if not prefixes:
        prefixes = (spec.names[-1].rsplit(".", 1)[0] + ".",)
    parts = [
        torch.full((n,), any(name.startswith(p) for p in prefixes), dtype=torch.bool)
        for name, n in zip(spec.names, spec.numels, strict=True)
    ]
    mask = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)
    if not bool(mask.any()):
        raise ValueError(f"no parameter matches personal layers {prefixes}; names: {spec.names}")
    if bool(mask.all()):
        raise ValueError(f"personal layers {prefixes} cover every parameter: nothing is shared")
    return mask


@dataclass(frozen=True, kw_only=True)
class FedPer(PlainRule):
    """FedPer (Arivazhagan et al. 2019, "Federated Learning with Personalization Layers"):
    the layers named by ``personal_layers`` (name prefixes; default: the last layer) never
    leave the client. Each client trains body and head from the global body and its own head;
    only the body's delta is uploaded (the head's is zero, so the global head stays put)."""

    personal_layers: tuple[str, ...] = ()
    name: str = "fedper"
    client_state: tuple[str, ...] = ("head",)
    mask: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def bind(self, spec: ParamSpec) -> FedPer:
        return replace(self, mask=layer_mask(spec, self.personal_layers))

    def _mask(self) -> torch.Tensor:
        if self.mask is None:
            raise RuntimeError("FedPer must be bound to a model's ParamSpec first (rule.bind)")
        return self.mask

    def begin(self, w_global: torch.Tensor, broadcast: Tensors, state: Tensors) -> Tensors:
        head = state.get("head")
        return {"head": w_global[self._mask()] if head is None else head}

    def start(self, w_global: torch.Tensor, rule_state: Tensors) -> torch.Tensor:
        w = w_global.clone()
        w[self._mask()] = rule_state["head"]
        return w

    def finish(
        self, w_global: torch.Tensor, w: torch.Tensor, rule_state: Tensors, steps: int, lr: float
    ) -> RuleOutput:
        mask = self._mask()
        delta = torch.where(mask, torch.zeros_like(w), w - w_global)
        return RuleOutput(arrays={"delta": delta}, state={"head": w[mask].clone()})

    def personal_model(self, w_global: torch.Tensor, state: Tensors) -> torch.Tensor | None:
        if "head" not in state:
            return None
        return self.start(w_global, {"head": state["head"]})


@dataclass(frozen=True, kw_only=True)
class Ditto(PlainRule):
    """Ditto (Li, Hu, Beirami, Smith 2021, "Ditto: Fair and Robust Federated Learning Through
    Personalization", ICML): the global model is trained as in FedAvg; each client also keeps
    a personal model ``v_k`` and, every time it is sampled, takes the same number of local
    steps on ``F_k(v) + lambda/2 ||v - w_global||^2`` from its previous ``v_k``
    (``lambda = 0``: purely local models; large ``lambda``: the global model)."""

    personal_lambda: float | None = 0.1
    name: str = "ditto"
    client_state: tuple[str, ...] = ("personal",)

    def __post_init__(self) -> None:
        if self.personal_lambda is None or self.personal_lambda < 0:
            raise ValueError(f"Ditto lambda must be >= 0, got {self.personal_lambda}")

    def personal_model(self, w_global: torch.Tensor, state: Tensors) -> torch.Tensor | None:
        return state.get("personal")
