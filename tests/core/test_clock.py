"""The virtual clock: arrival times from the profiles and the bytes and steps a round really
used, deterministic from the seed and equal on every engine and after resume; a deadline
drops exactly the members that arrive after it; over-selection keeps exactly the first K;
partial work fits the deadline; failures and availability windows act as drawn; device
traces are read, or refused with the row and column; TOML, the CLI and the refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from potluck.cli import app
from potluck.config import ConfigError, ExperimentConfig
from potluck.core.clock import ClockPolicy, arrivals
from potluck.data.profiles import DAY, LognormalProfiles, TraceProfiles, read_trace
from potluck.engines.inline import InlineEngine
from potluck.orchestrator import RunResult, run_experiment
from potluck.store.sqlite import RunStore
from potluck.testing import interrupted_and_resumed, learning

EXAMPLE_TRACE = Path(__file__).parents[2] / "examples" / "traces" / "devices.csv"
BASE: dict[str, Any] = {
    "seed": 0,
    "rounds": 4,
    "data": {"dataset": "digits", "num_clients": 20, "partition": {"kind": "dirichlet"}},
    "model": {"name": "mlp"},
    "sampler": {"clients_per_round": 6},
    "client": {"epochs": 1, "batch_size": 16, "lr": 0.1},
    "run": {"threads": 1},
    # slow, spread devices, so that deadlines bite: a median of 20 steps take 4 s
    "profiles": {"speed": 5.0, "speed_sigma": 0.8, "down_mbps": 1.0, "up_mbps": 0.3},
}


def config(**extra: Any) -> ExperimentConfig:
    return ExperimentConfig.from_dict({**BASE, **extra})


def stored(store: Path, **extra: Any) -> RunResult:
    """A run of ``config(**extra)`` recorded in ``store``."""
    return run_experiment(config(**extra).build(), store)


def per_client(store: Path) -> dict[int, list[tuple[int, dict[str, float]]]]:
    """Each round's per-client metrics from the run store."""
    rs = RunStore(store)
    (info,) = rs.list_runs()
    out: dict[int, list[tuple[int, dict[str, float]]]] = {}
    for rnd, client, metrics in rs.client_metrics(info.run_id):
        out.setdefault(rnd, []).append((client, metrics))
    return out


def test_an_answer_arrives_after_download_compute_and_upload() -> None:
    t = arrivals(
        start=100.0,
        latency_s=np.array([0.1]),
        down_bps=np.array([1e6]),
        up_bps=np.array([2e5]),
        speed=np.array([4.0]),
        bytes_down=np.array([3e6]),
        bytes_up=np.array([1e6]),
        steps=np.array([10]),
    )
    assert t.download_s.tolist() == [3.1] and t.compute_s.tolist() == [2.5]
    assert t.upload_s.tolist() == [5.1] and t.arrival.tolist() == pytest.approx([110.7])


def test_profiles_are_drawn_from_the_seed_with_the_stated_spread() -> None:
    a, b = LognormalProfiles().draw(20_000, seed=3), LognormalProfiles().draw(20_000, seed=3)
    assert np.array_equal(a.speed, b.speed) and a.classes == b.classes
    assert not np.array_equal(a.speed, LognormalProfiles().draw(20_000, seed=4).speed)
    logs = np.log(a.speed)
    assert abs(np.median(a.speed) - 20.0) < 0.5 and abs(logs.std() - 0.5) < 0.01
    assert sorted(set(a.classes)) == ["fast", "medium", "slow"]
    assert abs(a.classes.count("slow") - 20_000 / 3) < 2
    night = LognormalProfiles(available_hours=6).draw(5_000, seed=0)
    online = night.available(np.arange(5_000), now=12 * 3600.0)
    assert abs(online.mean() - 0.25) < 0.03  # 6 hours of 24, from uniform hours


def test_a_deadline_drops_exactly_the_members_whose_answer_arrives_after_it(
    tmp_path: Path,
) -> None:
    deadline = 2.0
    result = stored(tmp_path, clock={"deadline_s": deadline})
    late_total = 0
    for rnd, clients in per_client(tmp_path).items():
        m = result.history[rnd - 1]
        timed = {c: v for c, v in clients if "compute_s" in v}
        assert len(timed) == 6
        for v in timed.values():
            finish = v["download_s"] + v["compute_s"] + v["upload_s"]
            assert (v["kept"] == 1.0) == (finish <= deadline + 1e-9), v
        late = sum(v["kept"] == 0 for v in timed.values())
        assert m["dropped_late"] == late and m["updates"] == 6 - late
        assert m["round_virtual_s"] == pytest.approx(
            deadline
            if late
            else max(v["download_s"] + v["compute_s"] + v["upload_s"] for v in timed.values())
        )
        late_total += late
    assert 0 < late_total < 4 * 6  # the deadline bites, but not everyone
    starts = np.cumsum([0.0] + [m["round_virtual_s"] for m in result.history])
    assert [m["virtual_time_s"] for m in result.history] == pytest.approx(starts[1:].tolist())


def test_over_selection_keeps_exactly_the_first_k_to_arrive(tmp_path: Path) -> None:
    result = stored(tmp_path, clock={"over_selection": 0.5})
    for rnd, clients in per_client(tmp_path).items():
        m = result.history[rnd - 1]
        assert m["cohort_size"] == 9 and m["updates"] == 6 and m["over_selected"] == 3
        timed = [(c, v) for c, v in clients if "compute_s" in v]
        finish = {c: v["download_s"] + v["compute_s"] + v["upload_s"] for c, v in timed}
        kept = {c for c, v in timed if v["kept"] == 1.0}
        assert kept == set(sorted(finish, key=lambda c: (finish[c], c))[:6])
        assert m["round_virtual_s"] == pytest.approx(max(finish[c] for c in kept))


def test_partial_work_fits_the_deadline_and_does_fewer_steps(tmp_path: Path) -> None:
    """The same cohorts as without a deadline (one sampler stream), each member asked for
    at most its full steps, some for fewer, and every kept one within the deadline."""
    stored(tmp_path / "partial", clock={"deadline_s": 1.5, "late": "partial"})
    stored(tmp_path / "full")
    partial, full = per_client(tmp_path / "partial"), per_client(tmp_path / "full")
    fewer = 0
    for rnd, clients in partial.items():
        steps = {c: v["num_steps"] for c, v in full[rnd] if "num_steps" in v}
        for c, v in clients:
            if v.get("kept") == 1.0:
                assert v["download_s"] + v["compute_s"] + v["upload_s"] <= 1.5 + 1e-9
            if "num_steps" in v:
                assert v["num_steps"] <= steps[c]
                fewer += v["num_steps"] < steps[c]
    assert fewer > 0


def test_failures_drop_the_drawn_members_and_availability_limits_the_sampling(
    tmp_path: Path,
) -> None:
    profiles = {**BASE["profiles"], "failure": 0.3, "available_hours": 12}
    result = stored(tmp_path, profiles=profiles)
    devices = LognormalProfiles(**{k: v for k, v in profiles.items()}).draw(20, seed=0)
    t = 0.0
    failed = 0
    for rnd, clients in per_client(tmp_path).items():
        m = result.history[rnd - 1]
        timed = [c for c, v in clients if "compute_s" in v]
        start = m["virtual_time_s"] - m["round_virtual_s"]
        assert start >= t - 1e-9
        assert devices.available(np.array(timed), start).all()  # only online ones sampled
        failed += int(m["dropped_failed"])
        t = m["virtual_time_s"]
    assert failed > 0


def test_the_clock_is_the_same_on_every_engine_and_after_resume(tmp_path: Path) -> None:
    clock = {"deadline_s": 2.0, "over_selection": 0.3}
    inline = run_experiment(config(clock=clock).build())
    keys = ("virtual_time_s", "round_virtual_s", "dropped_late", "over_selected", "updates")

    def timeline(r: RunResult) -> list[list[float]]:
        return [[m[k] for k in keys] for m in r.history]

    for engine in ("vectorized", "pool"):
        run = {"threads": 1, "engine": engine, **({"workers": 2} if engine == "pool" else {})}
        assert timeline(run_experiment(config(clock=clock, run=run).build())) == timeline(inline)
    resumed = interrupted_and_resumed(config(clock=clock), tmp_path, after=2)
    assert learning(resumed) == learning(inline)


def test_a_trace_file_gives_the_devices_and_bad_traces_are_refused(tmp_path: Path) -> None:
    devices = TraceProfiles(str(EXAMPLE_TRACE)).draw(8, seed=0)
    assert devices.speed.tolist() == [4.0, 5.5, 6.0, 9.0, 12.0, 14.0, 30.0, 35.0]
    assert devices.classes[0] == "budget-3g" and devices.up_bps[0] == 0.5 * 125_000
    assert devices.available(0, now=23 * 3600.0) and not devices.available(0, now=12 * 3600.0)
    many = TraceProfiles(str(EXAMPLE_TRACE)).draw(100, seed=0)  # devices drawn for clients
    assert set(many.speed.tolist()) <= set(devices.speed.tolist()) and len(many) == 100
    rows = [{"speed": 3, "down_mbps": 1, "up_mbps": 1}]
    (tmp_path / "t.json").write_text(json.dumps(rows))
    one = TraceProfiles(str(tmp_path / "t.json")).draw(2, seed=0)
    assert one.failure.tolist() == [0.0, 0.0] and one.available_s.tolist() == [DAY, DAY]
    bad = tmp_path / "bad.csv"
    bad.write_text("speed,down_mbps,up_mbps\n3,1,1\n3,x,1\n")
    with pytest.raises(ValueError, match=r"bad.csv: row 2, down_mbps = 'x' is not a number"):
        TraceProfiles(str(bad)).draw(2, seed=0)
    bad.write_text("speed,down_mbps,up_mbps\n0,1,1\n")
    with pytest.raises(ValueError, match=r"row 1, speed = 0.0 is out of range"):
        TraceProfiles(str(bad)).draw(1, seed=0)
    bad.write_text("speed,down_mbps,upload\n3,1,1\n")
    with pytest.raises(ValueError, match=r"unknown columns \['upload'\]"):
        read_trace(bad)
    with pytest.raises(ValueError, match="cannot read it"):
        read_trace(tmp_path / "missing.csv")


def test_impossible_settings_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="needs a deadline_s"):
        ClockPolicy(late="partial")
    with pytest.raises(ConfigError, match="needs a deadline_s"):
        config(clock={"late": "partial"})
    with pytest.raises(ConfigError, match="give path exactly when kind"):
        config(profiles={"kind": "trace"})
    poisson = {"name": "poisson", "rate": 0.3}
    with pytest.raises(ValueError, match="sampler PoissonSampler cannot be asked for more"):
        run_experiment(config(sampler=poisson, clock={"over_selection": 0.3}).build())
    night = {**BASE["profiles"], "available_hours": 8}
    with pytest.raises(ValueError, match="samples among the online ones; PoissonSampler does"):
        run_experiment(config(sampler=poisson, profiles=night).build())


def test_the_cli_runs_on_virtual_time_from_toml(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text(
        "rounds = 2\n"
        '[data]\ndataset = "digits"\nnum_clients = 10\n'
        '[model]\nname = "mlp"\n'
        "[sampler]\nclients_per_round = 4\n"
        "[clock]\ndeadline_s = 60.0\nover_selection = 0.5\n"
        f'[profiles]\nkind = "trace"\npath = "{EXAMPLE_TRACE}"\n'
    )
    out = CliRunner().invoke(app, ["run", str(toml), "--store", str(tmp_path / "runs")])
    assert out.exit_code == 0, out.output
    assert "virtual_time_s=" in out.output
    store = RunStore(tmp_path / "runs")
    (info,) = store.list_runs()
    rounds = store.rounds(info.run_id)
    assert [r.metrics["cohort_size"] for r in rounds] == [6, 6]
    assert all(r.metrics["updates"] <= 4 for r in rounds)
    stored = ExperimentConfig.from_dict(info.config)
    assert stored.clock is not None and stored.clock.over_selection == 0.5


class Remote(InlineEngine):
    """What the deployment's engine says of itself."""

    remote = True


def test_a_deployment_refuses_what_only_the_virtual_clock_has() -> None:
    """Deployed, the deadline and over-selection apply on real time (tests/deploy); drawn
    devices and the policies that read them are refused."""
    with pytest.raises(ValueError, match="profiles: a deployment's devices are real"):
        run_experiment(config(clock={"deadline_s": 5.0}).build(), engine=Remote)
    real = {k: v for k, v in BASE.items() if k != "profiles"}
    for clock, field in (
        ({"deadline_s": 5.0, "late": "partial"}, "late"),
        ({"adaptive_work": True}, "adaptive_work"),
        ({"server_s": 1.0}, "server_s"),
    ):
        exp = ExperimentConfig.from_dict({**real, "clock": clock}).build()
        with pytest.raises(ValueError, match=f"clock.{field} = .*: in a deployment"):
            run_experiment(exp, engine=Remote)


def test_adaptive_work_gives_slower_devices_fewer_steps_by_speed(tmp_path: Path) -> None:
    """The median device does its full epoch, slower ones their speed's share of it, faster
    ones a full one; every update is still weighed by its examples."""
    stored(tmp_path / "adaptive", clock={"adaptive_work": True})
    stored(tmp_path / "full")
    devices = LognormalProfiles(**BASE["profiles"]).draw(20, seed=0)
    median = float(np.median(devices.speed))
    adaptive, full = per_client(tmp_path / "adaptive"), per_client(tmp_path / "full")
    fewer = 0
    for rnd, clients in adaptive.items():
        steps = {c: v["num_steps"] for c, v in full[rnd] if "num_steps" in v}
        for c, v in clients:
            if "num_steps" not in v:
                continue
            share = min(1.0, devices.speed[c] / median)
            assert v["num_steps"] == max(1, int(share * steps[c]))
            assert "weight" not in v  # the default weight: its examples
            fewer += v["num_steps"] < steps[c]
    assert fewer > 0


def test_adaptive_batches_follow_memory_and_every_engine_trains_them_alike(
    tmp_path: Path,
) -> None:
    """A member with less memory than the median device trains on proportionally smaller
    batches (more, cheaper steps: each takes its share of a full step's time); the batched
    engine pads them and agrees with the inline one."""
    clock = {"adaptive_batch": True}
    result = stored(tmp_path, clock=clock)
    devices = LognormalProfiles(**BASE["profiles"]).draw(20, seed=0)
    median = float(np.median(devices.memory_gb))
    exp = config(clock=clock).build()
    smaller = 0
    for clients in per_client(tmp_path).values():
        for c, v in clients:
            if "num_steps" not in v:
                continue
            b = int(np.clip(np.floor(16 * devices.memory_gb[c] / median), 1, 16))
            n = exp.federation.num_examples(c)
            assert v["num_steps"] == -(-n // min(b, n))
            assert v["compute_s"] == pytest.approx(v["num_steps"] * b / 16 / devices.speed[c])
            smaller += b < 16
    assert smaller > 0
    run = {"threads": 1, "engine": "vectorized"}
    batched = run_experiment(config(clock=clock, run=run).build())
    for a, b in zip(batched.history, result.history, strict=True):
        assert a["virtual_time_s"] == b["virtual_time_s"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
