"""Named algorithms: compositions of sampler, local rule, transforms, aggregator, server opt."""

from potluck.algorithms.base import Algorithm
from potluck.algorithms.dp_fedavg import dp_fedavg
from potluck.algorithms.dp_ftrl import dp_ftrl, ldp_fedavg
from potluck.algorithms.fedavg import fedavg
from potluck.algorithms.fednova import fednova
from potluck.algorithms.fedprox import fedprox
from potluck.algorithms.fedsgd import fedsgd
from potluck.algorithms.he_fedavg import he_fedavg
from potluck.algorithms.personal import ditto, fedper
from potluck.algorithms.qffl import qffl
from potluck.algorithms.scaffold import scaffold
from potluck.algorithms.secagg_fedavg import dp_secagg_fedavg, secagg_fedavg

__all__ = [
    "Algorithm",
    "ditto",
    "dp_fedavg",
    "dp_ftrl",
    "dp_secagg_fedavg",
    "fedavg",
    "fednova",
    "fedper",
    "fedprox",
    "fedsgd",
    "he_fedavg",
    "ldp_fedavg",
    "qffl",
    "scaffold",
    "secagg_fedavg",
]
