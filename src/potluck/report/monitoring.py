"""The report's monitoring section: the figures ``potluck.monitor`` stored with every round,
as charts (update norms and client drift, fairness over the clients, data drift, cost per
accuracy gain) and the rounds the diagnostics flagged (plateau, divergence). A chart is drawn
only for figures the run has.

Example:
    >>> from potluck.store.sqlite import RoundRecord
    >>> rounds = [RoundRecord(r, {"update_norm_mean": 1.0 / r, "plateau": float(r > 2)}, "")
    ...           for r in (1, 2, 3)]
    >>> html = monitoring_section(rounds)
    >>> "update norm" in html and "plateau from round 3" in html
    True
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from potluck.report.svg import Panel, panels
from potluck.store.sqlite import RoundRecord

# (chart label, its figures)
CHARTS = (
    ("update norm / client drift", ("update_norm_mean", "update_norm_max", "client_drift_mean")),
    (
        "accuracy over the clients",
        ("clients_accuracy_mean", "clients_accuracy_worst10", "clients_accuracy_min"),
    ),
    ("accuracy variance / Gini", ("clients_accuracy_var", "clients_accuracy_gini")),
    ("personal accuracy over the clients", ("clients_personal_accuracy_mean",
                                            "clients_personal_accuracy_worst10")),
    ("data shift (total variation)", ("label_shift_max", "feature_shift_max")),
    ("clients shifted", ("shifted_clients",)),
    ("bytes per accuracy point", ("bytes_per_gain",)),
)  # fmt: skip
FLAGS = (("plateau", "on a plateau"), ("diverging", "diverging"))


def monitoring_section(rounds: Sequence[RoundRecord]) -> str:
    """The HTML section (empty for a run without monitoring figures)."""
    charts = []
    for label, names in (*CHARTS, _groups(rounds)):
        series = {n: _series(rounds, n) for n in names}
        drawn = {n: xy for n, xy in series.items() if xy[0]}
        if drawn:
            charts.append(Panel(label, drawn))
    notes = [_flagged(rounds, flag, what) for flag, what in FLAGS]
    notes = [n for n in notes if n]
    if not charts and not notes:
        return ""
    figures = "".join(
        f'<figure aria-label="{html.escape(c.ylabel)}">{panels(c.ylabel, [c])}</figure>'
        for c in charts
    )
    listed = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return f"<h2>Monitoring</h2>{f'<ul>{listed}</ul>' if listed else ''}{figures}"


def _groups(rounds: Sequence[RoundRecord]) -> tuple[str, tuple[str, ...]]:
    names = dict.fromkeys(
        n for r in rounds for n in r.metrics if n.startswith("group_") and n.endswith("_accuracy")
    )
    return "accuracy per group", tuple(names)


def _series(rounds: Sequence[RoundRecord], name: str) -> tuple[list[int], list[float]]:
    pts = [(r.round, r.metrics[name]) for r in rounds if name in r.metrics]
    pts = [(x, y) for x, y in pts if y == y and abs(y) != float("inf")]
    return [x for x, _ in pts], [y for _, y in pts]


def _flagged(rounds: Sequence[RoundRecord], flag: str, what: str) -> str:
    """``"on a plateau from round 7 (4 rounds)"``: where a diagnostic first raised its flag."""
    hit = [r.round for r in rounds if r.metrics.get(flag) == 1.0]
    if not hit:
        return ""
    return f"{what} from round {hit[0]} ({len(hit)} round{'s' if len(hit) > 1 else ''})"
