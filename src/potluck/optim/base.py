"""The server optimizer protocol (``potluck.core.parts.ServerOptimizer``): explicit state
in, new weights and state out. ``step`` treats the aggregated mean delta as the negative of
a pseudo-gradient. State is a dict of tensors so it checkpoints with safetensors."""

from potluck.core.parts import ServerOptimizer, State

__all__ = ["ServerOptimizer", "State"]
