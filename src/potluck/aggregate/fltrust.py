"""FLTrust (Cao, Fang, Liu, Gong 2021, "FLTrust: Byzantine-robust Federated Learning via
Trust Bootstrapping", NDSS).

The server holds a small clean root dataset and each round trains its own update ``g0`` on
it from the global model, as a client would (the round loop does this for an aggregator
with a ``root_examples`` attribute and hands the result over in
``ctx.inbox.arrays["root_delta"]``). Each client update ``g_i`` gets the trust score
``TS_i = ReLU(cos(g_i, g0))`` (an update pointing away from the server's gets 0), is
rescaled to the server's norm ``||g0||`` (so a scaled-up update gains nothing), and the
aggregate is the trust-weighted mean

    g = sum_i TS_i (||g0|| / ||g_i||) g_i / sum_i TS_i.

When every score is 0 (no update within 90 degrees of ``g0``, a zero ``g0``, or only zero
updates) the aggregate is zero: the model does not move that round. There is no assumption
on the number of Byzantine clients; every update counts alike (weights ignored).
``trust_scores`` gives the round's scores on their own, for per-client anomaly scores.

Example:
    >>> import torch
    >>> from potluck.core.message import Message
    >>> from potluck.core.parts import part_context
    >>> root = torch.tensor([1.0, 0.0])
    >>> deltas = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-5.0, 0.0], [1.0, 1.0]])
    >>> [round(v, 4) for v in trust_scores(deltas, root).tolist()]
    [1.0, 0.0, 0.0, 0.7071]
    >>> ctx = part_context(0, 1, "aggregator", inbox=Message({"root_delta": root}))
    >>> FLTrust().aggregate(deltas, torch.ones(4), {}, ctx)[0]
    tensor([0.8787, 0.2929])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from potluck.aggregate.byzantine import ON_DEVICE_ROBUST, ROBUST_NEEDS, check_positive_int
from potluck.aggregate.mean import check_stack
from potluck.core.parts import Context, State
from potluck.core.registry import register

ROOT = "root_delta"


def trust_scores(deltas: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    """FLTrust's trust score of each row of a (K, d) stack: ``ReLU(cos(g_i, g0))`` against
    the server's update ``root`` = g0 (float64; 0 for a zero row or a zero ``root``).

    Example:
        >>> deltas = torch.tensor([[3.0, 4.0], [-1.0, 0.0], [0.0, 0.0]])
        >>> trust_scores(deltas, torch.tensor([1.0, 0.0]))
        tensor([0.6000, 0.0000, 0.0000], dtype=torch.float64)
    """
    return scores_and_norms(deltas, root)[0]


def scores_and_norms(
    deltas: torch.Tensor, root: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The trust scores, the rows' norms and the root's norm (float64): the scores' work
    over the stack, which the aggregate reuses."""
    dots = (deltas @ root.to(deltas.dtype)).double()
    norms = torch.linalg.vector_norm(deltas, dim=1).double()
    root_norm = torch.linalg.vector_norm(root).double()
    cosines = dots / (norms * root_norm).clamp(min=1e-300)
    return cosines.clamp(0.0, 1.0), norms, root_norm  # ReLU (and no rounding above 1)


def check_root(root: torch.Tensor | None, d: int) -> torch.Tensor:
    """The server's update ``root``, once it is a finite (d,) floating tensor."""
    if root is None:
        raise ValueError(
            "aggregator (FLTrust) needs the server's update on its root data, "
            f"ctx.inbox.arrays[{ROOT!r}], and the context has none (the round loop computes "
            "it for an aggregator with root_examples; a direct caller must pass it)"
        )
    if root.dim() != 1 or root.numel() != d or not root.is_floating_point():
        raise ValueError(
            f"aggregator (FLTrust): {ROOT} must be a floating (d,) = ({d},) tensor like each "
            f"update, got {root.dtype} of shape {tuple(root.shape)}"
        )
    if not bool(torch.isfinite(root).all()):
        raise ValueError(f"aggregator (FLTrust): {ROOT} holds NaN or Inf")
    return root


@register("aggregator", "fltrust")
@dataclass(frozen=True)
class FLTrust:
    """The trust-weighted mean of the updates rescaled to the norm of the server's own
    update, trained each round on ``root_examples`` examples of root data (100 in the
    paper)."""

    root_examples: int = 100
    needs: ClassVar[frozenset[str]] = ROBUST_NEEDS
    gives: ClassVar[frozenset[str]] = ON_DEVICE_ROBUST

    def __post_init__(self) -> None:
        check_positive_int("root_examples", self.root_examples)

    def init(self, w: torch.Tensor) -> State:
        return {}

    def update_scores(self, deltas: torch.Tensor, ctx: Context) -> dict[str, torch.Tensor]:
        """The round's per-update anomaly scores this rule computes: its ``trust``."""
        inbox = ctx.inbox.arrays if ctx.inbox is not None else {}
        return {"trust": trust_scores(deltas, check_root(inbox.get(ROOT), deltas.shape[1]))}

    def aggregate(
        self, deltas: torch.Tensor, weights: torch.Tensor, state: State, ctx: Context
    ) -> tuple[torch.Tensor, State]:
        check_stack(deltas, weights)
        inbox = ctx.inbox.arrays if ctx.inbox is not None else {}
        root = check_root(inbox.get(ROOT), deltas.shape[1])
        scores, norms, root_norm = scores_and_norms(deltas, root)
        total = scores.sum()
        if not float(total) > 0:
            return deltas.new_zeros(deltas.shape[1]), state
        trusted = scores > 0  # a positive score implies a positive norm
        scale = torch.where(trusted, root_norm / norms.clamp(min=1e-300), 0.0)
        coefficients = scores * scale / total
        return coefficients.to(deltas.dtype) @ deltas, state
