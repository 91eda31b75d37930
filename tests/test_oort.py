"""Oort (Lai et al. 2021): exploitation prefers high statistical utility and penalises
clients slower than the preferred duration; exploration covers the clients never chosen,
as epsilon decays; in a run it picks higher-loss clients than uniform sampling and, on a
virtual clock, shorter rounds; its state is server state (exact resume) and it runs from
TOML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from potluck.config import ExperimentConfig
from potluck.core.parts import Context
from potluck.orchestrator import RunResult, run_experiment
from potluck.sampling.oort import OortSampler
from potluck.testing import interrupted_and_resumed, learning


def ctx(rnd: int) -> Context:
    return Context(0, rnd, ("sampling", rnd))


def observed(oort: OortSampler, losses: list[float], durations: list[float] | None = None) -> Any:
    seen = {
        c: {
            "train_loss": loss,
            "num_examples": 10.0,
            **({"duration_s": durations[c]} if durations else {}),
        }
        for c, loss in enumerate(losses)
    }
    return oort.observe(oort.init(len(losses)), seen, ctx(1))


def test_exploitation_prefers_utility_and_penalises_slow_clients() -> None:
    oort = OortSampler(clients_per_round=1, epsilon=0.0, min_epsilon=0.0, cutoff=0.0)
    state = observed(oort, [1.0, 1.0, 1.0, 4.0])
    picks = [int(oort.sample(4, state, ctx(r))[0][0]) for r in range(2, 402)]
    share = np.bincount(picks, minlength=4) / len(picks)
    assert share[3] > 0.45 > share[0]  # utility 40 against 10 (plus the same uncertainty)
    slow = OortSampler(
        clients_per_round=1, epsilon=0.0, min_epsilon=0.0, cutoff=0.0, preferred_s=1.0
    )
    state = observed(slow, [1.0, 1.0, 1.0, 4.0], durations=[1.0, 1.0, 1.0, 4.0])
    picks = [int(slow.sample(4, state, ctx(r))[0][0]) for r in range(2, 402)]
    assert np.bincount(picks, minlength=4)[3] / len(picks) < 0.15  # (1/4)^2 of its utility


def test_exploration_takes_the_clients_never_chosen_while_epsilon_decays() -> None:
    oort = OortSampler(clients_per_round=4, epsilon=1.0, epsilon_decay=0.5, min_epsilon=0.25)
    state = oort.init(20)
    seen: set[int] = set()
    for rnd, explored in ((1, 0), (2, 2), (3, 3)):  # epsilon 1, 0.5, then 0.25 (the floor)
        cohort, _ = oort.sample(20, state, ctx(rnd))
        assert len(seen & set(cohort.tolist())) == explored
        seen |= set(cohort.tolist())
        outcome = {int(c): {"train_loss": 1.0, "num_examples": 5.0} for c in cohort}
        state = oort.observe(state, outcome, ctx(rnd))


BASE: dict[str, Any] = {
    "seed": 0,
    "rounds": 10,
    "data": {
        "dataset": "digits",
        "num_clients": 30,
        "partition": {"kind": "dirichlet", "alpha": 0.3},
    },
    "model": {"name": "mlp"},
    "client": {"epochs": 1, "batch_size": 16, "lr": 0.1},
    "run": {"threads": 1},
    "evaluation": {"federated_clients": 0},
}
OORT = {"name": "oort", "clients_per_round": 5, "epsilon": 0.6, "min_epsilon": 0.2}


def run(sampler: dict[str, Any], **extra: Any) -> RunResult:
    return run_experiment(ExperimentConfig.from_dict({**BASE, "sampler": sampler, **extra}).build())


def test_in_a_run_it_picks_higher_loss_clients_and_shorter_rounds_than_uniform() -> None:
    uniform = {"name": "uniform", "clients_per_round": 5}
    later = slice(4, None)
    loss = {
        name: np.mean([m["train_loss"] for m in run(s).history[later]])
        for name, s in (("oort", OORT), ("uniform", uniform))
    }
    assert loss["oort"] > loss["uniform"], loss
    spread = {"profiles": {"speed": 5.0, "speed_sigma": 1.0, "down_mbps": 1.0, "up_mbps": 0.3}}
    # exploration over by round 3 (random explorers would set the round's slowest member)
    fast = {**OORT, "epsilon": 1.0, "epsilon_decay": 0.3, "min_epsilon": 0.0, "preferred_s": 1.0}
    times = {
        name: np.mean([m["round_virtual_s"] for m in run(s, **spread).history[later]])
        for name, s in (("oort", fast), ("uniform", uniform))
    }
    assert times["oort"] < times["uniform"], times


def test_its_state_is_server_state_and_a_resume_is_exact(tmp_path: Path) -> None:
    cfg = ExperimentConfig.from_dict({**BASE, "rounds": 6, "sampler": OORT})
    resumed = interrupted_and_resumed(cfg, tmp_path, after=3)
    full = run_experiment(cfg.build())
    assert learning(resumed) == learning(full)
    assert torch.equal(resumed.weights, full.weights)
