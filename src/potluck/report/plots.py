"""Run reports: a PNG of the learning curves and a self-contained HTML page.

Matplotlib is imported lazily and driven through its object API (``Figure`` on an Agg
canvas), so writing a report never touches pyplot or the global backend.

Example:
    >>> import tempfile
    >>> from potluck.store.sqlite import RoundRecord
    >>> rounds = [RoundRecord(1, {"train_loss": 0.9}, ""), RoundRecord(2, {"train_loss": 0.5}, "")]
    >>> paths = write_report(Path(tempfile.mkdtemp()), rounds, title="demo", summary={"rounds": 2})
    >>> sorted(paths)
    ['html', 'png']
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from potluck.store.sqlite import RoundRecord

PNG_NAME = "curves.png"
HTML_NAME = "report.html"
_PANELS = (("loss", ("loss",)), ("accuracy", ("accuracy", "acc")))  # (label, name suffixes)

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th { background: #f3f3f3; }
td.key { text-align: left; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; }
img { max-width: 100%; }
"""


def write_report(
    run_dir: Path,
    rounds: Sequence[RoundRecord],
    *,
    title: str,
    summary: dict[str, Any],
    config: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``curves.png`` and ``report.html`` into ``run_dir``; return their paths.

    The plot has a loss panel (metrics named ``*loss``) and an accuracy panel (``*accuracy``,
    ``*acc``); rounds where a metric is absent, NaN or infinite are skipped in the plot.

    Example:
        >>> import tempfile
        >>> out = write_report(Path(tempfile.mkdtemp()), [], title="empty", summary={})
        >>> out["html"].name
        'report.html'
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    png = _curves_png(rounds, title)
    png_path, html_path = run_dir / PNG_NAME, run_dir / HTML_NAME
    png_path.write_bytes(png)
    html_path.write_text(_html(title, png, rounds, summary, config), encoding="utf-8")
    return {"png": png_path, "html": html_path}


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


def _curves_png(rounds: Sequence[RoundRecord], title: str) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    names = _metric_names(rounds)
    for ax, (label, suffixes) in zip(fig.subplots(1, 2), _PANELS, strict=True):
        plotted = False
        for name in (n for n in names if n.endswith(suffixes)):
            xs, ys = _series(rounds, name)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, label=name)
                plotted = True
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if plotted:
            ax.legend()
        else:
            ax.text(0.5, 0.5, f"no {label} metrics", ha="center", transform=ax.transAxes)
    fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


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
        f'<tr><td class="key">{html.escape(str(k))}</td><td>{_fmt(v)}</td></tr>'
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
        + "".join(f"<td>{_fmt(r.metrics[n]) if n in r.metrics else ''}</td>" for n in names)
        + "</tr>"
        for r in rounds
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html(
    title: str,
    png: bytes,
    rounds: Sequence[RoundRecord],
    summary: dict[str, Any],
    config: dict[str, Any] | None,
) -> str:
    esc = html.escape(title)
    data_uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    config_html = ""
    if config is not None:
        pretty = json.dumps(config, indent=2, sort_keys=True, default=str)
        config_html = f"<h2>Config</h2><pre>{html.escape(pretty)}</pre>"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc}</title><style>{_CSS}</style></head><body>"
        f"<h1>{esc}</h1>"
        f'<img src="{data_uri}" alt="learning curves">'
        f"<h2>Summary</h2>{_summary_table(summary)}"
        f"{config_html}"
        f"<h2>Rounds</h2>{_rounds_table(rounds)}"
        "</body></html>\n"
    )
