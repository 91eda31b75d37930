"""Server optimizers: how the aggregate moves the global model."""

from potluck.optim.sgd import ServerSGD

__all__ = ["ServerSGD"]
