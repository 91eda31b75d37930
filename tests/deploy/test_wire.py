"""The wire format: round trips, limits, malformed input (structured and fuzzed), gRPC loopback."""

from __future__ import annotations

import hashlib
import importlib.util
import math
import struct
import subprocess
import sys
from collections.abc import Iterable, Iterator
from concurrent import futures
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from proto_oracle import pb

from potluck.core import records
from potluck.core.message import Message, MessageError
from potluck.core.records import StageJob
from potluck.deploy import codec, wire
from potluck.deploy.wire import Envelope, WireError

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SINT64 = st.integers(-(1 << 63), (1 << 63) - 1)
NAME_CHARS = st.characters(blacklist_categories=("Cc", "Cs"))
NAMES = st.text(NAME_CHARS, min_size=1, max_size=30)
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(sorted(wire.ALLOWED_DTYPES)))
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    torch_dtype = getattr(torch, dtype)
    size = math.prod(shape) * torch_dtype.itemsize
    raw = bytearray(draw(st.binary(min_size=size, max_size=size)))
    if dtype == "bool":
        raw = bytearray(b & 1 for b in raw)
    if not raw:
        return torch.empty(shape, dtype=torch_dtype)
    return torch.frombuffer(raw, dtype=torch_dtype).reshape(shape)


@st.composite
def envelopes(draw: st.DrawFn) -> Envelope:
    return Envelope(
        kind=draw(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,63}", fullmatch=True)),
        run_id=draw(st.text(NAME_CHARS, max_size=200)),
        round=draw(st.integers(0, (1 << 63) - 1)),
        task_id=draw(st.binary(max_size=64)),
        client=draw(st.text(NAME_CHARS, max_size=20)),
        arrays=draw(st.dictionaries(NAMES, tensors(), max_size=4)),
        scalars=draw(st.dictionaries(NAMES, st.one_of(SINT64, st.floats(), TEXT), max_size=6)),
    )


def assert_same(a: Envelope, b: Envelope) -> None:
    """Equal field by field; tensors and floats bit for bit (NaN payloads included)."""
    assert (a.kind, a.run_id, a.round, a.task_id, a.client) == (
        b.kind,
        b.run_id,
        b.round,
        b.task_id,
        b.client,
    )
    assert list(a.arrays) == list(b.arrays)
    for name, x in a.arrays.items():
        y = b.arrays[name]
        assert (x.dtype, x.shape) == (y.dtype, y.shape), name
        assert _raw(x) == _raw(y), name
    assert list(a.scalars) == list(b.scalars)
    for name, v in a.scalars.items():
        w = b.scalars[name]
        assert type(v) is type(w), name
        if isinstance(v, float):
            assert struct.pack("<d", v) == struct.pack("<d", w), name
        else:
            assert v == w, name


def _raw(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def counted(chunks: Iterable[Any], seen: list[Any]) -> Iterator[Any]:
    for chunk in chunks:
        seen.append(chunk)
        yield chunk


# Round trips


@FAST
@given(envelopes())
def test_encode_decode_round_trip(env: Envelope) -> None:
    back = wire.decode(wire.encode(env))
    assert_same(env, back)
    assert back.nbytes == env.nbytes


@FAST
@given(envelopes())
def test_a_messages_wire_bytes_are_its_fields_in_the_encoded_envelope(env: Envelope) -> None:
    """``Message.wire_bytes`` (what ``bytes_up`` and ``bytes_down`` count) is the length the
    encoder gives the arrays and scalars: the whole envelope less its routing fields."""
    routing = replace(env, arrays={}, scalars={})
    payload = len(wire.encode(env)) - len(wire.encode(routing))
    assert env.message().wire_bytes == payload


@FAST
@given(envelopes(), st.integers(1, 300))
def test_send_receive_round_trip_in_random_chunks(env: Envelope, chunk_bytes: int) -> None:
    frames = list(wire.send(env, chunk_bytes))
    chunks = [pb.Chunk.FromString(f) for f in frames]  # protobuf's own parser reads them
    assert all(len(c.data) <= chunk_bytes for c in chunks)
    assert [bool(c.sha256) for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert b"".join(c.data for c in chunks) == wire.encode(env)
    assert_same(env, wire.receive(iter(frames)))


# The codec against protobuf's own implementation (upb)


def _from_pb(msg: Any) -> Envelope:
    """What upb parsed, as an Envelope."""
    arrays = {a.name: _pb_tensor(a) for a in msg.arrays}
    scalars = {s.name: getattr(s, s.WhichOneof("value")) for s in msg.scalars}
    return Envelope(
        msg.kind, msg.run_id, msg.round, msg.task_id, msg.client, arrays=arrays, scalars=scalars
    )


def _pb_tensor(array: Any) -> torch.Tensor:
    dtype = getattr(torch, array.dtype)
    if not array.data:
        return torch.empty(list(array.shape), dtype=dtype)
    return torch.frombuffer(bytearray(array.data), dtype=dtype).reshape(list(array.shape))


@FAST
@given(envelopes())
def test_protobuf_reads_what_the_codec_writes_and_the_codec_reads_protobuf(env: Envelope) -> None:
    assert_same(env, _from_pb(pb.Envelope.FromString(wire.encode(env))))
    msg = pb.Envelope.FromString(wire.encode(env))
    assert_same(env, wire.decode(msg.SerializeToString()))


@FAST
@given(envelopes(), envelopes())
def test_concatenated_messages_merge_as_protobuf_merges_them(a: Envelope, b: Envelope) -> None:
    _assert_parsed_as_protobuf_parses(wire.encode(a) + wire.encode(b))


def _assert_parsed_as_protobuf_parses(data: bytes) -> None:
    raw, msg = codec.parse_envelope(memoryview(data)), pb.Envelope.FromString(data)
    assert (raw.kind, raw.run_id, raw.round, raw.task_id, raw.client) == (
        msg.kind,
        msg.run_id,
        msg.round,
        msg.task_id,
        msg.client,
    )
    assert [(a.name, a.dtype, a.shape, bytes(a.data)) for a in raw.arrays] == [
        (a.name, a.dtype, list(a.shape), a.data) for a in msg.arrays
    ]
    which = [(s, s.WhichOneof("value")) for s in msg.scalars]
    theirs = [(s.name, _bits(getattr(s, w)) if w else None) for s, w in which]
    assert [(s.name, _bits(s.value)) for s in raw.scalars] == theirs


def _bits(value: object) -> object:
    """Floats by their bits (NaN equals NaN)."""
    return struct.pack("<d", value) if isinstance(value, float) else value


def test_unknown_fields_are_skipped_and_unpacked_shapes_accepted() -> None:
    unpacked = bytes([0x0A, 1]) + b"w" + bytes([0x12, 5]) + b"uint8"
    unpacked += bytes([0x18, 2, 0x18, 1]) + bytes([0x22, 2]) + b"ab"  # shape [2, 1], 2 bytes
    unknown = bytes([0x40, 5, 0x4A, 1]) + b"x"  # fields 8 (varint) and 9 (bytes)
    data = bytes([0x0A, 4]) + b"task" + unknown + bytes([0x32, len(unpacked)]) + unpacked
    env = wire.decode(data)
    assert env.kind == "task" and env.arrays["w"].tolist() == [[97], [98]]
    assert_same(env, _from_pb(pb.Envelope.FromString(data)))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (bytes([0x08, 1]), "Envelope field 1 has wire type varint, expected length-delimited"),
        (bytes([0x0A, 2, 0xFF, 0xFE]), "Envelope field 1 is not valid UTF-8"),
        (bytes([0x0B]), "wire type 3 .groups"),
        (bytes([0x0A, 9]) + b"abc", "field 1 claims 9 bytes, 3 remain"),
        (bytes([0x18]) + b"\xff" * 11, "varint longer than 10 bytes"),
        (bytes([0x00, 0]), "invalid field number 0"),
        (bytes([0x39]) + b"1234", "field 7 is truncated"),
    ],
)
def test_malformed_protobuf_is_named(data: bytes, match: str) -> None:
    with pytest.raises(WireError, match=match):
        wire.decode(data)


@FUZZ
@given(st.binary(max_size=200))
def test_whatever_the_codec_accepts_protobuf_parses_the_same(data: bytes) -> None:
    try:
        codec.parse_envelope(memoryview(data))
    except codec.CodecError:
        return
    _assert_parsed_as_protobuf_parses(data)


def test_decoded_tensors_are_writable_owned_copies() -> None:
    data = wire.encode(Envelope("reply", arrays={"0/m/delta": torch.arange(4.0)}))
    first, second = wire.decode(data), wire.decode(data)
    first.arrays["0/m/delta"].add_(1)
    assert second.arrays["0/m/delta"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_received_tensors_view_one_buffer_each_in_its_own_place() -> None:
    a0, b0 = torch.arange(1000.0), torch.arange(5000.0, 6000.0)
    env = Envelope("reply", arrays={"a": a0, "b": b0})
    data = wire.encode(env)
    back = wire.receive(wire.send(env, chunk_bytes=777))
    a, b = back.arrays["a"], back.arrays["b"]
    where = data.find(b0.numpy().tobytes()) - data.find(a0.numpy().tobytes())
    assert b.data_ptr() - a.data_ptr() == where  # views of the one reassembled buffer
    a.add_(1)
    assert torch.equal(a, a0 + 1) and torch.equal(b, b0)
    assert torch.equal(torch.stack([a, b]), torch.stack([a0 + 1, b0]))


def test_non_contiguous_and_grad_tensors_are_sent_as_their_values() -> None:
    w = torch.arange(6.0, requires_grad=True)
    t = torch.arange(6, dtype=torch.int32).reshape(2, 3).t()
    back = wire.decode(wire.encode(Envelope("task", arrays={"w": w, "t": t})))
    assert back.arrays["w"].tolist() == w.tolist()
    assert back.arrays["t"].tolist() == t.tolist()


def test_empty_payload_is_one_chunk() -> None:
    (chunk,) = wire.to_chunks(b"")
    assert (chunk.total, chunk.offset, chunk.data, chunk.sha256) == (
        0,
        0,
        b"",
        hashlib.sha256(b"").digest(),
    )
    assert wire.from_chunks([chunk]) == b""


def test_message_and_finite() -> None:
    env = Envelope(
        "reply",
        arrays={"0/m/delta": torch.zeros(3), "0/m/extra": torch.tensor([0.0, math.nan])},
        scalars={"num_examples": 7},
    )
    message = env.message()
    assert isinstance(message, Message)
    assert message.scalar("num_examples") == 7.0
    message.validate({"0/m/delta": 3})
    with pytest.raises(MessageError, match="NaN"):
        message.validate({"0/m/extra": 2})
    assert wire.finite(env) == "0/m/extra"
    assert wire.finite(Envelope("reply", arrays={"0/m/n": torch.tensor([1, 2])})) is None


def test_large_model_streams_in_chunks() -> None:
    env = Envelope("task", "run", round=1, arrays={"w": torch.randn(25_000_000)})
    assert env.nbytes == 100_000_000
    chunks = wire.send(env)
    back = wire.receive(chunks)
    assert torch.equal(back.arrays["w"], env.arrays["w"])


def test_large_model_over_the_limit_is_refused_at_the_first_chunk() -> None:
    env = Envelope("task", arrays={"w": torch.zeros(25_000_000)})
    seen: list[Any] = []
    with pytest.raises(WireError, match="exceeds the limit of 50000000 bytes"):
        wire.receive(counted(wire.send(env), seen), max_bytes=50_000_000)
    assert len(seen) == 1


# Fuzzing: malformed input raises WireError and nothing else


def _decode_or_wire_error(data: bytes) -> None:
    try:
        env = wire.decode(data)
    except WireError:
        return
    assert isinstance(env, Envelope)
    wire.decode(wire.encode(env))  # whatever is accepted can be sent on


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes_raise_only_wire_error(data: bytes) -> None:
    _decode_or_wire_error(data)


MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "insert", "delete", "truncate"]),
        st.integers(0),
        st.binary(min_size=1, max_size=4),
    ),
    min_size=1,
    max_size=6,
)


@FUZZ
@given(envelopes(), MUTATIONS)
def test_mutated_encodings_raise_wire_error_or_decode(env: Envelope, mutations: Any) -> None:
    data = bytearray(wire.encode(env))
    for op, at, blob in mutations:
        at %= len(data) + 1
        if op == "flip" and at < len(data):
            data[at] ^= blob[0] or 1
        elif op == "insert":
            data[at:at] = blob
        elif op == "delete":
            del data[at : at + len(blob)]
        else:
            del data[at:]
    _decode_or_wire_error(bytes(data))


CHUNKS = st.lists(
    st.builds(
        wire.Chunk,
        total=st.integers(0, 64),
        offset=st.integers(0, 64),
        data=st.binary(max_size=16),
        sha256=st.one_of(st.just(b""), st.binary(min_size=32, max_size=32)),
    ),
    max_size=6,
)


@FUZZ
@given(CHUNKS)
def test_random_chunk_streams_raise_wire_error(chunks: list[Any]) -> None:
    with pytest.raises(WireError):
        wire.from_chunks(chunks)


@FUZZ
@given(envelopes(), st.integers(1, 64), st.data())
def test_tampered_chunk_streams_raise_wire_error(env: Envelope, size: int, data: Any) -> None:
    chunks = list(wire.send(env, size))
    i = data.draw(st.integers(0, len(chunks) - 1))
    op = data.draw(st.sampled_from(["drop", "repeat", "swap", "total", "offset", "byte", "sha"]))
    chunks = [codec.parse_chunk(f) for f in wire.send(env, size)]
    tampered = list(chunks)
    target = tampered[i]
    if op == "drop":
        del tampered[i]
    elif op == "repeat":
        tampered.insert(i, tampered[i])
    elif op == "swap":
        j = data.draw(st.integers(0, len(chunks) - 1))
        tampered[i], tampered[j] = tampered[j], tampered[i]
    elif op == "total":
        tampered[i] = replace(target, total=target.total + data.draw(st.integers(1, 1000)))
    elif op == "offset":
        tampered[i] = replace(target, offset=target.offset + data.draw(st.integers(1, 1000)))
    elif op == "byte" and target.data:
        pos = data.draw(st.integers(0, len(target.data) - 1))
        flipped = bytearray(target.data)
        flipped[pos] ^= 1
        tampered[i] = replace(target, data=bytes(flipped))
    else:
        tampered[-1] = replace(tampered[-1], sha256=hashlib.sha256(b"other").digest())
    frames = [wire.frame(c) for c in tampered]
    if frames == [wire.frame(c) for c in chunks]:
        assert_same(env, wire.receive(frames))
    else:
        with pytest.raises(WireError):
            wire.receive(frames)


# Structured bad inputs, each refused with a message naming the problem


def _array(**fields: Any) -> Any:
    base: dict[str, Any] = {"name": "w", "dtype": "float32", "shape": [2], "data": bytes(8)}
    return pb.Array(**{**base, **fields})


def _envelope(**fields: Any) -> bytes:
    return bytes(pb.Envelope(**{"kind": "reply", **fields}).SerializeToString())


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"\xff\xff\xff", "not a valid Envelope"),
        (_envelope(kind=""), "kind ''"),
        (_envelope(kind="two words"), "kind 'two words'"),
        (_envelope(arrays=[_array(dtype="complex64")]), "dtype 'complex64'"),
        (_envelope(arrays=[_array(data=bytes(7))]), "needs 8 bytes, got 7"),
        (_envelope(arrays=[_array(data=bytes(12))]), "needs 8 bytes, got 12"),
        (_envelope(arrays=[_array(shape=[-2], data=b"")]), "shape \\[-2\\]"),
        (_envelope(arrays=[_array(shape=[0, 1 << 40], data=b"")]), "dimensions must be"),
        (_envelope(arrays=[_array(shape=[1] * 40, data=bytes(4))]), "at most 32"),
        (_envelope(arrays=[_array(dtype="bool", data=b"\x00\x02")]), "other than 0 and 1"),
        (_envelope(arrays=[_array(), _array()]), "duplicate array name 'w'"),
        (_envelope(arrays=[_array(name="")]), "array name '' is empty"),
        (_envelope(arrays=[_array(name="x" * 201)]), "at most 200"),
        (_envelope(arrays=[_array(name="a\nb")]), "array name 'a\\\\nb'"),
        (_envelope(scalars=[pb.Scalar(name="n", int=1)] * 2), "duplicate scalar name 'n'"),
        (_envelope(scalars=[pb.Scalar(name="n")]), "scalar 'n' has no value"),
        (_envelope(scalars=[pb.Scalar(name=str(i), int=i) for i in range(10_001)]), "10000"),
        (_envelope(round=-1), "round is -1"),
        (_envelope(task_id=bytes(65)), "task_id must be at most 64 bytes"),
        (_envelope(client="a\x00b"), "client"),
    ],
)
def test_malformed_envelopes_are_refused(data: bytes, problem: str) -> None:
    with pytest.raises(WireError, match=problem):
        wire.decode(data)


def test_oversized_envelope_is_refused() -> None:
    data = wire.encode(Envelope("reply", arrays={"0/m/delta": torch.zeros(100)}))
    with pytest.raises(WireError, match=f"envelope of {len(data)} bytes exceeds the limit of 100"):
        wire.decode(data, max_bytes=100)


def _stream(data: bytes = b"0123456789", size: int = 4) -> list[Any]:
    return list(wire.to_chunks(data, size))


def _tamper(chunks: list[Any], i: int, **fields: Any) -> list[Any]:
    chunks[i] = wire.Chunk(
        total=fields.get("total", chunks[i].total),
        offset=fields.get("offset", chunks[i].offset),
        data=fields.get("data", chunks[i].data),
        sha256=fields.get("sha256", chunks[i].sha256),
    )
    return chunks


@pytest.mark.parametrize(
    ("chunks", "problem"),
    [
        ([], "no chunks"),
        (_stream()[:2], "ended after 8 of 10 bytes \\(truncated\\)"),
        (_stream()[:1] + _stream()[2:], "chunk 1 starts at offset 8, expected 4"),
        ([_stream()[1], _stream()[0], _stream()[2]], "chunk 0 starts at offset 4, expected 0"),
        (_stream()[:2] + _stream()[1:], "chunk 2 starts at offset 4, expected 8"),
        (_tamper(_stream(), 1, total=11), "chunk 1 announces 11 bytes, the first 10"),
        (_tamper(_stream(), 2, data=b"8901"), "past the announced 10 bytes"),
        (_tamper(_stream(), 1, data=b""), "chunk 1 is empty"),
        (_tamper(_stream(), 2, sha256=b""), "no sha256"),
        (_tamper(_stream(), 2, sha256=bytes(32)), "checksum mismatch"),
        (_tamper(_stream(), 1, data=b"4567"[::-1]), "checksum mismatch"),
        ([*_stream(), wire.Chunk(total=10, offset=10)], "chunk 3 arrives after all 10 bytes"),
    ],
)
def test_malformed_chunk_streams_are_refused(chunks: list[Any], problem: str) -> None:
    with pytest.raises(WireError, match=problem):
        wire.from_chunks(chunks)


def test_over_tls_the_checksum_is_optional_and_the_framing_still_checked() -> None:
    """``verify=False`` (a TLS peer): no digest needed, a wrong one not looked at; the
    offsets and the announced length are checked as ever."""
    bare = list(wire.to_chunks(b"0123456789", 4, checksum=False))
    assert [len(c.sha256) for c in bare] == [0, 0, 0]
    with pytest.raises(WireError, match="no sha256"):
        wire.from_chunks(bare)  # a plaintext receiver requires it
    assert wire.from_chunks(bare, verify=False) == bytearray(b"0123456789")
    assert wire.from_chunks(_tamper(_stream(), 2, sha256=bytes(32)), verify=False)
    with pytest.raises(WireError, match="truncated"):
        wire.from_chunks(bare[:2], verify=False)
    with pytest.raises(WireError, match="expected 4"):
        wire.from_chunks([bare[0], bare[2]], verify=False)
    env = wire.Envelope("reply", "r", arrays={"d": torch.ones(3)})
    assert wire.receive(wire.send(env, 8, checksum=False), verify=False).arrays["d"].sum() == 3


def test_announced_total_over_the_limit_is_refused_before_reading_on() -> None:
    seen: list[Any] = []
    with pytest.raises(WireError, match="envelope of 10 bytes exceeds the limit of 9 bytes"):
        wire.from_chunks(counted(_stream(), seen), max_bytes=9)
    assert len(seen) == 1


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"kind": "x y"}, "kind 'x y'"),
        ({"kind": "ok", "round": -3}, "round is -3"),
        ({"kind": "ok", "arrays": {"z": torch.zeros(2, dtype=torch.complex64)}}, "complex64"),
        ({"kind": "ok", "arrays": {"z": [1.0]}}, "array 'z' is list"),
        ({"kind": "ok", "scalars": {"big": 1 << 63}}, "does not fit in 64 bits"),
        ({"kind": "ok", "scalars": {"none": None}}, "scalar 'none' is NoneType"),
        ({"kind": "ok", "scalars": {"": 1}}, "scalar name '' is empty"),
    ],
)
def test_envelopes_that_cannot_be_sent_are_refused_on_construction(
    fields: dict[str, Any], problem: str
) -> None:
    with pytest.raises(WireError, match=problem):
        Envelope(**fields)


def test_chunk_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="chunk_bytes must be >= 1, got 0"):
        wire.to_chunks(b"abc", 0)


# gRPC loopback


class Echo:
    def Call(self, request: Iterable[bytes], context: Any) -> Iterator[bytes]:
        yield from wire.send(wire.receive(request))


@pytest.fixture
def echo_stub() -> Iterator[Any]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((wire.handler(Echo().Call),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield wire.caller(channel)
    finally:
        channel.close()
        server.stop(None)


def test_grpc_loopback_passes_a_20mb_envelope_in_chunks(echo_stub: Any) -> None:
    env = Envelope(
        "reply",
        "run",
        round=2,
        task_id=b"\x01" * 16,
        client="site-a",
        arrays={"0/m/delta": torch.randn(5_000_000)},
        scalars={"num_examples": 3},
    )
    assert_same(env, wire.receive(echo_stub(wire.send(env), timeout=60)))
    with pytest.raises(grpc.RpcError) as info:  # one 20 MB message exceeds gRPC's 4 MiB default
        wire.receive(echo_stub(wire.send(env, chunk_bytes=env.nbytes + 1024), timeout=60))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# Coverage-guided fuzzing (atheris), a short run


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed")
def test_atheris_harness_runs_clean() -> None:
    harness = Path(__file__).with_name("fuzz_wire.py")
    done = subprocess.run(
        [sys.executable, str(harness), "-runs=3000", "-seed=1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@given(
    st.lists(st.binary(max_size=50), min_size=1, max_size=4),
    st.integers(1, 17),
)
def test_encoded_parts_stream_like_their_concatenation(parts: list[bytes], size: int) -> None:
    data = b"".join(parts)
    enc = wire.Encoded(tuple(parts), hashlib.sha256(data).digest())
    got = list(wire.send_encoded(enc, size))
    assert got == [wire.frame(c) for c in wire.to_chunks(data, size)]
    assert wire.from_chunks(codec.parse_chunk(f) for f in got) == data


def test_a_shared_prefix_merges_with_each_message() -> None:
    """A stage's shared message encoded once; each task's own fields follow and win, and the
    client reads back its one-member job."""
    w = torch.arange(6.0)
    job = StageJob(
        "train",
        4,
        Message({"w": w}),
        np.array([0, 1, 2]),
        tuple(Message(scalars={"work": 1.0 / (i + 1)}) for i in range(3)),
        tuple({"terms.0.scaffold": {"c_i": torch.full((2,), float(i))}} for i in range(3)),
    )
    shared: wire.Prefix | None = None
    for i in range(3):
        common, mine = records.task_message(job, i)
        if shared is None:
            first = wire.Envelope("task", arrays=common.arrays, scalars=common.scalars)
            shared = wire.Prefix(first)
        own = wire.Envelope(
            "task", "run", round=4, task_id=bytes([i]), arrays=mine.arrays,
            scalars={"stage": "train", **mine.scalars},
        )  # fmt: skip
        env = wire.receive(wire.send_encoded(shared.extend(own), 7))
        assert (env.kind, env.run_id, env.round, env.task_id) == ("task", "run", 4, bytes([i]))
        assert list(env.arrays) == ["b/w", "0/s/terms.0.scaffold/c_i"]
        assert torch.equal(env.arrays["b/w"], w)
        assert env.arrays["0/s/terms.0.scaffold/c_i"].tolist() == [i, i]
        assert env.scalars == {"stage": "train", "0/p/work": 1.0 / (i + 1)}
        back = records.job_from_task(str(env.scalars["stage"]), env.round, i, env.message())
        assert back.clients.tolist() == [i] and torch.equal(back.shared.arrays["w"], w)
        assert back.payloads[0].scalars == {"work": 1.0 / (i + 1)}
        assert back.states[0]["terms.0.scaffold"]["c_i"].tolist() == [i, i]
