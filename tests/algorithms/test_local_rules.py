"""Defining behaviour of the FedProx, SCAFFOLD and FedNova terms (alone and composed in one
chain) on quadratic client objectives.

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
from potluck.algorithms import Algorithm, fedavg, fednova, fedprox, scaffold
from potluck.client import ClientProgram, LocalSGD
from potluck.client.terms import FedNova, FedProx, Scaffold
from potluck.core.message import MessageError
from potluck.core.params import ParamSpec
from potluck.core.parts import Contributions, GradientTerm, LocalResult, State, part_context
from potluck.core.records import Reply
from potluck.orchestrator import Evaluation
from potluck.store.sqlite import RunStore

COMMON = {"clients_per_round": 3, "epochs": 10, "batch_size": "full", "lr": 0.05}


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
    assert all(set(states[c]) == {"terms.0.scaffold/c_i"} for c in seen)
    assert all(states[c]["terms.0.scaffold/c_i"].shape == (D,) for c in seen)
    _, ckpt = store.latest_checkpoint(result.run_id)
    # the server control variate is checkpointed in the term's own slot
    assert ckpt.tensors["terms.0.scaffold/c"].shape == (D,)


def test_fedprox_local_model_is_the_proximal_point() -> None:
    """Many local steps on F_k + mu/2 ||w - w0||^2 land on its closed-form minimiser."""
    fed = quadratic_federation(A, B, [10, 10, 10])
    w0 = torch.tensor([0.5, -0.5])
    drift = []
    for mu in (0.0, 1.0, 100.0):
        sgd = LocalSGD(epochs=2000, batch_size="full", lr=0.009)  # stable: 0.009 * 120 < 2
        algo = Algorithm(local=sgd, terms=(FedProx(mu=mu),))
        program = ClientProgram(quadratic_task(), fed, algo)
        local = w0 + program.train(0, 1, w0).message.arrays["delta"]
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


def _local_result(w0: torch.Tensor, delta: torch.Tensor, steps: int) -> LocalResult:
    return LocalResult(w0, w0 + delta, delta, weight=1.0, steps=steps)


def test_fednova_normaliser_and_aggregate_by_hand() -> None:
    term = FedNova()
    assert term.normaliser(4) == 4.0
    # momentum 0.5, 2 steps: w2 = w0 - lr g1 - lr (0.5 g1 + g2): coefficients 1.5 + 1 = 2.5
    assert FedNova(momentum=0.5).normaliser(2) == pytest.approx(2.5)
    w0 = torch.zeros(2)
    out1 = term.finish(None, _local_result(w0, torch.tensor([2.0, 4.0]), steps=2), {})
    out2 = term.finish(None, _local_result(w0, torch.tensor([4.0, 4.0]), steps=4), {})
    assert out1.delta.tolist() == [1.0, 2.0] and out1.scalars["a"] == 2.0
    assert out1.weight is None  # the aggregation weight is left as it was
    contributions = Contributions(
        np.array([0, 1]), torch.tensor([1.0, 1.0]), ({}, {}), (out1.scalars, out2.scalars)
    )
    mean = (out1.delta + out2.delta) / 2  # [1, 1.5]
    agg, _ = term.server_update({}, mean, contributions, part_context(0, 1, "terms.0.fednova"))
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


def test_term_parameters_are_validated() -> None:
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
    # the only client state is SCAFFOLD's c_i, stored under the term's namespace
    states = store.client_states(info.run_id, store.clients_with_state(info.run_id))
    assert states and all(set(s) == {"terms.0.scaffold/c_i"} for s in states)


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
    assert algo.terms == (Scaffold(momentum=None),)  # None: the local optimizer's momentum
    spec = ParamSpec.from_module(nn.Linear(1, 1))
    assert algo.terms[0].bind(spec, algo.local).momentum == 0.9
    assert torch.linalg.vector_norm(run_quadratic(algo, rounds=200) - w_star) < 1e-4
    naive = replace(algo, terms=(Scaffold(momentum=0.0),))
    assert naive.terms[0].bind(spec, algo.local).momentum == 0.0  # an explicit value stays
    with pytest.raises(MessageError, match="NaN or Inf"):
        run_quadratic(naive, rounds=200)


def _train_with(
    terms: tuple[GradientTerm, ...],
    w0: torch.Tensor,
    broadcast: State,
    state: State,
    sgd: LocalSGD,
) -> tuple[ClientProgram, Reply]:
    """Client 0's reply with ``terms``; ``broadcast`` and ``state`` go to every SCAFFOLD term."""
    fed = quadratic_federation(A, B, [10, 10, 10])
    program = ClientProgram(quadratic_task(), fed, Algorithm(local=sgd, terms=terms))
    scaffolds = [ns for ns in program.term_ns if ns.endswith(".scaffold")]
    reply = program.train(
        0,
        1,
        w0,
        broadcasts={ns: broadcast for ns in scaffolds},
        state={ns: state for ns in scaffolds},
    )
    return program, reply


def test_fedprox_and_scaffold_compose_in_one_chain() -> None:
    """Both corrections apply: many local steps on F_k(w) + mu/2 ||w - w0||^2 + (c - c_k).w
    land on (A_k + mu I)^-1 (A_k b_k + mu w0 - (c - c_k)), which neither term alone reaches."""
    w0, mu = torch.tensor([0.5, -0.5]), 1.0
    c, c_k = torch.tensor([0.3, -0.2]), torch.tensor([-0.4, 0.1])
    sgd = LocalSGD(epochs=2000, batch_size="full", lr=0.009)  # 2000 full-batch steps
    broadcast, state = {"c": c}, {"c_i": c_k}
    program, both = _train_with((FedProx(mu=mu), Scaffold()), w0, broadcast, state, sgd)
    assert program.term_ns == ["terms.0.fedprox", "terms.1.scaffold"]
    w_both = w0 + both.message.arrays["delta"]
    expected = torch.linalg.solve(A[0] + mu * torch.eye(D), A[0] @ B[0] + mu * w0 - (c - c_k))
    torch.testing.assert_close(w_both, expected, atol=1e-4, rtol=0)
    alone = {
        "fedprox": _train_with((FedProx(mu=mu),), w0, broadcast, state, sgd)[1],
        "scaffold": _train_with((Scaffold(),), w0, broadcast, state, sgd)[1],
    }
    for reply in alone.values():
        w_alone = w0 + reply.message.arrays["delta"]
        assert float(torch.linalg.vector_norm(w_both - w_alone)) > 0.05
    # the chain's order does not matter for the gradient corrections
    _, swapped = _train_with((Scaffold(), FedProx(mu=mu)), w0, broadcast, state, sgd)
    torch.testing.assert_close(swapped.message.arrays["delta"], both.message.arrays["delta"])
    # SCAFFOLD's client half still runs in the chain, under its own namespace:
    # c_k+ = c_k - c + (w0 - w) / (K lr), uploaded as delta_c = c_k+ - c_k
    assert set(both.message.arrays) == {"delta", "terms.1.scaffold/delta_c"}
    assert set(both.state) == {"terms.1.scaffold"}
    c_new = c_k - c + (w0 - w_both) / (2000 * 0.009)
    torch.testing.assert_close(both.state["terms.1.scaffold"]["c_i"], c_new)
    torch.testing.assert_close(both.message.arrays["terms.1.scaffold/delta_c"], c_new - c_k)


def test_scaffold_with_fedprox_still_reaches_the_exact_optimum() -> None:
    w_star = optimum(A, B, [10, 10, 10])
    algo = fedprox(mu=1.0, terms=(Scaffold(),), **COMMON)
    assert algo.terms == (FedProx(mu=1.0), Scaffold())  # the preset's term goes first
    w = run_quadratic(algo, rounds=150)
    assert torch.linalg.vector_norm(w - w_star) < 1e-4
    # FedProx alone keeps FedAvg's drift (0.13 away here): SCAFFOLD's correction removes it
    w_prox = run_quadratic(fedprox(mu=1.0, **COMMON), rounds=150)
    assert torch.linalg.vector_norm(w_prox - w_star) > 0.1


def test_fednova_normalises_the_fedprox_update() -> None:
    """Composed, FedProx shapes the local steps and FedNova divides their delta by a_k."""
    fed = quadratic_federation(A, B, [10, 10, 10])
    w0 = torch.tensor([0.5, -0.5])
    sgd = LocalSGD(epochs=4, batch_size=5, lr=0.01)  # 2 batches per epoch: 8 steps
    replies = {}
    for name, terms in (("prox", (FedProx(mu=2.0),)), ("both", (FedNova(), FedProx(mu=2.0)))):
        program = ClientProgram(quadratic_task(), fed, Algorithm(local=sgd, terms=terms))
        replies[name] = program.train(0, 1, w0).message
    both, prox = replies["both"], replies["prox"]
    assert both.scalars["num_steps"] == 8 and both.scalars["terms.0.fednova/a"] == 8.0
    torch.testing.assert_close(both.arrays["delta"], prox.arrays["delta"] / 8)
    assert both.scalars["weight"] == prox.scalars["weight"] == 10  # the example count


def test_fednova_with_fedprox_removes_the_objective_inconsistency() -> None:
    """The setup of the FedNova test above (one client takes 10x the steps, FedAvg ends at
    0.9899): FedNova composed with FedProx still lands near the optimum 10/11 (0.9074)."""
    a, b, sizes = [torch.eye(D)] * 2, [torch.zeros(D), torch.ones(D)], [2, 20]
    args = {"clients_per_round": 2, "epochs": 1, "batch_size": 1, "lr": 0.002}
    algo = fednova(terms=(FedProx(mu=0.1),), **args)
    assert algo.terms == (FedNova(), FedProx(mu=0.1))
    exp = Experiment(
        quadratic_task(),
        quadratic_federation(a, b, sizes),
        algo,
        rounds=400,
        evaluation=Evaluation(centralized=False),
    )
    assert torch.allclose(run_experiment(exp).weights, optimum(a, b, sizes), atol=3e-3)
