"""The documented examples run as a user would run them."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_custom_model_example_trains_and_stores(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "custom_model.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    final = float(out.split("final test accuracy ")[1].split(",")[0])
    assert final > 0.9  # breast-cancer is nearly linearly separable; chance is about 0.63
    assert (tmp_path / "potluck-runs" / "potluck.db").exists()
    assert "trained model ready" in out


def test_digits_toml_example_runs(tmp_path: Path) -> None:
    from potluck.config import ExperimentConfig
    from potluck.orchestrator import run_experiment

    cfg = ExperimentConfig.from_toml(ROOT / "examples" / "digits.toml", ["rounds=2"])
    assert run_experiment(cfg.build()).final["test_accuracy"] > 0.3
