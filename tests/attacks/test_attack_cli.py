"""``potluck attack``: the README's TOML experiment run and attacked, a stored run replayed, results
and pictures in the run directory and its report, local DP from TOML, clear refusals."""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path

import pytest
from typer.testing import CliRunner
from victims import one_thread  # noqa: F401  (autouse)

from potluck.cli import app

runner = CliRunner()
README = Path(__file__).resolve().parents[2] / "README.md"
# the victim of the README's "Privacy attacks" section
SECTION = README.read_text().split("### Privacy attacks")[1]
VICTIM = re.findall(r"```toml\n(.*?)```", SECTION, re.S)[0]
EXPERIMENT = VICTIM + '\n[run]\nname = "victim"\n'
LOCAL_DP = '\n[[transforms]]\nname = "local_dp"\nclip = 1.0\nnoise_multiplier = 0.1\n'


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    idat = data.index(b"IDAT")
    (length,) = struct.unpack(">I", data[idat - 4 : idat])
    assert len(zlib.decompress(data[idat + 4 : idat + 4 + length])) == height * (width + 1)
    return width, height


@pytest.fixture
def toml(tmp_path: Path) -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(EXPERIMENT)
    return path


def test_invert_a_toml_experiment_then_replay_the_stored_run(toml: Path, tmp_path: Path) -> None:
    store = str(tmp_path / "runs")
    code, out = invoke("attack", "invert", str(toml), "--round", "1", "--method", "idlg",
                       "--iterations", "50", "--store", store)  # fmt: skip
    assert code == 0, out
    saved = Path(re.search(r"saved (\S+\.json)", out.replace("\n", "")).group(1))  # type: ignore[union-attr]
    result = json.loads(saved.read_text())
    assert result["attack"] == "inversion" and result["protection"] == "none"
    assert result["psnr"] > 60 and result["label_accuracy"] == 1.0 and result["batch"] == 1
    pictures = (
        saved.parent / result["images"]["original"],
        saved.parent / result["images"]["reconstruction"],
    )
    assert [_png_size(p) for p in pictures] == [(64, 64), (64, 64)]  # 8x8, upscaled 8 times
    client = result["client"]
    code, out = invoke("attack", "invert", "victim", "--round", "1", "--client", str(client),
                       "--method", "dlg", "--store", store, "--json")  # fmt: skip
    assert code == 0, out
    replayed = json.loads(out[out.index("{") :])
    assert replayed["client"] == client and replayed["method"] == "dlg"
    report = (saved.parent.parent / "report.html").read_text()
    assert "<h2>Privacy attacks</h2>" in report and report.count("data:image/png;base64,") == 4
    assert "idlg" in report and "dlg" in report

    code, out = invoke("attack", "membership", "victim", "--shadows", "0", "--store", store)
    assert code == 0, out
    assert "loss" in out and "TPR at 0.1% FPR" in out
    membership = json.loads((saved.parent / "membership.json").read_text())
    assert membership["members"] == 1437 and membership["nonmembers"] == 360
    assert "Membership inference" in (saved.parent.parent / "report.html").read_text()


def test_invert_under_local_dp_from_toml(toml: Path, tmp_path: Path) -> None:
    toml.write_text(EXPERIMENT + LOCAL_DP)
    code, out = invoke("attack", "invert", str(toml), "--round", "1", "--method", "dlg",
                       "--store", str(tmp_path / "runs"), "--json")  # fmt: skip
    assert code == 0, out
    result = json.loads(out[out.index('{\n  "attack"') :])
    assert result["protection"].startswith("LocalGaussian(clip=1.0, noise_multiplier=0.1")
    assert result["withheld_counts"] is True and result["psnr"] < 12  # the mean digit: 11.4 dB


def test_attack_refusals_name_the_problem(toml: Path, tmp_path: Path) -> None:
    store = str(tmp_path / "runs")
    code, out = invoke("attack", "invert", str(toml), "--round", "2", "--store", store)
    assert code == 2 and "--round must lie in 1..1" in out
    code, out = invoke("attack", "invert", str(toml), "--round", "1", "--client", "7",
                       "--store", store)  # fmt: skip
    assert code == 2 and "client 7 was not captured" not in out
    assert "client 7 has no accepted update in round 1" in out.replace("\n", " ")
    code, out = invoke("attack", "membership", "victim", "--set", "rounds=2", "--store", store)
    assert code == 2 and "--set applies to a TOML experiment" in out
    code, out = invoke("attack", "membership", "nope", "--store", store)
    assert code == 2 and "nope" in out
    synthetic = tmp_path / "synthetic.toml"
    synthetic.write_text(
        EXPERIMENT.replace('"digits"', '"synthetic"').replace(
            "num_clients = 1400", "num_clients = 5"
        )
    )
    code, out = invoke("attack", "invert", str(synthetic), "--round", "1", "--store", store)
    assert code == 2 and "are not images" in out
