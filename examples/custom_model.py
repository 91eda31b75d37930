"""Federated training of your own PyTorch model on your own per-client data.

Adapt the three marked places: the model, the per-client data and the algorithm settings.
Runs offline in a few seconds:

    .venv/bin/python examples/custom_model.py
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from torch import nn

from potluck import Experiment, Federation, ParamSpec, Task, run_experiment
from potluck.algorithms import fedavg
from potluck.orchestrator import Evaluation


# 1. Your model: any torch.nn.Module with float32 parameters (no BatchNorm running stats).
class TumourNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(30, 32), nn.ReLU(), nn.Linear(32, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


# 2. Your data: one (x, y) pair per client. Here: 5 "hospitals", each with a slice of
#    scikit-learn's breast-cancer set, plus a held-out centralised test set.
def hospital_data() -> tuple[
    list[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]
]:
    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    to_t = lambda a, dt: torch.tensor(a, dtype=dt)  # noqa: E731
    sites = torch.arange(len(y_tr)) % 5
    clients = [
        (to_t(x_tr[sites == s], torch.float32), to_t(y_tr[sites == s], torch.int64))
        for s in range(5)
    ]
    return clients, (to_t(x_te, torch.float32), to_t(y_te, torch.int64))


def main() -> None:
    clients, test = hospital_data()
    experiment = Experiment(
        task=Task(model_fn=TumourNet, name="breast-cancer"),
        federation=Federation.from_client_data(clients, test=test, test_fraction=0.2),
        # 3. The algorithm: FedAvg, all 5 sites every round, 2 local epochs of batch-16 SGD.
        algorithm=fedavg(clients_per_round=5, epochs=2, batch_size=16, lr=0.05),
        rounds=10,
        seed=0,
        evaluation=Evaluation(every=1, centralized=True, federated_clients=-1),
        name="breast-cancer-example",
    )
    result = run_experiment(
        experiment,
        store="potluck-runs",
        on_round=lambda r, m: print(f"round {r}: test acc {m['test_accuracy']:.3f}"),
    )
    print(f"final test accuracy {result.final['test_accuracy']:.3f}, stored as run {result.run_id}")
    model = TumourNet()  # load the trained global weights back into a module
    ParamSpec.from_module(model).load_into(model, result.weights)
    print(f"trained model ready: {sum(p.numel() for p in model.parameters())} parameters")


if __name__ == "__main__":
    main()
