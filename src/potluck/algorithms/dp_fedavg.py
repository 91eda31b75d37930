"""DP-FedAvg (McMahan, Ramage, Talwar, Zhang 2018, "Learning Differentially Private
Recurrent Language Models", ICLR): user-level central differential privacy. Clients are
sampled by Poisson sampling with probability ``rate`` (so amplification by sampling applies),
each clips its update to L2 norm ``clip`` (``ClipNorm``), and the server clips again, sums
the updates with weight 1 each, adds Gaussian noise of std ``noise_multiplier * clip`` and
divides by the expected cohort size (``privacy.central.GaussianMean``). The rounds are
accounted by ``dp-accounting`` over what ran (``privacy.ledger``): the run's ``[privacy]``
budget states epsilon at a delta, stops at ``max_epsilon`` or calibrates the noise to a
``target_epsilon``.

Example:
    >>> algo = dp_fedavg(rate=0.05, clip=0.5, noise_multiplier=1.0)
    >>> algo.sampler.rate, algo.transforms[0].max_norm, algo.aggregator.noise_multiplier
    (0.05, 0.5, 1.0)
"""

from __future__ import annotations

from typing import Any

from potluck.algorithms.base import Algorithm, preset
from potluck.algorithms.fedavg import compose, fedavg
from potluck.privacy.central import GaussianMean
from potluck.sampling.poisson import PoissonSampler
from potluck.sampling.stragglers import Stragglers
from potluck.updates.base import ClipNorm


@preset("dp_fedavg")
def dp_fedavg_parts(
    *, rate: float = 0.01, clip: float = 1.0, noise_multiplier: float = 1.0, noise: str = "seed"
) -> dict[str, Any]:
    """Poisson sampling at ``rate``, a client clip and the noised mean; stragglers dropped."""
    return {
        "sampler": PoissonSampler(rate),
        "transforms": (ClipNorm(clip),),
        "aggregator": GaussianMean(clip, noise_multiplier, noise=noise),
        "stragglers": Stragglers(mode="drop"),
    }


def dp_fedavg(
    *,
    rate: float = 0.01,
    clip: float = 1.0,
    noise_multiplier: float = 1.0,
    noise: str = "seed",
    **fedavg_args: Any,
) -> Algorithm:
    """DP-FedAvg; other arguments (local training, server optimizer) as for ``fedavg``."""
    parts = dp_fedavg_parts(rate=rate, clip=clip, noise_multiplier=noise_multiplier, noise=noise)
    return compose("dp_fedavg", parts, fedavg(**fedavg_args))
