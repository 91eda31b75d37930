"""q-FFL: q = 0 is an unweighted mean of local models; larger q serves the worst clients."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from quadratic import A, B, quadratic_federation, quadratic_task
from torch import nn

from potluck import Experiment, Federation, Task, run_experiment
from potluck.algorithms import Algorithm, fedavg, qffl
from potluck.client import ClientProgram, LocalSGD
from potluck.client.terms import QFFL
from potluck.core.parts import Contributions, LocalResult, Need, needs, part_context
from potluck.optim import ServerAdam
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
    program = ClientProgram(Task(lambda: nn.Linear(2, 2)), fed, fedavg())
    return np.array(
        [program.evaluate(c, weights)["global"].accuracy for c in range(fed.num_clients)]
    )


def client_with_lr(lr: float) -> SimpleNamespace:
    """The part of a ``ClientView`` that ``QFFL.finish`` reads: the local optimizer."""
    return SimpleNamespace(optimizer=LocalSGD(lr=lr))


def finish(term: QFFL, w0: torch.Tensor, w: torch.Tensor, loss: float, lr: float, steps: int):
    """``term.finish`` for local training from ``w0`` to ``w`` with global loss ``loss``."""
    result = LocalResult(w0, w, w - w0, weight=1.0, steps=steps)
    return term.finish(client_with_lr(lr), result, {"global_loss": torch.tensor(loss)})


def test_q_zero_step_is_the_unweighted_mean_of_local_models() -> None:
    term, lr = QFFL(q=0.0), 0.1
    w0 = torch.tensor([1.0, -1.0])
    locals_ = [torch.tensor([0.0, 0.0]), torch.tensor([3.0, 1.0])]
    outs = [finish(term, w0, w, loss=2.0, lr=lr, steps=5) for w in locals_]
    weights = torch.tensor([o.weight for o in outs])
    deltas = torch.stack([o.delta for o in outs])
    step = (weights[:, None] * deltas).sum(0) / weights.sum()
    torch.testing.assert_close(w0 + step, torch.stack(locals_).mean(0))


def test_q_step_by_hand() -> None:
    # one client, q=1, F=2, lr=0.5 (L=2), w0 - w = [1, 0]: dW = [2, 0], Delta = F dW = [4, 0],
    # h = q F^0 |dW|^2 + L F = 4 + 4 = 8, step = -Delta / h = [-0.5, 0]
    out = finish(QFFL(q=1.0), torch.tensor([1.0, 0.0]), torch.zeros(2), loss=2.0, lr=0.5, steps=1)
    assert out.delta.tolist() == [-0.5, 0.0] and out.weight == 8.0
    contributions = Contributions(np.array([0]), torch.tensor([8.0]), ({},), ({},))
    agg, state = QFFL().server_update(
        {}, out.delta, contributions, part_context(0, 1, "terms.0.qffl")
    )
    assert agg.tolist() == [-0.5, 0.0] and state == {}


def test_client_uploads_the_q_delta_with_weight_h() -> None:
    """Through the client program, on client 0's quadratic: one full-batch step of rate lr
    from w0, so dW = L (w0 - w1) is the gradient at w0 and F = F_0(w0) is known."""
    q, lr = 2.0, 0.04
    fed = quadratic_federation(A, B, [10, 10, 10])
    algo = Algorithm(local=LocalSGD(batch_size="full", lr=lr), terms=(QFFL(q=q),))
    w0 = torch.tensor([0.5, -0.5])
    msg = ClientProgram(quadratic_task(), fed, algo).train(0, 1, w0).message
    r = w0 - B[0]
    loss, grad = float(0.5 * r @ A[0] @ r), A[0] @ r
    h = q * loss ** (q - 1) * float(grad @ grad) + loss**q / lr
    assert msg.scalars["weight"] == pytest.approx(h, rel=1e-5)  # h_k, not the example count
    torch.testing.assert_close(msg.arrays["delta"], -(loss**q) * grad / h)
    assert msg.scalars["num_examples"] == 10 and set(msg.arrays) == {"delta"}


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
    # the term declares that it needs the plain server step (and its weights honoured);
    # server SGD gives the step only with lr 1 and no momentum; the refusal names both parts
    assert needs(QFFL()) == {Need.PLAIN_SERVER_STEP, Need.WEIGHTED_UPDATES}
    need = re.escape("terms.0.qffl (QFFL) needs the server step w + mean delta")
    for server, name in (
        ({"server_lr": 0.5}, r"server \(ServerSGD\) \(lr=0.5"),
        ({"server_momentum": 0.9}, r"server \(ServerSGD\) \(lr=1.0, momentum=0.9"),
        ({"server": ServerAdam()}, r"server \(ServerAdam\)"),
    ):
        with pytest.raises(ValueError, match=f"{need}.*{name}"):
            qffl(clients_per_round=2, **server)
    assert qffl(clients_per_round=2).server.lr == 1.0  # the default is accepted
    # FedAvg has no term and needs nothing of its server: any server step goes
    plain = fedavg(clients_per_round=2, server_lr=0.5)
    assert plain.terms == () and not any(needs(part) for _, part in plain.parts())
