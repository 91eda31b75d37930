"""potluck.monitor: the figures a run stores with every round (convergence, update norms
and client drift, fairness, data drift, communication cost) and the client summaries data
drift is measured from."""

from potluck.monitor.drift import DriftScenario, ShiftTracker, SummaryOptions
from potluck.monitor.rounds import Monitoring, round_figures, summary_options

__all__ = [
    "DriftScenario",
    "Monitoring",
    "ShiftTracker",
    "SummaryOptions",
    "round_figures",
    "summary_options",
]
