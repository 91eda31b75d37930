"""FedPer and Ditto: personal state stays on clients and personalised models fit them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from quadratic import A, B, D, quadratic_federation, quadratic_task

from potluck import Experiment, Federation, Task
from potluck.algorithms import Algorithm, ditto, fedavg, fedper
from potluck.client import ClientProgram, LocalSGD
from potluck.client.personal import Ditto, FedPer
from potluck.config import ExperimentConfig
from potluck.core.params import ParamSpec
from potluck.orchestrator import Evaluation, run_experiment
from potluck.store.sqlite import RunStore
from potluck.updates import KeepLocal

SHARDS = {
    "rounds": 8,
    "data": {"dataset": "digits", "num_clients": 20, "partition": {"kind": "shards"}},
    "model": {"name": "mlp"},
    "sampler": {"clients_per_round": 10},
    "client": {"epochs": 2, "batch_size": 8, "lr": 0.1},
    "evaluation": {"federated_clients": -1, "centralized": False},
}

FRAMING = 200  # bytes of an update's names, dtypes, shapes and scalars, at most


def test_layer_mask_defaults_to_the_last_layer_and_validates() -> None:
    spec = ParamSpec.from_module(
        torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    )
    mask = spec.layer_mask(())
    assert int(mask.sum()) == 4 * 2 + 2 and bool(mask[-10:].all())
    assert int(spec.layer_mask(("0.",)).sum()) == 3 * 4 + 4
    with pytest.raises(ValueError, match="no parameter matches layers"):
        spec.layer_mask(("head.",))
    with pytest.raises(ValueError, match="nothing is shared"):
        spec.layer_mask(("0.", "2."))
    # FedPer and KeepLocal bound to the model use that mask
    assert torch.equal(FedPer().bind(spec, LocalSGD()).mask, mask)
    assert torch.equal(KeepLocal(("0.",)).bind(spec).mask, spec.layer_mask(("0.",)))


def test_fedper_heads_stay_local_and_personal_accuracy_beats_global(tmp_path: Path) -> None:
    cfg = ExperimentConfig.from_dict({**SHARDS, "algorithm": {"name": "fedper"}})
    exp = cfg.build()
    store = RunStore(tmp_path)
    result = run_experiment(exp, store)
    program = exp.algorithm.client_program(exp.task, exp.federation, seed=exp.seed)
    w0 = program.initial_weights()
    head = program.spec.layer_mask(())
    # the global head never moves: only body deltas are uploaded
    assert torch.equal(result.weights[head], w0[head])
    assert not torch.equal(result.weights[~head], w0[~head])
    states = store.client_states(result.run_id, list(range(20)))
    heads = {c: s["terms.0.fedper/head"] for c, s in enumerate(states) if s}
    first, second = list(heads.values())[:2]
    assert len(heads) >= 10 and not torch.equal(first, second)
    # each personal model of the result is the global body with the client's stored head
    assert sorted(result.personal) == sorted(heads)
    for c, h in heads.items():
        assert torch.equal(result.personal[c][head], h)
        assert torch.equal(result.personal[c][~head], result.weights[~head])
    final = result.history[-1]
    # two labels per client: a personal head fits them far better than one global head
    assert final["personal_accuracy"] > final["fed_accuracy"] + 0.2


def test_ditto_personal_step_by_hand() -> None:
    """One full-batch step on F(v) + lam/2 ||v - w||^2 from v0, next to the global step."""
    fed = quadratic_federation(A, B, [10, 10, 10])
    lr, lam = 0.05, 2.0
    algo = Algorithm(local=LocalSGD(batch_size="full", lr=lr), terms=(Ditto(lam=lam),))
    program = ClientProgram(quadratic_task(), fed, algo)
    w, v0 = torch.tensor([0.3, 0.1]), torch.tensor([-0.5, 0.4])
    out = program.train(1, 1, w, state={"terms.0.ditto": {"personal": v0}})
    expected_v = v0 - lr * (A[1] @ (v0 - B[1]) + lam * (v0 - w))
    torch.testing.assert_close(out.state["terms.0.ditto"]["personal"], expected_v)
    expected_delta = -lr * (A[1] @ (w - B[1]))  # the global update is plain local SGD
    torch.testing.assert_close(out.message.arrays["delta"], expected_delta)


def test_ditto_lambda_interpolates_between_local_and_global() -> None:
    fed = quadratic_federation(A, B, [10, 10, 10])
    w = torch.zeros(D)
    finals = {}
    for lam, lr in ((0.0, 0.04), (1e3, 1e-3)):  # each stable: lr * (lam + 20) < 2
        sgd = LocalSGD(epochs=3000, batch_size="full", lr=lr)
        program = ClientProgram(quadratic_task(), fed, Algorithm(local=sgd, terms=(Ditto(lam),)))
        finals[lam] = program.train(0, 1, w).state["terms.0.ditto"]["personal"]
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
    algo = fedper(clients_per_round=2, personal_layers=("2.",))
    assert algo.terms == (FedPer(personal_layers=("2.",)),)
    assert algo.transforms == (KeepLocal(layers=("2.",)),)  # the head is not even sent
    assert ditto(clients_per_round=2, lam=0.3).terms == (Ditto(lam=0.3),)
    with pytest.raises(ValueError, match="Ditto lam must be >= 0"):
        Ditto(lam=-1.0)


def test_two_personal_models_are_refused_naming_both_terms() -> None:
    both = "terms.0.fedper (FedPer) and terms.1.ditto (Ditto) both give a personal model"
    with pytest.raises(ValueError, match=rf"^algorithm 'fedavg' cannot run: {re.escape(both)}"):
        Algorithm(terms=(FedPer(), Ditto()))
    with pytest.raises(ValueError, match=re.escape(both)):
        fedper(clients_per_round=2, terms=(Ditto(),))  # the preset's FedPer goes first
    reverse = "terms.0.ditto (Ditto) and terms.1.fedper (FedPer) both give a personal model"
    with pytest.raises(ValueError, match=re.escape(reverse)):
        ditto(clients_per_round=2, terms=(FedPer(),))


def test_keep_local_sends_only_the_body_and_the_global_head_stays_put(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    clients = [
        (torch.randn(24, 4, generator=g), torch.randint(0, 3, (24,), generator=g)) for _ in range(8)
    ]
    fed = Federation.from_client_data(clients, test_fraction=0.25, num_classes=3)
    task = Task(lambda: torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 3)))
    args = {"clients_per_round": 4, "epochs": 1, "batch_size": 6, "lr": 0.1}
    runs = {}
    for name, algo in (("fedavg", fedavg(**args)), ("fedper", fedper(**args))):
        exp = Experiment(task, fed, algo, rounds=3, evaluation=Evaluation(centralized=False))
        runs[name] = run_experiment(exp, RunStore(tmp_path / name))
    program = fedper(**args).client_program(task, fed, seed=0)
    head = program.spec.layer_mask(())
    d, head_size = program.spec.size, int(head.sum())
    assert (d, head_size) == (4 * 5 + 5 + 5 * 3 + 3, 5 * 3 + 3)
    fedavg_up = [m["bytes_up"] for m in runs["fedavg"].history]
    fedper_up = [m["bytes_up"] for m in runs["fedper"].history]
    # float32 deltas of 4 clients, each with its message's framing: names, dtypes, shapes
    # and scalars, a hundred bytes or so (Message.wire_bytes, checked in test_wire.py)
    assert all(0 < up - 4 * d * 4 < 4 * FRAMING for up in fedavg_up)
    saved = [a - b for a, b in zip(fedavg_up, fedper_up, strict=True)]
    # the head's floats, and up to 4 bytes a message of shorter length and shape varints
    assert all(0 <= s - head_size * 4 * 4 <= 4 * 4 for s in saved), saved
    # per client: the body's float32 coordinates, and the framing
    per_client = RunStore(tmp_path / "fedper").client_metrics(runs["fedper"].run_id)
    assert len(per_client) == 12
    assert all(0 < m["bytes_up"] - (d - head_size) * 4 < FRAMING for _, _, m in per_client)
    # the server filled the head with zeros: the global head never moved, the body did
    w0 = program.initial_weights()
    final = runs["fedper"].weights
    assert torch.equal(final[head], w0[head]) and not torch.equal(final[~head], w0[~head])
