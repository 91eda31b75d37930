"""Local training: the base optimizer, the chain of gradient terms and the client program
that every engine runs."""

from potluck.client.personal import Ditto, FedPer
from potluck.client.program import ClientProgram
from potluck.client.sgd import LocalSGD
from potluck.client.terms import QFFL, FedNova, FedProx, Scaffold, Term

__all__ = [
    "QFFL",
    "ClientProgram",
    "Ditto",
    "FedNova",
    "FedPer",
    "FedProx",
    "LocalSGD",
    "Scaffold",
    "Term",
]
