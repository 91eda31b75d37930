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
    ClientSummary,
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
    "ClientSummary",
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
