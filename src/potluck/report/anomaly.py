"""The report's section on clients that look wrong: each client's anomaly scores over the
run (``detection``), the most flagged first.

Example:
    >>> rows = [(1, 4, {"score_norm": 9.0, "score_cosine": -0.5, "flagged": 1.0}),
    ...         (1, 2, {"score_norm": 1.0, "score_cosine": 0.9, "flagged": 0.0})]
    >>> [c.client for c in client_summaries(rows)]
    [4, 2]
    >>> "<td>4</td>" in anomaly_section(rows)
    True
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

PerClientRows = Sequence[tuple[int, int, dict[str, float]]]
SHOWN = 20  # clients listed in the report


@dataclass(frozen=True)
class ClientSummary:
    """One client's scores over the rounds it was scored in."""

    client: int
    rounds: int
    flagged: int
    mean_norm: float | None
    mean_cosine: float | None
    malicious: bool | None


def client_summaries(rows: PerClientRows) -> list[ClientSummary]:
    """Each scored client's summary, the most flagged (then the largest norm) first."""
    by_client: dict[int, list[dict[str, float]]] = {}
    for _, cid, metrics in rows:
        if any(k.startswith("score_") for k in metrics):
            by_client.setdefault(cid, []).append(metrics)
    out = [
        ClientSummary(
            cid,
            len(ms),
            int(sum(m.get("flagged", 0.0) for m in ms)),
            _mean([m["score_norm"] for m in ms if "score_norm" in m]),
            _mean([m["score_cosine"] for m in ms if "score_cosine" in m]),
            bool(ms[0]["malicious"]) if "malicious" in ms[0] else None,
        )
        for cid, ms in by_client.items()
    ]
    return sorted(out, key=lambda c: (-c.flagged, -(c.mean_norm or 0.0), c.client))


def anomaly_section(rows: PerClientRows) -> str:
    """The HTML section (empty for a run without scores)."""
    clients = client_summaries(rows)
    if not clients:
        return ""
    truth = any(c.malicious is not None for c in clients)
    head = ["client", "rounds scored", "rounds flagged", "mean norm", "mean cosine"]
    head += ["malicious (simulated)"] if truth else []
    body = []
    for c in clients[:SHOWN]:
        cells = [str(c.client), str(c.rounds), str(c.flagged), _num(c.mean_norm),
                 _num(c.mean_cosine)]  # fmt: skip
        cells += [("yes" if c.malicious else "no")] if truth else []
        body.append("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in cells) + "</tr>")
    flagged = sum(c.flagged > 0 for c in clients)
    note = f"<p>{flagged} of {len(clients)} scored clients flagged at least once"
    note += f"; the {SHOWN} most flagged are listed.</p>" if len(clients) > SHOWN else ".</p>"
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    table = f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    return f"<h2>Clients that look wrong</h2>{note}{table}"


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"
