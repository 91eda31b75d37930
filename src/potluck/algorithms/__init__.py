"""Named algorithms: compositions of sampler, local rule, transforms, aggregator, server opt."""

from potluck.algorithms.base import Algorithm
from potluck.algorithms.fedavg import fedavg
from potluck.algorithms.fedsgd import fedsgd

__all__ = ["Algorithm", "fedavg", "fedsgd"]
