"""Reports: curves PNG and self-contained HTML."""

from __future__ import annotations

import base64
import math
import re
from pathlib import Path

import matplotlib
import pytest

from potluck.report import write_report
from potluck.store.sqlite import RoundRecord

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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
        "png": tmp_path / "run" / "curves.png",
        "html": tmp_path / "run" / "report.html",
    }
    png = paths["png"].read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000


def test_html_is_escaped_and_self_contained(report: tuple[dict[str, Path], str]) -> None:
    paths, page = report
    title = "FedAvg &lt;b&gt;&quot;mnist&quot;&lt;/b&gt; &amp; co"
    assert f"<title>{title}</title>" in page and f"<h1>{title}</h1>" in page
    assert "<b>" not in page and "<script>" not in page and "<i>" not in page
    assert "&lt;script&gt;x&lt;/script&gt;" in page
    embedded = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert embedded and base64.b64decode(embedded.group(1)) == paths["png"].read_bytes()
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing external


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
    assert paths["png"].read_bytes().startswith(PNG_MAGIC)
    page = paths["html"].read_text(encoding="utf-8")
    assert "no rounds committed" in page and "Config" not in page
    only_nan = [RoundRecord(1, {"test_loss": math.nan}, ""), RoundRecord(2, {}, "")]
    paths = write_report(tmp_path, only_nan, title="nan", summary={"x": [1, 2]})
    assert paths["png"].read_bytes().startswith(PNG_MAGIC)
    assert "<td>[1, 2]</td>" in paths["html"].read_text(encoding="utf-8")


def test_backend_is_left_alone(tmp_path: Path) -> None:
    before = matplotlib.get_backend()
    write_report(tmp_path, _rounds(3), title="t", summary={})
    assert matplotlib.get_backend() == before
