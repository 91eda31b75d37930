"""Coverage-guided fuzzing of the wire format with atheris (libFuzzer).

Any exception other than ``WireError`` from ``decode`` or ``from_chunks`` is a finding; an
accepted envelope must encode again. Run as::

    python tests/deploy/fuzz_wire.py -runs=100000

Modes, chosen by the first input byte: raw bytes to ``decode``; a mutated valid encoding
to ``decode`` (so the fuzzer starts from well-formed input without a corpus); a chunk
stream built from the input to ``from_chunks``.
"""

from __future__ import annotations

import hashlib
import sys
from typing import Any

import atheris
import grpc  # noqa: F401 (imported uninstrumented, like torch: only the wire code is traced)
import torch

with atheris.instrument_imports(include=["potluck.deploy.wire"]):
    from potluck.deploy import wire

SEED = wire.encode(
    wire.Envelope(
        "reply",
        "run-1",
        round=3,
        task_id=bytes(16),
        client="site-a",
        arrays={
            "0/m/delta": torch.arange(6.0).reshape(2, 3),
            "0/s/transforms.0.mask/keep": torch.tensor([True, False]),
        },
        scalars={"num_examples": 12, "train_loss": 0.5, "note": "ok"},
    )
)


def _mutated(fdp: Any) -> bytes:
    data = bytearray(SEED)
    for _ in range(fdp.ConsumeIntInRange(1, 8)):
        op, at = fdp.ConsumeIntInRange(0, 3), fdp.ConsumeIntInRange(0, len(data))
        if op == 0 and at < len(data):
            data[at] ^= fdp.ConsumeIntInRange(1, 255)
        elif op == 1:
            data[at:at] = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 8))
        elif op == 2:
            del data[at : at + fdp.ConsumeIntInRange(1, 8)]
        else:
            del data[at:]
    return bytes(data)


def _chunks(fdp: Any) -> list[Any]:
    out = []
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 16))
        sha = hashlib.sha256(data).digest() if fdp.ConsumeBool() else b""
        total, offset = fdp.ConsumeIntInRange(0, 64), fdp.ConsumeIntInRange(0, 64)
        out.append(wire.Chunk(total=total, offset=offset, data=data, sha256=sha))
    return out


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 2)
    try:
        if mode == 2:
            wire.from_chunks(_chunks(fdp))
            return
        payload = _mutated(fdp) if mode == 1 else fdp.ConsumeBytes(sys.maxsize)
        wire.decode(wire.encode(wire.decode(payload)))
    except wire.WireError:
        pass


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
