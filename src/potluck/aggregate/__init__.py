"""Aggregators: how the server combines the cohort's updates (the weighted mean, and the
Byzantine-robust rules of ``byzantine``, ``coordinate``, ``krum``, ``geometric``,
``clipping``, ``fltrust`` and ``foolsgold``)."""

from potluck.aggregate.clipping import CenteredClipping, NormBounding
from potluck.aggregate.coordinate import CoordinateMedian, TrimmedMean
from potluck.aggregate.fltrust import FLTrust
from potluck.aggregate.foolsgold import FoolsGold
from potluck.aggregate.geometric import GeometricMedian
from potluck.aggregate.krum import Bulyan, Krum, MultiKrum
from potluck.aggregate.mean import WeightedMean
from potluck.aggregate.stack import StackBuffer

__all__ = [
    "Bulyan",
    "CenteredClipping",
    "CoordinateMedian",
    "FLTrust",
    "FoolsGold",
    "GeometricMedian",
    "Krum",
    "MultiKrum",
    "NormBounding",
    "StackBuffer",
    "TrimmedMean",
    "WeightedMean",
]
