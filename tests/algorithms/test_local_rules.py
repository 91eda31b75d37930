"""Defining behaviour of FedProx, SCAFFOLD and FedNova on quadratic client objectives.

Client i has data rows that all encode ``(A_i, b_i)``; its loss is the mean over the batch of
``0.5 (w - b_i)^T A_i (w - b_i)``, so full-batch gradients are exact and optima are known.
"""

from __future__ import annotations

import sqlite3
from dataclasses import replace

import numpy as np
import pytest
import torch
from quadratic import A, B, D, optimum, quadratic_federation, quadratic_task, run_quadratic
from torch import nn

from potluck import Experiment, Federation, Task, run_experiment
from potluck.algorithms import fedavg, fednova, fedprox, scaffold
from potluck.client import ClientProgram, LocalSGD
from potluck.client.rules import FedNova, FedProx, Uploaded
from potluck.core.message import MessageError
from potluck.orchestrator import Evaluation
from potluck.store.sqlite import RunStore

COMMON = {"clients_per_round": 3, "epochs": 10, "batch_size": None, "lr": 0.05}


def test_scaffold_reaches_the_exact_optimum_where_fedavg_is_biased() -> None:
    w_star = optimum(A, B, [10, 10, 10])
    w_avg = run_quadratic(fedavg(**COMMON), rounds=150)
    w_scaffold = run_quadratic(scaffold(**COMMON), rounds=150)
    assert torch.linalg.vector_norm(w_scaffold - w_star) < 1e-4
    # FedAvg with 10 local steps stops at a biased fixed point (client drift): 0.135 away
    assert torch.linalg.vector_norm(w_avg - w_star) > 0.1
    # ... which is a fixed point: more rounds do not remove the bias
    w_avg_more = run_quadratic(fedavg(**COMMON), rounds=300)
    assert torch.linalg.vector_norm(w_avg_more - w_avg) < 1e-5


def test_fedavg_with_one_local_step_is_unbiased_sanity_check() -> None:
    w_star = optimum(A, B, [10, 10, 10])
    w = run_quadratic(fedavg(**{**COMMON, "epochs": 1}), rounds=1000)
    assert torch.linalg.vector_norm(w - w_star) < 1e-4


def test_scaffold_keeps_control_variates_per_client_in_the_store(tmp_path) -> None:
    fed = quadratic_federation(A * 4, B * 4, [10] * 12)
    exp = Experiment(
        quadratic_task(),
        fed,
        scaffold(**{**COMMON, "clients_per_round": 4}),
        rounds=3,
        evaluation=Evaluation(centralized=False),
    )
    store = RunStore(tmp_path)
    result = run_experiment(exp, store)
    seen = {cid for _, cid, _ in store.client_metrics(result.run_id)}
    states = store.client_states(result.run_id, list(range(12)))
    assert {c for c in range(12) if states[c]} == seen  # exactly the clients that trained
    assert all(states[c]["c_i"].shape == (D,) for c in seen)
    _, ckpt = store.latest_checkpoint(result.run_id)
    assert "rule/c" in ckpt.tensors  # the server control variate is checkpointed


def test_fedprox_local_model_is_the_proximal_point() -> None:
    """Many local steps on F_k + mu/2 ||w - w0||^2 land on its closed-form minimiser."""
    fed = quadratic_federation(A, B, [10, 10, 10])
    w0 = torch.tensor([0.5, -0.5])
    drift = []
    for mu in (0.0, 1.0, 100.0):
        sgd = LocalSGD(epochs=2000, batch_size=None, lr=0.009)  # stable: 0.009 * 120 < 2
        program = ClientProgram(quadratic_task(), fed, sgd, rule=FedProx(mu=mu))
        local = w0 + program.train(0, w0, round=1).message.arrays["delta"]
        expected = torch.linalg.solve(A[0] + mu * torch.eye(D), A[0] @ B[0] + mu * w0)
        torch.testing.assert_close(local, expected, atol=1e-4, rtol=0)
        drift.append(float(torch.linalg.vector_norm(local - w0)))
    # larger mu keeps the local model nearer the global one: mu=100 drifts under 1/5 as far
    assert drift[0] > drift[1] > drift[2] and drift[2] < 0.2 * drift[0]


def test_fedprox_aggregates_stragglers_partial_work_fedavg_drops_them() -> None:
    g = torch.Generator().manual_seed(0)
    clients = [
        (torch.randn(20, 3, generator=g), torch.randint(0, 2, (20,), generator=g))
        for _ in range(10)
    ]
    fed = Federation.from_client_data(clients)
    task = Task(lambda: nn.Linear(3, 2))
    args = {"clients_per_round": 10, "epochs": 4, "batch_size": 5, "lr": 0.05}
    runs = {}
    for name, algo in (
        ("fedavg", fedavg(**args, stragglers=0.5)),
        ("fedprox", fedprox(mu=0.1, **args, stragglers=0.5)),
    ):
        exp = Experiment(task, fed, algo, rounds=3, evaluation=Evaluation(centralized=False))
        runs[name] = run_experiment(exp).history
    assert [m["updates"] for m in runs["fedavg"]] == [5.0, 5.0, 5.0]
    assert [m["updates"] for m in runs["fedprox"]] == [10.0, 10.0, 10.0]


def test_fednova_normaliser_and_aggregate_by_hand() -> None:
    rule = FedNova()
    assert rule.normaliser(4) == 4.0
    # momentum 0.5, 2 steps: w2 = w0 - lr g1 - lr (0.5 g1 + g2): coefficients 1.5 + 1 = 2.5
    assert FedNova(momentum=0.5).normaliser(2) == pytest.approx(2.5)
    w0 = torch.zeros(2)
    out1 = rule.finish(w0, torch.tensor([2.0, 4.0]), {}, steps=2, lr=0.1)
    out2 = rule.finish(w0, torch.tensor([4.0, 4.0]), {}, steps=4, lr=0.1)
    assert out1.arrays["delta"].tolist() == [1.0, 2.0] and out1.scalars["fednova_a"] == 2.0
    uploads = [Uploaded(o.arrays, o.scalars) for o in (out1, out2)]
    weights = torch.tensor([1.0, 1.0])
    mean = (out1.arrays["delta"] + out2.arrays["delta"]) / 2  # [1, 1.5]
    agg, _ = rule.server_update({}, mean, uploads, weights, num_clients=2)
    # tau_eff = (2 + 4) / 2 = 3
    assert agg.tolist() == [3.0, 4.5]


def test_fednova_removes_objective_inconsistency_of_unequal_local_steps() -> None:
    """Identical curvature, optima 0 and 1, one client takes 10x the steps (Wang et al.).

    FedNova's fixed point is the true optimum up to O(lr) (0.9076 vs 0.9091 at lr 0.002);
    FedAvg's is the optimum of the step-weighted surrogate, 0.9899.
    """
    a, b, sizes = [torch.eye(D)] * 2, [torch.zeros(D), torch.ones(D)], [2, 20]
    args = {"clients_per_round": 2, "epochs": 1, "batch_size": 1, "lr": 0.002}
    fed = quadratic_federation(a, b, sizes)
    target = optimum(a, b, sizes)  # 10/11 in each coordinate
    finals = {}
    for name, algo in (("fedavg", fedavg(**args)), ("fednova", fednova(**args))):
        exp = Experiment(
            quadratic_task(), fed, algo, rounds=400, evaluation=Evaluation(centralized=False)
        )
        finals[name] = run_experiment(exp).weights
    assert torch.allclose(finals["fednova"], target, atol=3e-3)
    # FedAvg drifts towards the client with more steps (its optimum is 1)
    assert float(finals["fedavg"][0]) > float(target[0]) + 0.07


def test_rule_parameters_are_validated() -> None:
    with pytest.raises(ValueError, match="FedProx mu must be >= 0"):
        FedProx(mu=-1)
    with pytest.raises(ValueError, match=r"FedNova momentum must be in \[0, 1\)"):
        FedNova(momentum=1.0)


def test_scaffold_resume_is_exact(tmp_path) -> None:
    from potluck import resume_experiment

    fed = quadratic_federation(A * 3, B * 3, [10] * 9)
    algo = scaffold(**{**COMMON, "clients_per_round": 3})
    exp = Experiment(
        quadratic_task(),
        fed,
        algo,
        rounds=8,
        evaluation=Evaluation(centralized=False),
        checkpoint_every=3,
    )
    full = run_experiment(exp).weights

    class Stop(Exception):
        pass

    def stop(rnd: int, _m: object) -> None:
        if rnd == 5:
            raise Stop

    store = RunStore(tmp_path)
    with pytest.raises(Stop):
        run_experiment(exp, store, on_round=stop)
    (info,) = store.list_runs()
    resumed = resume_experiment(exp, store, info.run_id)  # from the round-3 checkpoint
    assert torch.equal(resumed.weights, full)
    np.testing.assert_array_equal([r.round for r in store.rounds(info.run_id)], range(1, 9))
    assert replace(algo).rule.client_state == ("c_i",)


def test_scaffold_scales_to_100000_virtual_clients(tmp_path) -> None:
    """Client control variates cost storage only for clients that trained."""
    from potluck.data.partition import iid
    from potluck.data.sources import ArrayDataset, DataSource

    rng = np.random.default_rng(0)
    n, clients = 300_000, 100_000
    train = ArrayDataset(
        rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 3, n).astype(np.int64)
    )
    test = ArrayDataset(train.x[:100], train.y[:100])
    source = DataSource("virtual", train, test, num_classes=3, input_shape=(4,))
    fed = Federation(source, iid(n, clients, rng), test_fraction=0.0)
    exp = Experiment(
        Task(lambda: torch.nn.Linear(4, 3)),
        fed,
        scaffold(clients_per_round=50, epochs=1, batch_size=3, lr=0.1),
        rounds=3,
        evaluation=Evaluation(centralized=True),
    )
    store = RunStore(tmp_path)
    result = run_experiment(exp, store)
    trained = {cid for _, cid, m in store.client_metrics(result.run_id) if "num_examples" in m}
    assert len(trained) == 150  # 3 rounds x 50 distinct (with overwhelming probability)
    with sqlite3.connect(tmp_path / "potluck.db") as conn:
        rows = conn.execute("SELECT COUNT(*) FROM client_state").fetchone()[0]
    assert rows == len(trained)
    sample = store.client_states(result.run_id, [0, 1, 2, *sorted(trained)[:2]])
    assert sum(bool(s) for s in sample) >= 2


def test_scaffold_with_local_momentum_still_reaches_the_optimum() -> None:
    """With momentum 0.9 the control variates divide by the momentum-weighted step count;
    dividing by K instead (the paper's formula, which has no momentum) diverges here."""
    w_star = optimum(A, B, [10, 10, 10])
    args = {"clients_per_round": 3, "epochs": 10, "batch_size": None, "lr": 0.01, "momentum": 0.9}
    algo = scaffold(**args)
    assert algo.rule.momentum == 0.9
    assert torch.linalg.vector_norm(run_quadratic(algo, rounds=200) - w_star) < 1e-4
    naive = replace(algo, rule=replace(algo.rule, momentum=0.0))
    with pytest.raises(MessageError, match="NaN or Inf"):
        run_quadratic(naive, rounds=200)
