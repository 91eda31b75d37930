"""The progress bar of ``run_experiment``: the CLI's, fed every round unless told not to,
drawn only on a terminal."""

from __future__ import annotations

import io
from typing import Any

import pytest
from rich.console import Console

from potluck.config import ExperimentConfig
from potluck.orchestrator import run_experiment
from potluck.report import progress as progress_module
from potluck.report.progress import RoundProgress

CFG = {
    "rounds": 3,
    "data": {"dataset": "digits", "num_clients": 8},
    "model": {"name": "mlp"},
    "sampler": {"clients_per_round": 2},
    "evaluation": {"federated_clients": 0},
}


@pytest.mark.parametrize("shown", [True, False])
def test_the_bar_is_fed_every_round_unless_told_not_to(
    shown: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    monkeypatch.setattr(RoundProgress, "update", lambda self, rnd, m: seen.append(rnd))
    mine: list[int] = []
    exp = ExperimentConfig.from_dict(CFG).build()
    run_experiment(exp, on_round=lambda rnd, m: mine.append(rnd), progress=shown)
    assert seen == ([1, 2, 3] if shown else []) and mine == [1, 2, 3]


def test_on_a_terminal_the_bar_shows_the_round_and_accuracy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = io.StringIO()
    terminal = Console(file=out, force_terminal=True, width=120)
    real = RoundProgress.__init__

    def on_terminal(self: RoundProgress, *args: Any, **kwargs: Any) -> None:
        real(self, *args, console=terminal, **kwargs)

    monkeypatch.setattr(RoundProgress, "__init__", on_terminal)
    result = run_experiment(ExperimentConfig.from_dict(CFG).build())
    drawn = out.getvalue()
    acc = progress_module.fmt(result.history[-1]["test_accuracy"])
    assert "round   3/3" in drawn and f"test acc {acc}" in drawn


def test_without_a_terminal_nothing_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    run_experiment(ExperimentConfig.from_dict(CFG).build())
    captured = capsys.readouterr()
    assert "round" not in captured.err and "round" not in captured.out
