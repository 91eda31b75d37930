"""Poisoning attacks: each attack's defining behaviour on synthetic updates, the papers'
claims that ALIE, IPM and Fang's attack pass Krum and the median, and whole runs with an
attack from TOML and the CLI (the attackers recorded, a resumed run equal to an
uninterrupted one, bad settings refused with the parameter named)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from potluck.aggregate import CoordinateMedian, Krum, TrimmedMean, WeightedMean
from potluck.aggregate.byzantine import pairwise_sq_distances
from potluck.aggregate.krum import krum_scores
from potluck.attacks.backdoor import Backdoor
from potluck.attacks.colluding import ALIE, IPM, FangKrum, FangTrimmedMean, MinMax, MinSum
from potluck.attacks.poisoning import GaussianNoise, LabelFlip, Scaling, SignFlip, attack_context
from potluck.cli import app
from potluck.config import ConfigError, ExperimentConfig
from potluck.core.parts import part_context
from potluck.core.registry import names
from potluck.orchestrator import resume_experiment, run_experiment
from potluck.store.sqlite import RunStore

CTX = attack_context(0, 1)
AGG_CTX = part_context(0, 1, "aggregator")


def honest_stack(
    n: int, d: int, seed: int = 0, mean: float = 1.0, std: float = 0.5
) -> torch.Tensor:
    """Gaussian updates around a constant mean (by default all ones, std 0.5)."""
    g = torch.Generator().manual_seed(seed)
    return mean + std * torch.randn(n, d, generator=g)


def split(stack: torch.Tensor, f: int) -> tuple[torch.Tensor, torch.Tensor]:
    return stack[:f], stack[f:]


def krum_pick(stack: torch.Tensor, f: int) -> int:
    scores = krum_scores(pairwise_sq_distances(stack), stack.shape[0] - f - 2)
    return int(scores.argmin())


# ---- the attackers -------------------------------------------------------------------------


def test_the_attackers_are_a_seeded_fraction_of_the_federation() -> None:
    attack = SignFlip(fraction=0.2)
    first = attack.attackers(100, seed=3)
    assert len(first) == 20 and len(set(first.tolist())) == 20
    assert first.tolist() == sorted(first.tolist())
    assert torch.equal(torch.from_numpy(first), torch.from_numpy(attack.attackers(100, seed=3)))
    assert first.tolist() != attack.attackers(100, seed=4).tolist()
    assert len(SignFlip(fraction=0.0).attackers(100, 0)) == 0


def test_every_attack_of_the_issue_is_registered() -> None:
    assert set(names("attack")) >= {
        "label_flip", "sign_flip", "scaling", "gaussian", "alie", "ipm", "min_max", "min_sum",
        "fang_krum", "fang_trimmed_mean", "backdoor",
    }  # fmt: skip


# ---- attacks on one client's own update ----------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=20))
def test_sign_flip_and_scaling_multiply_the_honest_update(values: list[float]) -> None:
    delta = torch.tensor(values, dtype=torch.float32)
    assert torch.equal(SignFlip(scale=2.0).craft(delta, CTX), -2.0 * delta)
    assert torch.equal(Scaling(factor=3.0).craft(delta, CTX), 3.0 * delta)


def test_the_gaussian_attack_ignores_the_update_and_draws_from_its_stream() -> None:
    attack = GaussianNoise(std=2.0)
    a = attack.craft(torch.zeros(20_000), attack_context(0, 1, 5))
    assert torch.equal(a, attack.craft(torch.ones(20_000), attack_context(0, 1, 5)))
    assert not torch.equal(a, attack.craft(torch.zeros(20_000), attack_context(0, 2, 5)))
    assert abs(float(a.std()) - 2.0) < 0.05 and abs(float(a.mean())) < 0.05


def test_label_flipping_relabels_every_class_or_only_the_source() -> None:
    x, y = torch.zeros(10, 2), torch.arange(10)
    assert LabelFlip().poison(x, y, 10, None)[1].tolist() == list(range(9, -1, -1))
    flipped = LabelFlip(source=2, target=5).poison(x, y, 10, None)[1]
    assert flipped.tolist() == [0, 1, 5, 3, 4, 5, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="label 12 outside the task's 10 classes"):
        LabelFlip(source=12, target=1).poison(x, y, 10, None)


# ---- colluding attacks ---------------------------------------------------------------------


def test_alie_sends_mean_minus_z_std_with_the_papers_z() -> None:
    stack = honest_stack(50, 200)
    bad, good = split(stack, 12)
    crafted = ALIE(omniscient=True).collude(bad, good, CTX)
    z = ALIE.paper_z(50, 12)  # s = 26 - 12 = 14, z = Phi^-1(36 / 50)
    assert z == pytest.approx(0.5828, abs=1e-4)
    expected = stack.mean(0) - z * stack.std(0, correction=0)
    torch.testing.assert_close(crafted, expected.expand(12, -1))
    own = ALIE().collude(bad, good, CTX)  # non-omniscient: the attackers' own statistics
    torch.testing.assert_close(own[0], bad.mean(0) - z * bad.std(0, correction=0))


def test_alie_passes_krum_and_moves_the_median_as_the_paper_says() -> None:
    """Baruch et al.: the crafted updates sit within the benign spread, so Krum selects
    one of them, and the median follows them away from the honest mean."""
    n, f, d = 50, 12, 2000
    stack = honest_stack(n, d, seed=1)
    bad, good = split(stack, f)
    crafted = ALIE(omniscient=True).collude(bad, good, CTX)
    attacked = torch.cat([crafted, good])
    assert krum_pick(attacked, f) < f
    honest_mean = good.mean(0)
    median = CoordinateMedian(byzantine=f).aggregate(attacked, torch.ones(n), {}, AGG_CTX)[0]
    clean = CoordinateMedian(byzantine=0).aggregate(good, torch.ones(n - f), {}, AGG_CTX)[0]
    # the median moves by a sizeable share of z * sigma toward the crafted values
    shift = float((honest_mean - median).mean())
    assert shift > 0.3 * ALIE.paper_z(n, f) * 0.5
    assert float((median - honest_mean).norm()) > 3 * float((clean - honest_mean).norm())


def test_ipm_turns_the_mean_against_the_honest_direction_and_passes_krum() -> None:
    n, f, d = 20, 8, 500
    stack = honest_stack(n, d, seed=2)
    bad, good = split(stack, f)
    honest = good.mean(0)
    big = torch.cat([IPM(epsilon=5.0).collude(bad, good, CTX), good])
    mean = WeightedMean().aggregate(big, torch.ones(n), {}, AGG_CTX)[0]
    assert float(mean @ honest) < 0  # Xie et al.: a negative inner product
    small = torch.cat([IPM(epsilon=0.1).collude(bad, good, CTX), good])
    assert krum_pick(small, f) < f  # Xie et al.: a small epsilon passes Krum


@pytest.mark.parametrize("cls", [MinMax, MinSum])
def test_min_max_and_min_sum_find_the_largest_gamma_their_condition_allows(cls: Any) -> None:
    stack = honest_stack(30, 100, seed=3)
    bad, good = split(stack, 6)
    attack = cls()
    crafted = attack.collude(bad, good, CTX)[0]
    ref = torch.cat([good, bad])
    d2 = pairwise_sq_distances(ref)
    mean, p = ref.mean(0), attack.perturbation(ref)
    gamma = float((crafted - mean).norm() / p.norm())
    assert gamma > 0.1
    assert attack.allowed(mean + gamma * p, ref, d2)
    assert not attack.allowed(mean + (gamma + 1e-3) * p, ref, d2)
    if cls is MinMax:  # the paper's condition, written out
        assert float(((ref - crafted) ** 2).sum(1).max()) <= float(d2.max()) * (1 + 1e-6)


def test_fangs_krum_attack_gets_its_update_selected_against_the_honest_direction() -> None:
    """Stochastic updates (their mean small beside their spread), as in Fang et al.'s
    setting, where Krum's selected update is the attackers'."""
    n, f, d = 30, 6, 300
    stack = honest_stack(n, d, seed=4, mean=0.1, std=1.0)
    bad, good = split(stack, f)
    crafted = FangKrum().collude(bad, good, CTX)
    attacked = torch.cat([crafted, good])
    assert krum_pick(attacked, f) < f
    chosen = Krum(byzantine=f).aggregate(attacked, torch.ones(n), {}, AGG_CTX)[0]
    assert float(chosen @ good.mean(0)) < 0


def test_fangs_trimmed_mean_attack_pushes_each_coordinate_against_the_honest_one() -> None:
    n, f, d = 20, 4, 400
    stack = honest_stack(n, d, seed=5)
    bad, good = split(stack, f)
    crafted = FangTrimmedMean().collude(bad, good, attack_context(0, 1))
    lo, hi = stack.min(0).values, stack.max(0).values
    positive = stack.mean(0) > 0
    assert bool((crafted[:, positive] <= lo[positive] + 1e-6).all())
    assert bool((crafted[:, ~positive] >= hi[~positive] - 1e-6).all())
    assert not torch.equal(crafted[0], crafted[1])  # each attacker draws its own values
    attacked = torch.cat([crafted, good])
    trimmed = TrimmedMean(trim=f).aggregate(attacked, torch.ones(n), {}, AGG_CTX)[0]
    clean = TrimmedMean(trim=f).aggregate(stack, torch.ones(n), {}, AGG_CTX)[0]
    assert float(trimmed.mean()) < float(clean.mean()) - 0.05


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SignFlip(fraction=1.0), "attack.fraction must be a number in [0, 1)"),
        (lambda: Scaling(factor=-1.0), "attack.factor must be a finite number > 0, got -1.0"),
        (lambda: LabelFlip(source=1), "label_flip takes both source and target"),
        (lambda: MinMax(direction="up"), "attack.direction must be 'std', 'unit' or 'sign'"),
        (lambda: FangTrimmedMean(b=1.0), "attack.b must be a number > 1, got 1.0"),
        (lambda: Backdoor(poison_fraction=0.0), "attack.poison_fraction must be in (0, 1]"),
    ],
)
def test_bad_settings_name_the_parameter(make: Any, message: str) -> None:
    with pytest.raises(ValueError) as err:
        make()
    assert message in str(err.value)


# ---- whole runs ----------------------------------------------------------------------------

BASE: dict[str, Any] = {
    "data": {"dataset": "digits", "num_clients": 20, "partition": {"kind": "iid"}},
    "model": {"name": "mlp"},
    "sampler": {"clients_per_round": 10},
    "client": {"epochs": 1, "batch_size": 16, "lr": 0.1},
    "run": {"threads": 1},
}


def config(attack: dict[str, Any] | None, rounds: int = 3, **extra: Any) -> ExperimentConfig:
    data = {**BASE, "rounds": rounds, **extra}
    if attack is not None:
        data["attack"] = attack
    return ExperimentConfig.from_dict(data)


def test_a_run_records_its_attackers_and_an_attack_hurts_the_mean() -> None:
    attack = {"name": "sign_flip", "fraction": 0.3, "scale": 3.0}
    attacked = run_experiment(config(attack, rounds=4).build())
    clean = run_experiment(config(None, rounds=4).build())
    exp = config(attack).build()
    attackers = set(exp.attack.attackers(20, exp.seed).tolist())  # type: ignore[union-attr]
    assert len(attackers) == 6
    for metrics in attacked.history:
        assert 0 <= metrics["malicious"] <= metrics["updates"]
    assert sum(m["malicious"] for m in attacked.history) > 0
    assert "malicious" not in clean.history[0]
    assert attacked.history[-1]["test_accuracy"] < clean.history[-1]["test_accuracy"] - 0.1


def test_the_attack_section_is_validated_and_written_out_in_full() -> None:
    cfg = config({"name": "alie", "fraction": 0.25})
    assert cfg.attack == {"name": "alie", "fraction": 0.25, "omniscient": False}  # None: unset
    with pytest.raises(ConfigError, match=r"attack\.name: unknown attack 'aliee' \(did you mean"):
        config({"name": "aliee"})
    with pytest.raises(ConfigError, match=r"attack\.epsilon must be a finite number > 0"):
        config({"name": "ipm", "epsilon": 0})


def test_an_attack_runs_from_a_toml_file_with_the_cli(tmp_path: Path) -> None:
    exp = tmp_path / "attacked.toml"
    exp.write_text(
        "rounds = 2\n[data]\ndataset = 'digits'\nnum_clients = 10\n[model]\nname = 'mlp'\n"
        "[sampler]\nclients_per_round = 8\n[aggregator]\nname = 'median'\n"
        "[attack]\nname = 'min_max'\nfraction = 0.2\n[run]\nthreads = 1\n"
    )
    result = CliRunner().invoke(app, ["run", str(exp), "--store", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    store = RunStore(tmp_path / "runs")
    (info,) = store.list_runs()
    assert info.config["attack"]["name"] == "min_max"
    attack = ExperimentConfig.from_dict(info.config).build_attack()
    assert attack is not None
    attackers = set(attack.attackers(10, info.config["seed"]).tolist())
    assert len(attackers) == 2
    per_client = store.client_metrics(info.run_id)
    for rnd in store.rounds(info.run_id):
        clients = [c for r, c, m in per_client if r == rnd.round and "bytes_up" in m]
        assert rnd.metrics["malicious"] == sum(c in attackers for c in clients)
    assert all(m["malicious"] == float(c in attackers) for _, c, m in per_client if "bytes_up" in m)


def test_a_resumed_attacked_run_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    class Stop(Exception):
        pass

    def stop_after_two(rnd: int, _metrics: object) -> None:
        if rnd == 2:
            raise Stop

    attack = {"name": "backdoor", "fraction": 0.2, "target": 1, "boost": 3.0}
    whole = run_experiment(config(attack, rounds=4).build())
    store = RunStore(tmp_path)
    with pytest.raises(Stop):
        run_experiment(config(attack, rounds=4).build(), store, on_round=stop_after_two)
    (info,) = store.list_runs()
    resumed = resume_experiment(ExperimentConfig.from_dict(info.config).build(), store, info.run_id)
    assert torch.equal(resumed.weights, whole.weights)
    assert resumed.history[-1]["backdoor_accuracy"] == whole.history[-1]["backdoor_accuracy"]


def test_the_readme_examples_build() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for heading, check in (
        ("### Poisoning attacks", lambda cfg: cfg.build_attack() == ALIE(fraction=0.2)),
        ("### Anomaly detection and quarantine", lambda cfg: cfg.detection.strikes == 2),
    ):
        block = readme.split(heading)[1].split("```toml\n")[1].split("```")[0]
        assert check(ExperimentConfig.from_dict({**BASE, **tomllib.loads(block)}))


def test_an_experiment_built_in_python_says_its_attack_and_detection_back() -> None:
    from dataclasses import replace

    from potluck.aggregate.anomaly import Detection

    exp = replace(
        config(None).build(),
        attack=MinSum(fraction=0.1, direction="sign"),
        detection=Detection(scores=("norm", "krum"), flag_on="krum", quarantine=True),
        config=None,
    )
    said = exp.describe()
    cfg = ExperimentConfig.from_dict({**BASE, "attack": said["attack"],
                                      "detection": said["detection"]})  # fmt: skip
    again = cfg.build()
    assert again.attack == exp.attack and again.detection == exp.detection
