"""Fixed-width bit packing of small unsigned codes (1 to 8 bits each), most significant bit
first, as NumPy does (``np.packbits``): ``count`` codes of ``bits`` bits take
``ceil(count * bits / 8)`` bytes, the last byte padded with zeros.

Example:
    >>> import numpy as np
    >>> buf = pack(np.array([1, 2, 3], dtype=np.uint8), 2)
    >>> buf.tolist(), unpack(buf, 2, 3).tolist()
    ([108], [1, 2, 3])
"""

from __future__ import annotations

import numpy as np

from potluck.core.message import MessageError


def packed_size(count: int, bits: int) -> int:
    """Bytes of ``count`` codes of ``bits`` bits."""
    return -(-count * bits // 8)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """``codes`` (uint8, each < 2**bits) as ``bits``-bit fields."""
    _check_bits(bits)
    if bits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    if 8 % bits == 0:  # whole codes per byte: shifts and ors, one pass per field
        per = 8 // bits
        rows = np.zeros((packed_size(len(codes), bits), per), dtype=np.uint8)
        rows.reshape(-1)[: len(codes)] = codes
        out = rows[:, 0] << (8 - bits)
        for j in range(1, per):
            out |= rows[:, j] << (8 - bits * (j + 1))
        return out
    fields = np.unpackbits(codes.reshape(-1, 1), axis=1)[:, 8 - bits :]
    return np.packbits(fields.ravel())


def unpack(buf: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The ``count`` codes of ``pack``; a buffer of the wrong length is a ``MessageError``."""
    _check_bits(bits)
    want = packed_size(count, bits)
    if buf.dtype != np.uint8 or buf.shape != (want,):
        raise MessageError(f"{count} codes of {bits} bits take {want} bytes, got {buf.shape}")
    if bits == 8:
        return buf.copy()
    if 8 % bits == 0:
        per, mask = 8 // bits, (1 << bits) - 1
        out = np.empty((len(buf), per), dtype=np.uint8)
        for j in range(per):
            out[:, j] = (buf >> (8 - bits * (j + 1))) & mask
        return out.reshape(-1)[:count]
    fields = np.unpackbits(buf, count=count * bits).reshape(count, bits)
    wide = np.zeros((count, 8), dtype=np.uint8)
    wide[:, 8 - bits :] = fields
    return np.packbits(wide, axis=1).ravel()


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"codes are 1 to 8 bits wide, got {bits}")
