"""Server optimizers: how the aggregate moves the global model."""

from potluck.optim.adaptive import ServerAdagrad, ServerAdam, ServerYogi
from potluck.optim.base import ServerOptimizer
from potluck.optim.sgd import ServerSGD

__all__ = ["ServerAdagrad", "ServerAdam", "ServerOptimizer", "ServerSGD", "ServerYogi"]
