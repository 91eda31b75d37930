"""FedAvg with secure aggregation: the server learns only the weighted sum of the cohort's
updates, never one client's, even when clients drop out mid-round. SecAgg+ (Bell et al.
2020, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS) with about
``log2 n`` neighbours per client, or SecAgg (Bonawitz et al. 2017, "Practical Secure
Aggregation for Privacy-Preserving Machine Learning", CCS) with ``neighbours = "all"``;
``potluck.secagg`` has the protocol and its settings. ``ddp_secagg_fedavg`` adds distributed
DP: each client's share of Skellam noise goes into the sum before masking;
``dp_secagg_fedavg`` central DP: clients clip, the server noises the unmasked sum.

Example:
    >>> algo = secagg_fedavg(neighbours="all", clients_per_round=10)
    >>> [type(t).__name__ for t in algo.transforms], type(algo.aggregator).__name__
    (['SecAgg'], 'SecureSum')
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from potluck.algorithms.base import Algorithm, preset
from potluck.algorithms.fedavg import fedavg
from potluck.privacy.secure_central import SecureCentralGaussian
from potluck.secagg import DistributedSkellam, SecAgg, SecureSum


@preset("secagg_fedavg")
def secagg_fedavg_parts(
    *,
    neighbours: int | str = "log",
    threshold: int | float = 0.5,
    clip_range: float = 1.0,
    quantization_bits: int = 20,
    bits: int = 32,
    max_weight: float = 1000.0,
    dropout: float = 0.0,
) -> dict[str, Any]:
    """The ``SecAgg`` transform with these settings and the ``SecureSum`` aggregator."""
    secagg = SecAgg(neighbours, threshold, clip_range, quantization_bits, bits, max_weight, dropout)
    return {"transforms": (secagg,), "aggregator": SecureSum()}


def secagg_fedavg(
    *,
    neighbours: int | str = "log",
    threshold: int | float = 0.5,
    clip_range: float = 1.0,
    quantization_bits: int = 20,
    bits: int = 32,
    max_weight: float = 1000.0,
    dropout: float = 0.0,
    **fedavg_args: Any,
) -> Algorithm:
    """Secure FedAvg; other arguments as for ``fedavg`` (its ``transforms``, e.g. a clip,
    come before the masking, which is always last)."""
    parts = secagg_fedavg_parts(
        neighbours=neighbours, threshold=threshold, clip_range=clip_range,
        quantization_bits=quantization_bits, bits=bits, max_weight=max_weight, dropout=dropout,
    )  # fmt: skip
    base = fedavg(**fedavg_args)
    return replace(
        base,
        name="secagg_fedavg",
        transforms=(*base.transforms, *parts["transforms"]),
        aggregator=parts["aggregator"],
    )


@preset("ddp_secagg_fedavg")
def ddp_secagg_fedavg_parts(
    *,
    clip: float = 1.0,
    noise_multiplier: float = 1.0,
    min_survivors: int | float = 0.8,
    colluders: int = 0,
    noise: str = "seed",
    neighbours: int | str = "log",
    threshold: int | float = 0.5,
    quantization_bits: int = 20,
    bits: int = 32,
    dropout: float = 0.0,
) -> dict[str, Any]:
    """The ``DistributedSkellam`` transform with these settings and the ``SecureSum``
    aggregator."""
    ddp = DistributedSkellam(
        neighbours=neighbours, threshold=threshold, quantization_bits=quantization_bits,
        bits=bits, dropout=dropout, clip=clip, noise_multiplier=noise_multiplier,
        min_survivors=min_survivors, colluders=colluders, noise=noise,
    )  # fmt: skip
    return {"transforms": (ddp,), "aggregator": SecureSum()}


def ddp_secagg_fedavg(
    *,
    clip: float = 1.0,
    noise_multiplier: float = 1.0,
    min_survivors: int | float = 0.8,
    colluders: int = 0,
    noise: str = "seed",
    neighbours: int | str = "log",
    threshold: int | float = 0.5,
    quantization_bits: int = 20,
    bits: int = 32,
    dropout: float = 0.0,
    **fedavg_args: Any,
) -> Algorithm:
    """FedAvg with distributed DP on secure aggregation (Agarwal, Kairouz, Liu 2021, "The
    Skellam Mechanism for Differentially Private Federated Learning", NeurIPS): each client
    clips its update to ``clip`` and adds its share of Skellam noise before masking, so the
    server unmasks only a noised sum; ``potluck.secagg.distributed_dp`` has the mechanism and
    its trust model, ``potluck.privacy.distributed`` its accounting. A fixed-size cohort
    (``clients_per_round``); other arguments as for ``fedavg``.

    Example:
        >>> algo = ddp_secagg_fedavg(clip=0.5, clients_per_round=10)
        >>> type(algo.transforms[0]).__name__, algo.transforms[0].clip, algo.name
        ('DistributedSkellam', 0.5, 'ddp_secagg_fedavg')
    """
    parts = ddp_secagg_fedavg_parts(
        clip=clip, noise_multiplier=noise_multiplier, min_survivors=min_survivors,
        colluders=colluders, noise=noise, neighbours=neighbours, threshold=threshold,
        quantization_bits=quantization_bits, bits=bits, dropout=dropout,
    )  # fmt: skip
    base = fedavg(**fedavg_args)
    return replace(
        base,
        name="ddp_secagg_fedavg",
        transforms=(*base.transforms, *parts["transforms"]),
        aggregator=parts["aggregator"],
    )


@preset("dp_secagg_fedavg")
def dp_secagg_fedavg_parts(
    *,
    clip: float = 1.0,
    noise_multiplier: float = 1.0,
    noise: str = "seed",
    neighbours: int | str = "log",
    threshold: int | float = 0.5,
    quantization_bits: int = 20,
    bits: int = 32,
    dropout: float = 0.0,
) -> dict[str, Any]:
    """The ``SecureCentralGaussian`` transform (client clip, server noise), then ``SecAgg``
    with its clipping range at ``clip`` (no coordinate of a clipped update exceeds it) and
    weights of 1, and the ``SecureSum`` aggregator."""
    central = SecureCentralGaussian(clip=clip, noise_multiplier=noise_multiplier, noise=noise)
    secagg = SecAgg(
        neighbours, threshold, clip_range=clip, quantization_bits=quantization_bits, bits=bits,
        max_weight=1.0, dropout=dropout,
    )  # fmt: skip
    return {"transforms": (central, secagg), "aggregator": SecureSum()}


def dp_secagg_fedavg(
    *,
    clip: float = 1.0,
    noise_multiplier: float = 1.0,
    noise: str = "seed",
    neighbours: int | str = "log",
    threshold: int | float = 0.5,
    quantization_bits: int = 20,
    bits: int = 32,
    dropout: float = 0.0,
    **fedavg_args: Any,
) -> Algorithm:
    """DP-FedAvg on secure aggregation (McMahan et al. 2018, "Learning Differentially
    Private Recurrent Language Models", ICLR): clients clip to ``clip``, SecAgg+ sums them,
    the server noises the sum; ``potluck.privacy.secure_central`` has the mechanism, its
    trust model and its accounting. A fixed-size cohort (``clients_per_round``); other
    arguments as for ``fedavg``.

    Example:
        >>> algo = dp_secagg_fedavg(clip=0.5, clients_per_round=10)
        >>> [type(t).__name__ for t in algo.transforms], algo.transforms[1].clip_range
        (['SecureCentralGaussian', 'SecAgg'], 0.5)
    """
    parts = dp_secagg_fedavg_parts(
        clip=clip, noise_multiplier=noise_multiplier, noise=noise, neighbours=neighbours,
        threshold=threshold, quantization_bits=quantization_bits, bits=bits, dropout=dropout,
    )  # fmt: skip
    base = fedavg(**fedavg_args)
    return replace(
        base,
        name="dp_secagg_fedavg",
        transforms=(*base.transforms, *parts["transforms"]),
        aggregator=parts["aggregator"],
    )
