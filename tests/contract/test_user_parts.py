"""User-written stateful parts get the guarantees of built-in ones: the same results on every
engine and after a resume, named by import path from a config.

The parts are ``examples/my_lab``'s, written as a user would with the public API: sign
compression with error feedback (a transform with client state), a coordinate-wise median
(an aggregator), FedDyn (a gradient term with client and server state), FedProx + error
feedback (a preset composed with a user transform), a round-robin sampler with server state
under SCAFFOLD, and a commit-then-reveal beacon (a part with two stages of its own around
training, and dropouts between them), and a colluding poisoning attack (poisoned data and
updates crafted together). Tolerances as in ``test_engines.py``.
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch

from potluck.config import ExperimentConfig
from potluck.engines import available_engines
from potluck.orchestrator import TIMING_METRICS, RunResult, resume_experiment, run_experiment
from potluck.store.sqlite import RunStore

ROUNDS = 4
BASE: dict[str, Any] = {
    "rounds": ROUNDS,
    "data": {"dataset": "digits", "num_clients": 20, "partition": {"kind": "dirichlet"}},
    "model": {"name": "mlp"},
    "sampler": {"clients_per_round": 5},
    "client": {"epochs": 2, "batch_size": 8, "lr": 0.1},
    "evaluation": {"federated_clients": 5},
}
SIGN_EF = {"name": "my_lab.compress:SignEF"}
USER: dict[str, dict[str, Any]] = {
    "sign_ef": {"transforms": [SIGN_EF]},
    "median": {"aggregator": {"name": "my_lab.agg:Median"}},
    "feddyn": {"terms": [{"name": "my_lab.feddyn:FedDyn", "alpha": 0.01}]},
    "fedprox_ef": {"algorithm": {"name": "fedprox", "mu": 0.1}, "transforms": [SIGN_EF]},
    "round_robin_scaffold": {
        "algorithm": {"name": "scaffold"},
        "sampler": {"name": "my_lab.sampler:RoundRobin", "clients_per_round": 5},
    },
    "beacon": {"transforms": [{"name": "my_lab.beacon:Beacon", "drop": 0.4}]},
    "colluding_attack": {
        "attack": {"name": "my_lab.poison:CollectiveFlip", "fraction": 0.3},
        "aggregator": {"name": "my_lab.agg:Median"},
    },
}
ENGINES = [e for e in available_engines() if e not in ("inline", "ray")]
WEIGHT_TOL = LOSS_RTOL = 1e-5
ONE_EXAMPLE = 1 / 60


def config(name: str, engine: str = "inline", **extra: Any) -> ExperimentConfig:
    run = {"engine": engine, "threads": 1}
    return ExperimentConfig.from_dict({**BASE, **USER[name], "run": run, **extra})


@cache
def run(name: str, engine: str) -> RunResult:
    return run_experiment(config(name, engine).build())


def learning(result: RunResult) -> list[dict[str, float]]:
    return [{k: v for k, v in m.items() if k not in TIMING_METRICS} for m in result.history]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", USER)
def test_user_parts_match_the_inline_engine(name: str, engine: str) -> None:
    ref, got = run(name, "inline"), run(name, engine)
    if engine == "pool":  # the inline engine's code, in workers, at the same thread count
        assert learning(got) == learning(ref)
        assert torch.equal(got.weights, ref.weights)
        return
    for r, g in zip(ref.history, got.history, strict=True):
        assert g["train_loss"] == pytest.approx(r["train_loss"], rel=LOSS_RTOL)
        for key in ("test_accuracy", "fed_accuracy"):
            assert g[key] == pytest.approx(r[key], abs=ONE_EXAMPLE + 1e-12), key
        assert (g["updates"], g["bytes_up"]) == (r["updates"], r["bytes_up"])
    torch.testing.assert_close(got.weights, ref.weights, atol=WEIGHT_TOL, rtol=WEIGHT_TOL)


@pytest.mark.parametrize("engine", ["inline", "pool"])
@pytest.mark.parametrize("name", USER)
def test_resumed_run_equals_uninterrupted(name: str, engine: str, tmp_path: Path) -> None:
    class Stop(Exception):
        pass

    def stop_after_two(rnd: int, _metrics: object) -> None:
        if rnd == 2:
            raise Stop

    store = RunStore(tmp_path)
    with pytest.raises(Stop):
        run_experiment(config(name, engine).build(), store, on_round=stop_after_two)
    (info,) = store.list_runs()
    stored = ExperimentConfig.from_dict(info.config)  # rebuilt from the store, as the CLI does
    resumed = resume_experiment(stored.build(), store, info.run_id)
    full = run(name, engine)
    assert learning(resumed) == learning(full)
    assert torch.equal(resumed.weights, full.weights)


def test_the_user_parts_really_keep_state(tmp_path: Path) -> None:
    """Not vacuous: the residuals, FedDyn's h_k and the sampler's position are stored, and
    the compression really sends one bit per coordinate."""
    store = RunStore(tmp_path)
    ef = run_experiment(config("sign_ef").build(), store)
    states = store.client_states(ef.run_id, list(range(20)))
    residuals = [s["transforms.0.SignEF/residual"] for s in states if s]
    assert residuals and all(float(r.abs().sum()) > 0 for r in residuals)
    plain = run_experiment(ExperimentConfig.from_dict({**BASE, "run": {"threads": 1}}).build())
    d, (first,) = ef.weights.numel(), ef.history[:1]
    # one bit per coordinate, and each update's framing (names, dtypes, shapes, scalars)
    assert 0 < first["bytes_up"] - first["updates"] * math.ceil(d / 8) < first["updates"] * 200
    assert plain.history[0]["bytes_up"] / first["bytes_up"] > 20
    dyn = run_experiment(config("feddyn").build(), store)
    _, ckpt = store.latest_checkpoint(dyn.run_id)
    assert float(ckpt.tensors["terms.0.FedDyn/h"].abs().sum()) > 0
    rr = run_experiment(config("round_robin_scaffold").build(), store)
    _, ckpt = store.latest_checkpoint(rr.run_id)
    assert int(ckpt.tensors["sampler/next"]) == (5 * ROUNDS) % 20
    cohorts = {
        r: sorted(
            c for rnd, c, m in store.client_metrics(rr.run_id) if rnd == r and "num_steps" in m
        )
        for r in (1, 2)
    }
    assert cohorts == {1: [0, 1, 2, 3, 4], 2: [5, 6, 7, 8, 9]}


def test_the_beacon_runs_two_stages_with_dropouts_between_them() -> None:
    result = run("beacon", "inline")
    committed = [m["transforms.0.Beacon/committed"] for m in result.history]
    revealed = [m["transforms.0.Beacon/revealed"] for m in result.history]
    dropped = [m["transforms.0.Beacon/dropped"] for m in result.history]
    assert committed == [5.0] * ROUNDS
    assert [r + d for r, d in zip(revealed, dropped, strict=True)] == committed
    assert sum(dropped) > 0 and sum(revealed) > 0  # some left between the stages, some stayed
    # members that dropped after training still trained: their updates were aggregated
    assert all(m["updates"] == 5.0 for m in result.history)
