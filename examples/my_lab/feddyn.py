"""FedDyn (Acar, Zhao, Matas, Mattina, Whatmough, Saligrama 2021, "Federated Learning Based
on Dynamic Regularization", ICLR) as a gradient term with a server half.

Client ``k`` minimises ``L_k(w) - <h_k, w> + alpha/2 ||w - w_global||^2``, where its state
``h_k`` (the gradient of ``L_k`` at its last local model) is updated to
``h_k - alpha (w_k - w_global)`` after training. The server keeps ``h``, moves it by
``-alpha/m`` times the sum of the cohort's updates (``m`` clients in all) and sets the global
model to the plain mean of the local models minus ``h / alpha``; with server SGD at lr 1 the
term does that by rescaling the aggregate (a declared need), and it weights clients equally.

Example:
    >>> import torch
    >>> term = FedDyn(alpha=0.1)
    >>> work = term.begin(None, torch.zeros(2), {}, {})
    >>> term.gradient(torch.ones(2), torch.zeros(2), work).tolist()
    [0.10000000149011612, 0.10000000149011612]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from potluck.client import Term
from potluck.core.parts import (
    ClientView,
    Context,
    Contributions,
    LocalResult,
    Need,
    State,
    TermOutput,
)


@dataclass(frozen=True)
class FedDyn(Term):
    """Dynamic regularisation with weight ``alpha``."""

    alpha: float = 0.01
    needs: ClassVar[frozenset[str]] = frozenset({Need.PLAIN_SERVER_STEP})
    client_state: ClassVar[dict[str, str]] = {"h_k": "float32"}

    def __post_init__(self) -> None:
        if not self.alpha > 0:
            raise ValueError(f"FedDyn alpha must be > 0, got {self.alpha}")

    def server_init(self, w: torch.Tensor) -> State:
        return {"h": torch.zeros_like(w)}

    def begin(
        self, client: ClientView, w_global: torch.Tensor, broadcast: State, state: State
    ) -> State:
        return {"anchor": w_global, "h_k": state.get("h_k", torch.zeros_like(w_global))}

    def gradient(self, w: torch.Tensor, grad: torch.Tensor, work: State) -> torch.Tensor:
        return grad - work["h_k"] + self.alpha * (w - work["anchor"])

    def finish(self, client: ClientView, result: LocalResult, work: State) -> TermOutput:
        h_k = work["h_k"] - self.alpha * (result.w - result.w_global)
        return TermOutput(weight=1.0, state={"h_k": h_k})

    def server_update(
        self, state: State, aggregate: torch.Tensor, contributions: Contributions, ctx: Context
    ) -> tuple[torch.Tensor, State]:
        share = len(contributions.clients) / ctx.num_clients
        h = state["h"] - self.alpha * share * aggregate
        return aggregate - h / self.alpha, {"h": h}
