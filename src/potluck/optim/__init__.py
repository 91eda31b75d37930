"""Server optimizers: how the aggregate moves the global model."""

from potluck.optim.adaptive import ServerAdagrad, ServerAdam, ServerYogi
from potluck.optim.sgd import ServerSGD

__all__ = ["ServerAdagrad", "ServerAdam", "ServerSGD", "ServerYogi"]
