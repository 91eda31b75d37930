"""FedPer and Ditto: personal state stays on clients and personalised models fit them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from quadratic import A, B, D, quadratic_federation, quadratic_task

from potluck.algorithms import ditto, fedper
from potluck.client import ClientProgram, LocalSGD
from potluck.client.personal import Ditto, FedPer, layer_mask
from potluck.config import ExperimentConfig
from potluck.core.params import ParamSpec
from potluck.orchestrator import run_experiment
from potluck.store.sqlite import RunStore

SHARDS = {
    "rounds": 8,
    "data": {"dataset": "digits", "num_clients": 20, "partition": {"kind": "shards"}},
    "model": {"name": "mlp"},
    "sampler": {"clients_per_round": 10},
    "client": {"epochs": 2, "batch_size": 8, "lr": 0.1},
    "evaluation": {"federated_clients": -1, "centralized": False},
}


def test_layer_mask_defaults_to_the_last_layer_and_validates() -> None:
    spec = ParamSpec.from_module(
        torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    )
    mask = layer_mask(spec, ())
    assert int(mask.sum()) == 4 * 2 + 2 and bool(mask[-10:].all())
    assert int(layer_mask(spec, ("0.",)).sum()) == 3 * 4 + 4
    with pytest.raises(ValueError, match="no parameter matches"):
        layer_mask(spec, ("head.",))
    with pytest.raises(ValueError, match="nothing is shared"):
        layer_mask(spec, ("0.", "2."))


def test_fedper_heads_stay_local_and_personal_accuracy_beats_global(tmp_path: Path) -> None:
    cfg = ExperimentConfig.from_dict({**SHARDS, "algorithm": {"name": "fedper"}})
    exp = cfg.build()
    store = RunStore(tmp_path)
    result = run_experiment(exp, store)
    program = ClientProgram(exp.task, exp.federation, LocalSGD(), seed=exp.seed)
    w0 = program.initial_weights()
    head = layer_mask(program.spec, ())
    # the global head never moves: only body deltas are uploaded
    assert torch.equal(result.weights[head], w0[head])
    assert not torch.equal(result.weights[~head], w0[~head])
    states = store.client_states(result.run_id, list(range(20)))
    heads = [s["head"] for s in states if s]
    assert len(heads) >= 10 and not torch.equal(heads[0], heads[1])
    final = result.history[-1]
    # two labels per client: a personal head fits them far better than one global head
    assert final["personal_accuracy"] > final["fed_accuracy"] + 0.2


def test_ditto_personal_step_by_hand() -> None:
    """One full-batch step on F(v) + lam/2 ||v - w||^2 from v0, next to the global step."""
    fed = quadratic_federation(A, B, [10, 10, 10])
    lr, lam = 0.05, 2.0
    program = ClientProgram(
        quadratic_task(), fed, LocalSGD(batch_size=None, lr=lr), rule=Ditto(personal_lambda=lam)
    )
    w, v0 = torch.tensor([0.3, 0.1]), torch.tensor([-0.5, 0.4])
    out = program.train(1, w, round=1, state={"personal": v0})
    expected_v = v0 - lr * (A[1] @ (v0 - B[1]) + lam * (v0 - w))
    torch.testing.assert_close(out.state["personal"], expected_v)
    expected_delta = -lr * (A[1] @ (w - B[1]))  # the global update is plain local SGD
    torch.testing.assert_close(out.message.arrays["delta"], expected_delta)


def test_ditto_lambda_interpolates_between_local_and_global() -> None:
    fed = quadratic_federation(A, B, [10, 10, 10])
    w = torch.zeros(D)
    finals = {}
    for lam, lr in ((0.0, 0.04), (1e3, 1e-3)):  # each stable: lr * (lam + 20) < 2
        sgd = LocalSGD(epochs=3000, batch_size=None, lr=lr)
        program = ClientProgram(quadratic_task(), fed, sgd, rule=Ditto(personal_lambda=lam))
        finals[lam] = program.train(0, w, round=1).state["personal"]
    torch.testing.assert_close(finals[0.0], B[0], atol=1e-3, rtol=0)  # the local optimum
    assert float(torch.linalg.vector_norm(finals[1e3] - w)) < 0.03  # pinned to the global


def test_ditto_end_to_end_personal_beats_global() -> None:
    cfg = ExperimentConfig.from_dict({**SHARDS, "algorithm": {"name": "ditto", "lam": 0.1}})
    final = run_experiment(cfg.build()).history[-1]
    assert final["personal_accuracy"] > final["fed_accuracy"] + 0.2


def test_finetuned_evaluation_is_reported() -> None:
    cfg = ExperimentConfig.from_dict(
        {**SHARDS, "rounds": 3, "evaluation": {**SHARDS["evaluation"], "finetune_epochs": 1}}
    )
    final = run_experiment(cfg.build()).history[-1]
    assert final["finetuned_accuracy"] > final["fed_accuracy"]


def test_compositions() -> None:
    assert fedper(clients_per_round=2, personal_layers=("2.",)).rule == FedPer(
        personal_layers=("2.",)
    )
    assert ditto(clients_per_round=2, lam=0.3).rule.personal_lambda == 0.3
    with pytest.raises(ValueError, match="Ditto lambda must be >= 0"):
        Ditto(personal_lambda=-1.0)
