"""Run reports: the learning curves as SVG and a self-contained HTML page embedding them.

The charts are drawn by ``report.svg`` in plain Python (no plotting library to import).

Example:
    >>> import tempfile
    >>> from potluck.store.sqlite import RoundRecord
    >>> rounds = [RoundRecord(1, {"train_loss": 0.9}, ""), RoundRecord(2, {"train_loss": 0.5}, "")]
    >>> paths = write_report(Path(tempfile.mkdtemp()), rounds, title="demo", summary={"rounds": 2})
    >>> sorted(paths)
    ['html', 'svg']
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from potluck.report.anomaly import PerClientRows, anomaly_section
from potluck.report.attacks import attack_section
from potluck.report.communication import accuracy_by_bytes, communication_section
from potluck.report.monitoring import monitoring_section
from potluck.report.svg import Panel, panels
from potluck.store.sqlite import RoundRecord

SVG_NAME = "curves.svg"
HTML_NAME = "report.html"
_PANELS = (("loss", ("loss",)), ("accuracy", ("accuracy", "acc")))  # (label, name suffixes)
_OPTIONAL_PANELS = (  # drawn for runs that have them
    ("epsilon (privacy spent)", ("epsilon",)),
    ("updates flagged", ("flagged", "flagged_malicious", "malicious")),
)

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th { background: #f3f3f3; }
td.key { text-align: left; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; }
svg { max-width: 100%; height: auto; }
figure.attack img { image-rendering: pixelated; margin: 2px 0; }
"""


def write_report(
    run_dir: Path,
    rounds: Sequence[RoundRecord],
    *,
    title: str,
    summary: dict[str, Any],
    config: dict[str, Any] | None = None,
    clients: PerClientRows = (),
) -> dict[str, Path]:
    """Write ``curves.svg`` and ``report.html`` into ``run_dir``; return their paths.

    The plot has a loss panel (metrics named ``*loss``) and an accuracy panel (``*accuracy``,
    ``*acc``), and for a private run the epsilon spent; rounds where a metric is absent, NaN
    or infinite are skipped in the plot; a run that counted bytes gets a panel of its accuracy
    against the megabytes uploaded and a communication section (the bytes to reach each
    accuracy level, ``report.communication``); a run with anomaly detection gets a panel of the
    updates flagged and a section on the clients that look wrong (from the per-client
    metrics ``clients``). The monitoring figures stored with the rounds get a section of
    charts (``report.monitoring``); attack results in ``run_dir/attacks`` (``potluck
    attack``) get a section of their own.

    Example:
        >>> import tempfile
        >>> out = write_report(Path(tempfile.mkdtemp()), [], title="empty", summary={})
        >>> out["html"].name
        'report.html'
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    svg = curves_svg(rounds, title)
    svg_path, html_path = run_dir / SVG_NAME, run_dir / HTML_NAME
    svg_path.write_text(svg, encoding="utf-8")
    sections = (
        monitoring_section(rounds)
        + communication_section(rounds)
        + anomaly_section(clients)
        + attack_section(run_dir)
    )
    page = _html(title, svg, rounds, summary, config, sections)
    html_path.write_text(page, encoding="utf-8")
    return {"svg": svg_path, "html": html_path}


def _metric_names(rounds: Sequence[RoundRecord]) -> list[str]:
    """Every metric name, in order of first appearance."""
    return list(dict.fromkeys(name for r in rounds for name in r.metrics))


def _series(rounds: Sequence[RoundRecord], name: str) -> tuple[list[int], list[float]]:
    """Rounds and values of metric ``name``, skipping rounds where it is absent or not finite."""
    points = [
        (r.round, float(r.metrics[name]))
        for r in rounds
        if name in r.metrics and math.isfinite(r.metrics[name])
    ]
    return [x for x, _ in points], [y for _, y in points]


def curves_svg(rounds: Sequence[RoundRecord], title: str) -> str:
    """The loss and accuracy panels of a run as one SVG document."""
    names = _metric_names(rounds)
    charts = []
    for label, suffixes in _PANELS + _OPTIONAL_PANELS:
        series = {n: _series(rounds, n) for n in names if n.endswith(suffixes)}
        drawn = {n: xy for n, xy in series.items() if xy[0]}
        if drawn or (label, suffixes) in _PANELS:
            charts.append(Panel(label, drawn))
    by_bytes = accuracy_by_bytes(rounds)
    if by_bytes is not None:
        charts.append(by_bytes)
    return panels(title, charts)


def human_bytes(n: float) -> str:
    """A byte count for people (powers of 1,000, as on the wire).

    Example:
        >>> human_bytes(96715.0), human_bytes(5.78e6), human_bytes(512)
        ('96.7 kB', '5.78 MB', '512 B')
    """
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def _cell(name: str, value: Any) -> str:
    """A metric's table cell: bytes (``bytes_*``, ``*_bytes``) for people, else ``_fmt``."""
    counted = name.startswith("bytes") or name.endswith("bytes")
    if counted and isinstance(value, int | float) and math.isfinite(value):
        return html.escape(human_bytes(value))
    return _fmt(value)


def _fmt(value: Any) -> str:
    """A table cell: numbers compactly, everything else as JSON; HTML-escaped."""
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, str | int):
        text = str(value)
    else:
        text = json.dumps(value, default=str)
    return html.escape(text)


def _summary_table(summary: dict[str, Any]) -> str:
    rows = "".join(
        f'<tr><td class="key">{html.escape(str(k))}</td><td>{_cell(str(k), v)}</td></tr>'
        for k, v in summary.items()
    )
    return f"<table>{rows}</table>" if rows else "<p>(empty)</p>"


def _rounds_table(rounds: Sequence[RoundRecord]) -> str:
    if not rounds:
        return "<p>(no rounds committed)</p>"
    names = _metric_names(rounds)
    head = "".join(f"<th>{html.escape(n)}</th>" for n in ["round", *names])
    body = "".join(
        "<tr>"
        + f"<td>{r.round}</td>"
        + "".join(f"<td>{_cell(n, r.metrics[n]) if n in r.metrics else ''}</td>" for n in names)
        + "</tr>"
        for r in rounds
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html(
    title: str,
    svg: str,
    rounds: Sequence[RoundRecord],
    summary: dict[str, Any],
    config: dict[str, Any] | None,
    attacks: str = "",
) -> str:
    esc = html.escape(title)
    config_html = ""
    if config is not None:
        pretty = json.dumps(config, indent=2, sort_keys=True, default=str)
        config_html = f"<h2>Config</h2><pre>{html.escape(pretty)}</pre>"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc}</title><style>{_CSS}</style></head><body>"
        f"<h1>{esc}</h1>"
        f'<figure aria-label="learning curves">{svg}</figure>'
        f"<h2>Summary</h2>{_summary_table(summary)}"
        f"{attacks}"
        f"{config_html}"
        f"<h2>Rounds</h2>{_rounds_table(rounds)}"
        "</body></html>\n"
    )
