"""Example-level DP-SGD inside the clients: per-example gradients, the clip, the noise,
Poisson sampling of examples, the accounting, engines, resume, refusals and the CLI."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import dp_accounting as dpa
import numpy as np
import pytest
import torch
from dp_accounting import rdp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from potluck import resume_experiment, run_experiment
from potluck.algorithms import ditto, fedavg, qffl
from potluck.client.program import ClientProgram
from potluck.client.terms import FedProx
from potluck.config import ExperimentConfig
from potluck.core.task import Task
from potluck.data import Federation
from potluck.models.zoo import mlp, small_cnn
from potluck.orchestrator import Experiment
from potluck.privacy.central import NORM_SLACK
from potluck.privacy.dp_sgd import DpSgd, clip_scales, poisson_batches
from potluck.privacy.example import example_epsilon, largest_epsilon
from potluck.store.sqlite import RunStore

EPSILON = "terms.0.dp_sgd/epsilon"


def images(clients: int, n: int, seed: int = 0) -> Federation:
    g = torch.Generator().manual_seed(seed)
    data = [
        (torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))
        for _ in range(clients)
    ]
    return Federation.from_client_data(data)


# ---- per-example gradients ---------------------------------------------------------------


@pytest.mark.parametrize("model", ["mlp", "small_cnn"])
def test_per_example_gradients_equal_a_loop_over_single_examples(model: str) -> None:
    net = (lambda: mlp((1, 8, 8), 10)) if model == "mlp" else (lambda: small_cnn((1, 8, 8), 10))
    program = ClientProgram(Task(net), images(1, 12), fedavg(terms=(DpSgd(),)))
    x, y = program._data(0, 1)
    w = program.initial_weights() + 0.05 * torch.randn(program.spec.size)
    grads, loss = program.example_gradients(program.spec.unflatten(w), x, y, torch.ones(12))
    flat = torch.cat([grads[n].reshape(12, -1) for n in program.spec.names], 1)
    losses = []
    for i in range(12):
        alone, loss_i = program._grad(w, x[i : i + 1], y[i : i + 1])
        torch.testing.assert_close(flat[i], alone, rtol=1e-5, atol=1e-6)
        losses.append(float(loss_i))
    assert float(loss) == pytest.approx(sum(losses) / 12, rel=1e-6)


def test_padded_examples_do_not_count() -> None:
    program = ClientProgram(Task(lambda: mlp((1, 8, 8), 10)), images(1, 6), fedavg())
    x, y = program._data(0, 1)
    params = program.spec.unflatten(program.initial_weights())
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    _, padded = program.example_gradients(params, x, y, mask)
    _, real = program.example_gradients(params, x[:3], y[:3], torch.ones(3))
    assert float(padded) == pytest.approx(float(real), rel=1e-6)


# ---- the clip, the sum, the noise ---------------------------------------------------------


@settings(deadline=None)
@given(st.integers(1, 8), st.integers(1, 30), st.floats(1e-3, 1e3), st.integers(0, 2**31))
def test_the_clip_bounds_every_example_and_keeps_small_ones(
    b: int, d: int, clip: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(b, d, generator=g) * torch.rand(b, 1, generator=g) * 10 * clip
    scales = clip_scales(grads, clip)
    clipped = grads.double() * scales.double()[:, None]
    norms = grads.double().norm(dim=1)
    assert bool((clipped.norm(dim=1) <= clip).all())
    small = norms * (1 + 2 * NORM_SLACK) <= clip
    assert bool((scales[small] == 1.0).all())
    step = DpSgd(clip=clip, noise_multiplier=0.0).reduce(
        torch.zeros(d), grads, torch.ones(b), torch.zeros(d), {"expected_batch": torch.tensor(4.0)}
    )
    torch.testing.assert_close(step, (scales @ grads) / 4.0)  # summed over the expected batch


@pytest.mark.parametrize("noise", ["seed", "secure"])
def test_the_noise_std_is_z_clip_over_the_expected_batch(noise: str) -> None:
    term, d = DpSgd(clip=0.5, noise_multiplier=1.3, noise=noise), 200_000
    draw = term.draw(torch.Generator().manual_seed(7), d)
    work = {"expected_batch": torch.tensor(16.0)}
    step = term.reduce(torch.zeros(d), torch.zeros(3, d), torch.ones(3), draw, work).double()
    std = 1.3 * 0.5 / 16
    assert abs(float(step.mean())) < 5 * std / math.sqrt(d)
    assert abs(float(step.std()) / std - 1) < 0.01


def test_seeded_noise_follows_the_stream_and_secure_noise_does_not() -> None:
    seeded, secure = DpSgd(), DpSgd(noise="secure")
    a = seeded.draw(torch.Generator().manual_seed(3), 8)
    assert torch.equal(a, seeded.draw(torch.Generator().manual_seed(3), 8))
    b = secure.draw(torch.Generator().manual_seed(3), 8)
    assert not torch.equal(b, secure.draw(torch.Generator().manual_seed(3), 8))


def test_poisson_sampling_takes_each_example_with_probability_q() -> None:
    n, q, steps = 50, 0.2, 4000
    counts = torch.zeros(n)
    sizes = []
    for idx in poisson_batches(n, q, steps, torch.Generator().manual_seed(0)):
        counts[idx] += 1
        sizes.append(len(idx))
    assert float((counts / steps - q).abs().max()) < 4 * math.sqrt(q * (1 - q) / steps)
    assert np.mean(sizes) == pytest.approx(n * q, rel=0.02)
    assert np.var(sizes) == pytest.approx(n * q * (1 - q), rel=0.1)  # Binomial(n, q)
    assert min(sizes) == 0 or n * (1 - q) ** n < 1e-3  # a step may be empty


# ---- the accounting -----------------------------------------------------------------------


def test_the_accountant_equals_dp_accountings_own() -> None:
    for q, steps, z in [(0.01, 1000, 1.1), (0.25, 12, 1.0), (1.0, 3, 2.0)]:
        acc = rdp.RdpAccountant()
        acc.compose(
            dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), steps)
        )
        assert example_epsilon(q, steps, z, 1e-5) == acc.get_epsilon(1e-5)
    assert round(example_epsilon(0.01, 1000, 1.1, 1e-5), 4) == 1.7118
    pairs = [(0.25, 10), (0.125, 40), (0.25, 4), (0.1, 40)]
    expected = max(example_epsilon(q, t, 1.0, 1e-5) for q, t in pairs)
    assert largest_epsilon(pairs, 1.0, 1e-5) == expected


CONFIG: dict[str, Any] = {
    "rounds": 3,
    "data": {"dataset": "digits", "num_clients": 20, "partition": {"kind": "dirichlet"}},
    "model": {"name": "mlp"},
    "sampler": {"clients_per_round": 5},
    "client": {"epochs": 1, "batch_size": 16, "lr": 0.1, "momentum": 0.5},
    "terms": [{"name": "dp_sgd", "clip": 1.0, "noise_multiplier": 1.1}],
    "evaluation": {"federated_clients": 0},
    "run": {"threads": 1, "store": "none"},
}


def config(**sections: Any) -> ExperimentConfig:
    return ExperimentConfig.from_dict({**CONFIG, **sections})


def test_each_round_reports_the_largest_epsilon_over_every_client_so_far(tmp_path: Path) -> None:
    iid = {**CONFIG["data"], "partition": {"kind": "iid"}}  # two sizes: 71 and 72 examples
    store = RunStore(tmp_path)
    result = run_experiment(config(rounds=4, data=iid).build(), store)
    fed = config(data=iid).build().federation
    rate = {c: min(16, n) / n for c in range(20) if (n := fed.num_examples(c))}
    steps = dict.fromkeys(range(20), 0)
    shown = []
    for rnd in range(1, 5):
        for _, c, metrics in store.client_metrics(result.run_id, rnd):
            steps[c] += int(metrics["num_steps"])
        exposed = [(rate[c], t) for c, t in steps.items() if t]
        shown.append(max(example_epsilon(q, t, 1.1, 1e-5) for q, t in exposed))
    assert [m[EPSILON] for m in result.history] == shown
    states = store.client_states(result.run_id, list(range(20)))
    stored = {c: int(s.get("terms.0.dp_sgd/steps", 0)) for c, s in enumerate(states)}
    assert stored == steps


# ---- engines, composition, resume -------------------------------------------------------


@pytest.mark.parametrize("engine", ["vectorized", "pool"])
def test_every_engine_gives_the_inline_run(engine: str) -> None:
    terms = [{"name": "fedprox", "mu": 0.1}, *CONFIG["terms"], {"name": "scaffold"}]
    inline = run_experiment(config(terms=terms).build())
    run = {**CONFIG["run"], "engine": engine, "workers": 2}
    other = run_experiment(config(terms=terms, run=run).build())
    if engine == "pool":
        assert torch.equal(inline.weights, other.weights)
    else:
        torch.testing.assert_close(other.weights, inline.weights, rtol=1e-5, atol=1e-5)
    key = "terms.1.dp_sgd/epsilon"
    assert [m[key] for m in other.history] == [m[key] for m in inline.history]


def test_the_vectorized_engine_trains_a_cnn_as_inline() -> None:
    fed = images(6, 20)
    algo = fedavg(clients_per_round=3, batch_size=8, lr=0.1, terms=(DpSgd(clip=0.5),))
    task = Task(lambda: small_cnn((1, 8, 8), 10))
    runs = {
        e: run_experiment(Experiment(task, fed, algo, rounds=2, engine=e, threads=1))
        for e in ("inline", "vectorized")
    }
    torch.testing.assert_close(runs["vectorized"].weights, runs["inline"].weights)


def test_dropout_draws_per_example_masks_inline_and_in_the_pool_and_is_refused_batched() -> None:
    g = torch.Generator().manual_seed(0)
    fed = Federation.from_client_data(
        [(torch.randn(20, 16, generator=g), torch.randint(0, 3, (20,), generator=g))] * 4
    )
    net = lambda: nn.Sequential(nn.Linear(16, 8), nn.Dropout(0.5), nn.Linear(8, 3))  # noqa: E731
    algo = fedavg(clients_per_round=2, batch_size=4, lr=0.1, terms=(DpSgd(),))
    runs = {
        e: run_experiment(Experiment(Task(net), fed, algo, rounds=2, engine=e, threads=1))
        for e in ("inline", "pool")
    }
    assert torch.equal(runs["inline"].weights, runs["pool"].weights)
    with pytest.raises(ValueError, match="the vectorized engine cannot batch"):
        run_experiment(Experiment(Task(net), fed, algo, rounds=1, engine="vectorized"))


def test_the_other_terms_correct_the_privatised_gradient() -> None:
    mu, lr = 0.5, 0.5
    algo = fedavg(
        clients_per_round=1, epochs=2, batch_size=4, lr=lr, terms=(DpSgd(), FedProx(mu=mu))
    )
    program = ClientProgram(Task(lambda: mlp((1, 8, 8), 10)), images(1, 8), algo)
    w0 = program.initial_weights()
    delta = program.train(0, 1, w0).message.arrays["delta"]
    # by hand: the same Poisson batches and noise, the proximal term added after the noise
    x, y = program._data(0, 1)
    prep = program.prepare(0, 1, w0, {}, {})
    step = program.example_step(prep)
    assert step is not None
    w = w0
    for idx in program.batches(8, 4, program.seeds.torch("batch", 1, 0)):
        ones = torch.ones(len(idx))
        grads, _ = program.example_gradients(program.spec.unflatten(w), x[idx], y[idx], ones)
        flat = torch.cat([grads[n].reshape(len(idx), -1) for n in program.spec.names], 1)
        noise = step.term.draw(step.gen, program.spec.size)
        g = step.term.reduce(w, flat, ones, noise, step.work) + mu * (w - w0)
        w = w - lr * g
    torch.testing.assert_close(delta, w - w0)


def test_resume_restores_the_step_counts(tmp_path: Path) -> None:
    cfg = config(rounds=4)
    whole = RunStore(tmp_path / "whole")
    full = run_experiment(cfg.build(), whole)

    class Stop(Exception):
        pass

    def stop(rnd: int, _metrics: object) -> None:
        if rnd == 2:
            raise Stop

    store = RunStore(tmp_path / "resumed")
    with pytest.raises(Stop):
        run_experiment(cfg.build(), store, on_round=stop)
    (info,) = store.list_runs()
    resumed = resume_experiment(cfg.build(), store, info.run_id)
    assert torch.equal(resumed.weights, full.weights)
    assert [m[EPSILON] for m in resumed.history] == [m[EPSILON] for m in full.history]
    clients = list(range(20))
    counts = [s.get("terms.0.dp_sgd/steps") for s in store.client_states(info.run_id, clients)]
    assert any(c is not None for c in counts)
    assert counts == [
        s.get("terms.0.dp_sgd/steps") for s in whole.client_states(full.run_id, clients)
    ]


def test_it_composes_with_user_level_dp_each_with_its_own_accounting() -> None:
    algorithm = {"name": "dp_fedavg", "rate": 0.25, "clip": 0.5, "noise_multiplier": 1.0}
    sampler = {"name": "poisson", "rate": 0.25}
    history = run_experiment(config(rounds=2, algorithm=algorithm, sampler=sampler).build()).history
    assert all(m["epsilon"] > 0 and m[EPSILON] > 0 for m in history)  # user- and example-level


# ---- refused up front ---------------------------------------------------------------------


def test_what_would_leak_or_cannot_be_taken_per_example_is_refused() -> None:
    with pytest.raises(ValueError, match=r"terms.0.qffl \(QFFL\) reads it outside them"):
        qffl(clients_per_round=2, terms=(qffl().terms[0], DpSgd()))
    with pytest.raises(ValueError, match=r"terms.0.ditto \(Ditto\) reads it outside them"):
        ditto(clients_per_round=2, terms=(ditto().terms[0], DpSgd()))
    with pytest.raises(ValueError, match=r"so does terms.0.dp_sgd \(DpSgd\): one term reduces"):
        fedavg(terms=(DpSgd(), DpSgd()))
    with pytest.raises(ValueError, match="clip must be a finite number > 0"):
        DpSgd(clip=0.0)
    norm = torch.nn.BatchNorm1d(10, track_running_stats=False)  # batch statistics
    net = lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10), norm)  # noqa: E731
    fed = images(1, 4)
    with pytest.raises(ValueError, match=r"module '2' is BatchNorm1d, whose batch statistics"):
        ClientProgram(Task(net), fed, fedavg(terms=(DpSgd(),)))


def test_a_deployment_refuses_noise_that_follows_from_the_seed() -> None:
    from potluck.deployment import site_program
    from potluck.engines.inline import InlineEngine

    class Remote(InlineEngine):
        remote = True

    match = r"terms.0.dp_sgd.noise = \"seed\": a deployment's DP noise"
    with pytest.raises(ValueError, match=match):
        run_experiment(config().build(), engine=Remote)
    with pytest.raises(ValueError, match=match):
        site_program(config(), 0)
    secure = config(terms=[{**CONFIG["terms"][0], "noise": "secure"}], rounds=1).build()
    assert EPSILON in run_experiment(secure, engine=Remote).history[0]


# ---- through TOML and the CLI ---------------------------------------------------------------


def test_the_cli_runs_the_readmes_dp_sgd_example(tmp_path: Path) -> None:
    import json
    import re

    import tomli_w
    from typer.testing import CliRunner

    from potluck.cli import app

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("**Example-level DP-SGD", 1)[1]
    (block,) = re.findall(r"```toml\n(.*?)```", section, re.DOTALL)[:1]
    assert '[[terms]]\nname = "dp_sgd"' in block
    base = {k: v for k, v in CONFIG.items() if k not in ("client", "terms")}
    exp = tmp_path / "dp_sgd.toml"
    exp.write_text(tomli_w.dumps({**base, "rounds": 2}) + "\n" + block)
    runner, store = CliRunner(), str(tmp_path / "runs")
    done = runner.invoke(app, ["run", str(exp), "--store", store, "--set", 'run.name="dp"'])
    assert done.exit_code == 0, done.output
    flat = " ".join(done.output.split())
    assert "example-level DP-SGD (terms.0.dp_sgd): clip 1, noise multiplier 1.1" in flat
    shown = json.loads(runner.invoke(app, ["show", "dp", "--store", store, "--json"]).output)
    final = shown["rounds"][-1][EPSILON]
    assert final > 0 and f"{EPSILON}={final:.4g}" in flat
    stated = runner.invoke(app, ["privacy", "dp", "--store", store, "--json"])
    assert stated.exit_code == 0, stated.output
    example = json.loads(stated.output)["example_level"]["terms.0.dp_sgd"]
    assert example["epsilon"] == final  # afresh from the stored step counts
    assert example["statement"].startswith(f"({final:.4g}, 1e-05)-DP at the level of one example")
    table = runner.invoke(app, ["privacy", "dp", "--store", store])
    assert "example-level" in " ".join(table.output.split())


def test_a_term_that_only_asks_for_per_example_gradients_trains_as_fedavg() -> None:
    from dataclasses import dataclass
    from typing import ClassVar

    from potluck.client.terms import Term
    from potluck.core.parts import Need

    @dataclass(frozen=True)
    class PerExample(Term):  # the default batches, draw and reduce: the batch mean
        needs: ClassVar[frozenset[str]] = frozenset({Need.PER_EXAMPLE_GRADIENTS})

    fed, task = images(4, 10), Task(lambda: mlp((1, 8, 8), 10))
    plain = fedavg(clients_per_round=2, batch_size=4, lr=0.1)
    per_example = fedavg(clients_per_round=2, batch_size=4, lr=0.1, terms=(PerExample(),))
    for engine in ("inline", "vectorized"):
        a = run_experiment(Experiment(task, fed, plain, rounds=2, engine=engine, threads=1))
        b = run_experiment(Experiment(task, fed, per_example, rounds=2, engine=engine, threads=1))
        torch.testing.assert_close(b.weights, a.weights, rtol=1e-5, atol=1e-6)
