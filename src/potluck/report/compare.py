"""Several stored runs side by side: one row of headline figures per run, and one metric's
curves overlaid (``potluck compare``).

Example:
    >>> import tempfile
    >>> from potluck.store import RunStore
    >>> store = RunStore(tempfile.mkdtemp())
    >>> a, b = store.create_run({}, name="a"), store.create_run({}, name="b")
    >>> for run, acc in ((a, 0.5), (b, 0.7)):
    ...     store.commit_round(run, 1, {"test_accuracy": acc, "bytes_total": 2e6}, [])
    >>> rows = compare_rows(store, [a, b], "test_accuracy")
    >>> [(r.label, r.values["best"], r.values["MB moved"]) for r in rows]
    [('a', 0.5, 2.0), ('b', 0.7, 2.0)]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from potluck.report.svg import Panel, Series, panels
from potluck.store.sqlite import RoundRecord, RunStore

# (column, round metric, how: "last" value or "sum" over rounds, scale)
_COLUMNS = (
    ("MB moved", "bytes_total", "last", 1e-6),
    ("bytes per point", "bytes_per_gain", "last", 1.0),
    ("clients acc var", "clients_accuracy_var", "last", 1.0),
    ("worst 10% acc", "clients_accuracy_worst10", "last", 1.0),
    ("epsilon", "epsilon", "last", 1.0),
    ("flagged", "flagged", "sum", 1.0),
    ("shifted", "shifted_clients", "last", 1.0),
    ("seconds", "round_seconds", "sum", 1.0),
)


@dataclass(frozen=True)
class Compared:
    """One run's row: its label (name, or id), status, rounds, and figures by column."""

    run_id: str
    label: str
    status: str
    rounds: Sequence[RoundRecord]
    values: dict[str, float]


def compare_rows(store: RunStore, run_ids: Sequence[str], metric: str) -> list[Compared]:
    """Each run's ``metric`` (its last and best value, and the round of the best; higher is
    better unless the name ends in ``loss``) and the figures of ``_COLUMNS`` it has."""
    lower = metric.endswith("loss")
    out = []
    for run_id in run_ids:
        info, rounds = store.get_run(run_id), store.rounds(run_id)
        values: dict[str, float] = {"rounds": float(info.last_round)}
        points = [(r.round, r.metrics[metric]) for r in rounds if _finite(r.metrics.get(metric))]
        if points:
            best = (min if lower else max)(points, key=lambda p: p[1])
            values |= {"last": points[-1][1], "best": best[1], "best round": float(best[0])}
        for column, name, how, scale in _COLUMNS:
            got = [r.metrics[name] for r in rounds if _finite(r.metrics.get(name))]
            if got:
                values[column] = (got[-1] if how == "last" else sum(got)) * scale
        label = info.name if info.name != run_id else run_id
        out.append(Compared(run_id, label, info.status, rounds, values))
    return out


def columns(rows: Sequence[Compared]) -> list[str]:
    """The columns any of ``rows`` has, in a fixed order."""
    order = ["rounds", "last", "best", "best round", *(c for c, *_ in _COLUMNS)]
    return [c for c in order if any(c in r.values for r in rows)]


def overlay_svg(rows: Sequence[Compared], metric: str) -> str:
    """``metric`` of every run against the round, in one chart (a legend entry per run).

    Example:
        >>> r = RoundRecord(1, {"test_accuracy": 0.5}, "")
        >>> row = Compared("x", "x", "finished", [r, r], {})
        >>> "<polyline" in overlay_svg([row], "test_accuracy")
        True
    """
    series: dict[str, Series] = {}
    for row in rows:
        pts = [(r.round, r.metrics[metric]) for r in row.rounds if _finite(r.metrics.get(metric))]
        series[_unique(row.label, series)] = ([p[0] for p in pts], [p[1] for p in pts])
    return panels(f"{metric} by round", [Panel(metric, series)])


def _unique(label: str, taken: Mapping[str, object]) -> str:
    name, k = label, 2
    while name in taken:
        name, k = f"{label} ({k})", k + 1
    return name


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
