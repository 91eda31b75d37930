"""Per-client anomaly scores, flagging and quarantine: the scores equal their definitions,
a boosted attacker is flagged, a quarantined client is left out of later cohorts (also
after a resume), the scores are stored per client, shown by ``potluck show --clients`` and
in the report, and a run under secure aggregation (no individual updates) has none."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from potluck.aggregate.anomaly import Detection, anomaly_scores, robust_z
from potluck.cli import app
from potluck.config import ConfigError, ExperimentConfig
from potluck.orchestrator import resume_experiment, run_experiment
from potluck.store.sqlite import RunStore


@settings(max_examples=25, deadline=None)
@given(st.integers(3, 12), st.integers(1, 6), st.integers(0, 2**16), st.integers(0, 2))
def test_the_scores_equal_their_definitions(k: int, d: int, seed: int, f: int) -> None:
    g = torch.Generator().manual_seed(seed)
    deltas, agg = torch.randn(k, d, generator=g), torch.randn(d, generator=g)
    scores = anomaly_scores(deltas, agg, ("norm", "cosine", "krum"), f)
    for i in range(k):  # float32 passes over the stack: float32 rounding (d <= 6 terms)
        x = deltas[i].double()
        assert float(scores["norm"][i]) == pytest.approx(float(x.norm()), rel=1e-5)
        cos = float(x @ agg.double() / (x.norm() * agg.double().norm()))
        assert float(scores["cosine"][i]) == pytest.approx(cos, rel=1e-5, abs=1e-6)
        others = sorted(float(((deltas[i] - deltas[j]) ** 2).sum()) for j in range(k) if j != i)
        neighbours = min(max(k - f - 2, 1), k - 1)
        assert float(scores["krum"][i]) == pytest.approx(sum(others[:neighbours]), rel=1e-4)


def test_robust_z_measures_in_scaled_median_absolute_deviations() -> None:
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0], dtype=torch.float64)
    z = robust_z(values)  # median 3, MAD 1 (deviations 2, 1, 0, 1, 97)
    assert z.tolist() == pytest.approx([-2 / 1.4826, -1 / 1.4826, 0.0, 1 / 1.4826, 97 / 1.4826])
    flagged = Detection(flag_on="norm", threshold=3.0).flagged({"norm": values}, 5)
    assert flagged.tolist() == [False, False, False, False, True]
    low = Detection(flag_on="cosine").flagged({"cosine": -values}, 5)
    assert low.tolist() == [False, False, False, False, True]  # a low cosine is flagged


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scores": ("norm", "size")}, "detection.scores: unknown ['size']"),
        ({"flag_on": "krum"}, "detection.flag_on = 'krum' must be one of the recorded scores"),
        ({"threshold": 0.0}, "detection.threshold must be a number > 0"),
        ({"strikes": 0}, "detection.strikes must be an int >= 1"),
    ],
)
def test_bad_detection_settings_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as err:
        Detection(**kwargs)
    assert message in str(err.value)
    with pytest.raises(ConfigError):
        config(detection={k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()})


BASE: dict[str, Any] = {
    "data": {"dataset": "digits", "num_clients": 20, "partition": {"kind": "iid"}},
    "model": {"name": "mlp"},
    "sampler": {"clients_per_round": 10},
    "client": {"epochs": 1, "batch_size": 16, "lr": 0.1},
    "run": {"threads": 1},
}
SCALED = {"name": "scaling", "fraction": 0.2, "factor": 20.0}


def config(rounds: int = 4, **extra: Any) -> ExperimentConfig:
    return ExperimentConfig.from_dict({**BASE, "rounds": rounds, **extra})


def test_boosted_attackers_are_flagged_and_honest_clients_rarely() -> None:
    result = run_experiment(config(attack=SCALED).build())
    malicious = sum(m["malicious"] for m in result.history)
    caught = sum(m["flagged_malicious"] for m in result.history)
    false = sum(m["flagged"] - m["flagged_malicious"] for m in result.history)
    assert malicious > 0 and caught == malicious
    assert false <= 0.1 * sum(m["updates"] - m["malicious"] for m in result.history)


def test_quarantine_leaves_flagged_clients_out_and_survives_a_resume(tmp_path: Path) -> None:
    detection = {"quarantine": True, "strikes": 1, "scores": ["norm", "krum"], "flag_on": "krum"}
    exp = config(6, attack=SCALED, detection=detection).build()
    assert exp.attack is not None
    attackers = set(exp.attack.attackers(20, exp.seed).tolist())
    store = RunStore(tmp_path / "whole")
    whole = run_experiment(exp, store)
    (info,) = store.list_runs()
    seen: dict[int, set[int]] = {}
    for rnd, cid, metrics in store.client_metrics(info.run_id):
        if "bytes_up" in metrics:
            seen.setdefault(rnd, set()).add(cid)
    first_flag: dict[int, int] = {}
    for rnd, cid, metrics in store.client_metrics(info.run_id):
        if metrics.get("flagged") and cid not in first_flag:
            first_flag[cid] = rnd
    assert attackers & set(first_flag)  # some attacker was caught
    for cid, rnd in first_flag.items():  # and never trained again
        assert all(cid not in seen.get(r, set()) for r in range(rnd + 1, 7))
    assert sum(m["quarantined"] for m in whole.history) > 0

    class Stop(Exception):
        pass

    def stop_after_three(rnd: int, _metrics: object) -> None:
        if rnd == 3:
            raise Stop

    other = RunStore(tmp_path / "stopped")
    with pytest.raises(Stop):
        run_experiment(config(6, attack=SCALED, detection=detection).build(), other,
                       on_round=stop_after_three)  # fmt: skip
    (stopped,) = other.list_runs()
    resumed = resume_experiment(
        ExperimentConfig.from_dict(stopped.config).build(), other, stopped.run_id
    )
    assert torch.equal(resumed.weights, whole.weights)
    assert [m["quarantined"] for m in resumed.history] == [m["quarantined"] for m in whole.history]


def test_scores_are_shown_by_the_cli_and_in_the_report(tmp_path: Path) -> None:
    exp = tmp_path / "scored.toml"
    exp.write_text(
        "rounds = 2\n[data]\ndataset = 'digits'\nnum_clients = 10\n[model]\nname = 'mlp'\n"
        "[sampler]\nclients_per_round = 8\n[attack]\nname = 'scaling'\nfraction = 0.2\n"
        "factor = 20.0\n[detection]\nscores = ['norm', 'cosine', 'krum']\n[run]\nthreads = 1\n"
    )
    runs = str(tmp_path / "runs")
    result = CliRunner().invoke(app, ["run", str(exp), "--store", runs])
    assert result.exit_code == 0, result.output
    (info,) = RunStore(runs).list_runs()
    shown = CliRunner().invoke(app, ["show", info.run_id, "--store", runs, "--clients"])
    assert shown.exit_code == 0, shown.output
    assert "anomaly scores" in shown.output and "krum" in shown.output
    assert "flagged" in shown.output
    page = (info.run_dir / "report.html").read_text()
    assert "Clients that look wrong" in page and "malicious (simulated)" in page
    assert "updates flagged" in (info.run_dir / "curves.svg").read_text()


def test_secure_aggregation_has_no_individual_updates_to_score() -> None:
    result = run_experiment(config(1, algorithm={"name": "secagg_fedavg"}).build())
    assert "flagged" not in result.history[0]


def test_fltrust_adds_its_trust_scores_and_a_root_set_too_large_is_refused(
    tmp_path: Path,
) -> None:
    store = RunStore(tmp_path)
    attack = {"name": "sign_flip", "fraction": 0.2, "scale": 2.0}
    run_experiment(config(2, aggregator={"name": "fltrust"}, attack=attack).build(), store)
    (info,) = store.list_runs()
    rows = [m for _, _, m in store.client_metrics(info.run_id) if "score_trust" in m]
    assert len(rows) == 20
    assert all(0.0 <= m["score_trust"] <= 1.0 for m in rows)
    flipped = [m["score_trust"] for m in rows if m["malicious"]]
    assert flipped and max(flipped) == 0.0  # reversed updates earn no trust
    with pytest.raises(ValueError, match="root_examples = 5000: the server's root data"):
        run_experiment(config(1, aggregator={"name": "fltrust", "root_examples": 5000}).build())
