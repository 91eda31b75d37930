"""SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning", ICML): FedAvg with control variates that correct client drift. The
client control variates ``c_i`` persist per client in the run store (and so in resumes).

Example:
    >>> algo = scaffold(clients_per_round=10, epochs=10, batch_size=64, lr=0.01)
    >>> algo.name, algo.terms
    ('scaffold', (Scaffold(momentum=None),))
"""

from __future__ import annotations

from typing import Any

from potluck.algorithms.base import Algorithm, preset
from potluck.algorithms.fedavg import compose, fedavg
from potluck.client.terms import Scaffold


@preset("scaffold")
def scaffold_parts() -> dict[str, Any]:
    """The control-variate term (option II; its momentum: the local optimizer's)."""
    return {"terms": (Scaffold(),)}


def scaffold(**fedavg_args: Any) -> Algorithm:
    """SCAFFOLD (option II control variates); arguments as for ``fedavg`` (the local momentum
    sets the control variates' step normaliser)."""
    return compose("scaffold", scaffold_parts(), fedavg(**fedavg_args))
