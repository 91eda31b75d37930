"""DP-FedAvg (McMahan, Ramage, Talwar, Zhang 2018, "Learning Differentially Private
Recurrent Language Models", ICLR): user-level central differential privacy. Clients are
sampled by Poisson sampling with probability ``rate`` (so amplification by sampling applies),
each clips its update to L2 norm ``clip`` (``ClipNorm``), and the server clips again, sums
the updates with weight 1 each, adds Gaussian noise of std ``noise_multiplier * clip`` and
divides by the expected cohort size (``privacy.central.GaussianMean``). The rounds are
accounted by ``dp-accounting`` over what ran (``privacy.ledger``): the run's ``[privacy]``
budget states epsilon at a delta, stops at ``max_epsilon`` or calibrates the noise to a
``target_epsilon``.

With ``target_quantile`` the clip is adaptive (Andrew et al. 2021,
``privacy.adaptive.AdaptiveGaussianMean``): it starts at ``clip`` and follows that quantile
of the update norms, learnt at rate ``clip_lr`` from a private count; the clients then do not
clip (the server does, to the current clip). ``per_layer`` clips each parameter tensor on
the client to an equal share of ``clip`` (McMahan et al.'s per-layer clipping).

Example:
    >>> algo = dp_fedavg(rate=0.05, clip=0.5, noise_multiplier=1.0)
    >>> algo.sampler.rate, algo.transforms[0].max_norm, algo.aggregator.noise_multiplier
    (0.05, 0.5, 1.0)
"""

from __future__ import annotations

from typing import Any

from potluck.algorithms.base import Algorithm, preset
from potluck.algorithms.fedavg import compose, fedavg
from potluck.privacy.adaptive import AdaptiveGaussianMean
from potluck.privacy.central import GaussianMean
from potluck.sampling.poisson import PoissonSampler
from potluck.sampling.stragglers import Stragglers
from potluck.updates.base import ClipNorm


@preset("dp_fedavg")
def dp_fedavg_parts(
    *,
    rate: float = 0.01,
    clip: float = 1.0,
    noise_multiplier: float = 1.0,
    noise: str = "seed",
    target_quantile: float | None = None,
    clip_lr: float = 0.2,
    per_layer: bool = False,
) -> dict[str, Any]:
    """Poisson sampling at ``rate``, a client clip and the noised mean (or, with a
    ``target_quantile``, the adaptive one); stragglers dropped."""
    parts: dict[str, Any] = {"sampler": PoissonSampler(rate), "stragglers": Stragglers(mode="drop")}
    if target_quantile is None:
        parts["transforms"] = (ClipNorm(clip, per_layer),)
        parts["aggregator"] = GaussianMean(clip, noise_multiplier, noise=noise)
    elif per_layer:
        raise ValueError("dp_fedavg: per_layer clipping needs a fixed clip (no target_quantile)")
    else:
        parts["aggregator"] = AdaptiveGaussianMean(
            clip, noise_multiplier, target_quantile, clip_lr, noise=noise
        )
    return parts


def dp_fedavg(
    *,
    rate: float = 0.01,
    clip: float = 1.0,
    noise_multiplier: float = 1.0,
    noise: str = "seed",
    target_quantile: float | None = None,
    clip_lr: float = 0.2,
    per_layer: bool = False,
    **fedavg_args: Any,
) -> Algorithm:
    """DP-FedAvg; other arguments (local training, server optimizer) as for ``fedavg``."""
    parts = dp_fedavg_parts(
        rate=rate, clip=clip, noise_multiplier=noise_multiplier, noise=noise,
        target_quantile=target_quantile, clip_lr=clip_lr, per_layer=per_layer,
    )  # fmt: skip
    return compose("dp_fedavg", parts, fedavg(**fedavg_args))
