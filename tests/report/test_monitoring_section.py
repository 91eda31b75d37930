"""The HTML report's monitoring section: a chart per figure the run stored, none faked."""

from __future__ import annotations

from potluck.report.monitoring import monitoring_section
from potluck.store.sqlite import RoundRecord


def _rounds(**series: list[float]) -> list[RoundRecord]:
    n = len(next(iter(series.values())))
    return [RoundRecord(r + 1, {k: v[r] for k, v in series.items()}, "") for r in range(n)]


def test_charts_only_for_the_figures_a_run_has() -> None:
    html = monitoring_section(
        _rounds(clients_accuracy_mean=[0.5, 0.6], clients_accuracy_worst10=[0.1, 0.2])
    )
    assert html.count("<svg") == 1 and "accuracy over the clients" in html
    assert "data shift" not in html and "update norm" not in html
    assert monitoring_section(_rounds(test_accuracy=[0.5, 0.6])) == ""


def test_drift_groups_and_flags() -> None:
    html = monitoring_section(
        _rounds(
            label_shift_max=[0.0, 0.4],
            feature_shift_max=[0.0, 0.1],
            group_north_accuracy=[0.3, 0.5],
            diverging=[0.0, 1.0],
            plateau=[0.0, 0.0],
        )
    )
    assert "data shift (total variation)" in html and "group_north_accuracy" in html
    assert "diverging from round 2 (1 round)" in html and "plateau" not in html
    assert html.count("<polyline") == 3  # label, feature shift; the group
