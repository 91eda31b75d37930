"""FoolsGold (Fung, Yoon, Beschastnikh 2020, "The Limitations of Federated Learning in Sybil
Settings", RAID).

Sybils pushing one poisoned objective send updates that agree with each other round after
round far more than honest clients with diverse data do. FoolsGold keeps each client's
history ``H_i`` (the sum of all its updates so far) and, each round, weighs the round's
clients by its Algorithm 1:

- ``cs_ij = cos(H_i, H_j)`` and ``v_i = max_j cs_ij`` (with ``cs_ii = 0``, as in the
  reference code's ``cs - I``: a client whose history points away from every other's has
  ``v_i = 0``);
- pardoning: ``cs_ij *= v_i / v_j`` where ``v_j > v_i`` (an honest client that merely
  resembles a sybil is not punished as much as the sybil);
- ``alpha_i = clip(1 - max_j cs_ij, 0, 1)``, rescaled by ``alpha / max_i alpha``;
- the logit confidence ``alpha_i = clip(kappa (ln(alpha_i / (1 - alpha_i)) + 0.5), 0, 1)``,
  where, as in the reference code, an ``alpha_i`` of 1 is taken as 0.99 (then clipped to 1)
  and one of 0 gives 0.

The aggregate is the ``alpha``-weighted mean of this round's updates,
``sum_i alpha_i g_i / sum_i alpha_i`` (the reference code adds ``sum_i alpha_i g_i`` to
the model, its deep-learning version that sum divided by the cohort size; here a round
without sybils, all ``alpha_i = 1``, gives the plain mean as the other aggregators do). If
every ``alpha_i`` is 0 (say every history of the round matches another's) the aggregate is
zero: the model does not move. The clients' claimed weights are ignored. The paper's
feature-importance weighting (for a softmax model's output layer) is not implemented: the
similarities use whole updates.

The histories are server state, checkpointed with each round (a resumed run goes on with
them): ``clients``, the ids of the clients seen so far (sorted, int64), and ``history``,
their float32 sums, one row each. They take 4 d bytes per client seen, up to
``num_clients * d * 4`` (for 1,000 clients of the 1.66M-parameter McMahan CNN, 6.6 GB); a
round that would grow them over ``max_history_bytes`` (2 GiB by default) is refused with a
``ValueError``. The cosines come from one float32 Gram matrix of the round's histories.

Example:
    >>> import torch
    >>> from potluck.core.parts import part_context
    >>> ctx = part_context(0, 1, "aggregator", num_clients=4, members=(0, 1, 2, 3))
    >>> sybil = [1.0, 1.0, 0.0]
    >>> deltas = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], sybil, sybil])
    >>> [round(a, 4) for a in foolsgold_weights(deltas).tolist()]  # 0 resembles the sybils
    [0.5, 1.0, 0.0, 0.0]
    >>> agg, state = FoolsGold().aggregate(deltas, torch.ones(4), {}, ctx)
    >>> agg, state["clients"].tolist()
    (tensor([0.3333, 0.0000, 0.6667]), [0, 1, 2, 3])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from potluck.aggregate.byzantine import (
    ON_DEVICE_ROBUST,
    ROBUST_NEEDS,
    check_positive,
    check_positive_int,
)
from potluck.aggregate.mean import check_stack
from potluck.core.parts import Context, State
from potluck.core.registry import register

FLOAT32_BYTES = 4


def cosine_matrix(rows: torch.Tensor) -> torch.Tensor:
    """The (K, K) cosine similarities of the rows of a (K, d) stack (float64, from a
    float32 Gram matrix; 0 against a zero row).

    Example:
        >>> cosine_matrix(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])).round(decimals=4)
        tensor([[1.0000, 0.7071, 0.0000],
                [0.7071, 1.0000, 0.0000],
                [0.0000, 0.0000, 0.0000]], dtype=torch.float64)
    """
    gram = (rows @ rows.T).double()
    norms = gram.diagonal().clamp(min=0).sqrt()
    return (gram / (norms[:, None] * norms[None, :]).clamp(min=1e-300)).clamp(-1.0, 1.0)


def foolsgold_weights(histories: torch.Tensor, kappa: float = 1.0) -> torch.Tensor:
    """FoolsGold's weight ``alpha_i`` in [0, 1] of each client from the (K, d) stack of
    the round's clients' histories (float64; all 0 when every history matches another's).

    Example:
        >>> h = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
        >>> foolsgold_weights(h).tolist()
        [1.0, 1.0, 0.0, 0.0]
    """
    cs = cosine_matrix(histories).fill_diagonal_(0.0)
    v = cs.max(dim=1).values
    row, col = v[:, None], v[None, :]
    cs = cs * torch.where(col > row, row / col.clamp(min=1e-300), 1.0)  # pardoning
    alpha = (1 - cs.max(dim=1).values).clamp(0.0, 1.0)
    top = alpha.max()
    if not float(top) > 0:
        return torch.zeros_like(alpha)
    alpha = (alpha / top).clamp(max=0.99)
    return (kappa * (torch.log(alpha / (1 - alpha)) + 0.5)).clamp(0.0, 1.0)


def check_members(members: tuple[int, ...], k: int, num_clients: int) -> torch.Tensor:
    """The round's client ids as an int64 tensor, once they name the ``k`` rows, distinct
    and inside the federation."""
    if len(members) != k:
        raise ValueError(
            f"aggregator (FoolsGold) needs the client of each of the {k} updates in "
            f"ctx.members, got {len(members)} ids"
        )
    ids = torch.tensor(members, dtype=torch.int64)
    if ids.unique().numel() != k:
        raise ValueError(f"aggregator (FoolsGold): ctx.members repeats a client: {members}")
    if k and (int(ids.min()) < 0 or (num_clients and int(ids.max()) >= num_clients)):
        raise ValueError(
            f"aggregator (FoolsGold): ctx.members must be clients 0..{num_clients - 1}, "
            f"got {members}"
        )
    return ids


@register("aggregator", "foolsgold")
@dataclass(frozen=True)
class FoolsGold:
    """The mean of the updates weighted by FoolsGold's sybil scores from each client's
    history of updates (server state), with confidence ``kappa`` (1 in the paper); the
    history may take at most ``max_history_bytes``."""

    kappa: float = 1.0
    max_history_bytes: int = 2 * 1024**3
    needs: ClassVar[frozenset[str]] = ROBUST_NEEDS
    gives: ClassVar[frozenset[str]] = ON_DEVICE_ROBUST

    def __post_init__(self) -> None:
        check_positive("kappa", self.kappa)
        check_positive_int("max_history_bytes", self.max_history_bytes)

    def init(self, w: torch.Tensor) -> State:
        return {}  # allocated on the first round, for the clients it sees

    def aggregate(
        self, deltas: torch.Tensor, weights: torch.Tensor, state: State, ctx: Context
    ) -> tuple[torch.Tensor, State]:
        check_stack(deltas, weights)
        ids = check_members(ctx.members, deltas.shape[0], ctx.num_clients).to(deltas.device)
        clients, history = self.updated_history(state, ids, deltas, ctx.num_clients)
        rows = torch.searchsorted(clients, ids)
        alpha = foolsgold_weights(history[rows], self.kappa)
        total = alpha.sum()
        if not float(total) > 0:
            aggregate = deltas.new_zeros(deltas.shape[1])
        else:
            aggregate = (alpha / total).to(deltas.dtype) @ deltas
        return aggregate, {"clients": clients, "history": history}

    def updated_history(
        self, state: State, ids: torch.Tensor, deltas: torch.Tensor, num_clients: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The sorted ids of the clients seen, and their histories with this round's
        updates added (a new tensor: the state passed in is left as it was)."""
        d = deltas.shape[1]
        seen = state.get("clients", ids.new_zeros(0))
        old = state.get("history", deltas.new_zeros((0, d)))
        if old.shape != (seen.numel(), d):
            raise ValueError(
                f"aggregator (FoolsGold): the state's history has shape {tuple(old.shape)}, "
                f"but it names {seen.numel()} clients and the updates have {d} parameters"
            )
        clients = torch.cat([seen, ids]).unique()
        self.check_size(clients.numel(), d, num_clients)
        history = deltas.new_zeros((clients.numel(), d))
        history[torch.searchsorted(clients, seen)] = old.to(deltas.dtype)
        history.index_add_(0, torch.searchsorted(clients, ids), deltas)
        return clients, history

    def check_size(self, rows: int, d: int, num_clients: int) -> None:
        """Refuse a history of ``rows`` clients over ``max_history_bytes``."""
        size = rows * d * FLOAT32_BYTES
        if size > self.max_history_bytes:
            worst = f" (at most {num_clients * d * FLOAT32_BYTES} for all {num_clients})"
            raise ValueError(
                f"aggregator (FoolsGold): the history of {rows} clients' updates of {d} "
                f"parameters takes {size} bytes, over max_history_bytes = "
                f"{self.max_history_bytes}{worst if num_clients else ''}: raise "
                "max_history_bytes or federate fewer clients"
            )
