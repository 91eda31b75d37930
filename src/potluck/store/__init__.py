"""potluck.store: the run store (SQLite) and safetensors checkpoints."""

from potluck.store.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from potluck.store.sqlite import (
    AmbiguousRunError,
    RoundRecord,
    RunInfo,
    RunStore,
    UnknownRunError,
)

__all__ = [
    "AmbiguousRunError",
    "Checkpoint",
    "CheckpointError",
    "RoundRecord",
    "RunInfo",
    "RunStore",
    "UnknownRunError",
    "load_checkpoint",
    "save_checkpoint",
]
