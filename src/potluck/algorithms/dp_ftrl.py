"""DP-FTRL and local-DP FedAvg: the user-level DP algorithms that need no sampling
assumption.

``dp_ftrl`` (Kairouz et al. 2021, "Practical and Private (Deep) Learning without Sampling
or Shuffling", ICML): shuffled epochs of ``clients_per_round`` clients (each at most once per
epoch), each client clips its update to ``clip`` (``ClipNorm``), and the server releases
noisy prefix sums of the clipped sums by tree aggregation
(``privacy.tree.TreeAggregatedMean``), restarted every ``restart_every`` rounds (default:
never; one epoch, ``N // clients_per_round`` rounds, is the paper's choice); server momentum
makes it DP-FTRLM.

``ldp_fedavg``: FedAvg whose clients clip and noise their own updates before they leave
(``privacy.local.LocalGaussian``), private even from the server.

Both are accounted per client from who took part (``privacy.participation``).

Example:
    >>> algo = dp_ftrl(clients_per_round=10, clip=0.5, noise_multiplier=2.0)
    >>> algo.sampler.clients_per_round, algo.aggregator.noise_multiplier
    (10, 2.0)
    >>> ldp_fedavg(clients_per_round=5, clip=0.1).transforms[0].clip
    0.1
"""

from __future__ import annotations

from typing import Any

from potluck.algorithms.base import Algorithm, preset
from potluck.algorithms.fedavg import compose, fedavg
from potluck.privacy.local import LocalGaussian
from potluck.privacy.tree import TreeAggregatedMean
from potluck.sampling.shuffle import ShuffledSampler
from potluck.sampling.stragglers import Stragglers
from potluck.updates.base import ClipNorm


@preset("dp_ftrl")
def dp_ftrl_parts(
    *,
    clients_per_round: int = 10,
    clip: float = 1.0,
    noise_multiplier: float = 1.0,
    restart_every: int | None = None,
    noise: str = "seed",
) -> dict[str, Any]:
    """Shuffled epochs, a client clip and the tree-aggregated mean; stragglers dropped."""
    return {
        "sampler": ShuffledSampler(clients_per_round),
        "stragglers": Stragglers(mode="drop"),
        "transforms": (ClipNorm(clip),),
        "aggregator": TreeAggregatedMean(clip, noise_multiplier, restart_every, noise=noise),
    }


@preset("ldp_fedavg")
def ldp_fedavg_parts(
    *, clip: float = 1.0, noise_multiplier: float = 1.0, noise: str = "seed"
) -> dict[str, Any]:
    """Local DP on each client's update; stragglers dropped."""
    return {
        "stragglers": Stragglers(mode="drop"),
        "transforms": (LocalGaussian(clip, noise_multiplier, noise),),
    }


def dp_ftrl(
    *,
    clients_per_round: int = 10,
    clip: float = 1.0,
    noise_multiplier: float = 1.0,
    restart_every: int | None = None,
    noise: str = "seed",
    **fedavg_args: Any,
) -> Algorithm:
    """DP-FTRL; other arguments (local training, server optimizer) as for ``fedavg``."""
    parts = dp_ftrl_parts(
        clients_per_round=clients_per_round, clip=clip, noise_multiplier=noise_multiplier,
        restart_every=restart_every, noise=noise,
    )  # fmt: skip
    return compose("dp_ftrl", parts, fedavg(**fedavg_args))


def ldp_fedavg(
    *, clip: float = 1.0, noise_multiplier: float = 1.0, noise: str = "seed", **fedavg_args: Any
) -> Algorithm:
    """FedAvg with local DP; other arguments (cohort, local training, server) as for
    ``fedavg``."""
    parts = ldp_fedavg_parts(clip=clip, noise_multiplier=noise_multiplier, noise=noise)
    return compose("ldp_fedavg", parts, fedavg(**fedavg_args))
