"""Samplers: which clients take part in a round."""

from potluck.sampling.uniform import UniformSampler

__all__ = ["UniformSampler"]
