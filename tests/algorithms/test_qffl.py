"""q-FFL: q = 0 is an unweighted mean of local models; larger q serves the worst clients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from potluck import Experiment, Federation, Task, run_experiment
from potluck.algorithms import fedavg, qffl
from potluck.client import ClientProgram, LocalSGD
from potluck.client.rules import QFFL, Uploaded
from potluck.orchestrator import Evaluation


def two_group_federation(seed: int = 0) -> Federation:
    """8 majority clients label by x0 > 0, 2 minority clients by x1 > 0: one linear model
    cannot serve both, so the objective decides who is served."""
    rng = np.random.default_rng(seed)
    clients = []
    for k in range(10):
        x = rng.normal(size=(200, 2)).astype(np.float32)
        y = (x[:, 0] > 0) if k < 8 else (x[:, 1] > 0)
        clients.append((x, y.astype(np.int64)))
    return Federation.from_client_data(clients, test_fraction=0.5, num_classes=2)


def per_client_accuracy(fed: Federation, weights: torch.Tensor) -> np.ndarray:
    program = ClientProgram(Task(lambda: nn.Linear(2, 2)), fed, LocalSGD())
    return np.array(
        [program.evaluate(c, weights)["global"].accuracy for c in range(fed.num_clients)]
    )


def test_q_zero_step_is_the_unweighted_mean_of_local_models() -> None:
    rule, lr = QFFL(q=0.0), 0.1
    w0 = torch.tensor([1.0, -1.0])
    locals_ = [torch.tensor([0.0, 0.0]), torch.tensor([3.0, 1.0])]
    outs = [rule.finish(w0, w, {"global_loss": torch.tensor(2.0)}, steps=5, lr=lr) for w in locals_]
    weights = torch.tensor([o.scalars["weight"] for o in outs])
    deltas = torch.stack([o.arrays["delta"] for o in outs])
    step = (weights[:, None] * deltas).sum(0) / weights.sum()
    torch.testing.assert_close(w0 + step, torch.stack(locals_).mean(0))


def test_q_step_by_hand() -> None:
    # one client, q=1, F=2, lr=0.5 (L=2), w0 - w = [1, 0]: dW = [2, 0], Delta = F dW = [4, 0],
    # h = q F^0 |dW|^2 + L F = 4 + 4 = 8, step = -Delta / h = [-0.5, 0]
    out = QFFL(q=1.0).finish(
        torch.tensor([1.0, 0.0]),
        torch.zeros(2),
        {"global_loss": torch.tensor(2.0)},
        steps=1,
        lr=0.5,
    )
    assert out.arrays["delta"].tolist() == [-0.5, 0.0] and out.scalars["weight"] == 8.0
    agg, _ = QFFL().server_update(
        {},
        out.arrays["delta"],
        [Uploaded(out.arrays, out.scalars)],
        torch.tensor([8.0]),
        num_clients=1,
    )
    assert agg.tolist() == [-0.5, 0.0]


def test_larger_q_raises_the_worst_clients_accuracy() -> None:
    fed = two_group_federation()
    task = Task(lambda: nn.Linear(2, 2))
    args = {"clients_per_round": 10, "epochs": 1, "batch_size": 50, "lr": 0.1}
    worst, mean = {}, {}
    for q in (0.0, 5.0):
        exp = Experiment(
            task, fed, qffl(q=q, **args), rounds=60, evaluation=Evaluation(centralized=False)
        )
        acc = per_client_accuracy(fed, run_experiment(exp).weights)
        worst[q], mean[q] = acc.min(), acc.mean()
    assert worst[5.0] > worst[0.0] + 0.1  # 0.55 -> 0.72 here
    # the usual price: the average client is served somewhat less well, not collapsed
    assert mean[5.0] > 0.7


def test_qffl_validates() -> None:
    with pytest.raises(ValueError, match="q-FFL q must be >= 0"):
        QFFL(q=-1)
    with pytest.raises(ValueError, match="keep server SGD with lr 1"):
        qffl(clients_per_round=2, server_lr=0.5)
    assert fedavg(clients_per_round=2).rule.needs_global_loss is False
