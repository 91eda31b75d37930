"""FedAvg with homomorphic aggregation for cross-silo federations: the clients encrypt their
weighted updates with CKKS (Cheon et al. 2017, "Homomorphic Encryption for Arithmetic of
Approximate Numbers", ASIACRYPT) under a key pair one of them (the key holder) makes each
round; the server adds the ciphertexts and the key holder decrypts only the sum.
``potluck.secagg.homomorphic`` has the protocol, its trust model and its settings (TenSEAL:
the optional extra ``potluck[he]``).

Example:
    >>> algo = he_fedavg(key_holder=0, clients_per_round=5)
    >>> [type(t).__name__ for t in algo.transforms], type(algo.aggregator).__name__
    (['CKKS'], 'CKKSSum')
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from potluck.algorithms.base import Algorithm, preset
from potluck.algorithms.fedavg import fedavg
from potluck.secagg.homomorphic import CKKS, CKKSSum


@preset("he_fedavg")
def he_fedavg_parts(
    *,
    key_holder: int | None = None,
    clip_range: float = 1.0,
    max_weight: float = 1000.0,
    min_clients: int = 2,
    flooding: float = 2.0**-24,
    poly_modulus_degree: int = 8192,
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 60),
    scale_bits: int = 50,
) -> dict[str, Any]:
    """The ``CKKS`` transform with these settings and the ``CKKSSum`` aggregator."""
    he = CKKS(
        key_holder, clip_range, max_weight, min_clients, flooding, poly_modulus_degree,
        coeff_mod_bit_sizes, scale_bits,
    )  # fmt: skip
    return {"transforms": (he,), "aggregator": CKKSSum()}


def he_fedavg(
    *,
    key_holder: int | None = None,
    clip_range: float = 1.0,
    max_weight: float = 1000.0,
    min_clients: int = 2,
    flooding: float = 2.0**-24,
    poly_modulus_degree: int = 8192,
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 60),
    scale_bits: int = 50,
    **fedavg_args: Any,
) -> Algorithm:
    """Homomorphic FedAvg; other arguments as for ``fedavg`` (its ``transforms``, e.g. a
    clip, come before the encryption, which is always last)."""
    parts = he_fedavg_parts(
        key_holder=key_holder, clip_range=clip_range, max_weight=max_weight,
        min_clients=min_clients, flooding=flooding, poly_modulus_degree=poly_modulus_degree,
        coeff_mod_bit_sizes=coeff_mod_bit_sizes, scale_bits=scale_bits,
    )  # fmt: skip
    base = fedavg(**fedavg_args)
    return replace(
        base,
        name="he_fedavg",
        transforms=(*base.transforms, *parts["transforms"]),
        aggregator=parts["aggregator"],
    )
