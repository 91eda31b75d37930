"""Personalised federated learning as compositions: FedPer and Ditto.

Examples:
    >>> fedper(clients_per_round=5).rule.client_state
    ('head',)
    >>> ditto(lam=0.5, clients_per_round=5).rule.personal_lambda
    0.5
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from potluck.algorithms.base import Algorithm
from potluck.algorithms.fedavg import fedavg
from potluck.client.personal import Ditto, FedPer


def fedper(*, personal_layers: tuple[str, ...] = (), **fedavg_args: Any) -> Algorithm:
    """FedPer (Arivazhagan et al. 2019): FedAvg of the body, personal heads named by
    ``personal_layers`` (parameter-name prefixes; default: the last layer)."""
    return replace(
        fedavg(**fedavg_args), name="fedper", rule=FedPer(personal_layers=personal_layers)
    )


def ditto(*, lam: float = 0.1, **fedavg_args: Any) -> Algorithm:
    """Ditto (Li et al. 2021): FedAvg for the global model plus a personal model per client
    regularised towards it with weight ``lam``."""
    return replace(fedavg(**fedavg_args), name="ditto", rule=Ditto(personal_lambda=lam))
