"""FedAvg with secure aggregation: the server learns only the weighted sum of the cohort's
updates, never one client's, even when clients drop out mid-round. SecAgg+ (Bell et al.
2020, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS) with about
``log2 n`` neighbours per client, or SecAgg (Bonawitz et al. 2017, "Practical Secure
Aggregation for Privacy-Preserving Machine Learning", CCS) with ``neighbours = "all"``;
``potluck.secagg`` has the protocol and its settings.

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
from potluck.secagg import SecAgg, SecureSum


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
