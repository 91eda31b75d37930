"""The protobuf wire format of ``potluck.proto``'s ``Envelope`` and ``Chunk``, read in place.

``potluck.proto`` is the schema; this module encodes and decodes its two messages in the
standard protobuf binary format, so any protobuf implementation can talk to potluck (the
tests check both directions against protobuf's own parser, ``upb``). It exists for speed on
the server's bulk path: decoding returns the arrays' bytes as ``memoryview`` slices of the
received buffer, and encoding returns byte parts that reference the tensors' memory, so a
payload byte is copied once per direction instead of five or six times. It also keeps the
bulk path off ``upb``'s Python allocator, which calls ``malloc_trim(0)`` after every 10,000
freed arenas and so hands the server's buffers back to the kernel to be faulted in again
(BENCHMARKS.md §9).

Decoding follows protobuf's rules: unknown fields are skipped, a repeated field may come in
any number of pieces (``shape`` packed or not), for a singular field the last value wins
(``wire.Prefix`` relies on it). It is strict where protobuf allows nothing else: a
truncated or over-long varint, a length past the end, a known field with the wrong wire
type, groups, invalid UTF-8 in a string, and more than ``max_items`` entries raise
``CodecError``. Whether the values are acceptable is ``wire``'s business.

Example:
    >>> parts = envelope_parts("update", "run-1", 3, b"", "", [("w", "uint8", [2], b"ab")],
    ...                        [("n", 7)])
    >>> env = parse_envelope(memoryview(b"".join(parts)))
    >>> env.kind, env.round, env.arrays[0].shape, bytes(env.arrays[0].data), env.scalars
    ('update', 3, [2], b'ab', [RawScalar(name='n', value=7)])
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_WIRE_NAMES = {0: "varint", 1: "64-bit", 2: "length-delimited", 5: "32-bit"}
_U64 = 1 << 64
_DOUBLE = struct.Struct("<d")
Bytes = bytes | memoryview


class CodecError(ValueError):
    """Bytes that are not a well-formed message of ``potluck.proto``."""


@dataclass
class RawArray:
    """An ``Array`` as decoded: ``data`` is a view of the received buffer."""

    name: str = ""
    dtype: str = ""
    shape: list[int] = field(default_factory=list)
    data: Bytes = b""


@dataclass
class RawScalar:
    """A ``Scalar``; ``value`` is None when the message set none of its oneof fields."""

    name: str = ""
    value: int | float | str | None = None


@dataclass
class RawEnvelope:
    """An ``Envelope`` as decoded (not yet checked)."""

    kind: str = ""
    run_id: str = ""
    round: int = 0
    task_id: bytes = b""
    client: str = ""
    arrays: list[RawArray] = field(default_factory=list)
    scalars: list[RawScalar] = field(default_factory=list)


@dataclass(frozen=True)
class Chunk:
    """A ``Chunk``: ``data`` is a piece of the serialized envelope at ``offset``; the last
    chunk of a stream carries the SHA-256 of the whole."""

    total: int = 0
    offset: int = 0
    data: Bytes = b""
    sha256: bytes = b""


# ---- decoding -------------------------------------------------------------------------------


def parse_chunk(frame: Bytes) -> Chunk:
    """Decode one serialized ``Chunk`` (a gRPC message); ``data`` is a view of ``frame``.

    Example:
        >>> parse_chunk(chunk_frame(5, 0, [b"abc"], b"")).data.tobytes()
        b'abc'
    """
    buf = memoryview(frame)
    total = offset = 0
    data: Bytes = b""
    sha = b""
    for number, wtype, value in _fields(buf, 0, len(buf)):
        if number == 1:
            total = _number(value, wtype, number, "Chunk")
        elif number == 2:
            offset = _number(value, wtype, number, "Chunk")
        elif number == 3:
            data = _view(value, wtype, number, "Chunk")
        elif number == 4:
            sha = _view(value, wtype, number, "Chunk").tobytes()
    return Chunk(total, offset, data, sha)


def parse_envelope(buf: memoryview, max_items: int = 10_000, max_dims: int = 32) -> RawEnvelope:
    """Decode a serialized ``Envelope``; the arrays' ``data`` are views of ``buf``."""
    env = RawEnvelope()
    for number, wtype, value in _fields(buf, 0, len(buf)):
        if number == 3:
            env.round = _int64(_number(value, wtype, number, "Envelope"))
        elif number == 6:
            if len(env.arrays) >= max_items:
                raise CodecError(f"more than {max_items} arrays")
            env.arrays.append(_parse_array(_view(value, wtype, number, "Envelope"), max_dims))
        elif number == 7:
            if len(env.scalars) >= max_items:
                raise CodecError(f"more than {max_items} scalars")
            env.scalars.append(_parse_scalar(_view(value, wtype, number, "Envelope")))
        elif number == 4:
            env.task_id = _view(value, wtype, number, "Envelope").tobytes()
        elif number == 1:
            env.kind = _text(value, wtype, number, "Envelope")
        elif number == 2:
            env.run_id = _text(value, wtype, number, "Envelope")
        elif number == 5:
            env.client = _text(value, wtype, number, "Envelope")
        # other field numbers: unknown, skipped as protobuf does
    return env


def _parse_array(buf: memoryview, max_dims: int) -> RawArray:
    array = RawArray()
    for number, wtype, value in _fields(buf, 0, len(buf)):
        if number == 3:
            if wtype == _VARINT:  # an unpacked dimension
                array.shape.append(_int64(_number(value, wtype, number, "Array")))
            else:
                packed = _view(value, wtype, number, "Array")
                array.shape.extend(_packed(packed, max_dims - len(array.shape)))
            if len(array.shape) > max_dims:
                raise CodecError(
                    f"array {array.name!r} has too many dimensions: at most {max_dims}"
                )
        elif number == 4:
            array.data = _view(value, wtype, number, "Array")
        elif number == 1:
            array.name = _text(value, wtype, number, "Array")
        elif number == 2:
            array.dtype = _text(value, wtype, number, "Array")
    return array


def _parse_scalar(buf: memoryview) -> RawScalar:
    scalar = RawScalar()
    for number, wtype, value in _fields(buf, 0, len(buf)):
        if number == 1:
            scalar.name = _text(value, wtype, number, "Scalar")
        elif number == 2:
            raw = _number(value, wtype, number, "Scalar")
            scalar.value = (raw >> 1) ^ -(raw & 1)  # sint64: zigzag
        elif number == 3:
            _expect(wtype, _I64, number, "Scalar")
            assert isinstance(value, memoryview)
            scalar.value = _DOUBLE.unpack(value)[0]
        elif number == 4:
            scalar.value = _text(value, wtype, number, "Scalar")
    return scalar


def _fields(buf: memoryview, pos: int, end: int) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of each field in ``buf[pos:end]``."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wtype = key >> 3, key & 7
        if number == 0 or number >= 1 << 29:
            raise CodecError(f"invalid field number {number}")
        value: int | memoryview
        if wtype == _VARINT:
            value, pos = _varint(buf, pos, end)
        elif wtype == _LEN:
            size, pos = _varint(buf, pos, end)
            if size > end - pos:
                raise CodecError(f"field {number} claims {size} bytes, {end - pos} remain")
            value, pos = buf[pos : pos + size], pos + size
        elif wtype in (_I64, _I32):
            size = 8 if wtype == _I64 else 4
            if size > end - pos:
                raise CodecError(f"field {number} is truncated")
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise CodecError(f"field {number} has wire type {wtype} (groups are not used)")
        yield number, wtype, value


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise CodecError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
        shift += 7
        if shift >= 70:
            raise CodecError("varint longer than 10 bytes")
    if result >= _U64:
        raise CodecError("varint exceeds 64 bits")
    return result, pos


def _packed(buf: memoryview, room: int) -> list[int]:
    out: list[int] = []
    pos = 0
    while pos < len(buf):
        if len(out) > room:
            break  # the caller reports too many dimensions
        value, pos = _varint(buf, pos, len(buf))
        out.append(_int64(value))
    return out


def _int64(value: int) -> int:
    return value - _U64 if value >= 1 << 63 else value


def _number(value: int | memoryview, wtype: int, number: int, message: str) -> int:
    _expect(wtype, _VARINT, number, message)
    assert isinstance(value, int)
    return value


def _view(value: int | memoryview, wtype: int, number: int, message: str) -> memoryview:
    _expect(wtype, _LEN, number, message)
    assert isinstance(value, memoryview)
    return value


def _text(value: int | memoryview, wtype: int, number: int, message: str) -> str:
    try:
        return str(_view(value, wtype, number, message), "utf-8")
    except UnicodeDecodeError:
        raise CodecError(f"{message} field {number} is not valid UTF-8") from None


def _expect(wtype: int, wanted: int, number: int, message: str) -> None:
    if wtype != wanted:
        raise CodecError(
            f"{message} field {number} has wire type {_WIRE_NAMES[wtype]},"
            f" expected {_WIRE_NAMES[wanted]}"
        )


# ---- encoding -------------------------------------------------------------------------------


def varint(value: int) -> bytes:
    """``value`` (0 <= value < 2**64) as a protobuf varint.

    Example:
        >>> varint(300).hex()
        'ac02'
    """
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(number: int, wtype: int) -> bytes:
    return varint(number << 3 | wtype)


def _len_prefix(number: int, size: int) -> bytes:
    return _key(number, _LEN) + varint(size)


def _text_field(number: int, text: str) -> bytes:
    raw = text.encode()
    return _len_prefix(number, len(raw)) + raw if raw else b""


def envelope_parts(
    kind: str,
    run_id: str,
    round: int,
    task_id: bytes,
    client: str,
    arrays: Sequence[tuple[str, str, Sequence[int], Bytes]],
    scalars: Sequence[tuple[str, int | float | str]],
) -> list[Bytes]:
    """A serialized ``Envelope`` as byte parts (joined, they are the message); array data is
    referenced, not copied. Fields at their default value are left out, as protobuf does."""
    parts: list[Bytes] = [_text_field(1, kind), _text_field(2, run_id)]
    if round:
        parts.append(_key(3, _VARINT) + varint(round % _U64))
    if task_id:
        parts.append(_len_prefix(4, len(task_id)) + task_id)
    parts.append(_text_field(5, client))
    for name, dtype, shape, data in arrays:
        head = _text_field(1, name) + _text_field(2, dtype)
        if shape:
            dims = b"".join(varint(d % _U64) for d in shape)
            head += _len_prefix(3, len(dims)) + dims
        head += _len_prefix(4, len(data)) if len(data) else b""
        parts += [_len_prefix(6, len(head) + len(data)), head, data]
    for name, value in scalars:
        body = _text_field(1, name) + _scalar_value(value)
        parts += [_len_prefix(7, len(body)), body]
    return [p for p in parts if len(p)]


def _scalar_value(value: int | float | str) -> bytes:
    """The oneof field, written even at its default (that is what marks it set)."""
    if isinstance(value, str):
        raw = value.encode()
        return _len_prefix(4, len(raw)) + raw
    if isinstance(value, int):
        return _key(2, _VARINT) + varint(((value << 1) ^ (value >> 63)) % _U64)  # zigzag
    return _key(3, _I64) + _DOUBLE.pack(value)


def chunk_frame(total: int, offset: int, data: Sequence[Bytes], sha256: bytes) -> bytes:
    """One serialized ``Chunk`` whose ``data`` is the concatenation of ``data``.

    Example:
        >>> parse_chunk(chunk_frame(4, 2, [b"a", b"b"], b"")).offset
        2
    """
    size = sum(len(d) for d in data)
    head = b""
    if total:
        head += _key(1, _VARINT) + varint(total)
    if offset:
        head += _key(2, _VARINT) + varint(offset)
    if size:
        head += _len_prefix(3, size)
    tail = _len_prefix(4, len(sha256)) + sha256 if sha256 else b""
    return b"".join([head, *data, tail])
