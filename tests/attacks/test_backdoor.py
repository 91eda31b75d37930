"""The pixel-pattern backdoor (Bagdasaryan et al. 2020): its trigger and poisoned data, model
replacement by one attacker in one round on plain FedAvg, and norm bounding against it."""

from __future__ import annotations

from functools import cache

import pytest
import torch

from potluck.aggregate import NormBounding, WeightedMean
from potluck.attacks.backdoor import Backdoor
from potluck.attacks.poisoning import Attack, Scaling
from potluck.client.program import ClientProgram
from potluck.config import ExperimentConfig
from potluck.core.parts import Aggregator, part_context
from potluck.orchestrator import run_experiment

BASE = {
    "data": {"dataset": "digits", "num_clients": 20, "partition": {"kind": "iid"}},
    "model": {"name": "mlp"},
    "sampler": {"clients_per_round": 10},
    "client": {"epochs": 2, "batch_size": 16, "lr": 0.1},
    "run": {"threads": 1},
}
ATTACK = Backdoor(fraction=0.05, target=0, poison_fraction=0.5, boost=10.0)


@cache
def pretrained() -> tuple[ExperimentConfig, torch.Tensor]:
    """A global model trained clean for 15 rounds (the paper attacks a converged model)."""
    cfg = ExperimentConfig.from_dict({**BASE, "rounds": 15})
    return cfg, run_experiment(cfg.build()).weights


def one_round(attack: Attack, aggregator: Aggregator) -> tuple[float, float]:
    """One round of 10 clients from the pretrained model, client 0 the one attacker: the
    new global model's (test accuracy, backdoor accuracy)."""
    cfg, w = pretrained()
    exp = cfg.build()
    program = exp.algorithm.client_program(exp.task, exp.federation, seed=0, attack=attack,
                                           attackers=[0])  # fmt: skip
    replies = [program.train(c, 16, w) for c in range(10)]
    deltas = torch.stack([r.message.arrays["delta"] for r in replies if r is not None])
    weights = torch.tensor(
        [float(r.message.scalars["weight"]) for r in replies if r], dtype=torch.float64
    )
    agg, _ = aggregator.aggregate(deltas, weights, aggregator.init(w), part_context(0, 16, "a"))
    return accuracies(program, ATTACK, w + agg)


def accuracies(program: ClientProgram, attack: Backdoor, w: torch.Tensor) -> tuple[float, float]:
    test = program.federation.source.test
    x, y = torch.from_numpy(test.features()), torch.from_numpy(test.y)
    main = program.evaluate_arrays(w, x.numpy(), y.numpy()).accuracy
    xt, yt = attack.triggered(x, y)
    return main, program.evaluate_arrays(w, xt.numpy(), yt.numpy()).accuracy


def test_the_trigger_is_stamped_on_a_fraction_of_the_attackers_examples() -> None:
    x, y = torch.zeros(10, 1, 6, 6), torch.arange(10) % 3
    gen = torch.Generator().manual_seed(0)
    px, py = Backdoor(target=2, poison_fraction=0.3, size=2, value=1.0).poison(x, y, 3, gen)
    stamped = px.flatten(1).sum(1) > 0
    assert int(stamped.sum()) == 3
    assert bool((py[stamped] == 2).all()) and torch.equal(py[~stamped], y[~stamped])
    assert px[stamped][0, 0, 4:, 4:].tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert torch.equal(x, torch.zeros(10, 1, 6, 6))  # the data is copied, not changed


def test_model_replacement_by_one_attacker_in_one_round_installs_the_backdoor() -> None:
    """Bagdasaryan et al.: boosted by n / eta (10 clients, lr 1), the attacker's update
    replaces the global model with its backdoored one. Its main-task accuracy is that of
    one client's local model trained on half-relabelled data (about 70 examples here: 0.43
    measured, against 0.79 when an honest client's boosted update replaces the model and
    0.85 before the round); the paper's attacker, with many more examples, keeps it."""
    cfg, w = pretrained()
    exp = cfg.build()
    program = exp.algorithm.client_program(exp.task, exp.federation, seed=0)
    clean_main, clean_backdoor = accuracies(program, ATTACK, w)
    main, backdoor = one_round(ATTACK, WeightedMean())
    replaced_main, replaced_backdoor = one_round(
        Scaling(fraction=0.05, factor=10.0), WeightedMean()
    )
    assert clean_backdoor < 0.1 and replaced_backdoor < 0.1
    assert backdoor > 0.9
    assert main > 0.3  # far above chance (0.1)
    assert replaced_main < clean_main
    unboosted = one_round(Backdoor(fraction=0.05, target=0, poison_fraction=0.5), WeightedMean())
    assert unboosted[1] < 0.5  # without replacement, one client of ten barely moves it


def test_norm_bounding_reduces_the_backdoor() -> None:
    """Sun et al. 2019: bounding each update's norm to the honest scale undoes the boost."""
    _, backdoor = one_round(ATTACK, WeightedMean())
    _, bounded = one_round(ATTACK, NormBounding(bound=1.0))
    assert bounded < backdoor - 0.5


def test_train_and_scale_keeps_within_the_norm_bound() -> None:
    cfg, w = pretrained()
    exp = cfg.build()
    attack = Backdoor(fraction=0.05, target=0, boost=10.0, norm_bound=1.0)
    program = exp.algorithm.client_program(exp.task, exp.federation, seed=0, attack=attack,
                                           attackers=[0])  # fmt: skip
    reply = program.train(0, 16, w)
    assert reply is not None
    assert float(reply.message.arrays["delta"].norm()) == pytest.approx(1.0, rel=1e-5)


def test_constrain_and_scale_keeps_the_attacker_near_the_global_model() -> None:
    """Bagdasaryan et al.'s anomaly term: with alpha < 1 the attacker's local model stays
    closer to the global one (a smaller update for a defence to see)."""
    cfg, w = pretrained()
    exp = cfg.build()

    def attacker_update(alpha: float) -> torch.Tensor:
        attack = Backdoor(fraction=0.05, target=0, alpha=alpha)
        program = exp.algorithm.client_program(exp.task, exp.federation, seed=0, attack=attack,
                                               attackers=[0])  # fmt: skip
        reply = program.train(0, 16, w)
        assert reply is not None
        return reply.message.arrays["delta"]

    plain, constrained = attacker_update(1.0), attacker_update(0.5)
    assert float(constrained.norm()) < 0.9 * float(plain.norm())
    with pytest.raises(ValueError, match=r"attack\.alpha must be in \(0, 1\]"):
        Backdoor(alpha=0.0)
