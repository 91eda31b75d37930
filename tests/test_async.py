"""The asynchronous driver (FedBuff, FedAsync) on the virtual clock: with the buffer equal
to the cohort and no staleness it is synchronous FedAvg, bit for bit; FedAsync with one
client in flight is FedAvg with one client a round; the staleness weights follow their
formulas and are applied; stale updates past ``max_staleness`` are dropped; every engine
and a resume (the in-flight clients retrained from their versions) give the same run;
TOML and the CLI; what needs a round barrier is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from potluck.buffered import AsyncDriver, Buffered, Flight
from potluck.cli import app
from potluck.config import ConfigError, ExperimentConfig
from potluck.core.message import Message
from potluck.data.profiles import LognormalProfiles
from potluck.engines.inline import InlineEngine
from potluck.orchestrator import RunResult, _Update, run_experiment
from potluck.sampling.asynchrony import Asynchrony
from potluck.store.sqlite import RunStore
from potluck.testing import interrupted_and_resumed, learning

SAME = {"speed": 10.0, "speed_sigma": 0.0, "bandwidth_sigma": 0.0, "latency_sigma": 0.0}
BASE: dict[str, Any] = {
    "seed": 0,
    "rounds": 4,
    "data": {"dataset": "digits", "num_clients": 12, "partition": {"kind": "iid"}},
    "model": {"name": "mlp"},
    "sampler": {"clients_per_round": 4},
    "client": {"epochs": 1, "batch_size": 16, "lr": 0.1, "max_steps": 5},
    "run": {"threads": 1},
    "profiles": {},
}
FEDBUFF = {"concurrency": 6, "buffer": 3}


def run(**extra: Any) -> RunResult:
    return run_experiment(ExperimentConfig.from_dict({**BASE, **extra}).build())


def test_the_staleness_weights_follow_their_formulas() -> None:
    buff = Asynchrony(concurrency=10)
    assert [buff.weight(t) for t in (0, 3, 8)] == [1.0, 0.5, 1 / 3]  # 1 / sqrt(1 + tau)
    poly = Asynchrony(concurrency=10, a=2.0)
    assert poly.weight(1) == 0.25
    hinge = Asynchrony(concurrency=10, staleness="hinge", a=0.5, b=2.0)
    assert [hinge.weight(t) for t in (0, 2, 4)] == [1.0, 1.0, 0.5]
    assert Asynchrony(concurrency=10, staleness="constant").weight(100) == 1.0
    with pytest.raises(ValueError, match="buffer must be in"):
        Asynchrony(concurrency=2, buffer=3)


def test_fedbuff_with_the_buffer_equal_to_the_cohort_and_no_staleness_is_fedavg() -> None:
    """Identical devices and equal local work: the cohort arrives at one instant, the server
    steps, and the next cohort is released with the new model (sampled as the round's)."""
    sync = run(profiles=SAME)
    buff = run(profiles=SAME, **{"async": {"concurrency": 4, "buffer": 4}})
    assert torch.equal(sync.weights, buff.weights)
    for s, b in zip(sync.history, buff.history, strict=True):
        assert (b["test_accuracy"], b["train_loss"]) == (s["test_accuracy"], s["train_loss"])
        assert b["staleness_max"] == 0.0 and b["virtual_time_s"] == s["virtual_time_s"]


def test_fedasync_with_one_client_in_flight_replaces_nothing_but_moves_by_its_model() -> None:
    """alpha = 1, no staleness: the new global model is the client's (FedAvg with one)."""
    sync = run(sampler={"clients_per_round": 1})
    fedasync = {"concurrency": 1, "buffer": 1, "mix": "model", "staleness": "constant"}
    one = run(sampler={"clients_per_round": 1}, **{"async": fedasync})
    assert torch.equal(sync.weights, one.weights)


def test_fedasync_mixes_the_stale_clients_model_into_the_current_one() -> None:
    """``w <- (1 - alpha s) w + alpha s x`` with the client's model ``x = w_v + delta``: the
    aggregator gets ``s (x - w)``, the server step (lr alpha) applies it."""
    policy = Asynchrony(concurrency=2, buffer=1, mix="model", staleness="polynomial", a=1.0)
    driver = AsyncDriver.__new__(AsyncDriver)
    driver.policy = policy
    w_old, w_now, delta = torch.zeros(3), torch.tensor([1.0, 1.0, 1.0]), torch.tensor([2.0, 0, 0])
    driver.versions = {0: {"w": w_old}}
    validated = {"delta": float(delta.norm())}  # the norm taken at validation
    update = _Update(5, Message({"delta": delta}, {"num_examples": 1}), 1.0, {}, validated)
    flight = Flight(0, 5, 0, 0.0, update=update)
    weighed = driver._weighed(Buffered(flight, staleness=1), w_now)
    got = weighed.message.arrays["delta"]
    x = w_old + delta
    assert torch.equal(got, 0.5 * (x - w_now))  # s(1) = 1 / (1 + 1)
    assert weighed.norm("delta") == float(torch.linalg.vector_norm(got))  # not the stale one
    alpha = 0.3
    assert torch.allclose(w_now + alpha * got, (1 - alpha * 0.5) * w_now + alpha * 0.5 * x)


def test_stale_updates_are_weighed_recorded_and_dropped_past_the_limit(tmp_path: Path) -> None:
    result = run_experiment(
        ExperimentConfig.from_dict({**BASE, "rounds": 6, "async": FEDBUFF}).build(), tmp_path
    )
    assert max(m["staleness_max"] for m in result.history) >= 1
    assert all(m["updates"] == 3 and m["in_flight"] >= 3 for m in result.history)
    times = [m["virtual_time_s"] for m in result.history]
    assert times == sorted(times) and times[0] > 0
    store = RunStore(tmp_path)
    (info,) = store.list_runs()
    recorded = [m["staleness"] for _, _, m in store.client_metrics(info.run_id) if "staleness" in m]
    assert len(recorded) == 18 and max(recorded) >= 1
    fresh_only = run(rounds=6, **{"async": {**FEDBUFF, "max_staleness": 0}})
    assert sum(m["dropped_stale"] for m in fresh_only.history) > 0
    assert all(m["staleness_max"] == 0 for m in fresh_only.history)


@pytest.mark.parametrize("engine", ["vectorized", "pool"])
def test_every_engine_gives_the_inline_run(engine: str) -> None:
    opts = {"threads": 1, "engine": engine, **({"workers": 2} if engine == "pool" else {})}
    other, inline = run(run=opts, **{"async": FEDBUFF}), run(**{"async": FEDBUFF})
    keys = ("virtual_time_s", "staleness_mean", "updates", "bytes_up", "bytes_down")
    assert [[m[k] for k in keys] for m in other.history] == [
        [m[k] for k in keys] for m in inline.history
    ]
    torch.testing.assert_close(other.weights, inline.weights, atol=1e-5, rtol=1e-5)


def test_a_resumed_run_retrains_the_clients_in_flight_and_equals_the_uninterrupted_one(
    tmp_path: Path,
) -> None:
    cfg = ExperimentConfig.from_dict({**BASE, "rounds": 6, "async": FEDBUFF})
    resumed = interrupted_and_resumed(cfg, tmp_path, after=3)
    full = run_experiment(cfg.build())
    assert learning(resumed) == learning(full)
    assert torch.equal(resumed.weights, full.weights)


def test_a_term_with_a_broadcast_resumes_from_the_versions_it_was_sent(tmp_path: Path) -> None:
    """SCAFFOLD's server control variate is part of each version's broadcast: the clients in
    flight across the interruption are retrained from their own version's."""
    cfg = ExperimentConfig.from_dict(
        {**BASE, "rounds": 5, "algorithm": {"name": "scaffold"}, "async": FEDBUFF}
    )
    resumed = interrupted_and_resumed(cfg, tmp_path, after=2)
    full = run_experiment(cfg.build())
    assert learning(resumed) == learning(full)
    assert torch.equal(resumed.weights, full.weights)


def test_the_cli_runs_fedbuff_from_toml(tmp_path: Path) -> None:
    toml = tmp_path / "a.toml"
    toml.write_text(
        "rounds = 3\n"
        '[data]\ndataset = "digits"\nnum_clients = 10\n'
        '[model]\nname = "mlp"\n'
        "[async]\nconcurrency = 5\nbuffer = 2\n"
        '[server]\nname = "sgd"\nlr = 1.0\nmomentum = 0.9\n'
    )
    out = CliRunner().invoke(app, ["run", str(toml), "--store", str(tmp_path / "runs")])
    assert out.exit_code == 0, out.output
    store = RunStore(tmp_path / "runs")
    (info,) = store.list_runs()
    assert [r.metrics["updates"] for r in store.rounds(info.run_id)] == [2, 2, 2]
    stored = ExperimentConfig.from_dict(info.config)
    assert stored.asynchrony is not None and stored.asynchrony.buffer == 2
    assert "async" in info.config


class Remote(InlineEngine):
    remote = True


def test_what_needs_a_round_barrier_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError, match="could never fill it"):
        ExperimentConfig.from_dict({**BASE, "async": {"concurrency": 2, "buffer": 3}})
    with pytest.raises(ValueError, match="async: a part with stages of its own"):
        run(algorithm={"name": "secagg_fedavg"}, **{"async": FEDBUFF})
    with pytest.raises(ValueError, match="synchronous round policies"):
        run(clock={"deadline_s": 3.0}, **{"async": FEDBUFF})
    with pytest.raises(ValueError, match="PoissonSampler cannot release clients"):
        run(sampler={"name": "poisson", "rate": 0.3}, **{"async": FEDBUFF})
    exp = ExperimentConfig.from_dict({**BASE, "async": FEDBUFF}).build()  # with profiles
    with pytest.raises(ValueError, match="a deployment runs on real time"):
        run_experiment(exp, engine=Remote)
    no_profiles = {k: v for k, v in BASE.items() if k != "profiles"}
    cfg = {**no_profiles, "evaluation": {"federated_clients": 3}, "async": FEDBUFF}
    with pytest.raises(ValueError, match="federated evaluation would wait for sites"):
        run_experiment(ExperimentConfig.from_dict(cfg).build(), engine=Remote)


def test_adaptive_work_applies_to_the_clients_released_too(tmp_path: Path) -> None:
    """Each landed update did its device's share of the full local work."""
    cfg = ExperimentConfig.from_dict(
        {**BASE, "clock": {"adaptive_work": True}, "async": FEDBUFF}
    ).build()
    run_experiment(cfg, tmp_path)
    devices = LognormalProfiles().draw(12, seed=0)
    median = float(np.median(devices.speed))
    store = RunStore(tmp_path)
    (info,) = store.list_runs()
    fewer = 0
    for _, c, m in store.client_metrics(info.run_id):
        if "num_steps" in m:
            assert m["num_steps"] == max(1, int(min(1.0, devices.speed[c] / median) * 5))
            fewer += m["num_steps"] < 5
    assert fewer > 0


def test_adaptive_batches_apply_to_the_clients_released_too() -> None:
    small = {"memory_gb": 4.0, "memory_sigma": 1.0}
    adaptive = run(profiles=small, clock={"adaptive_batch": True}, **{"async": FEDBUFF})
    plain = run(profiles=small, **{"async": FEDBUFF})
    assert adaptive.history[-1]["train_loss"] != plain.history[-1]["train_loss"]
    with pytest.raises(ValueError, match="batch_size is 'full', not a number"):
        run(client={"epochs": 1, "batch_size": "full"}, clock={"adaptive_batch": True})
