"""q-FedAvg (Li, Sanjabi, Beirami, Smith 2020, "Fair Resource Allocation in Federated
Learning", ICLR): FedAvg's round structure with the q-FFL term, so that larger ``q`` gives
more weight to the clients the global model serves worst. The term needs the plain server
step (server SGD with lr 1): any other server optimizer is refused when the algorithm is
built.

Example:
    >>> algo = qffl(q=1.0, clients_per_round=10, epochs=1, batch_size=10, lr=0.1)
    >>> algo.name, algo.terms[0].q, algo.server.lr
    ('qffl', 1.0, 1.0)
"""

from __future__ import annotations

from typing import Any

from potluck.algorithms.base import Algorithm, preset
from potluck.algorithms.fedavg import compose, fedavg
from potluck.client.terms import QFFL


@preset("qffl")
def qffl_parts(*, q: float = 1.0) -> dict[str, Any]:
    """The q-FFL term with fairness parameter ``q``."""
    return {"terms": (QFFL(q=q),)}


def qffl(*, q: float = 1.0, **fedavg_args: Any) -> Algorithm:
    """q-FedAvg with fairness parameter ``q``; other arguments as for ``fedavg``."""
    return compose("qffl", qffl_parts(q=q), fedavg(**fedavg_args))
