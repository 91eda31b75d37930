"""Every engine runs the same experiments to the same results.

Each experiment (digits, MLP, 20 clients, 5 per round, 3 rounds) runs on every engine of
``available_engines()`` and is compared with the inline engine, the reference: per-round
``train_loss``, ``test_accuracy``, ``fed_accuracy`` (and ``personal_accuracy`` where a term
keeps personal models), the final weights and the personal models. The reference's own
determinism is a separate test (a fresh run against a cached one).

The pool engine runs the inline engine's code in worker processes, one torch thread each:
with ``threads = 1`` here it is bitwise equal to the reference.

Tolerance: engines that batch clients (``vectorized``) compute the same float32 steps with
batched matmuls and a masked mean over padded batches, which round in a different order
(about one float32 ulp, 1.2e-7 relative, per operation). Over the few dozen local steps of
these runs the final weights differ by under 1e-6 (measured); we allow 1e-5 absolute and
relative. Accuracies are counts, so a model whose logits moved by 1e-6 could in principle
flip one prediction near a tie: we allow one example of the smallest evaluation set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from potluck.config import ExperimentConfig
from potluck.core.seeding import Seeds
from potluck.core.task import Task
from potluck.engines import available_engines
from potluck.orchestrator import TIMING_METRICS, RunResult, run_experiment
from potluck.store.sqlite import RunStore

ENGINES = [e for e in available_engines() if e != "ray"]  # Ray: tests/engines/test_ray.py
REFERENCE = "inline"
OTHERS = [e for e in ENGINES if e != REFERENCE]  # compared with the reference
WEIGHT_TOL = 1e-5
LOSS_RTOL = 1e-5
ONE_EXAMPLE = 1 / 60  # the 5 sampled clients' local test sets hold at least 60 examples

BASE: dict[str, Any] = {
    "rounds": 3,
    "data": {"dataset": "digits", "num_clients": 20, "partition": {"kind": "iid"}},
    "model": {"name": "mlp"},
    "sampler": {"clients_per_round": 5},
    "client": {"epochs": 2, "batch_size": 8, "lr": 0.1},
    "evaluation": {"federated_clients": 5},
}
DIRICHLET = {"dataset": "digits", "num_clients": 20, "partition": {"kind": "dirichlet"}}
MOMENTUM = {"epochs": 2, "batch_size": 8, "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}

EXPERIMENTS: dict[str, dict[str, Any]] = {
    "fedavg_iid_momentum_clip": {
        "client": MOMENTUM,
        "algorithm": {"name": "fedavg"},
        "transforms": [{"name": "clip", "max_norm": 1.0}],
    },
    "fedavg_dirichlet_momentum": {"data": DIRICHLET, "client": MOMENTUM},
    "fedprox_stragglers": {
        "data": DIRICHLET,
        "client": {"epochs": 3, "batch_size": 8, "lr": 0.1},
        "algorithm": {"name": "fedprox", "mu": 0.1},
        "stragglers": {"fraction": 0.6},
    },
    "scaffold": {"data": DIRICHLET, "algorithm": {"name": "scaffold"}},
    "fednova_momentum": {"data": DIRICHLET, "client": MOMENTUM, "algorithm": {"name": "fednova"}},
    "fedper": {"data": DIRICHLET, "algorithm": {"name": "fedper"}},
    "qffl": {"data": DIRICHLET, "algorithm": {"name": "qffl", "q": 1.0}},
    "ditto": {"data": DIRICHLET, "algorithm": {"name": "ditto", "lam": 0.1}},
    "fedprox_scaffold_bf16_down": {
        "data": DIRICHLET,
        "terms": [{"name": "fedprox", "mu": 0.1}, {"name": "scaffold"}],
        "downlink": [{"name": "cast", "dtype": "bfloat16"}],
    },
    # compression: stochastic rounding and a rotation drawn per round and client
    "qsgd4_rotated": {"transforms": [{"name": "qsgd", "bits": 4, "block": 256, "rotate": True}]},
    # a sketch summed by the aggregator, unsketched with the server's momentum and error
    "fetchsgd": {"transforms": [{"name": "fetchsgd", "rows": 3, "cols": 400, "top_k": 0.02}]},
    # sparsification with DGC's momentum correction: client state u and v
    "top_k_dgc": {
        "data": DIRICHLET,
        "transforms": [{"name": "top_k", "fraction": 0.05, "momentum": 0.9}],
    },
    # low rank: power iteration warm-started from client state, error feedback
    "powersgd_ef": {"data": DIRICHLET, "transforms": [{"name": "powersgd", "rank": 2}]},
    # the broadcast as a delta against each client's last model (client and server state)
    "delta_downlink": {
        "transforms": [{"name": "top_k", "fraction": 0.02}],
        "server": {"name": "sgd", "lr": 1.0},
        "downlink": [{"name": "delta"}],
    },
    # poisoning: a backdoor (poisoned data, boosted updates) and a colluding attack
    "backdoor_median": {
        "attack": {"name": "backdoor", "fraction": 0.3, "target": 3, "boost": 2.0, "alpha": 0.7},
        "aggregator": {"name": "median"},
    },
    "alie_trimmed_mean": {
        "data": DIRICHLET,
        "attack": {"name": "alie", "fraction": 0.3},
        "aggregator": {"name": "trimmed_mean", "trim": 1},
    },
}


def dropout_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 10))


class LSTMNet(nn.Module):
    """A digit (8x8) as a sequence of 8 rows, through a two-layer LSTM with dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 16, num_layers=2, dropout=0.2, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x.reshape(len(x), 8, 8))
        return self.head(out[:, -1])


# what each engine refuses up front (engine, model) -> the model, words its message must contain
PROBE = ("vectorized", "inline", "cannot batch this model's training step")
REFUSED: dict[tuple[str, str], tuple[Callable[[], nn.Module], tuple[str, ...]]] = {
    ("vectorized", "dropout"): (dropout_mlp, PROBE),
    ("vectorized", "lstm_dropout"): (LSTMNet, PROBE),
}


def config(name: str, engine: str) -> ExperimentConfig:
    run = {"engine": engine, "threads": 1}  # 2 threads crawl when another process is busy
    return ExperimentConfig.from_dict({**BASE, **EXPERIMENTS[name], "run": run})


@cache
def run(name: str, engine: str) -> RunResult:
    return run_experiment(config(name, engine).build())


def learning(result: RunResult) -> list[dict[str, float]]:
    return [{k: v for k, v in m.items() if k not in TIMING_METRICS} for m in result.history]


PERSONAL = {"fedper", "ditto"}  # experiments whose term keeps a personal model per client


@pytest.mark.parametrize("engine", OTHERS)
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_engine_matches_reference(name: str, engine: str) -> None:
    ref, got = run(name, REFERENCE), run(name, engine)
    assert len(got.history) == len(ref.history) == BASE["rounds"]
    accuracies = ["test_accuracy", "fed_accuracy"]
    accuracies += ["personal_accuracy"] if name in PERSONAL else []
    for r, g in zip(ref.history, got.history, strict=True):
        assert g.keys() == r.keys()
        assert ("personal_accuracy" in r) == (name in PERSONAL)
        assert g["train_loss"] == pytest.approx(r["train_loss"], rel=LOSS_RTOL)
        for key in accuracies:
            assert g[key] == pytest.approx(r[key], abs=ONE_EXAMPLE + 1e-12), key
        assert g["updates"] == r["updates"]
        assert g["bytes_up"] == r["bytes_up"]
        if "backdoor_accuracy" in r:
            assert g["backdoor_accuracy"] == pytest.approx(r["backdoor_accuracy"], abs=1e-2)
    torch.testing.assert_close(got.weights, ref.weights, atol=WEIGHT_TOL, rtol=WEIGHT_TOL)
    assert got.personal.keys() == ref.personal.keys()
    assert bool(ref.personal) == (name in PERSONAL)
    for client, v in ref.personal.items():
        torch.testing.assert_close(got.personal[client], v, atol=WEIGHT_TOL, rtol=WEIGHT_TOL)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", ["fedavg_dirichlet_momentum", "scaffold", "fedprox_stragglers"])
def test_same_seed_same_result_on_each_engine(name: str, engine: str) -> None:
    first, again = run(name, engine), run_experiment(config(name, engine).build())
    assert learning(again) == learning(first)
    assert torch.equal(again.weights, first.weights)


def test_stragglers_really_take_fewer_steps() -> None:
    """The FedProx experiment exercises unequal step counts (else it would test nothing)."""
    exp = config("fedprox_stragglers", REFERENCE).build()
    seeds, stragglers = Seeds(exp.seed), exp.algorithm.stragglers
    shares = [stragglers.plan(5, 3, seeds.numpy("stragglers", rnd))[0] for rnd in (1, 2, 3)]
    assert any(len(set(work.tolist())) > 1 for work in shares)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # LSTM under vmap
@pytest.mark.parametrize(("engine", "model"), sorted(REFUSED))
def test_refuses_up_front(engine: str, model: str, tmp_path: Path) -> None:
    """Refused when the engine is made: nothing stored, no round run."""
    model_fn, words = REFUSED[engine, model]
    exp = dataclasses.replace(
        config("fedavg_dirichlet_momentum", engine).build(), task=Task(model_fn), config=None
    )
    rounds: list[int] = []
    with RunStore(tmp_path) as store:
        with pytest.raises(ValueError) as err:
            run_experiment(exp, store, on_round=lambda rnd, metrics: rounds.append(rnd))
        assert store.list_runs() == []
    for word in words:
        assert word in str(err.value)
    assert rounds == []


@pytest.mark.parametrize(("engine", "model"), sorted(REFUSED))
def test_what_is_refused_runs_on_the_reference(engine: str, model: str) -> None:
    """The refused models are fine in themselves: one round trains on the inline engine."""
    model_fn, _ = REFUSED[engine, model]
    exp = dataclasses.replace(
        config("fedavg_dirichlet_momentum", REFERENCE).build(),
        task=Task(model_fn),
        config=None,
        rounds=1,
    )
    result = run_experiment(exp)
    assert result.history[0]["updates"] == BASE["sampler"]["clients_per_round"]
    assert result.history[0]["train_loss"] > 0


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_pool_is_bitwise_the_inline_engine(name: str) -> None:
    """The pool runs the inline engine's code in its workers, at the same thread count."""
    ref, got = run(name, REFERENCE), run(name, "pool")
    assert learning(got) == learning(ref)
    assert torch.equal(got.weights, ref.weights)
    assert got.personal.keys() == ref.personal.keys()
    assert all(torch.equal(got.personal[c], v) for c, v in ref.personal.items())
