"""Distributed DP on secure aggregation (the distributed Skellam mechanism): the noise has the
Skellam distribution, from seeded or cryptographic bits; the rotation and the conditional
rounding keep their bounds; the server's unmasked sum is exactly the sum of the clients'
noised encodings; the accountant equals the papers' formulas and dp-accounting where they
meet; calibration, the budget, resume, the engines, TOML and the CLI; what cannot be
accounted or deployed is refused."""

from __future__ import annotations

import itertools
import json
import math
import re
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import dp_accounting as dpa
import numpy as np
import pytest
import torch
from dp_accounting import rdp
from dp_accounting.rdp.rdp_privacy_accountant import _compute_rdp_sample_wor_gaussian_scalar
from scipy import stats
from secagg_harness import NS, SEED, bound, inputs_for, secure_round
from typer.testing import CliRunner

from potluck.cli import app
from potluck.config import ExperimentConfig
from potluck.core.message import Message
from potluck.engines import available_engines
from potluck.engines.inline import InlineEngine
from potluck.orchestrator import RunResult, resume_experiment, run_experiment
from potluck.privacy.accounting import WithoutReplacement
from potluck.privacy.distributed import (
    ORDERS,
    DistributedLedger,
    calibrate,
    epsilon_of,
    sampled_rdp,
    skellam_rdp,
    subsampled_rdp,
)
from potluck.privacy.ledger import PrivacyBudget, check_deployable, ledger_for
from potluck.privacy.skellam import poisson, secure_bytes, seeded_bytes, skellam
from potluck.secagg import DistributedSkellam
from potluck.secagg.ddp_encoding import ROUNDING_SLACK, SkellamEncoding, conditional_round
from potluck.secagg.protocol import _ids
from potluck.secagg.rotation import fwht, padded, rotate, rotation_signs, unrotate
from potluck.store.sqlite import RunStore

# ---- the noise ----------------------------------------------------------------------------


def chi_square(x: np.ndarray, pmf: Any, lo: int, hi: int) -> float:
    """The chi-square p-value of integer samples ``x`` against ``pmf`` on [lo, hi] and the
    rest of the line as one more bin."""
    ks = np.arange(lo, hi + 1)
    observed = np.array([(x == k).sum() for k in ks], dtype=np.float64)
    expected = pmf(ks) * len(x)
    observed = np.append(observed, len(x) - observed.sum())
    expected = np.append(expected, len(x) - expected.sum())
    return float(stats.chi2.sf(((observed - expected) ** 2 / expected).sum(), len(ks)))


@pytest.mark.parametrize("lam", [0.4, 6.0, 10.0, 45.0])  # multiplication below 10, PTRS above
def test_the_poisson_sampler_has_the_poisson_distribution(lam: float) -> None:
    x = poisson(lam, 100_000, seeded_bytes(np.random.default_rng(7)))
    dist = stats.poisson(lam)
    assert x.dtype == np.int64 and x.min() >= 0
    assert chi_square(x, dist.pmf, int(dist.ppf(1e-3)), int(dist.ppf(1 - 1e-3))) > 1e-3


@pytest.mark.parametrize("mu", [3.0, 80.0, 2.0**36])
def test_skellam_shares_are_integers_of_mean_zero_and_variance_mu(mu: float) -> None:
    x = skellam(mu, 200_000, seeded_bytes(np.random.default_rng(3)))
    assert x.dtype == np.int64
    assert abs(float(x.mean())) < 4 * math.sqrt(mu / len(x))
    assert abs(float(x.var()) / mu - 1) < 4 * math.sqrt(2 / len(x))
    if mu < 100:
        dist = stats.skellam(mu / 2, mu / 2)
        assert chi_square(x, dist.pmf, int(dist.ppf(1e-3)), int(dist.ppf(1 - 1e-3))) > 1e-3


def test_the_sum_of_shares_is_skellam_of_the_summed_variance() -> None:
    """What the accountant relies on: n shares of variance mu / n add up to Sk(mu)."""
    source = seeded_bytes(np.random.default_rng(11))
    total = sum(skellam(12.0 / 6, 100_000, source) for _ in range(6))
    dist = stats.skellam(6.0, 6.0)
    assert chi_square(total, dist.pmf, int(dist.ppf(1e-3)), int(dist.ppf(1 - 1e-3))) > 1e-3


def test_seeded_noise_is_reproducible_and_secure_noise_is_not() -> None:
    def seeded() -> np.ndarray:
        return skellam(1e4, 1000, seeded_bytes(np.random.default_rng(0)))

    assert np.array_equal(seeded(), seeded())
    a, b = skellam(1e4, 100_000, secure_bytes()), skellam(1e4, 100_000, secure_bytes())
    assert not np.array_equal(a[:1000], b[:1000])
    assert abs(float(a.var()) / 1e4 - 1) < 0.02 and abs(float(a.mean())) < 2.0


# ---- rotation and rounding ------------------------------------------------------------------


def test_the_rotation_is_orthogonal_flattens_and_inverts() -> None:
    n = padded(1000)
    assert n == 1024 and padded(1) == 1 and padded(1024) == 1024
    h = np.stack([fwht(row) for row in np.eye(16)])
    assert np.array_equal(h @ h, 16 * np.eye(16))  # H H = n I
    signs = rotation_signs(SEED, NS, 3, n)
    assert set(np.unique(signs)) == {-1.0, 1.0}
    spike = np.zeros(n)
    spike[5] = 3.0
    y = rotate(spike, signs)
    assert np.allclose(np.abs(y), 3.0 / math.sqrt(n))  # every coordinate norm / sqrt(n)
    x = np.random.default_rng(0).normal(size=n)
    assert np.isclose(np.linalg.norm(rotate(x, signs)), np.linalg.norm(x))
    assert np.allclose(unrotate(rotate(x, signs), signs), x)


def test_conditional_rounding_is_unbiased_and_never_exceeds_its_bound() -> None:
    rng = np.random.default_rng(0)
    y = rng.normal(size=256) * 3
    bound_ = math.sqrt(float(y @ y) + 256 / 4 + math.sqrt(float(y @ y)))
    draws = np.stack([conditional_round(y, bound_, rng) for _ in range(2000)])
    assert (np.abs(draws - y) < 1).all()
    assert (np.sqrt((draws.astype(np.float64) ** 2).sum(axis=1)) <= bound_).all()
    assert np.abs(draws.mean(axis=0) - y).max() < 0.05  # about unbiased (conditioning aside)
    with pytest.raises(RuntimeError, match="all exceeded"):
        conditional_round(np.full(16, 0.5), 1.0, rng)


def test_the_encoding_clips_and_decodes_the_mean_within_the_rounding() -> None:
    enc = SkellamEncoding(0.5, 20, 32, 5, 0.0, NS)
    enc = enc.for_round(SEED, 1, seeded_bytes(np.random.default_rng(0)))
    rng = np.random.default_rng(0)
    big, small = np.array([3.0, 4.0, 0, 0, 0]), np.array([0.1, -0.2, 0.05, 0, 0.3])
    total = enc.encode(big, 99.0, rng) + enc.encode(small, 1.0, rng)  # weights do not count
    mean = enc.decode(total)
    expected = (big * 0.5 / 5 * (1 - 1e-5) + small) / 2  # big clipped to norm 0.5
    assert np.abs(mean - expected).max() < 0.5 * math.sqrt(8) / 2**19
    assert enc.encode(small, 1.0, rng).dtype == np.uint32 and len(total) == 8 + 1


# ---- the protocol: what the server unmasks --------------------------------------------------


def ddp(**settings: Any) -> DistributedSkellam:
    base: dict[str, Any] = {"neighbours": 4, "threshold": 0.5, "min_survivors": 5}
    return DistributedSkellam(**{**base, **settings})


@pytest.mark.parametrize(
    "drops", [{}, {"masked_input": {3}}, {"advertise": {0}, "unmask": {5}}, {"share": {7}}]
)
def test_the_unmasked_sum_is_the_sum_of_the_survivors_noised_encodings(
    drops: dict[str, set[int]],
) -> None:
    d, clients = 3000, list(range(8))
    part = bound(ddp(noise_multiplier=0.5), d)
    inputs = inputs_for(clients, d)
    out = secure_round(part, inputs, drops)
    assert out.aborted is None and out.total is not None and out.mean is not None
    survivors = sorted(out.uploads)
    noisy, plain = (np.zeros(padded(d) + 1, np.uint32) for _ in range(2))
    for c in survivors:
        ctx = out.view.ctx(c)
        for total, variance in ((noisy, part.encoding(NS).variance), (plain, 0.0)):
            enc = SkellamEncoding(1.0, 20, 32, d, variance, NS)
            enc = enc.for_round(SEED, 1, seeded_bytes(ctx.rng("noise")))
            total += enc.encode(inputs[c][0], inputs[c][1], ctx.rng("rounding"))
    assert np.array_equal(out.total, noisy)  # exactly, modulo 2^32
    summed_noise = noisy.view(np.int32)[:-1].astype(np.int64) - plain.view(np.int32)[:-1]
    expected_var = len(survivors) * (0.5 * 2**19) ** 2 / 5  # min_survivors' shares each
    assert abs(float(summed_noise.var()) / expected_var - 1) < 0.1
    assert int(out.total[-1]) == len(survivors)
    clipped = [inputs[c][0] * min(1.0, 1 / np.linalg.norm(inputs[c][0])) for c in survivors]
    noise_std = math.sqrt(expected_var) / 2**19 / len(survivors)  # per coordinate, rotated
    error = out.mean.numpy() - np.mean(clipped, axis=0)
    assert 0.8 < float(error.std()) / noise_std < 1.2


def test_too_few_survivors_abort_before_any_share_is_revealed() -> None:
    part = bound(ddp(min_survivors=7), 6)
    out = secure_round(part, inputs_for(list(range(8)), 6), {"masked_input": {1, 4}})
    assert out.aborted and "6 masked inputs arrived, fewer than min_survivors = 7" in out.aborted
    assert not any("b_shares" in m.arrays for m in out.view.seen)
    assert out.view.metrics["masked"] == 6


def test_a_survivor_declines_to_unmask_a_sum_with_too_few_survivors() -> None:
    """Against a server that would unmask anyway: the clients check the survivors too."""
    part = bound(ddp(min_survivors=7), 6)
    out = secure_round(part, inputs_for(list(range(8)), 6))
    state, ctx = out.view.states[2], out.view.ctx(2)
    short = Message({"survivors": _ids([0, 2, 3]), "dropped": _ids([1, 4, 5, 6, 7])})
    assert part.client_stage("unmask", short, state, ctx) == (None, {})
    full = Message({"survivors": _ids(range(8)), "dropped": _ids([])})
    assert part.client_stage("unmask", full, state, ctx)[0] is not None


# ---- the accountant -------------------------------------------------------------------------


def test_the_skellam_rdp_is_the_papers_bound_in_its_own_units() -> None:
    """Agarwal et al.'s bound written for a sensitivity and variance in model units at scale
    s (as in their paper and TFF) equals ours in integer units."""
    s, l2, var = 300.0, 1.3, 0.8  # integer units: l2 s, var s^2
    l1 = l2 * math.sqrt(100)
    a = ORDERS.astype(np.float64)
    paper = a / (2 * var) * l2**2 + np.minimum(
        ((2 * a - 1) * s * l2**2 + 6 * l1) / (4 * s**3 * var**2), 3 * l1 / (2 * s * var)
    )
    assert np.allclose(skellam_rdp(ORDERS, l1 * s, l2 * s, var * s * s), paper, rtol=1e-12)
    assert np.isinf(skellam_rdp(ORDERS, 1.0, 1.0, 0.0)).all()


def test_the_sampling_bound_is_wang_et_als_theorem_9() -> None:
    """With the Gaussian's RDP plugged in it is dp-accounting's bound for the sampled
    Gaussian where dp-accounting uses Theorem 9 (orders above 256), and never below
    dp-accounting's tighter Gaussian-only bound (Theorem 27) under it."""
    sigma, q = 1.7, 0.02

    def gaussian(a: np.ndarray) -> np.ndarray:
        return a / (2 * sigma**2)

    orders = np.array([2, 3, 8, 40, 300, 400])
    ours = subsampled_rdp(orders, q, gaussian)
    theirs = np.array([_compute_rdp_sample_wor_gaussian_scalar(q, sigma, a) for a in orders])
    assert np.allclose(ours[-2:], theirs[-2:], rtol=1e-10)
    assert (ours >= theirs * (1 - 1e-12)).all()
    assert np.array_equal(subsampled_rdp(orders, 1.0, gaussian), gaussian(orders))
    assert np.array_equal(subsampled_rdp(orders, 0.0, gaussian), np.zeros(6))


def test_at_a_fine_scale_epsilon_is_the_sampled_gaussians() -> None:
    """With 2^19 units per clip Skellam's extra terms vanish: epsilon is dp-accounting's for
    the sampled Gaussian of multiplier sqrt(mu) / (2 l2) (replace-one), at least and
    within 1%."""
    z, rounds, n, m = 1.2, 50, 1000, 20
    release = DistributedSkellam(noise_multiplier=z, min_survivors=10).release()
    ours = epsilon_of(rounds * sampled_rdp(release, m / n), 1e-5)
    acc = rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    z_eff = math.sqrt(release.mu) / (2 * release.l2)
    assert np.isclose(z_eff, z / (2 * (1 + ROUNDING_SLACK)))
    gaussian = dpa.SampledWithoutReplacementDpEvent(n, m, dpa.GaussianDpEvent(z_eff))
    acc.compose(dpa.SelfComposedDpEvent(gaussian, rounds))
    theirs = acc.get_epsilon(1e-5)
    assert theirs <= ours <= 1.01 * theirs


def test_epsilon_decreases_with_noise_and_coarse_scales_cost_more() -> None:
    def eps(z: float, bits: int = 20) -> float:
        part = DistributedSkellam(noise_multiplier=z, quantization_bits=bits, min_survivors=5)
        return epsilon_of(20 * sampled_rdp(part.release(), 0.1), 1e-5)

    values = [eps(z) for z in (0.5, 0.8, 1.0, 2.0, 4.0)]
    assert all(a > b for a, b in itertools.pairwise(values))
    assert eps(1.0, bits=3) > 1.05 * eps(1.0)  # Skellam's terms beyond the Gaussian's


@pytest.mark.parametrize("target", [1.0, 4.0, 10.0])
def test_calibration_hits_the_target_within_one_percent(target: float) -> None:
    part = DistributedSkellam(min_survivors=5)
    sampling = WithoutReplacement(500, 25)
    z = calibrate(target, 1e-5, 40, sampling, part.release_at)
    spent = epsilon_of(40 * sampled_rdp(part.release_at(z), 25 / 500), 1e-5)
    assert 0.99 * target <= spent <= target
    with pytest.raises(ValueError, match="target_epsilon 1e-05 is not reached"):
        calibrate(1e-5, 1e-5, 40, sampling, part.release_at)


def test_the_ledger_takes_the_better_bound_and_states_both() -> None:
    part = DistributedSkellam(noise_multiplier=0.8).bind_cohort(10)
    ledger = DistributedLedger.of(part, WithoutReplacement(40, 10), PrivacyBudget(delta=1e-6))
    state: dict[str, torch.Tensor] = {}
    for cohort in ([0, 1, 2], [0, 3, 4], [5, 6, 7]):  # client 0 in two rounds
        state, eps = ledger.record(state, cohort)
    assert ledger.most_rounds(state) == 2 and state["counts"].tolist()[:8] == [2, *[1] * 7]
    base = part.release().rdp()
    server = epsilon_of(2 * base, 1e-6)
    sampled = epsilon_of(3 * sampled_rdp(part.release(), 0.25), 1e-6)
    assert ledger.server_spent(state) == server
    assert eps == epsilon_of(np.minimum(3 * sampled_rdp(part.release(), 0.25), 2 * base), 1e-6)
    assert eps <= min(server, sampled)
    assert ledger.per_round(state)[-1] == eps and len(ledger.per_round(state)) == 3
    text = ledger.statement(state)
    assert f"({eps:.4g}, 1e-06)-DP" in text and f"({server:.4g}, 1e-06)-DP" in text
    assert "8 honest survivors" in text and "10 of 40 clients without replacement" in text
    again = DistributedLedger.stored(state, PrivacyBudget(delta=1e-6))
    assert again.spent(state) == eps and again.statement(state) == text


# ---- whole runs -----------------------------------------------------------------------------

ENGINES = [e for e in available_engines() if e != "ray"]
BASE: dict[str, Any] = {
    "data": {"dataset": "digits", "num_clients": 20, "partition": {"kind": "dirichlet"}},
    "model": {"name": "mlp"},
    "sampler": {"clients_per_round": 8},
    "client": {"epochs": 1, "batch_size": 16, "lr": 0.1},
    "evaluation": {"federated_clients": 0},
}
DDP: dict[str, Any] = {
    "name": "ddp_secagg_fedavg", "clip": 0.5, "noise_multiplier": 0.3, "threshold": 3,
    "min_survivors": 6, "dropout": 0.03,
}  # fmt: skip


def config(engine: str = "inline", rounds: int = 3, **extra: Any) -> ExperimentConfig:
    sections = {"algorithm": DDP, **extra}
    run_ = {"engine": engine, "threads": 1, "workers": 2}
    return ExperimentConfig.from_dict({**BASE, "rounds": rounds, "run": run_, **sections})


@cache
def run(engine: str) -> RunResult:
    return run_experiment(config(engine).build())


@pytest.mark.parametrize("engine", [e for e in ENGINES if e != "inline"])
def test_the_engines_give_the_inline_run(engine: str) -> None:
    ref, got = run("inline"), run(engine)
    assert [m["updates"] for m in ref.history] != [8.0] * 3  # dropouts happened
    protocol = ("updates", "aborted", "bytes_up", "epsilon", "epsilon_server")
    for r, g in zip(ref.history, got.history, strict=True):
        for key in r:
            if key.startswith("transforms.") or key in protocol:
                assert g[key] == r[key], key
    if engine == "pool":
        assert torch.equal(got.weights, ref.weights)
    else:
        torch.testing.assert_close(got.weights, ref.weights, atol=1e-5, rtol=1e-5)


def test_a_run_reports_the_ledgers_epsilons_and_noised_models() -> None:
    result = run("inline")
    history = result.history
    exp = config().build()
    ledger = ledger_for(exp.algorithm, 20, PrivacyBudget())
    assert isinstance(ledger, DistributedLedger)
    assert all(m["epsilon"] <= m["epsilon_server"] for m in history)
    assert history[-1]["epsilon"] > history[0]["epsilon"] > 0
    noiseless = run_experiment(config(algorithm={**DDP, "noise_multiplier": 0.0}).build())
    assert not torch.equal(noiseless.weights, result.weights)
    assert math.isinf(noiseless.history[0]["epsilon"])


def test_a_resumed_run_continues_the_ledger(tmp_path: Path) -> None:
    class Stop(Exception):
        pass

    def stop_after_two(rnd: int, _metrics: object) -> None:
        if rnd == 2:
            raise Stop

    store = RunStore(tmp_path)
    with pytest.raises(Stop):
        run_experiment(config().build(), store, on_round=stop_after_two)
    (info,) = store.list_runs()
    resumed = resume_experiment(ExperimentConfig.from_dict(info.config).build(), store, info.run_id)
    full = run("inline")
    assert torch.equal(resumed.weights, full.weights)
    for key in ("epsilon", "epsilon_server"):
        assert [m[key] for m in resumed.history] == [m[key] for m in full.history]
    _, ckpt = store.latest_checkpoint(info.run_id)
    assert ckpt.tensors["privacy/counts"].sum() == 3 * 8  # every sampled client, 3 rounds


def test_a_target_epsilon_sets_the_noise_and_the_budget_stops_the_run() -> None:
    exp = config(rounds=20, privacy={"target_epsilon": 30.0}).build()
    part = exp.algorithm.transforms[0]
    assert isinstance(part, DistributedSkellam) and part.min_survivors == 6
    ledger = ledger_for(exp.algorithm, 20, exp.privacy)
    assert ledger is not None
    state: dict[str, torch.Tensor] = {}
    for _ in range(20):  # the worst case: one client in every round
        state, eps = ledger.record(state, list(range(8)))
    assert 0.99 * 30.0 <= eps <= 30.0
    full = run("inline").history
    cap = (full[0]["epsilon"] + full[1]["epsilon"]) / 2
    capped = run_experiment(config(privacy={"max_epsilon": cap}).build())
    assert capped.stopped and f"above max_epsilon = {cap:g}" in capped.stopped
    assert [m["epsilon"] for m in capped.history] == [full[0]["epsilon"]]


def test_the_cli_runs_the_preset_from_toml_and_states_its_privacy(tmp_path: Path) -> None:
    exp = tmp_path / "ddp.toml"
    exp.write_text(
        "rounds = 2\n[data]\ndataset = 'digits'\nnum_clients = 10\n"
        "[model]\nname = 'mlp'\n[sampler]\nclients_per_round = 5\n"
        "[algorithm]\nname = 'ddp_secagg_fedavg'\nclip = 0.5\nmin_survivors = 4\n"
        "threshold = 0.6\n[privacy]\ntarget_epsilon = 50.0\n[run]\nthreads = 1\nname = 'ddp'\n"
    )
    runner, store = CliRunner(), str(tmp_path / "runs")
    done = runner.invoke(app, ["run", str(exp), "--store", store])
    assert done.exit_code == 0, done.output
    assert "distributed DP: clip 0.5, noise multiplier" in done.output
    stated = runner.invoke(app, ["privacy", "ddp", "--store", store, "--json"])
    assert stated.exit_code == 0, stated.output
    payload = json.loads(stated.output)
    assert "distributed Skellam mechanism on secure aggregation" in payload["statement"]
    assert len(payload["epsilon"]) == 2 and payload["epsilon"][-1] <= 50.0


def test_the_readmes_example_builds_with_its_calibrated_noise() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", readme, re.DOTALL)
    (block,) = [b for b in blocks if 'name = "ddp_secagg_fedavg"' in b]
    given = tomllib.loads(block)
    data = {"dataset": "digits", "num_clients": 200, "partition": {"kind": "iid"}}
    exp = ExperimentConfig.from_dict({**BASE, **given, "data": data, "rounds": 10}).build()
    part = exp.algorithm.transforms[0]
    assert isinstance(part, DistributedSkellam) and part.min_survivors == 80
    assert exp.privacy is not None and exp.privacy.target_epsilon == 8.0
    assert part.noise_multiplier > 1.0  # calibrated: 10 rounds of 100 of 200 clients, epsilon 8


# ---- refused --------------------------------------------------------------------------------


class _Remote(InlineEngine):
    remote = True


def test_a_deployment_refuses_seeded_noise() -> None:
    with pytest.raises(ValueError, match=r'transforms.0.noise = "seed": a deployment'):
        run_experiment(config().build(), engine=_Remote)
    secure = config(algorithm={**DDP, "noise": "secure"}).build()
    check_deployable(secure.algorithm)  # the noise is fine (the sites keep their secrets)


def test_a_sum_that_could_wrap_stops_the_run_before_its_first_round() -> None:
    algorithm = {**DDP, "quantization_bits": 30, "noise_multiplier": 1.0}
    with pytest.raises(ValueError) as err:
        run_experiment(config(algorithm=algorithm).build())
    message = str(err.value)
    assert "transforms.0.dskellam: the noised sum of 8 clients can reach" in message
    assert "lower quantization_bits to at most 28" in message and "bits = 64" in message
    for fix in ({"quantization_bits": 28}, {"bits": 64}):
        fixed = run_experiment(config(rounds=1, algorithm={**algorithm, **fix}).build())
        assert fixed.history[0]["updates"] > 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"sampler": {"name": "poisson", "rate": 0.4}}, "not Poisson sampling: the server"),
        ({"privacy": {"accountant": "pld"}}, 'accounted in RDP: set privacy accountant = "rdp"'),
        ({"algorithm": {**DDP, "min_survivors": 9}}, "min_survivors = 9 is above the cohort"),
        ({"algorithm": {**DDP, "min_survivors": 2, "colluders": 2}}, "must exceed colluders"),
        ({"algorithm": {**DDP, "quantization_bits": 6}}, "raise quantization_bits to at least"),
        ({"aggregator": {"name": "my_lab.agg:Median"}}, "gives the server only their sum"),
        (
            {
                "algorithm": {"name": "fedavg"},
                "transforms": [{"name": "local_dp"}, {"name": "dskellam"}],
                "aggregator": {"name": "secagg_sum"},
            },
            "are each a private mechanism",
        ),
    ],
)
def test_what_cannot_be_accounted_is_refused_before_the_run(
    extra: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError) as err:
        run_experiment(config(rounds=1, **extra).build())
    assert message in str(err.value)
