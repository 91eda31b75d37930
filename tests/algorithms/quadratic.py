"""Quadratic client objectives for tests of local training and its gradient terms.

Client i's data rows all encode ``(A_i, b_i)``; its loss is the batch mean of
``0.5 (w - b_i)^T A_i (w - b_i)``, so full-batch gradients are exact and optima are known.
"""

from __future__ import annotations

import torch
from torch import nn

from potluck import Experiment, Federation, Task, run_experiment
from potluck.algorithms import Algorithm
from potluck.orchestrator import Evaluation

D = 2
A = [
    torch.diag(torch.tensor([1.0, 20.0])),
    torch.diag(torch.tensor([20.0, 1.0])),
    torch.tensor([[2.0, 1.0], [1.0, 3.0]]),
]
B = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([-1.0, -1.0])]


class Quadratic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x[:, : D * D].view(-1, D, D), x[:, D * D :]
        r = self.w - b
        return 0.5 * torch.einsum("ni,nij,nj->n", r, a, r)


def quadratic_task() -> Task:
    return Task(
        Quadratic,
        loss_fn=lambda out, y: out.mean(),
        correct_fn=lambda out, y: torch.zeros(()),
        name="quadratic",
    )


def quadratic_federation(
    a: list[torch.Tensor], b: list[torch.Tensor], sizes: list[int]
) -> Federation:
    clients = []
    for a_i, b_i, n in zip(a, b, sizes, strict=True):
        row = torch.cat([a_i.reshape(-1), b_i])
        clients.append((row.repeat(n, 1), torch.zeros(n, dtype=torch.int64)))
    return Federation.from_client_data(clients, num_classes=2)


def optimum(a: list[torch.Tensor], b: list[torch.Tensor], sizes: list[int]) -> torch.Tensor:
    p = [n / sum(sizes) for n in sizes]
    lhs = sum(pi * ai for pi, ai in zip(p, a, strict=True))
    rhs = sum(pi * ai @ bi for pi, ai, bi in zip(p, a, b, strict=True))
    return torch.linalg.solve(lhs, rhs)


def run_quadratic(
    algorithm: Algorithm, rounds: int, sizes: list[int] | None = None
) -> torch.Tensor:
    sizes = sizes or [10, 10, 10]
    exp = Experiment(
        quadratic_task(),
        quadratic_federation(A, B, sizes),
        algorithm,
        rounds=rounds,
        evaluation=Evaluation(centralized=False),
    )
    return run_experiment(exp).weights
