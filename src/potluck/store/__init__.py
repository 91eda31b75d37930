"""potluck.store: the run store (SQLite) and safetensors checkpoints."""

from potluck.store.checkpoint import (
    Checkpoint,
    CheckpointError,
    DamagedCheckpointError,
    load_checkpoint,
    parse_checkpoint,
    save_checkpoint,
)
from potluck.store.sqlite import (
    AmbiguousRunError,
    ResumePoint,
    RoundRecord,
    RunInfo,
    RunStore,
    StoreError,
    UnknownRunError,
)

__all__ = [
    "AmbiguousRunError",
    "Checkpoint",
    "CheckpointError",
    "DamagedCheckpointError",
    "ResumePoint",
    "RoundRecord",
    "RunInfo",
    "RunStore",
    "StoreError",
    "UnknownRunError",
    "load_checkpoint",
    "parse_checkpoint",
    "save_checkpoint",
]
