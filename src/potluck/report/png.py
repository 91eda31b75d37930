"""PNG images in plain Python (``zlib`` and ``struct``; no imaging library): a row of small
images, upscaled so that an 8x8 digit can be seen.

Example:
    >>> data = png_bytes(np.zeros((2, 3), np.uint8))
    >>> data[:8] == PNG_SIGNATURE, struct.unpack(">II", data[16:24])
    (True, (3, 2))
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

__all__ = ["PNG_SIGNATURE", "image_row", "png_bytes"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_bytes(pixels: np.ndarray) -> bytes:
    """An 8-bit PNG of ``pixels``: ``(H, W)`` grey or ``(H, W, 3)`` RGB, dtype uint8."""
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
        raise ValueError(
            f"png_bytes needs a uint8 (H, W) or (H, W, 3) array, got {pixels.dtype} {pixels.shape}"
        )
    if pixels.ndim == 3 and pixels.shape[2] != 3:
        raise ValueError(f"colour images need 3 channels, got {pixels.shape[2]}")
    height, width = pixels.shape[:2]
    colour = 2 if pixels.ndim == 3 else 0
    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    rows = np.ascontiguousarray(pixels).reshape(height, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 per scanline
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw, 9))
        + _chunk(b"IEND", b"")
    )


def image_row(
    images: np.ndarray, bounds: tuple[float, float], scale: int = 1, gap: int = 2
) -> np.ndarray:
    """``(B, C, H, W)`` images with values in ``bounds`` side by side as one uint8 picture
    (grey for 1 channel, RGB for 3), each pixel a ``scale x scale`` block, ``gap`` white
    pixels between images.

    Example:
        >>> row = image_row(np.ones((2, 1, 2, 2)), (0.0, 1.0), scale=3, gap=1)
        >>> row.shape, int(row.min()), int(row.max())
        ((6, 13), 255, 255)
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"image_row needs (B, 1 or 3, H, W) images, got {images.shape}")
    lo, hi = bounds
    unit = np.clip((np.asarray(images, dtype=np.float64) - lo) / (hi - lo), 0, 1)
    pixels = np.rint(unit * 255).astype(np.uint8)
    pixels = pixels.repeat(scale, axis=2).repeat(scale, axis=3).transpose(0, 2, 3, 1)
    b, h, w, c = pixels.shape
    out = np.full((h, b * w + (b - 1) * gap, c), 255, dtype=np.uint8)
    for i in range(b):
        out[:, i * (w + gap) : i * (w + gap) + w] = pixels[i]
    return out[:, :, 0] if c == 1 else out
