"""Messages: what crosses the client/server boundary, as named flat arrays and scalars.

A client's update is a ``Message`` whose arrays hold at least ``"delta"`` (local - global,
float32) and whose scalars hold ``num_examples``. Nothing here is ever pickled.

Example:
    >>> import torch
    >>> m = Message(arrays={"delta": torch.zeros(3)}, scalars={"num_examples": 5})
    >>> m.validate(expected={"delta": 3})
    >>> m.nbytes
    12
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

Scalar = int | float | str


class MessageError(ValueError):
    """A message that is malformed, of the wrong shape or dtype, or not finite."""


@dataclass(frozen=True)
class Message:
    """Named flat float32 arrays and named scalars; the unit of client/server traffic."""

    arrays: Mapping[str, torch.Tensor] = field(default_factory=dict)
    scalars: Mapping[str, Scalar] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Payload bytes of the arrays (their raw data alone)."""
        return sum(a.numel() * a.element_size() for a in self.arrays.values())

    @property
    def wire_bytes(self) -> int:
        """Bytes of this message's arrays and scalars in the protobuf ``Envelope`` of
        ``potluck/deploy/potluck.proto``, as the deployment sends them: each array's data,
        name, dtype and shape, each scalar's name and value, and their field framing (the
        envelope's routing fields, kind, run, round, task and client, excepted). What the
        round metrics ``bytes_up`` and ``bytes_down`` count; ``tests/deploy/test_wire.py``
        checks it against the encoder.

        Example:
            >>> Message({"delta": torch.zeros(3)}, {"num_examples": 5}).wire_bytes
            53
        """
        arrays = sum(_framed(_array_body(name, a)) for name, a in self.arrays.items())
        return arrays + sum(_framed(_scalar_body(k, v)) for k, v in self.scalars.items())

    def validate(
        self,
        expected: Mapping[str, int],
        source: str = "message",
        dtypes: Mapping[str, torch.dtype] | None = None,
        finite: bool = True,
    ) -> None:
        """Check that every expected array is present, 1-D of its length, of its dtype in
        ``dtypes`` (default float32) and, if floating point and ``finite``, finite (a caller
        that takes each array's norm anyway checks that instead: ``finite=False``)."""
        for name, length in expected.items():
            if name not in self.arrays:
                raise MessageError(f"{source}: missing array {name!r}")
            arr = self.arrays[name]
            if not isinstance(arr, torch.Tensor):
                raise MessageError(f"{source}: array {name!r} is {type(arr).__name__}")
            dtype = (dtypes or {}).get(name, torch.float32)
            if arr.dtype != dtype:
                want = str(dtype).removeprefix("torch.")
                raise MessageError(f"{source}: array {name!r} has dtype {arr.dtype}, not {want}")
            if arr.dim() != 1 or arr.numel() != length:
                raise MessageError(
                    f"{source}: array {name!r} has shape {tuple(arr.shape)}, expected ({length},)"
                )
            if finite and arr.is_floating_point() and not _all_finite(arr):
                raise MessageError(f"{source}: array {name!r} contains NaN or Inf")
        for key, value in self.scalars.items():
            if isinstance(value, float) and value != value:  # NaN
                raise MessageError(f"{source}: scalar {key!r} is NaN")

    def scalar(self, key: str, source: str = "message") -> float:
        """A numeric scalar, or a clear error."""
        value = self.scalars.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MessageError(f"{source}: scalar {key!r} missing or not numeric: {value!r}")
        return float(value)


def _all_finite(arr: torch.Tensor) -> bool:
    """Whether every element is finite: a finite sum proves it (NaN and Inf propagate into
    sums) at a fraction of the cost; only a non-finite sum (possibly an overflow) is checked
    element by element.

    Example:
        >>> _all_finite(torch.tensor([3e38, 3e38])), _all_finite(torch.tensor([1.0, float("nan")]))
        (True, False)
    """
    return bool(torch.isfinite(arr.sum())) or bool(torch.isfinite(arr).all())


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _text_size(text: str) -> int:
    """A string field, left out when empty (as protobuf does)."""
    raw = len(text.encode())
    return 1 + _varint_size(raw) + raw if raw else 0


def _framed(body: int) -> int:
    """A length-delimited field of ``body`` bytes (field number below 16)."""
    return 1 + _varint_size(body) + body


def _array_body(name: str, a: torch.Tensor) -> int:
    size = _text_size(name) + _text_size(str(a.dtype).removeprefix("torch."))
    if a.dim():
        size += _framed(sum(_varint_size(d) for d in a.shape))
    data = a.numel() * a.element_size()
    return size + (_framed(data) if data else 0)


def _scalar_body(name: str, value: Scalar) -> int:
    if isinstance(value, str):
        size = _framed(len(value.encode()))
    elif isinstance(value, int):
        size = 1 + _varint_size(((value << 1) ^ (value >> 63)) % (1 << 64))  # zigzag
    else:
        size = 1 + 8  # a double
    return _text_size(name) + size
