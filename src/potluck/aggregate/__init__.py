"""Aggregators: how the server combines the cohort's updates."""

from potluck.aggregate.mean import WeightedMean
from potluck.aggregate.stack import StackBuffer

__all__ = ["StackBuffer", "WeightedMean"]
