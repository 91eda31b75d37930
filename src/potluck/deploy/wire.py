"""The wire format: envelopes of named tensors and scalars, serialized and streamed in chunks.

An ``Envelope`` is one logical message between server and client. It is serialized as the
protobuf ``Envelope`` of ``potluck.proto`` (each tensor as its dtype name, shape and raw
little-endian bytes; nothing is pickled) by ``codec``, and streamed as ``Chunk`` messages of
at most ``chunk_bytes`` of it each, so a model of any size passes gRPC's per-message limit.
The last chunk carries the SHA-256 of the whole payload, which the receiver checks; over
mutual TLS, whose records are authenticated, it is optional (``checksum=False`` to send
none, ``verify=False`` not to check it): the offsets and the announced length still catch a
truncated or reordered stream. gRPC moves the chunks as bytes
(``handler``, ``caller``): ``codec`` reads them in place. Everything read from the network
is checked before use: a malformed, truncated, corrupted or oversized input raises
``WireError`` saying what is wrong, never another exception. Whether the *values* are
acceptable (expected shapes, NaN/Inf) is the receiver's business (``Message.validate``;
``finite`` helps).

Example:
    >>> import torch
    >>> env = Envelope("update", "run-1", round=3, arrays={"delta": torch.ones(2)},
    ...                scalars={"num_examples": 10})
    >>> back = receive(send(env, chunk_bytes=16))
    >>> back.kind, back.round, back.arrays["delta"].tolist(), back.scalars
    ('update', 3, [1.0, 1.0], {'num_examples': 10})
"""

from __future__ import annotations

import hashlib
import math
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from potluck.core.message import Message, MessageError
from potluck.deploy import codec
from potluck.deploy.codec import Chunk

if sys.byteorder != "little":  # tensors travel as their raw in-memory bytes
    raise ImportError("potluck.deploy.wire supports little-endian hosts only")

SERVICE = "potluck.v1.Coordinator"  # potluck.proto's service, with its one method
METHOD = f"/{SERVICE}/Call"
DEFAULT_CHUNK_BYTES = 1 << 20
DEFAULT_MAX_BYTES = 256 << 20
MAX_ITEMS = 10_000
MAX_NAME = 200
MAX_TASK_ID = 64
MAX_DIMS = 32
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
ALLOWED_DTYPES = frozenset(_DTYPES)
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_KIND = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SINT64 = (-(1 << 63), (1 << 63) - 1)


class WireError(MessageError):
    """A malformed, truncated, corrupted or oversized message on the wire."""


@dataclass(frozen=True)
class Envelope:
    """One logical message; checked on construction, so every envelope can be encoded.

    Example:
        >>> Envelope("poll", "run-1", client="site-a").nbytes
        0
        >>> Envelope("poll", round=-1)
        Traceback (most recent call last):
        ...
        potluck.deploy.wire.WireError: round is -1, must be in 0..2**63-1
    """

    kind: str
    run_id: str = ""
    round: int = 0
    task_id: bytes = b""
    client: str = ""
    arrays: Mapping[str, torch.Tensor] = field(default_factory=dict)
    scalars: Mapping[str, int | float | str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_fields(self)

    @property
    def nbytes(self) -> int:
        """Payload bytes of the arrays."""
        return sum(a.numel() * a.element_size() for a in self.arrays.values())

    def message(self) -> Message:
        """The arrays and scalars as a ``Message``.

        Example:
            >>> Envelope("update", scalars={"num_examples": 4}).message().scalar("num_examples")
            4.0
        """
        return Message(arrays=dict(self.arrays), scalars=dict(self.scalars))


def finite(env: Envelope) -> str | None:
    """The name of the first array holding NaN or Inf, or None if all are finite.

    Example:
        >>> arrays = {"a": torch.zeros(2), "b": torch.tensor([1.0, math.inf])}
        >>> finite(Envelope("update", arrays=arrays))
        'b'
    """
    for name, array in env.arrays.items():
        if array.is_floating_point() and not bool(torch.isfinite(array).all()):
            return name
    return None


def encode(env: Envelope) -> bytes:
    """The serialized protobuf ``Envelope``.

    Example:
        >>> decode(encode(Envelope("wait", "run-1"))).run_id
        'run-1'
    """
    return b"".join(_parts(env))


def _parts(env: Envelope) -> list[codec.Bytes]:
    arrays = []
    for name, array in env.arrays.items():
        flat = array.detach().cpu().contiguous().reshape(-1)
        data = flat.view(torch.uint8).numpy().data  # the tensor's memory, not a copy
        arrays.append((name, _NAMES[array.dtype], list(array.shape), data))
    return codec.envelope_parts(
        env.kind, env.run_id, env.round, env.task_id, env.client, arrays, list(env.scalars.items())
    )


@dataclass(frozen=True)
class Encoded:
    """An encoded envelope kept as byte parts (a prefix shared by many messages, then the
    message's own fields) with the SHA-256 of their concatenation.

    Protobuf merges concatenated messages (repeated fields append, scalar fields take the last
    value), so a round's global weights are serialized and hashed once and every task only adds
    its own small fields (``Prefix.extend``).

    Example:
        >>> shared = Prefix(Envelope("task", arrays={"w": torch.zeros(3)}))
        >>> enc = shared.extend(Envelope("task", "run-1", round=2, scalars={"work": 1.0}))
        >>> env = receive(send_encoded(enc, 16))
        >>> env.run_id, env.round, list(env.arrays), env.scalars["work"]
        ('run-1', 2, ['w'], 1.0)
    """

    parts: tuple[bytes, ...]
    digest: bytes

    @property
    def nbytes(self) -> int:
        return sum(len(p) for p in self.parts)


class Prefix:
    """The encoded fields many envelopes share (a round's weights), hashed once."""

    def __init__(self, env: Envelope) -> None:
        self.data = encode(env)
        self._hash = hashlib.sha256(self.data)

    def extend(self, env: Envelope) -> Encoded:
        """``env``'s fields after the shared ones (``env``'s scalar fields win)."""
        own = encode(env)
        h = self._hash.copy()
        h.update(own)
        return Encoded((self.data, own), h.digest())


def send_encoded(enc: Encoded, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    """``enc`` as serialized ``Chunk`` messages, each copying its piece of the parts once."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    total, offset = enc.nbytes, 0
    if total == 0:
        yield codec.chunk_frame(0, 0, [], enc.digest)
        return
    for piece in _pieces(enc.parts, chunk_bytes):
        size = sum(len(p) for p in piece)
        last = offset + size == total
        yield codec.chunk_frame(total, offset, piece, enc.digest if last else b"")
        offset += size


def _pieces(parts: tuple[bytes, ...], size: int) -> Iterator[list[memoryview]]:
    """Consecutive ``size``-byte pieces of the concatenated ``parts`` (the last shorter),
    each as views of the parts."""
    pending: list[memoryview] = []
    held = 0
    for part in parts:
        view = memoryview(part)
        while len(view):
            take = min(size - held, len(view))
            pending.append(view[:take])
            held += take
            view = view[take:]
            if held == size:
                yield pending
                pending, held = [], 0
    if held:
        yield pending


def decode(data: bytes | bytearray | memoryview, max_bytes: int = DEFAULT_MAX_BYTES) -> Envelope:
    """Parse and check a serialized ``Envelope``. The tensors are writable: views of ``data``
    if it is writable (``receive`` hands over a buffer nothing else holds), else copies.

    Example:
        >>> decode(b"\\x12")
        Traceback (most recent call last):
        ...
        potluck.deploy.wire.WireError: not a valid Envelope: truncated varint
    """
    if len(data) > max_bytes:
        raise WireError(f"envelope of {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    view = memoryview(data)
    try:
        raw = codec.parse_envelope(view, MAX_ITEMS, MAX_DIMS)
    except codec.CodecError as exc:
        raise WireError(f"not a valid Envelope: {exc}") from None
    copy = view.readonly
    arrays = _unique("array", ((a.name, _tensor(a, max_bytes, copy)) for a in raw.arrays))
    scalars = _unique("scalar", ((s.name, _scalar(s)) for s in raw.scalars))
    return Envelope(
        raw.kind, raw.run_id, raw.round, raw.task_id, raw.client, arrays=arrays, scalars=scalars
    )


def to_chunks(
    data: bytes, chunk_bytes: int = DEFAULT_CHUNK_BYTES, checksum: bool = True
) -> Iterator[Chunk]:
    """``data`` as ``Chunk`` messages; the last carries the SHA-256 of the whole (none
    without ``checksum``).

    Example:
        >>> [(c.offset, len(c.data), len(c.sha256)) for c in to_chunks(b"abcde", 2)]
        [(0, 2, 0), (2, 2, 0), (4, 1, 32)]
    """
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    return _chunks(data, chunk_bytes, checksum)


def _chunks(data: bytes, chunk_bytes: int, checksum: bool) -> Iterator[Chunk]:
    total, digest = len(data), hashlib.sha256(data).digest() if checksum else b""
    last = max(total - 1, 0) // chunk_bytes * chunk_bytes
    view = memoryview(data)
    for offset in range(0, last + 1, chunk_bytes):
        piece = view[offset : offset + chunk_bytes]
        yield Chunk(total, offset, piece, digest if offset == last else b"")


def frame(chunk: Chunk) -> bytes:
    """``chunk`` serialized (what one gRPC message carries).

    Example:
        >>> codec.parse_chunk(frame(Chunk(3, 0, b"abc"))).total
        3
    """
    return codec.chunk_frame(chunk.total, chunk.offset, [chunk.data], chunk.sha256)


def from_chunks(
    chunks: Iterable[Chunk], max_bytes: int = DEFAULT_MAX_BYTES, verify: bool = True
) -> bytearray:
    """Reassemble and check a chunk stream (its SHA-256 too, with ``verify``); stops at the
    first bad chunk.

    Example:
        >>> from_chunks(to_chunks(b"abcde", 2))
        bytearray(b'abcde')
        >>> from_chunks(list(to_chunks(b"abcde", 2))[:2])
        Traceback (most recent call last):
        ...
        potluck.deploy.wire.WireError: stream ended after 4 of 5 bytes (truncated)
        >>> from_chunks(to_chunks(b"abc", 2, checksum=False), verify=False)
        bytearray(b'abc')
    """
    pieces: list[codec.Bytes] = []
    sha = hashlib.sha256() if verify else None
    total = filled = 0
    digest = b""
    for i, chunk in enumerate(chunks):
        data = chunk.data
        if i == 0:
            total = chunk.total
            if total > max_bytes:
                raise WireError(f"envelope of {total} bytes exceeds the limit of {max_bytes} bytes")
        elif chunk.total != total:
            raise WireError(f"chunk {i} announces {chunk.total} bytes, the first {total}")
        elif filled == total:
            raise WireError(f"chunk {i} arrives after all {total} bytes")
        if chunk.offset != filled:
            raise WireError(
                f"chunk {i} starts at offset {chunk.offset}, expected {filled}"
                " (chunks reordered, overlapping or missing)"
            )
        end = filled + len(data)
        if end > total:
            raise WireError(f"chunk {i} carries data past the announced {total} bytes")
        if end == filled and total:
            raise WireError(f"chunk {i} is empty")
        if sha is not None:
            sha.update(data)  # while the piece is in cache
        pieces.append(data)
        filled, digest = end, chunk.sha256
    if not pieces:
        raise WireError("empty stream: no chunks")
    if filled < total:
        raise WireError(f"stream ended after {filled} of {total} bytes (truncated)")
    if sha is not None and not digest:
        raise WireError("the last chunk carries no sha256 checksum")
    if sha is not None and sha.digest() != digest:
        raise WireError("sha256 checksum mismatch: the payload is corrupted")
    return bytearray().join(pieces)  # one copy, into a buffer decoded tensors may view


def send(
    env: Envelope, chunk_bytes: int = DEFAULT_CHUNK_BYTES, checksum: bool = True
) -> Iterator[bytes]:
    """``env`` serialized and cut into ``Chunk`` messages (what a gRPC stream carries)."""
    return (frame(c) for c in to_chunks(encode(env), chunk_bytes, checksum))


def receive(
    frames: Iterable[bytes], max_bytes: int = DEFAULT_MAX_BYTES, verify: bool = True
) -> Envelope:
    """The envelope carried by a stream of serialized chunks, checked (``from_chunks`` +
    ``decode``; its SHA-256 with ``verify``)."""
    return decode(from_chunks(_parsed(frames), max_bytes, verify), max_bytes)


def _parsed(frames: Iterable[bytes]) -> Iterator[Chunk]:
    for i, data in enumerate(frames):
        try:
            yield codec.parse_chunk(data)
        except codec.CodecError as exc:
            raise WireError(f"chunk {i} is not a valid Chunk: {exc}") from None


def handler(call: Callable[[Iterator[bytes], Any], Iterator[bytes]]) -> Any:
    """A gRPC handler serving ``call`` as ``Coordinator.Call``, chunks passed as bytes."""
    method = grpc.stream_stream_rpc_method_handler(call)
    return grpc.method_handlers_generic_handler(SERVICE, {"Call": method})


def caller(channel: Any) -> Callable[..., Iterator[bytes]]:
    """``Coordinator.Call`` on ``channel``: serialized chunks in, serialized chunks out.

    Example:
        >>> import grpc
        >>> call = caller(grpc.insecure_channel("localhost:1"))
        >>> # receive(call(send(Envelope("poll", "run-1", client="a")), timeout=5))
    """
    return channel.stream_stream(METHOD)


def _check_fields(env: Envelope) -> None:
    if not isinstance(env.kind, str) or not _KIND.fullmatch(env.kind):
        raise WireError(f"kind {env.kind!r} is not an identifier of at most 64 characters")
    _check_text("run_id", env.run_id)
    _check_text("client", env.client)
    if isinstance(env.round, bool) or not isinstance(env.round, int):
        raise WireError(f"round is {type(env.round).__name__}, must be int")
    if not 0 <= env.round <= _SINT64[1]:
        raise WireError(f"round is {env.round}, must be in 0..2**63-1")
    if not isinstance(env.task_id, bytes) or len(env.task_id) > MAX_TASK_ID:
        raise WireError(f"task_id must be at most {MAX_TASK_ID} bytes")
    for what, items in (("arrays", env.arrays), ("scalars", env.scalars)):
        if len(items) > MAX_ITEMS:
            raise WireError(f"{len(items)} {what}, at most {MAX_ITEMS}")
        for name in items:
            _check_name(what[:-1], name)
    for name, array in env.arrays.items():
        if not isinstance(array, torch.Tensor) or array.dtype not in _NAMES:
            kind = array.dtype if isinstance(array, torch.Tensor) else type(array).__name__
            raise WireError(f"array {name!r} is {kind}; allowed dtypes: {sorted(ALLOWED_DTYPES)}")
    for name, value in env.scalars.items():
        _check_scalar(name, value)


def _check_text(what: str, text: object) -> None:
    if not isinstance(text, str) or len(text) > MAX_NAME or _CONTROL.search(text):
        raise WireError(f"{what} {text!r} is not a string of at most {MAX_NAME} printable chars")


def _check_name(what: str, name: object) -> None:
    if not isinstance(name, str) or not name:
        raise WireError(f"{what} name {name!r} is empty or not a string")
    _check_text(f"{what} name", name)


def _check_scalar(name: str, value: object) -> None:
    if isinstance(value, int) and not _SINT64[0] <= value <= _SINT64[1]:
        raise WireError(f"scalar {name!r} = {value} does not fit in 64 bits")
    if not isinstance(value, int | float | str):
        raise WireError(f"scalar {name!r} is {type(value).__name__}, not int, float or str")


def _unique(what: str, items: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in items:
        if name in out:
            raise WireError(f"duplicate {what} name {name!r}")
        out[name] = value
    return out


def _tensor(array: codec.RawArray, max_bytes: int, copy: bool) -> torch.Tensor:
    name, shape, data = array.name, list(array.shape), array.data
    dtype = _DTYPES.get(array.dtype)
    if dtype is None:
        raise WireError(
            f"array {name!r} has dtype {array.dtype!r}; allowed: {sorted(ALLOWED_DTYPES)}"
        )
    if len(shape) > MAX_DIMS or any(not 0 <= d <= max_bytes for d in shape):
        raise WireError(
            f"array {name!r} has shape {shape[: MAX_DIMS + 1]}: dimensions must be 0..{max_bytes},"
            f" at most {MAX_DIMS} of them"
        )
    itemsize = dtype.itemsize
    if math.prod(shape) * itemsize != len(data):
        raise WireError(
            f"array {name!r} of shape {shape} and dtype {array.dtype} needs"
            f" {math.prod(shape) * itemsize} bytes, got {len(data)}"
        )
    if dtype == torch.bool and bytes(data).translate(None, b"\x00\x01"):
        raise WireError(f"array {name!r} of dtype bool holds bytes other than 0 and 1")
    if not data:
        return torch.empty(shape, dtype=dtype)
    buffer = bytearray(data) if copy else data  # a view may be unaligned: x86 and torch allow it
    return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


def _scalar(scalar: codec.RawScalar) -> int | float | str:
    if scalar.value is None:
        raise WireError(f"scalar {scalar.name!r} has no value")
    return scalar.value
