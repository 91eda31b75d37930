"""The model a deployed site runs: what a model server's ``install`` stage hands it, checked
and kept on disk.

A model server (``potluck models serve``, ``potluck.rollout.serving``) sends each site the
version it should use (the production version, or a canary) as an ``install`` task: the
flat weights ``w`` and the scalars ``model``, ``version`` and ``digest`` (the SHA-256 of the
weights' float32 bytes). The site checks them (``check_install``: the fields, the shape its
task needs, finite values, the digest), writes them atomically to its ``--model-out`` file
(a safetensors checkpoint, the version in its metadata) and answers with the digest it
wrote, so the server knows which version every site runs. ``read_installed`` reads the file
back, verified, for the site's own inference.

Example:
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "model.safetensors"
    >>> digest = write_installed(path, "digits", 3, torch.ones(4))
    >>> got = read_installed(path)
    >>> got.name, got.version, got.digest == digest, got.weights.tolist()
    ('digits', 3, True, [1.0, 1.0, 1.0, 1.0])
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from potluck.core.message import Message, MessageError
from potluck.store.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

INSTALL = "install"  # the stage name a site handles itself, not through its program
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class InstalledModel:
    """A served version: its model name, version number, weights and their digest."""

    name: str
    version: int
    digest: str
    weights: torch.Tensor


def weights_digest(w: torch.Tensor) -> str:
    """SHA-256 (hex) of the weights' contiguous float32 bytes.

    Example:
        >>> weights_digest(torch.zeros(2))[:12]
        'af5570f5a181'
    """
    data = w.detach().to(torch.float32).contiguous().cpu().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


def check_install(message: Message, size: int) -> InstalledModel:
    """The model an ``install`` task carries, or ``MessageError`` naming what is wrong: its
    fields, the shape (``size`` weights), non-finite values, or a digest that does not match
    the weights."""
    arrays, s = message.arrays, message.scalars
    if set(arrays) != {"w"}:
        raise MessageError(f"install: expected one array 'w', got {sorted(arrays)[:4]}")
    name, version, digest = s.get("model"), s.get("version"), s.get("digest")
    if not isinstance(name, str) or not name:
        raise MessageError("install: no model name")
    if not isinstance(version, int) or version < 1:
        raise MessageError(f"install: version must be a positive integer, got {version!r}")
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        raise MessageError("install: digest must be 64 hex digits")
    w = arrays["w"]
    if w.dtype != torch.float32 or tuple(w.shape) != (size,):
        raise MessageError(
            f"install: weights are {w.dtype} {tuple(w.shape)}; this site's task needs "
            f"float32 ({size},)"
        )
    if not bool(torch.isfinite(w).all()):
        raise MessageError("install: the weights contain NaN or Inf")
    if weights_digest(w) != digest:
        raise MessageError("install: the weights do not match their digest")
    return InstalledModel(name, version, digest, w)


def write_installed(path: Path, name: str, version: int, w: torch.Tensor) -> str:
    """Keep ``w`` as version ``version`` of ``name`` at ``path`` (atomically); its digest."""
    digest = weights_digest(w)
    meta = {"model": name, "version": version, "digest": digest}
    save_checkpoint(path, Checkpoint({"w": w.detach().to(torch.float32).cpu()}, meta))
    return digest


def read_installed(path: Path) -> InstalledModel:
    """The model kept at ``path``, verified against its digest (``ValueError`` if not)."""
    ckpt = load_checkpoint(path)
    meta, w = ckpt.meta, ckpt.tensors.get("w")
    name, version, digest = meta.get("model"), meta.get("version"), meta.get("digest")
    if w is None or not isinstance(name, str) or not isinstance(version, int):
        raise ValueError(f"{path}: not a model installed by a potluck model server")
    if weights_digest(w) != digest:
        raise ValueError(f"{path}: the weights do not match their digest")
    return InstalledModel(name, version, digest, w)
