"""Fixed-width bit packing of small unsigned codes (1 to 8 bits each), most significant bit
first, as NumPy does (``np.packbits``): ``count`` codes of ``bits`` bits take
``ceil(count * bits / 8)`` bytes, the last byte padded with zeros.

Each width is a few whole-array passes over machine words, none over single bits: 2 and 4
bits gather a word's codes into one byte with a multiplication, 3, 5, 6 and 7 bits gather 8
codes into a 64-bit group of ``bits`` bytes.

Example:
    >>> import numpy as np
    >>> buf = pack(np.array([1, 2, 3], dtype=np.uint8), 2)
    >>> buf.tolist(), unpack(buf, 2, 3).tolist()
    ([108], [1, 2, 3])
"""

from __future__ import annotations

import numpy as np

from potluck.core.message import MessageError

# (lane dtype, multiplier, shift): a lane of 8 / bits codes, one a byte (little-endian),
# times the multiplier puts code j at bits ``shift + bits * (per - 1 - j)``, with no carries
GATHER = {4: (np.uint16, 0x1001, 8), 2: (np.uint32, 0x40100401, 24)}


def packed_size(count: int, bits: int) -> int:
    """Bytes of ``count`` codes of ``bits`` bits."""
    return -(-count * bits // 8)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """``codes`` (uint8, each < 2**bits) as ``bits``-bit fields."""
    _check_bits(bits)
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    count = len(codes)
    if bits == 8:
        return codes.copy()
    if bits == 1:
        return np.packbits(codes)
    padded = _padded(codes, 8 // bits if bits in GATHER else 8)
    if bits in GATHER:
        lane, times, shift = GATHER[bits]
        words = padded.view(lane) * lane(times)
        words >>= lane(shift)
        return words.astype(np.uint8)
    groups = np.zeros(len(padded) // 8, dtype=np.uint64)
    for j, column in enumerate(padded.reshape(-1, 8).T):
        groups |= column.astype(np.uint64) << np.uint64(bits * (7 - j) + 64 - 8 * bits)
    wide = groups.byteswap().view(np.uint8).reshape(-1, 8)  # big-endian: the top bytes first
    return wide[:, :bits].reshape(-1)[: packed_size(count, bits)]


def unpack(buf: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The ``count`` codes of ``pack``; a buffer of the wrong length is a ``MessageError``."""
    _check_bits(bits)
    want = packed_size(count, bits)
    if buf.dtype != np.uint8 or buf.shape != (want,):
        raise MessageError(f"{count} codes of {bits} bits take {want} bytes, got {buf.shape}")
    if bits == 8:
        return buf.copy()
    if bits == 1:
        return np.unpackbits(buf, count=count)
    if bits == 4:
        words = buf.astype(np.uint16)
        low = words & np.uint16(0xF)
        low <<= np.uint16(8)
        words >>= np.uint16(4)
        words |= low
        return words.view(np.uint8)[:count]
    if bits == 2:  # byte b: b >> 6, then b's other pairs moved by one multiplication
        words = buf.astype(np.uint32)
        spread = words * np.uint32((1 << 4) | (1 << 14) | (1 << 24))
        spread &= np.uint32(0x03030300)
        words >>= np.uint32(6)
        spread |= words
        return spread.view(np.uint8)[:count]
    groups = -(-count // 8)
    wide = np.zeros((groups, 8), dtype=np.uint8)
    full = np.zeros(groups * bits, dtype=np.uint8)
    full[:want] = buf
    wide[:, :bits] = full.reshape(groups, bits)
    words = wide.view(">u8").reshape(-1).astype(np.uint64) >> np.uint64(64 - 8 * bits)
    out = np.empty((groups, 8), dtype=np.uint8)
    mask = np.uint64((1 << bits) - 1)
    for j in range(8):
        out[:, j] = (words >> np.uint64(bits * (7 - j))) & mask
    return out.reshape(-1)[:count]


def _padded(a: np.ndarray, multiple: int) -> np.ndarray:
    """``a`` (uint8) with zeros up to a multiple of ``multiple`` (itself when it is one)."""
    if len(a) % multiple == 0:
        return a
    out = np.zeros(-(-len(a) // multiple) * multiple, dtype=np.uint8)
    out[: len(a)] = a
    return out


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"codes are 1 to 8 bits wide, got {bits}")
