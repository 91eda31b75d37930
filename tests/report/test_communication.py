"""The report's communication view: cumulative bytes, the bytes to first reach each accuracy
level (against a hand count), the accuracy-by-bytes panel, and, on real runs written by the
CLI, a compressed run that reaches an accuracy on fewer uploaded bytes than a dense one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from potluck.cli import app
from potluck.report import write_report
from potluck.report.communication import (
    accuracy_by_bytes,
    bytes_to_reach,
    communication_section,
    cumulative,
)
from potluck.store.sqlite import RoundRecord, RunStore


def rounds(accuracies: list[float | None], up: float = 100.0) -> list[RoundRecord]:
    out = []
    for r, acc in enumerate(accuracies, start=1):
        metrics = {"bytes_up": up * r, "bytes_down": 10.0, "updates": 2.0}
        if acc is not None:
            metrics["test_accuracy"] = acc
        out.append(RoundRecord(r, metrics, ""))
    return out


def test_bytes_to_reach_counts_every_round_before_the_first_at_the_level() -> None:
    run = rounds([0.15, None, 0.18, 0.33, 0.29, 0.52])  # cumulative up: 100, 300, ..., 2100
    assert cumulative(run, "bytes_up") == [100, 300, 600, 1000, 1500, 2100]
    costs = [(c.level, c.round, c.bytes_up, c.bytes_down) for c in bytes_to_reach(run)]
    assert costs == [
        (0.1, 1, 100, 10),
        (0.2, 4, 1000, 40),
        (0.3, 4, 1000, 40),
        (0.4, 6, 2100, 60),
        (0.5, 6, 2100, 60),
    ]


def test_a_run_without_bytes_or_accuracy_has_no_communication_view() -> None:
    plain = [RoundRecord(1, {"train_loss": 1.0}, "")]
    assert communication_section(plain) == "" and accuracy_by_bytes(plain) is None
    assert bytes_to_reach(rounds([None, None])) == []
    assert "MB uploaded" in communication_section(rounds([None]))


def test_the_report_draws_accuracy_against_the_megabytes_uploaded(tmp_path: Path) -> None:
    run = rounds([0.2, 0.5, 0.7], up=2e6)
    paths = write_report(tmp_path, run, title="t", summary={})
    svg, page = paths["svg"].read_text(), paths["html"].read_text()
    assert "MB uploaded (cumulative)" in svg
    assert "<h2>Communication</h2>" in page and "12 MB uploaded (2000 kB per update)" in page
    assert "<td>70%</td><td>3</td><td>12</td>" in page


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("comm")
    runs = {}
    for name, transform in (
        ("dense", ""),
        ("topk", '[[transforms]]\nname = "top_k"\nfraction = 0.05\n'),
    ):
        toml = root / f"{name}.toml"
        toml.write_text(
            "rounds = 10\n"
            '[data]\ndataset = "digits"\nnum_clients = 10\n'
            '[model]\nname = "mlp"\n'
            "[sampler]\nclients_per_round = 5\n"
            "[client]\nlr = 0.1\nbatch_size = 16\n" + transform
        )
        store = root / name
        out = CliRunner().invoke(app, ["run", str(toml), "--store", str(store)])
        assert out.exit_code == 0, out.output
        (info,) = RunStore(store).list_runs()
        runs[name] = (store, info.run_id)
    return root, runs


def test_a_compressed_run_reaches_its_accuracy_on_fewer_bytes(
    cli_runs: tuple[Path, dict[str, Any]],
) -> None:
    _, runs = cli_runs
    reached = {}
    for name, (store, run_id) in runs.items():
        reached[name] = {
            c.level: c.bytes_up for c in bytes_to_reach(RunStore(store).rounds(run_id))
        }
    common = sorted(set(reached["dense"]) & set(reached["topk"]))
    assert common and max(common) >= 0.5, reached
    for level in common:  # 5 % of the coordinates: an order of magnitude fewer bytes
        assert reached["topk"][level] < reached["dense"][level] / 5, (level, reached)


def test_the_report_of_a_cli_run_has_the_communication_view(
    cli_runs: tuple[Path, dict[str, Any]],
) -> None:
    _, runs = cli_runs
    store, run_id = runs["topk"]
    run_dir = RunStore(store).run_dir(run_id)
    page = (run_dir / "report.html").read_text()
    assert "<h2>Communication</h2>" in page and "Bytes to first reach" in page
    assert "MB uploaded (cumulative)" in (run_dir / "curves.svg").read_text()
