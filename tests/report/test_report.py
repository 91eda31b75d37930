"""Reports: curves SVG (drawn in plain Python) and self-contained HTML."""

from __future__ import annotations

import itertools
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from potluck.report import write_report
from potluck.report.svg import nice_ticks
from potluck.store.sqlite import RoundRecord

SVG = "{http://www.w3.org/2000/svg}"


def _svg(path: Path) -> ET.Element:
    root = ET.fromstring(path.read_text(encoding="utf-8"))  # well-formed XML
    assert root.tag == f"{SVG}svg"
    return root


def _rounds(n: int = 12) -> list[RoundRecord]:
    out = []
    for r in range(1, n + 1):
        metrics = {"train_loss": 2.0 / r, "cohort_size": 10.0}
        if r % 3 == 0:  # evaluation runs every third round only
            metrics |= {"test_loss": 2.5 / r, "test_accuracy": 1 - 1 / r, "fed_acc": 0.5}
        if r == 6:
            metrics["test_loss"] = math.nan
        out.append(RoundRecord(r, metrics, f"2025-01-01T00:00:{r:02d}+00:00"))
    return out


@pytest.fixture
def report(tmp_path: Path) -> tuple[dict[str, Path], str]:
    paths = write_report(
        tmp_path / "run",
        _rounds(),
        title='FedAvg <b>"mnist"</b> & co',
        summary={"test_accuracy": 0.912345678, "rounds": 12, "note": "<script>x</script>"},
        config={"algorithm": {"name": "fedavg", "lr": 0.1}, "tag": "<i>"},
    )
    return paths, paths["html"].read_text(encoding="utf-8")


def test_files_are_written(tmp_path: Path, report: tuple[dict[str, Path], str]) -> None:
    paths, _ = report
    assert paths == {
        "svg": tmp_path / "run" / "curves.svg",
        "html": tmp_path / "run" / "report.html",
    }
    root = _svg(paths["svg"])
    lines = root.findall(f".//{SVG}polyline")
    assert len(lines) == 4  # train_loss, test_loss | test_accuracy, fed_acc
    texts = [t.text for t in root.iter(f"{SVG}text")]
    for name in ("train_loss", "test_loss", "test_accuracy", "fed_acc", "round", "loss"):
        assert name in texts
    assert 'FedAvg <b>"mnist"</b> & co' in texts  # the title, as text (escaped in the file)


def test_curves_skip_missing_and_non_finite_points(report: tuple[dict[str, Path], str]) -> None:
    root = _svg(report[0]["svg"])
    counts = sorted(len(p.get("points", "").split()) for p in root.iter(f"{SVG}polyline"))
    # train_loss every round (12); test_accuracy and fed_acc every third round (4);
    # test_loss every third round but NaN in round 6 (3)
    assert counts == [3, 4, 4, 12]


def test_html_is_escaped_and_self_contained(report: tuple[dict[str, Path], str]) -> None:
    paths, page = report
    title = "FedAvg &lt;b&gt;&quot;mnist&quot;&lt;/b&gt; &amp; co"
    assert f"<title>{title}</title>" in page and f"<h1>{title}</h1>" in page
    assert "<b>" not in page and "<script>" not in page and "<i>" not in page
    assert "&lt;script&gt;x&lt;/script&gt;" in page
    assert paths["svg"].read_text(encoding="utf-8") in page  # the chart, inline
    assert not re.search(r'(src|href)="', page)  # nothing external


def test_html_has_summary_config_and_rounds(report: tuple[dict[str, Path], str]) -> None:
    _, page = report
    assert "<td>0.912346</td>" in page  # summary value, compact
    assert "&quot;lr&quot;: 0.1" in page  # config as pretty JSON
    header = re.search(r"<thead><tr>(.*?)</tr></thead>", page)
    assert header is not None
    cols = re.findall(r"<th>(.*?)</th>", header.group(1))
    assert cols == ["round", "train_loss", "cohort_size", "test_loss", "test_accuracy", "fed_acc"]
    rows = re.findall(r"<tr><td>(\d+)</td>(.*?)</tr>", page)
    assert [int(r) for r, _ in rows] == list(range(1, 13))
    cells = {int(r): re.findall(r"<td>(.*?)</td>", rest) for r, rest in rows}
    assert cells[1] == ["2", "10", "", "", ""]  # evaluation absent: empty cells
    assert cells[3] == ["0.666667", "10", "0.833333", "0.666667", "0.5"]
    assert cells[6][2] == "nan"


def test_empty_and_metricless_runs(tmp_path: Path) -> None:
    paths = write_report(tmp_path, [], title="empty", summary={})
    assert "no loss metrics" in paths["svg"].read_text(encoding="utf-8")
    page = paths["html"].read_text(encoding="utf-8")
    assert "no rounds committed" in page and "Config" not in page
    only_nan = [RoundRecord(1, {"test_loss": math.nan}, ""), RoundRecord(2, {}, "")]
    paths = write_report(tmp_path, only_nan, title="nan", summary={"x": [1, 2]})
    assert not _svg(paths["svg"]).findall(f".//{SVG}polyline")
    assert "<td>[1, 2]</td>" in paths["html"].read_text(encoding="utf-8")


@given(st.floats(-1e6, 1e6), st.floats(1e-6, 1e6))
def test_ticks_are_round_and_cover_the_range(lo: float, width: float) -> None:
    assume(width > 1e-6 * abs(lo))  # a range float64 resolves into round ticks
    hi = lo + width
    ticks = nice_ticks(lo, hi)
    assert 2 <= len(ticks) <= 11
    assert all(lo - 1e-9 * width <= t <= hi + 1e-9 * width for t in ticks)
    step = ticks[1] - ticks[0]
    assert all(b - a == pytest.approx(step, rel=1e-3) for a, b in itertools.pairwise(ticks))
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert any(mantissa == pytest.approx(m, rel=1e-3) for m in (1, 2, 5, 10))


def test_a_private_run_gets_an_epsilon_panel(tmp_path: Path) -> None:
    rounds = [RoundRecord(r, {"train_loss": 1.0 / r, "epsilon": 0.5 * r}, "") for r in (1, 2, 3)]
    private = _svg(write_report(tmp_path / "dp", rounds, title="dp", summary={})["svg"])
    texts = [t.text for t in private.iter(f"{SVG}text")]
    assert "epsilon (privacy spent)" in texts and "epsilon" in texts
    assert len(private.findall(f".//{SVG}polyline")) == 2
    plain = _svg(write_report(tmp_path / "plain", _rounds(), title="t", summary={})["svg"])
    assert "epsilon (privacy spent)" not in [t.text for t in plain.iter(f"{SVG}text")]


def test_bytes_are_shown_for_people(tmp_path: Path) -> None:
    rounds = [RoundRecord(1, {"bytes_up": 96715.0, "bytes_down": 5.78e6, "train_loss": 1.0}, "")]
    paths = write_report(tmp_path, rounds, title="bytes", summary={"bytes_up": 96715.0})
    page = paths["html"].read_text()
    assert "96.7 kB" in page and "5.78 MB" in page and "96715" not in page
