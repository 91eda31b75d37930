"""The examples of ``docs/extending.md`` run: every TOML block is a valid config (the last one
a whole experiment, which runs), and every Python block executes."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from potluck.config import ExperimentConfig
from potluck.orchestrator import run_experiment

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
BLOCKS = re.findall(r"```(toml|python)\n(.*?)```", DOC.read_text(), re.DOTALL)
TOML = [text for kind, text in BLOCKS if kind == "toml"]
# python blocks that begin with imports are whole programs; the others sketch a file of
# examples/my_lab (which the contract tests run)
PYTHON = [t for kind, t in BLOCKS if kind == "python" and t.startswith(("import", "from"))]
SMALL = {"data": {"dataset": "digits", "num_clients": 20}, "model": {"name": "mlp"}, "rounds": 1}


def test_the_page_has_examples() -> None:
    assert len(TOML) >= 5 and len(PYTHON) >= 1


@pytest.mark.parametrize("text", TOML)
def test_toml_blocks_are_valid_configs(text: str) -> None:
    given = tomllib.loads(text)
    cfg = ExperimentConfig.from_dict({**SMALL, **given, "run": {"threads": 1}})
    assert cfg.algorithm_parts() is not None


def test_the_whole_experiment_runs() -> None:
    cfg = ExperimentConfig.from_dict({**tomllib.loads(TOML[-1]), "run": {"threads": 1}})
    result = run_experiment(cfg.build())
    assert len(result.history) == cfg.rounds and result.final["test_accuracy"] > 0.1


@pytest.mark.parametrize("text", PYTHON)
def test_python_blocks_run(text: str) -> None:
    exec(compile(text, str(DOC), "exec"), {})
