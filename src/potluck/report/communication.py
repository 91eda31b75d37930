"""What a run's accuracy cost in bytes: cumulative bytes up and down per round (the round
metrics ``bytes_up`` and ``bytes_down``, counted as on the wire), the accuracy against the
megabytes uploaded, and the bytes it took to first reach each accuracy level (the
communication cost of an accuracy gain).

Example:
    >>> from potluck.store.sqlite import RoundRecord
    >>> rounds = [RoundRecord(r, {"bytes_up": 1e6, "bytes_down": 2e6, "test_accuracy": a}, "")
    ...           for r, a in ((1, 0.12), (2, 0.25), (3, 0.44))]
    >>> [(c.level, c.round, c.bytes_up) for c in bytes_to_reach(rounds)]
    [(0.1, 1, 1000000.0), (0.2, 2, 2000000.0), (0.3, 3, 3000000.0), (0.4, 3, 3000000.0)]
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

from potluck.report.svg import Panel
from potluck.store.sqlite import RoundRecord

ACCURACY = ("test_accuracy", "fed_accuracy")  # the accuracy the levels are read from, in order
MB = 1e6


@dataclass(frozen=True)
class Cost:
    """The round a run first reached accuracy ``level`` and the bytes spent by then."""

    level: float
    round: int
    bytes_up: float
    bytes_down: float


def cumulative(rounds: Sequence[RoundRecord], name: str) -> list[float]:
    """The running total of metric ``name`` (a round without it adds nothing)."""
    total, out = 0.0, []
    for r in rounds:
        value = r.metrics.get(name, 0.0)
        total += value if math.isfinite(value) else 0.0
        out.append(total)
    return out


def accuracy_metric(rounds: Sequence[RoundRecord]) -> str | None:
    """The first of ``ACCURACY`` the run records."""
    return next((n for n in ACCURACY if any(n in r.metrics for r in rounds)), None)


def bytes_to_reach(rounds: Sequence[RoundRecord], step: float = 0.1) -> list[Cost]:
    """For each accuracy level ``step, 2 step, ...`` the run reached, the first round at or
    above it and the cumulative bytes up and down until then."""
    metric = accuracy_metric(rounds)
    if metric is None:
        return []
    up, down = cumulative(rounds, "bytes_up"), cumulative(rounds, "bytes_down")
    costs: list[Cost] = []
    level = step
    for i, r in enumerate(rounds):
        acc = r.metrics.get(metric)
        if acc is None or not math.isfinite(acc):
            continue
        while level <= acc + 1e-12 and level <= 1.0 + 1e-12:
            costs.append(Cost(round(level, 6), r.round, up[i], down[i]))
            level += step
    return costs


def accuracy_by_bytes(rounds: Sequence[RoundRecord]) -> Panel | None:
    """The accuracy against the cumulative megabytes uploaded (``None``: nothing to draw)."""
    metric = accuracy_metric(rounds)
    if metric is None or not any("bytes_up" in r.metrics for r in rounds):
        return None
    up = cumulative(rounds, "bytes_up")
    points = [
        (up[i] / MB, r.metrics[metric])
        for i, r in enumerate(rounds)
        if metric in r.metrics and math.isfinite(r.metrics[metric])
    ]
    xs, ys = [x for x, _ in points], [y for _, y in points]
    return Panel("accuracy", {metric: (xs, ys)}, xlabel="MB uploaded (cumulative)")


def communication_section(rounds: Sequence[RoundRecord]) -> str:
    """The report's section: total bytes each way and the bytes to reach each accuracy level
    (empty for a run that recorded no bytes)."""
    if not any("bytes_up" in r.metrics for r in rounds):
        return ""
    up, down = cumulative(rounds, "bytes_up")[-1], cumulative(rounds, "bytes_down")[-1]
    updates = sum(r.metrics.get("updates", 0.0) for r in rounds)
    per_update = f"{up / updates / 1e3:.4g} kB per update" if updates else "no updates"
    head = (
        f"<h2>Communication</h2><p>{up / MB:.4g} MB uploaded ({per_update}), "
        f"{down / MB:.4g} MB downloaded, over {len(rounds)} rounds; counted as on the wire.</p>"
    )
    costs = bytes_to_reach(rounds)
    metric = accuracy_metric(rounds)
    if not costs or metric is None:
        return head
    rows = "".join(
        f"<tr><td>{c.level:.0%}</td><td>{c.round}</td><td>{c.bytes_up / MB:.4g}</td>"
        f"<td>{c.bytes_down / MB:.4g}</td></tr>"
        for c in costs
    )
    return (
        head
        + f"<p>Bytes to first reach each level of {html.escape(metric)}:</p>"
        + "<table><thead><tr><th>accuracy</th><th>round</th><th>MB up</th><th>MB down</th>"
        + f"</tr></thead><tbody>{rows}</tbody></table>"
    )
