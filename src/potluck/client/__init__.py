"""Local training rules and the client program that engines run."""

from potluck.client.program import ClientProgram
from potluck.client.sgd import LocalSGD

__all__ = ["ClientProgram", "LocalSGD"]
