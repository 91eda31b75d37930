"""potluck.report: learning-curve plots and self-contained HTML run reports."""

from potluck.report.plots import write_report

__all__ = ["write_report"]
