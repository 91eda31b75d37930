"""Checkpoints: named tensors plus JSON metadata in one safetensors file, written atomically.

Nothing is ever unpickled: the file is a safetensors header (JSON) and raw tensor bytes, and
the metadata travels as JSON text under the ``"potluck"`` header key.

Example:
    >>> import tempfile, torch
    >>> path = Path(tempfile.mkdtemp()) / "round-000001.safetensors"
    >>> digest = save_checkpoint(path, Checkpoint({"global": torch.zeros(3)}, {"round": 1}))
    >>> ckpt = load_checkpoint(path)
    >>> ckpt.meta, ckpt.tensors["global"].tolist()
    ({'round': 1}, [0.0, 0.0, 0.0])
    >>> digest == hashlib.sha256(path.read_bytes()).hexdigest()
    True
"""

from __future__ import annotations

import hashlib
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


class DamagedCheckpointError(CheckpointError):
    """A recorded checkpoint whose file does not verify against its row in the run store.

    ``problem`` says which file, which round and what is wrong (``reason`` is the first of
    ``"unreadable"``, ``"round mismatch"``, ``"checksum mismatch"``); the message adds what
    to do about it. ``earlier`` is the newest earlier round whose checkpoint verifies
    (``None`` if none does), ``last_round`` the run's last committed round.
    """

    def __init__(
        self,
        problem: str,
        *,
        path: Path,
        round: int,
        reason: str,
        advice: str = "",
        earlier: int | None = None,
        last_round: int | None = None,
    ) -> None:
        super().__init__(f"{problem}. {advice}" if advice else problem)
        self.problem, self.path, self.round, self.reason = problem, path, round, reason
        self.earlier, self.last_round = earlier, last_round


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """Named tensors (e.g. ``"global"``, ``"server/momentum"``) and JSON-serialisable metadata.

    Example:
        >>> Checkpoint({"global": torch.ones(2)}, {"round": 3}).meta["round"]
        3
    """

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> str:
    """Write ``ckpt`` to ``path`` atomically (a reader sees the old file or the new one,
    whole) and return the SHA-256 (hex) of the bytes written.

    The bytes go to a temporary file ``.<name>.<hex>.tmp`` in the same directory, are
    flushed and fsynced, then ``os.replace`` puts them in place and the directory is fsynced.

    Example:
        >>> import tempfile
        >>> len(save_checkpoint(Path(tempfile.mkdtemp()) / "c.safetensors", Checkpoint({}, {})))
        64
    """
    path = Path(path)
    data = _encode(ckpt)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data, mode=0o600)
    return hashlib.sha256(data).hexdigest()


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and validate the checkpoint at ``path`` (never unpickles).

    Raises ``FileNotFoundError`` if it is missing and ``CheckpointError`` if it is corrupt,
    truncated or not a potluck checkpoint; both messages name the path.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "c.safetensors"
        >>> _ = save_checkpoint(p, Checkpoint({"w": torch.arange(2)}, {"a": 1}))
        >>> load_checkpoint(p).tensors["w"].tolist()
        [0, 1]
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None
    return parse_checkpoint(data, path)


def parse_checkpoint(data: bytes, path: str | Path) -> Checkpoint:
    """The checkpoint in ``data`` (the bytes of the file at ``path``, which only names it in
    errors); ``CheckpointError`` if they are corrupt, truncated or not a potluck checkpoint.

    Example:
        >>> try:
        ...     parse_checkpoint(b"garbage", "x.safetensors")
        ... except CheckpointError as err:
        ...     print(err)
        checkpoint x.safetensors is truncated (7 bytes)
    """
    try:
        return _parse(data)
    except CheckpointError as err:
        raise CheckpointError(f"checkpoint {path} {err}") from None


def _parse(data: bytes) -> Checkpoint:
    """The checkpoint in ``data``; ``CheckpointError("is ...")`` saying what is wrong."""
    meta = _read_meta(data)
    try:
        tensors = _load_tensors(data)
    except SafetensorError as err:
        raise CheckpointError(f"is corrupt or truncated ({err})") from None
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


def _read_meta(data: bytes) -> dict[str, Any]:
    """Parse the safetensors header by hand and return the potluck metadata."""
    if len(data) < _HEADER_LEN_BYTES:
        raise CheckpointError(f"is truncated ({len(data)} bytes)")
    size = int.from_bytes(data[:_HEADER_LEN_BYTES], "little")
    if _HEADER_LEN_BYTES + size > len(data):
        raise CheckpointError("is truncated or not a safetensors file")
    try:
        header = json.loads(data[_HEADER_LEN_BYTES : _HEADER_LEN_BYTES + size])
        meta = json.loads(header["__metadata__"][META_KEY])
    except (ValueError, KeyError, TypeError):
        raise CheckpointError("is not a potluck checkpoint (no valid metadata)") from None
    if not isinstance(meta, dict):
        raise CheckpointError("is not a potluck checkpoint (metadata is not an object)")
    return meta
