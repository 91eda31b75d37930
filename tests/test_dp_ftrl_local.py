"""DP-FTRL with tree aggregation and local DP: their mechanisms, their per-client ledger and
the runs that use them."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import dp_accounting as dpa
import numpy as np
import pytest
import torch
from dp_accounting import rdp
from hypothesis import given, settings
from hypothesis import strategies as st

from potluck import resume_experiment, run_experiment
from potluck.algorithms import dp_ftrl, fedavg, ldp_fedavg, qffl, scaffold
from potluck.config import ExperimentConfig
from potluck.core.message import Message
from potluck.core.parts import part_context
from potluck.privacy.central import GaussianMean
from potluck.privacy.ledger import PrivacyBudget, prepare, stored_ledger
from potluck.privacy.local import LocalGaussian
from potluck.privacy.participation import (
    Participation,
    ParticipationLedger,
    gaussian_epsilon,
    tree_sensitivity,
)
from potluck.privacy.tree import TreeAggregatedMean, trailing_zeros
from potluck.sampling.shuffle import ShuffledSampler
from potluck.store.sqlite import RunStore


def rdp_epsilon(event: dpa.DpEvent, delta: float = 1e-5, special: bool = False) -> float:
    relation = dpa.NeighboringRelation
    acc = rdp.RdpAccountant(
        neighboring_relation=relation.REPLACE_SPECIAL if special else relation.ADD_OR_REMOVE_ONE
    )
    acc.compose(event)
    return float(acc.get_epsilon(delta))


# ---- the tree ---------------------------------------------------------------------------


def test_a_round_completes_the_node_of_its_trailing_zeros() -> None:
    agg = TreeAggregatedMean(clip=1.0, noise_multiplier=1.0, denominator=1.0)
    state = agg.init(torch.zeros(1))
    live = []
    for t in range(1, 9):
        _, state = agg.aggregate(torch.zeros(0, 1), torch.ones(0), state, ctx(t))
        live.append(sorted(int(k.removeprefix("node_")) for k in state if k != "t"))
    # the live nodes are the set bits of t: its prefix sum is theirs
    assert live == [[b for b in range(4) if t >> b & 1] for t in range(1, 9)]
    assert [trailing_zeros(t) for t in (1, 2, 12, 64)] == [0, 1, 2, 6]


def ctx(t: int) -> Any:
    return part_context(0, t, "aggregator")


def test_the_prefix_noise_has_the_std_of_its_nodes() -> None:
    """After round t the model carries the noise of popcount(t) nodes, not of t rounds."""
    d, sigma = 100_000, 2.0
    agg = TreeAggregatedMean(clip=1.0, noise_multiplier=sigma, denominator=1.0)
    state, released = agg.init(torch.zeros(d)), torch.zeros(d, dtype=torch.float64)
    stds = {}
    for t in range(1, 9):
        step, state = agg.aggregate(torch.zeros(0, d), torch.ones(0), state, ctx(t))
        released += step.double()
        stds[t] = float(released.std())
    for t in (1, 3, 7, 8):
        assert stds[t] == pytest.approx(sigma * math.sqrt(bin(t).count("1")), rel=0.01)


def test_without_noise_dp_ftrl_is_the_clipped_mean() -> None:
    deltas = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, -2.0]])
    tree = TreeAggregatedMean(clip=1.0, noise_multiplier=0.0, denominator=4.0)
    flat = GaussianMean(clip=1.0, noise_multiplier=0.0, denominator=4.0)
    state = tree.init(torch.zeros(2))
    for t in range(1, 6):
        step, state = tree.aggregate(deltas * t, torch.ones(3), state, ctx(t))
        mean, _ = flat.aggregate(deltas * t, torch.ones(3), {}, ctx(t))
        assert torch.equal(step, mean)


def test_a_restart_starts_a_new_tree() -> None:
    agg = TreeAggregatedMean(clip=1.0, noise_multiplier=1.0, restart_every=3, denominator=1.0)
    state = agg.init(torch.zeros(4))
    ts = []
    for t in range(1, 8):
        _, state = agg.aggregate(torch.zeros(0, 4), torch.ones(0), state, ctx(t))
        ts.append(int(state["t"]))
    assert ts == [1, 2, 3, 1, 2, 3, 1]
    assert sorted(state) == ["node_0", "t"]


# ---- the per-client ledger ----------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=40))
def test_the_tree_sensitivity_bounds_every_participation_pattern(pattern: list[bool]) -> None:
    """sum over the released nodes of (rounds of the client under it)^2, for any pattern,
    is at most the bound the ledger uses."""
    rounds, k = len(pattern), sum(pattern)
    exact = 0
    for level in range(rounds.bit_length()):
        span = 2**level
        for start in range(0, rounds - span + 1, span):  # the complete nodes of that level
            exact += sum(pattern[start : start + span]) ** 2
    assert exact <= tree_sensitivity(np.array([k]), rounds)[0]


def test_one_participation_per_tree_is_dp_accountings_tree_event() -> None:
    """40 clients, 4 a round: each once per 10-round epoch; a tree per epoch."""
    result = run_experiment(config(rounds=20, algorithm=algo_section(restart_every=10)).build())
    tree = dpa.SingleEpochTreeAggregationDpEvent(3.0, 10)
    assert result.history[9]["epsilon"] == pytest.approx(rdp_epsilon(tree, special=True), rel=1e-9)
    two = dpa.SelfComposedDpEvent(tree, 2)
    assert result.history[-1]["epsilon"] == pytest.approx(rdp_epsilon(two, special=True), rel=1e-9)


def test_local_dp_composes_a_gaussian_of_half_the_multiplier_per_release() -> None:
    ledger = ParticipationLedger(Participation("local"), 4.0, 1.0, PrivacyBudget(), 5)
    state: dict[str, torch.Tensor] = {}
    for cohort in ([0, 1], [1, 2], [1, 3]):
        state, eps = ledger.record(state, cohort)
    k = 3  # client 1 released three updates
    fresh = rdp_epsilon(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(4.0 / 2), k))
    assert eps == pytest.approx(fresh, rel=1e-9)
    assert ledger.most_rounds(state) == 3
    assert state["counts"].tolist() == [1, 3, 1, 1, 0]


def test_the_pld_accountant_gives_the_exact_gaussian() -> None:
    exact = dpa.pld.PLDAccountant()
    exact.compose(dpa.GaussianDpEvent(1.5))
    assert gaussian_epsilon(1.5, 1e-5, "pld") == pytest.approx(exact.get_epsilon(1e-5))
    assert gaussian_epsilon(1.5, 1e-5, "pld") < gaussian_epsilon(1.5, 1e-5, "rdp")


# ---- local DP, the transform ---------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=20),
    st.floats(0.01, 10.0),
)
def test_local_dp_clips_before_the_noise(values: list[float], clip: float) -> None:
    ldp = LocalGaussian(clip=clip, noise_multiplier=0.0)
    delta = torch.tensor(values, dtype=torch.float32)
    out, _ = ldp.encode(Message({"delta": delta}), {}, part_context(0, 1, "t", client=0))
    norm = float(torch.linalg.vector_norm(out.arrays["delta"].double()))
    assert norm <= clip * (1 + 1e-6)
    if float(torch.linalg.vector_norm(delta.double())) <= clip * 0.99:
        assert torch.allclose(out.arrays["delta"], delta)


def test_local_dp_noise_has_the_configured_std_and_nothing_else_leaves() -> None:
    ldp = LocalGaussian(clip=0.5, noise_multiplier=2.0)
    msg = Message({"delta": torch.zeros(200_000)}, {"num_examples": 37, "train_loss": 0.25})
    out, _ = ldp.encode(msg, {}, part_context(0, 1, "transforms.0.local_dp", client=3))
    assert float(out.arrays["delta"].std()) == pytest.approx(1.0, rel=0.01)
    assert out.scalars == {"num_examples": 1, "num_steps": 0, "weight": 1.0}
    again, _ = ldp.encode(msg, {}, part_context(0, 1, "transforms.0.local_dp", client=4))
    assert not torch.equal(again.arrays["delta"], out.arrays["delta"])  # per client


# ---- in a run ---------------------------------------------------------------------------

CONFIG: dict[str, Any] = {
    "rounds": 6,
    "data": {"dataset": "digits", "num_clients": 40, "partition": {"kind": "iid"}},
    "model": {"name": "logreg"},
    "client": {"epochs": 1, "batch_size": 16, "lr": 0.1},
    "evaluation": {"federated_clients": 0},
    "run": {"threads": 1, "store": "none"},
}


def algo_section(**params: Any) -> dict[str, Any]:
    base = {"name": "dp_ftrl", "clients_per_round": 4, "clip": 0.5, "noise_multiplier": 3.0}
    return {**base, **params}


def ldp_section(**params: Any) -> dict[str, Any]:
    base = {"name": "ldp_fedavg", "clip": 0.5, "noise_multiplier": 2.0}
    return {**base, **params}


def config(**sections: Any) -> ExperimentConfig:
    sections.setdefault("algorithm", algo_section())
    if sections["algorithm"]["name"] == "ldp_fedavg":
        sections.setdefault("sampler", {"clients_per_round": 8})
    return ExperimentConfig.from_dict({**CONFIG, **sections})


def test_the_tree_run_is_accounted_from_who_took_part() -> None:
    result = run_experiment(config(rounds=12).build())
    # one tree of 12 rounds; each client in at most 2 (epochs of 10 rounds)
    s = tree_sensitivity(np.array([2]), 12)[0]
    assert result.history[-1]["epsilon"] == pytest.approx(
        gaussian_epsilon(3.0 / math.sqrt(s), 1e-5), rel=1e-12
    )


def test_a_target_epsilon_calibrates_the_tree_and_the_local_noise() -> None:
    target = {"target_epsilon": 8.0}
    shuffled = {"name": "shuffle", "clients_per_round": 8}  # 5-round epochs: twice in 7 rounds
    runs = [
        config(rounds=10, algorithm=algo_section(restart_every=10), privacy=target),
        config(rounds=7, algorithm=ldp_section(), sampler=shuffled, privacy=target),
    ]
    for cfg in runs:
        result = run_experiment(cfg.build())
        assert 0.99 * 8.0 <= result.history[-1]["epsilon"] <= 8.0 * (1 + 1e-6), cfg.algorithm


def test_the_budget_stops_a_tree_run_at_the_round_the_accountant_says() -> None:
    result = run_experiment(config(rounds=30, privacy={"max_epsilon": 6.0}).build())
    assert result.stopped is not None and "would spend epsilon" in result.stopped
    t = len(result.history)
    assert result.history[-1]["epsilon"] <= 6.0 and t < 30
    # the next round, for the most-participating client taking part again, would cross it
    s_next = tree_sensitivity(np.array([math.ceil(t / 10) + 1]), t + 1)[0]
    assert gaussian_epsilon(3.0 / math.sqrt(s_next), 1e-5) > 6.0


@pytest.mark.parametrize("section", [algo_section(restart_every=4), ldp_section()])
def test_resume_continues_the_tree_and_the_ledger_exactly(
    tmp_path: Path, section: dict[str, Any]
) -> None:
    cfg = config(algorithm=section)
    full = run_experiment(cfg.build())

    class Stop(Exception):
        pass

    def stop(rnd: int, _metrics: object) -> None:
        if rnd == 3:
            raise Stop

    store = RunStore(tmp_path)
    with pytest.raises(Stop):
        run_experiment(cfg.build(), store, on_round=stop)
    (info,) = store.list_runs()
    resumed = resume_experiment(cfg.build(), store, info.run_id)
    assert torch.equal(resumed.weights, full.weights)
    assert [m["epsilon"] for m in resumed.history] == [m["epsilon"] for m in full.history]
    _, ckpt = store.latest_checkpoint(info.run_id)
    slot = {k.split("/", 1)[1]: v for k, v in ckpt.tensors.items() if k.startswith("privacy/")}
    ledger = stored_ledger(slot, PrivacyBudget())
    assert ledger.per_round(slot) == [m["epsilon"] for m in full.history]


@pytest.mark.parametrize("engine", ["vectorized", "pool"])
def test_local_dp_gives_the_inline_run_on_every_engine(engine: str) -> None:
    inline = run_experiment(config(algorithm=ldp_section()).build())
    run = {**CONFIG["run"], "engine": engine, "workers": 2}
    other = run_experiment(config(algorithm=ldp_section(), run=run).build())
    assert torch.equal(inline.weights, other.weights)


def test_the_server_sees_only_the_noised_delta() -> None:
    seen: list[Message] = []
    exp = config(algorithm=ldp_section(), rounds=1).build()
    run_experiment(exp, on_updates=lambda rnd, w, ups: seen.extend(ups.values()))
    assert seen and all(set(m.arrays) == {"delta"} for m in seen)
    assert all(m.scalars == {"num_examples": 1, "num_steps": 0, "weight": 1.0} for m in seen)
    # noise of std 2 x 0.5 per coordinate: far above the clip of 0.5
    assert all(float(torch.linalg.vector_norm(m.arrays["delta"])) > 5 for m in seen)


# ---- refused up front -------------------------------------------------------------------


def test_combinations_without_an_accounting_are_refused() -> None:
    with pytest.raises(ValueError, match="each a private mechanism"):
        config(algorithm=ldp_section(), aggregator={"name": "dp_mean", "clip": 1.0}).build()
    with pytest.raises(ValueError, match=r"scaffold \(Scaffold\) also uploads"):
        scaffold(clients_per_round=2, transforms=(LocalGaussian(),))
    with pytest.raises(ValueError, match="counts every update alike"):
        qffl(clients_per_round=2, transforms=(LocalGaussian(),))
    with pytest.raises(ValueError, match="counts every update alike"):
        qffl(clients_per_round=2, aggregator=TreeAggregatedMean())
    with pytest.raises(ValueError, match="min_updates = 2"):
        config(deploy={"min_updates": 2}).build()
    shuffled = replace(fedavg(aggregator=GaussianMean()), sampler=ShuffledSampler(4))
    with pytest.raises(ValueError, match="central DP is accounted for Poisson"):
        prepare(shuffled, 40, 5, PrivacyBudget())
    assert dp_ftrl(clients_per_round=3).sampler == ShuffledSampler(3)
    assert ldp_fedavg(clients_per_round=3).transforms == (LocalGaussian(),)


def test_a_deployment_refuses_seeded_local_and_tree_noise() -> None:
    from potluck.engines.inline import InlineEngine

    class Remote(InlineEngine):
        remote = True

    for section, where in ((ldp_section(), "transforms.0"), (algo_section(), "aggregator")):
        with pytest.raises(ValueError, match=rf'{where}.noise = "seed": a deployment'):
            run_experiment(config(algorithm=section).build(), engine=Remote)
        secure = config(algorithm={**section, "noise": "secure"}, rounds=2).build()
        assert len(run_experiment(secure, engine=Remote).history) == 2


# ---- through TOML and the CLI ---------------------------------------------------------------


def test_the_cli_runs_dp_ftrl_and_local_dp_and_states_their_privacy(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from potluck.cli import app

    runner, store = CliRunner(), str(tmp_path / "runs")
    expected = {
        "tree": (algo_section(restart_every=10), "rounds of DP-FTRL with tree aggregation"),
        "local": (ldp_section(), "-local DP for each client"),
    }
    for name, (section, phrase) in expected.items():
        exp = tmp_path / f"{name}.toml"
        cfg = config(algorithm=section, run={"threads": 1, "name": name})
        exp.write_text(cfg.to_toml())
        done = runner.invoke(app, ["run", str(exp), "--store", store])
        assert done.exit_code == 0, done.output
        stated = runner.invoke(app, ["privacy", name, "--store", store, "--json"])
        assert stated.exit_code == 0, stated.output
        payload = json.loads(stated.output)
        assert phrase in payload["statement"]
        assert payload["epsilon"][-1] == pytest.approx(
            json.loads(runner.invoke(app, ["show", name, "--store", store, "--json"]).output)[
                "rounds"
            ][-1]["epsilon"]
        )
