"""Samplers and system heterogeneity: which clients take part, and how much they do."""

from potluck.sampling.oort import OortSampler
from potluck.sampling.poisson import PoissonSampler
from potluck.sampling.shuffle import ShuffledSampler
from potluck.sampling.stragglers import Stragglers
from potluck.sampling.uniform import UniformSampler

__all__ = ["OortSampler", "PoissonSampler", "ShuffledSampler", "Stragglers", "UniformSampler"]
