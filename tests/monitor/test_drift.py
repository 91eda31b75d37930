"""Data-drift monitoring end to end: the clients' summaries, an injected drift flagged (and
quiet without one), equal on every engine and after resume, from TOML and the CLI, and
over gRPC."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from potluck.cli import app
from potluck.config import ConfigError, ExperimentConfig
from potluck.core.message import Message, MessageError
from potluck.core.parts import part_context
from potluck.monitor.drift import (
    DriftScenario,
    SummaryOptions,
    feature_edges,
    read_request,
    read_summary,
    summarize,
    summary_message,
    summary_request,
    total_variation,
)
from potluck.orchestrator import TIMING_METRICS, RunResult, run_experiment
from potluck.store.sqlite import RunStore
from potluck.testing import interrupted_and_resumed

ENGINES = ["inline", "vectorized", "pool"]
CFG: dict[str, Any] = {
    "rounds": 6,
    "data": {"dataset": "digits", "num_clients": 10, "partition": {"kind": "iid"}},
    "model": {"name": "mlp"},
    "sampler": {"clients_per_round": 5},
    "client": {"epochs": 1, "batch_size": 16, "lr": 0.1},
    "evaluation": {"federated_clients": -1},
    "monitoring": {"summaries": True, "summary_bins": 8},
    "run": {"threads": 1},
}
DRIFT = {"start_round": 4, "fraction": 0.4, "kind": "features", "shift": 2.0}


def _cfg(**sections: Any) -> ExperimentConfig:
    return ExperimentConfig.from_dict({**CFG, **sections})


def _shifts(store: RunStore, run_id: str) -> dict[tuple[int, int], tuple[float, float]]:
    return {
        (rnd, c): (m["label_shift"], m["feature_shift"])
        for rnd, c, m in store.client_metrics(run_id)
        if "label_shift" in m
    }


def test_a_summary_by_hand() -> None:
    x = torch.tensor([[0.0, 0.2], [0.6, 0.9], [0.4, 0.1]])
    labels, feats = summarize(x, torch.tensor([2, 0, 2]), 4, torch.tensor([0.15, 0.5]))
    assert labels.tolist() == pytest.approx([1 / 3, 0.0, 2 / 3, 0.0])
    assert feats.tolist() == pytest.approx([2 / 6, 2 / 6, 2 / 6])  # 0, 0.1 | 0.2, 0.4 | ...
    assert total_variation(feats, torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(2 / 3)
    ctx = part_context(0, 1, "monitor.summary", 3)
    noised = summarize(x, torch.tensor([2, 0, 2]), 4, torch.tensor([0.5]), SummaryOptions(5.0), ctx)
    again = summarize(x, torch.tensor([2, 0, 2]), 4, torch.tensor([0.5]), SummaryOptions(5.0), ctx)
    assert all(float(h.sum()) == pytest.approx(1.0) and bool((h >= 0).all()) for h in noised)
    assert torch.equal(noised[0], again[0])  # the seeded noise is the run's
    secure = SummaryOptions(5.0, "secure")
    a = summarize(x, torch.tensor([2, 0, 2]), 4, torch.tensor([0.5]), secure, ctx)
    b = summarize(x, torch.tensor([2, 0, 2]), 4, torch.tensor([0.5]), secure, ctx)
    assert not torch.equal(a[0], b[0])  # os.urandom's: no two alike


def test_feature_edges_split_the_test_values_evenly() -> None:
    x = torch.rand(500, 30).numpy()
    edges = feature_edges(x, 8, seed=0)
    counts = torch.bincount(
        torch.bucketize(torch.from_numpy(x).double().reshape(-1), edges, right=True)
    )
    assert len(edges) == 7 and counts.min() > 0.9 * x.size / 8
    with pytest.raises(ValueError, match="central test set"):
        feature_edges(x[:0], 8, seed=0)


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (summary_message(torch.tensor([0.5, 0.6]), torch.ones(3) / 3), "sums to 1.1"),
        (summary_message(torch.tensor([1.5, -0.5]), torch.ones(3) / 3), "negative"),
        (summary_message(torch.tensor([float("nan"), 1.0]), torch.ones(3) / 3), "non-finite"),
        (summary_message(torch.ones(3) / 3, torch.ones(3) / 3), "must be 2 floats"),
        (summary_message(torch.tensor([1, 0]), torch.ones(3) / 3), "must be 2 floats"),
        (Message({"labels": torch.ones(2) / 2}), "'labels' and 'features' only"),
        (Message({"labels": torch.ones(2) / 2, "features": torch.ones(3) / 3}, {"x": 1}), "only"),
    ],
)
def test_a_malformed_summary_is_refused(message: Message, error: str) -> None:
    with pytest.raises(MessageError, match=error):
        read_summary(message, 2, 3, "client 7")


def test_a_malformed_request_is_refused_by_the_client() -> None:
    assert read_request(summary_request(5, torch.tensor([0.0, 1.0])))[0] == 5
    for edges in (torch.tensor([1.0, 0.0]), torch.tensor([float("inf")]), torch.zeros(0)):
        with pytest.raises(MessageError, match="edges"):
            read_request(Message({"edges": edges}, {"classes": 3}))
    with pytest.raises(MessageError, match="classes"):
        read_request(Message({"edges": torch.zeros(1)}, {"classes": 0}))


def test_the_label_drift_keeps_the_count_and_moves_the_prior() -> None:
    y = torch.arange(40) % 4
    x, y2 = DriftScenario(1, 1.0, kind="labels").apply(torch.randn(40, 2), y, torch.Generator())
    assert len(y2) == 40 and set(y2.tolist()) <= {0, 1} and len(x) == 40
    one = torch.zeros(5, dtype=torch.int64)
    assert torch.equal(
        DriftScenario(1, 1.0, "labels").apply(torch.ones(5, 1), one, torch.Generator())[1], one
    )
    with pytest.raises(ValueError, match="fraction"):
        DriftScenario(1, 0.0)


@pytest.mark.parametrize("kind", ["features", "labels"])
def test_an_injected_drift_is_flagged_and_no_drift_stays_quiet(kind: str, tmp_path: Path) -> None:
    drifting = _cfg(drift={**DRIFT, "kind": kind}).build()
    assert drifting.drift is not None
    who = drifting.drift.drifted(10, drifting.seed)
    store = RunStore(tmp_path)
    result = run_experiment(drifting, store)
    shifts = _shifts(store, result.run_id or "")
    seen_before = {c for (rnd, c) in shifts if rnd < 4}
    index = 0 if kind == "labels" else 1
    for (rnd, c), values in shifts.items():
        if rnd >= 4 and c in who and c in seen_before:
            assert values[index] > 0.2, (rnd, c, values)  # flagged
        else:
            assert values == (0.0, 0.0), (rnd, c, values)  # its data did not change
    flagged = [m["shifted_clients"] for m in result.history]
    assert flagged[:3] == [0.0, 0.0, 0.0] and sum(flagged[3:]) > 0
    quiet = run_experiment(_cfg().build())
    assert [m["shifted_clients"] for m in quiet.history] == [0.0] * 6
    assert max(m["label_shift_max"] for m in quiet.history) == 0.0


def test_summaries_every_k_rounds_are_the_every_round_ones_on_those_rounds(
    tmp_path: Path,
) -> None:
    """``summary_every = 2``: summaries in rounds 1, 3 and 5 only, each equal to the
    every-round run's (a client's first summary may come later, so its baseline is the one
    it gave then), and the drift from round 4 is still flagged in round 5."""
    store = RunStore(tmp_path)
    every = run_experiment(_cfg(drift=DRIFT).build(), store)
    sparse = _cfg(drift=DRIFT, monitoring={**CFG["monitoring"], "summary_every": 2})
    thinned = run_experiment(sparse.build(), store)
    got, full = _shifts(store, thinned.run_id or ""), _shifts(store, every.run_id or "")
    assert {rnd for rnd, _ in got} == {1, 3, 5}
    first_seen = {c: min(r for r, cc in full if cc == c) for _, c in full}
    for key in got:
        if first_seen[key[1]] in (1, 3, 5):  # the same baseline in both runs
            assert got[key] == full[key], key
    assert ["shifted_clients" in m for m in thinned.history] == [True, False] * 3
    assert thinned.history[4]["shifted_clients"] > 0
    with pytest.raises(ConfigError, match="summary_every"):
        _cfg(monitoring={**CFG["monitoring"], "summary_every": 0})


def test_noised_summaries_stay_quiet_below_the_threshold_without_drift() -> None:
    cfg = _cfg(monitoring={**CFG["monitoring"], "summary_noise": 1.0})
    result = run_experiment(cfg.build())
    assert 0 < max(m["feature_shift_max"] for m in result.history) < 0.2
    assert all(m["shifted_clients"] == 0.0 for m in result.history)


def _comparable(result: RunResult) -> list[dict[str, float]]:
    return [{k: v for k, v in m.items() if k not in TIMING_METRICS} for m in result.history]


@pytest.mark.parametrize("engine", [e for e in ENGINES if e != "inline"])
def test_every_engine_measures_the_same_shifts(engine: str, tmp_path: Path) -> None:
    runs = {}
    for e in ("inline", engine):
        store = RunStore(tmp_path / e)
        result = run_experiment(_cfg(drift=DRIFT, run={"threads": 1, "engine": e}).build(), store)
        runs[e] = _shifts(store, result.run_id or "")
    assert runs["inline"].keys() == runs[engine].keys()
    for key, (label, feature) in runs["inline"].items():
        assert runs[engine][key] == pytest.approx((label, feature), abs=1e-12), key


def test_resumed_run_keeps_each_clients_first_summary(tmp_path: Path) -> None:
    cfg = _cfg(drift=DRIFT)
    full = run_experiment(cfg.build())
    resumed = interrupted_and_resumed(cfg, tmp_path, after=4)
    assert _comparable(resumed) == _comparable(full)
    assert sum(m["shifted_clients"] for m in resumed.history[4:]) > 0


def test_summaries_are_refused_with_a_privacy_budget_or_asynchrony() -> None:
    private = _cfg(
        algorithm={"name": "dp_fedavg", "noise_multiplier": 1.0, "clip": 1.0},
        sampler={"name": "poisson", "rate": 0.5},
    )
    with pytest.raises(ValueError, match="not accounted by the privacy ledger"):
        run_experiment(private.build())
    with pytest.raises(ValueError, match="synchronous rounds"):
        run_experiment(_cfg(**{"async": {"concurrency": 3, "buffer": 2}}).build())
    with pytest.raises(ConfigError, match=r"drift\.fraction"):
        _cfg(drift={**DRIFT, "fraction": 1.5})


def test_from_toml_and_the_cli(tmp_path: Path) -> None:
    toml = tmp_path / "drift.toml"
    toml.write_text(
        ExperimentConfig.from_dict(
            {**CFG, "rounds": 5, "drift": DRIFT, "run": {"store": str(tmp_path / "runs")}}
        ).to_toml()
    )
    out = CliRunner().invoke(app, ["run", str(toml)])
    assert out.exit_code == 0, out.output
    store = RunStore(tmp_path / "runs")
    (info,) = store.list_runs()
    rounds = store.rounds(info.run_id)
    assert rounds[-1].metrics["shifted_clients"] > 0
    assert info.config["drift"]["start_round"] == 4 and info.config["monitoring"]["summaries"]
