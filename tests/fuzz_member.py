"""Coverage-guided fuzzing of a certified member's answers with atheris (libFuzzer) (issue 13),
the companion of the hypothesis fuzz in ``test_member_fuzz.py``: the same run (SCAFFOLD on
digits, three clients, two rounds) and the same server path (``wire.receive`` under the size
limit of the member's task, the reply record, the round loop of an untrusted engine).

The input drives edits of each of the member's four answers (a train and an evaluation
answer in each round): an element set to any float, an array cast, reshaped, cut, grown or
dropped, an array added under any name, a scalar set to any number or text or dropped, or
the encoded bytes mutated (then framed with valid checksums, so the decoder and the checks
behind it see them). A finding is
- any exception out of the run: the server would have stopped;
- an accepted train answer that breaks a rule checked here on its own: arrays other than
  the run's, not 1-D float32 of the model's size or not finite, an update array above
  ``deploy.max_update_norm``, a count or weight not a finite number >= 0, a weight above
  ``deploy.max_weight``;
- a metric of the run that is NaN or Inf;
- when no train answer was accepted, a model other than the one of the run in which the
  member sent nothing.

Run as::

    python tests/fuzz_member.py -runs=5000 -max_len=512
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Any

import atheris
import grpc  # noqa: F401 (imported uninstrumented: only potluck's code is traced)
import hypothesis  # noqa: F401
import numpy as np  # noqa: F401
import pydantic  # noqa: F401
import torch

with atheris.instrument_imports(include=["potluck"]):
    import test_member_fuzz as base
    from potluck.config import ExperimentConfig
    from potluck.deploy import wire
    from potluck.orchestrator import run_experiment

SIZE = 64 * 10 + 10  # logistic regression on digits
UPLOADS = {"0/m/delta", "0/m/terms.0.scaffold/delta_c"}
STATE = "0/s/terms.0.scaffold/c_i"
COUNTS = ("num_examples", "num_steps", "weight")
MAX_NORM = float(base.CONFIG["deploy"]["max_update_norm"])  # type: ignore[index]
MAX_WEIGHT = float(base.CONFIG["deploy"]["max_weight"])  # type: ignore[index]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.bool]
PREFIXES = ["0/m/", "0/s/terms.0.scaffold/", "0/s/", "1/m/", "", "global/"]
SCALARS = [*COUNTS, "train_loss", "global/n", "global/correct", "global/loss_sum"]


class Editor:
    """Edits the member's answers as the fuzzer's input says; remembers what it sent."""

    def __init__(self, data: bytes) -> None:
        self.fdp = atheris.FuzzedDataProvider(data)
        self.sent: list[wire.Envelope | None] = []  # as decoded by the server; None: not

    def __call__(self, env: wire.Envelope) -> wire.Envelope | list[bytes]:
        for _ in range(self.fdp.ConsumeIntInRange(0, 3)):
            edited = self._edit(env)
            if isinstance(edited, bytes):
                return self._framed(edited)
            env = edited
        self.sent.append(env)
        return env

    def _framed(self, data: bytes) -> list[bytes]:
        try:
            self.sent.append(wire.decode(data))
        except wire.WireError:
            self.sent.append(None)
        return [wire.frame(c) for c in wire.to_chunks(data, 4096)] or [b""]

    def _edit(self, env: wire.Envelope) -> wire.Envelope | bytes:
        fdp, arrays, scalars = self.fdp, dict(env.arrays), dict(env.scalars)
        op = fdp.ConsumeIntInRange(0, 6)
        names = sorted(arrays)
        if op <= 2 and names:
            name = names[fdp.ConsumeIntInRange(0, len(names) - 1)]
            arrays[name] = self._changed(arrays[name], op)
        elif op == 3:
            name = PREFIXES[fdp.ConsumeIntInRange(0, len(PREFIXES) - 1)]
            name += fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 24))
            dtype = DTYPES[fdp.ConsumeIntInRange(0, len(DTYPES) - 1)]
            arrays[name] = torch.ones(fdp.ConsumeIntInRange(0, 2 * SIZE)).to(dtype)
        elif op == 4:
            keys = names + sorted(scalars)
            if keys:
                gone = keys[fdp.ConsumeIntInRange(0, len(keys) - 1)]
                arrays.pop(gone, None)
                scalars.pop(gone, None)
        elif op == 5:
            name = SCALARS[fdp.ConsumeIntInRange(0, len(SCALARS) - 1)]
            scalars[name] = self._value()
        else:
            return _mutated(fdp, wire.encode(env))
        try:
            return wire.Envelope(
                env.kind, env.run_id, env.round, env.task_id, env.client,
                arrays=arrays, scalars=scalars,
            )  # fmt: skip
        except wire.WireError:  # not even encodable (an empty name): bytes edits reach it
            return env

    def _changed(self, a: torch.Tensor, op: int) -> torch.Tensor:
        fdp = self.fdp
        if op == 0 and a.numel() and a.is_floating_point():
            a, value = a.clone(), torch.tensor(fdp.ConsumeFloat(), dtype=torch.float64)
            a.view(-1)[fdp.ConsumeIntInRange(0, a.numel() - 1)] = value.to(a.dtype)  # may be Inf
            return a
        if op == 1:
            return a.to(DTYPES[fdp.ConsumeIntInRange(0, len(DTYPES) - 1)])
        how = fdp.ConsumeIntInRange(0, 3)
        if how == 0:
            return a[: fdp.ConsumeIntInRange(0, max(0, a.numel() - 1))]
        if how == 1:
            return torch.cat([a, a[:1]])
        return a.reshape(-1, 2) if how == 2 and a.numel() % 2 == 0 else a.reshape(1, -1)

    def _value(self) -> int | float | str:
        kind = self.fdp.ConsumeIntInRange(0, 2)
        if kind == 0:
            return self.fdp.ConsumeInt(8)
        if kind == 1:
            return self.fdp.ConsumeFloat()
        return self.fdp.ConsumeUnicodeNoSurrogates(8)


def _mutated(fdp: Any, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(fdp.ConsumeIntInRange(1, 6)):
        at = fdp.ConsumeIntInRange(0, len(out))
        op = fdp.ConsumeIntInRange(0, 2)
        if op == 0 and at < len(out):
            out[at] ^= fdp.ConsumeIntInRange(1, 255)
        elif op == 1:
            out[at:at] = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 8))
        else:
            del out[at : at + fdp.ConsumeIntInRange(1, 8)]
    return bytes(out)


def violation(env: wire.Envelope) -> str | None:
    """Why a train answer must not have been accepted, checked apart from the server's code."""
    if not UPLOADS <= set(env.arrays) <= UPLOADS | {STATE}:
        return f"arrays {sorted(env.arrays)}"
    for name, a in env.arrays.items():
        if a.dtype != torch.float32 or tuple(a.shape) != (SIZE,):
            return f"{name}: {a.dtype} {tuple(a.shape)}"
        if not bool(torch.isfinite(a).all()):
            return f"{name}: not finite"
        if name in UPLOADS and float(a.double().norm()) > MAX_NORM:
            return f"{name}: norm above {MAX_NORM}"
    for key in COUNTS:
        v = env.scalars.get(key)
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < math.inf:
            return f"{key} = {v!r}"
    if float(env.scalars["weight"]) > MAX_WEIGHT:
        return f"weight above {MAX_WEIGHT}"
    return None


def test_one_input(data: bytes) -> None:
    editor = Editor(data)
    engines: list[base.Member] = []

    def engine(program: Any) -> base.Member:
        engines.append(base.Member(program, editor))
        return engines[-1]

    result = run_experiment(ExperimentConfig.from_dict(base.CONFIG).build(), engine=engine)
    assert len(editor.sent) == 4, len(editor.sent)
    accepted = [m["updates"] == 3 for m in result.history]
    for rnd, ok in enumerate(accepted):
        sent = editor.sent[2 * rnd]
        if ok:
            assert sent is not None, f"round {rnd + 1}: an undecodable answer was accepted"
            why = violation(sent)
            assert why is None, f"round {rnd + 1}: accepted a train answer with {why}"
    for m in result.history:
        bad = {k: v for k, v in m.items() if not math.isfinite(v)}
        assert not bad, f"metrics not finite: {bad}"
    if not any(accepted):
        assert torch.equal(result.weights, base.silent_run().weights)


def main() -> None:
    logging.getLogger("potluck").setLevel(logging.ERROR)  # each refusal is logged
    torch.set_num_threads(1)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
