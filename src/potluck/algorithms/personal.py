"""Personalised federated learning as compositions: FedPer and Ditto.

Examples:
    >>> fedper(clients_per_round=5).terms, fedper(clients_per_round=5).transforms
    ((FedPer(personal_layers=()),), (KeepLocal(layers=()),))
    >>> ditto(lam=0.5, clients_per_round=5).terms
    (Ditto(lam=0.5),)
"""

from __future__ import annotations

from typing import Any

from potluck.algorithms.base import Algorithm, preset
from potluck.algorithms.fedavg import compose, fedavg
from potluck.client.personal import Ditto, FedPer
from potluck.updates.base import KeepLocal


@preset("fedper")
def fedper_parts(*, personal_layers: tuple[str, ...] = ()) -> dict[str, Any]:
    """Personal layers kept on each client, and not sent."""
    layers = tuple(personal_layers)
    return {"terms": (FedPer(personal_layers=layers),), "transforms": (KeepLocal(layers),)}


@preset("ditto")
def ditto_parts(*, lam: float = 0.1) -> dict[str, Any]:
    """A personal model per client, pulled towards the global one with weight ``lam``."""
    return {"terms": (Ditto(lam=lam),)}


def fedper(*, personal_layers: tuple[str, ...] = (), **fedavg_args: Any) -> Algorithm:
    """FedPer (Arivazhagan et al. 2019): FedAvg of the body, personal heads named by
    ``personal_layers`` (parameter-name prefixes; default: the last layer)."""
    return compose("fedper", fedper_parts(personal_layers=personal_layers), fedavg(**fedavg_args))


def ditto(*, lam: float = 0.1, **fedavg_args: Any) -> Algorithm:
    """Ditto (Li et al. 2021): FedAvg for the global model plus a personal model per client
    regularised towards it with weight ``lam``."""
    return compose("ditto", ditto_parts(lam=lam), fedavg(**fedavg_args))
