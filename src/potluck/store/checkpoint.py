"""Checkpoints: named tensors plus JSON metadata in one safetensors file, written atomically.

Nothing is ever unpickled: the file is a safetensors header (JSON) and raw tensor bytes, and
the metadata travels as JSON text under the ``"potluck"`` header key.

Example:
    >>> import tempfile, torch
    >>> path = Path(tempfile.mkdtemp()) / "round-000001.safetensors"
    >>> save_checkpoint(path, Checkpoint({"global": torch.zeros(3)}, {"round": 1}))
    >>> ckpt = load_checkpoint(path)
    >>> ckpt.meta, ckpt.tensors["global"].tolist()
    ({'round': 1}, [0.0, 0.0, 0.0])
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _load_tensors
from safetensors.torch import save as _save_tensors

from potluck.core.files import atomic_write

META_KEY = "potluck"
_HEADER_LEN_BYTES = 8


class CheckpointError(ValueError):
    """A file that is not a readable potluck checkpoint (corrupt, truncated or foreign)."""


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """Named tensors (e.g. ``"global"``, ``"server/momentum"``) and JSON-serialisable metadata.

    Example:
        >>> Checkpoint({"global": torch.ones(2)}, {"round": 3}).meta["round"]
        3
    """

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` to ``path`` atomically: a reader sees the old file or the new one, whole.

    The bytes go to a temporary file in the same directory, are flushed and fsynced, then
    ``os.replace`` puts them in place and the directory is fsynced.

    Example:
        >>> import tempfile
        >>> save_checkpoint(Path(tempfile.mkdtemp()) / "c.safetensors", Checkpoint({}, {}))
    """
    path = Path(path)
    data = _encode(ckpt)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data, mode=0o600)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and validate the checkpoint at ``path`` (never unpickles).

    Raises ``FileNotFoundError`` if it is missing and ``CheckpointError`` if it is corrupt,
    truncated or not a potluck checkpoint; both messages name the path.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "c.safetensors"
        >>> save_checkpoint(p, Checkpoint({"w": torch.arange(2)}, {"a": 1}))
        >>> load_checkpoint(p).tensors["w"].tolist()
        [0, 1]
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None
    meta = _read_meta(data, path)
    try:
        tensors = _load_tensors(data)
    except SafetensorError as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {err}") from None
    return Checkpoint(tensors=dict(tensors), meta=meta)


def _encode(ckpt: Checkpoint) -> bytes:
    for name in ckpt.tensors:
        if not isinstance(name, str) or not name:
            raise TypeError(f"checkpoint tensor names must be non-empty strings, got {name!r}")
    try:
        meta = json.dumps(ckpt.meta)
    except (TypeError, ValueError) as err:
        raise TypeError(f"checkpoint meta must be JSON-serialisable: {err}") from None
    tensors = {k: v.detach().cpu().contiguous() for k, v in ckpt.tensors.items()}
    return _save_tensors(tensors, metadata={META_KEY: meta})


def _read_meta(data: bytes, path: Path) -> dict[str, Any]:
    """Parse the safetensors header by hand and return the potluck metadata."""
    if len(data) < _HEADER_LEN_BYTES:
        raise CheckpointError(f"checkpoint {path} is truncated ({len(data)} bytes)")
    size = int.from_bytes(data[:_HEADER_LEN_BYTES], "little")
    if _HEADER_LEN_BYTES + size > len(data):
        raise CheckpointError(f"checkpoint {path} is truncated or not a safetensors file")
    try:
        header = json.loads(data[_HEADER_LEN_BYTES : _HEADER_LEN_BYTES + size])
        meta = json.loads(header["__metadata__"][META_KEY])
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path} is not a potluck checkpoint (no valid metadata)") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is not a potluck checkpoint (metadata is not an object)")
    return meta
