"""Aggregators: how the server combines the cohort's updates."""

from potluck.aggregate.mean import WeightedMean

__all__ = ["WeightedMean"]
