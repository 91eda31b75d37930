"""Durable file writes.

Example:
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "key.pem"
    >>> atomic_write(path, b"secret", mode=0o600)
    >>> oct(path.stat().st_mode & 0o777), path.read_bytes()
    ('0o600', b'secret')
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a
    part: a temporary file beside it, created with ``mode`` (so a key is never readable by
    others, not even briefly), fsynced, renamed over ``path``, and the directory fsynced."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
