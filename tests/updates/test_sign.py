"""EF-signSGD: the server decodes exactly what the client's compressor sent (hypothesis over
layer layouts), error feedback keeps what was lost (to float32 rounding), the per-layer
scaled sign contracts exactly as the paper's identity says and never worse than one scale
for the whole model, a hostile message is refused with the reason, and a run sends one bit
a coordinate, learns and resumes to the same result."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from potluck.config import ExperimentConfig
from potluck.core.message import Message, MessageError
from potluck.core.params import ParamSpec
from potluck.core.parts import part_context
from potluck.orchestrator import run_experiment
from potluck.store.sqlite import RunStore
from potluck.testing import interrupted_and_resumed, learning
from potluck.updates.sign import SCALE, SignEF

EPS = float(torch.finfo(torch.float32).eps)


def spec(*numels: int) -> ParamSpec:
    return ParamSpec(tuple(f"p{i}" for i in range(len(numels))), tuple((n,) for n in numels))


def ctx() -> Any:
    return part_context(0, 1, "transforms.0.sign_ef", client=0)


def uneven(numels: list[int], seed: int) -> torch.Tensor:
    """A delta whose layers differ in scale by up to 1e4 (as a model's do)."""
    g = torch.Generator().manual_seed(seed)
    scales = [10 ** float(torch.rand(1, generator=g) * 4 - 2) for _ in numels]
    return torch.cat([torch.randn(n, generator=g) * s for n, s in zip(numels, scales, strict=True)])


LAYOUTS = st.lists(st.integers(1, 70), min_size=1, max_size=4)


@settings(max_examples=80, deadline=None)
@given(numels=LAYOUTS, seed=st.integers(0, 2**32 - 1))
def test_the_server_decodes_what_the_compressor_sent(numels: list[int], seed: int) -> None:
    sign = SignEF().bind(spec(*numels))
    e = uneven(numels, seed)
    sent, state = sign.encode(Message({"delta": e}), {}, ctx())
    compressed, positive, scales = sign.compress(e)
    assert sent.arrays["delta"].dtype == torch.uint8
    assert sent.nbytes == math.ceil(sum(numels) / 8) + 4 * len(numels)
    decoded = sign.decode(sent, ctx()).arrays
    assert set(decoded) == {"delta"} and torch.equal(decoded["delta"], compressed)
    for layer, scale in zip(torch.split(e, numels), scales.tolist(), strict=True):
        assert scale == pytest.approx(float(layer.abs().mean()), rel=1e-5)
    assert torch.equal(positive, e >= 0)
    assert torch.equal(state["residual"], e - compressed)


@settings(max_examples=80, deadline=None)
@given(numels=LAYOUTS, seed=st.integers(0, 2**32 - 1))
def test_error_feedback_keeps_what_was_lost(numels: list[int], seed: int) -> None:
    """sent + new residual == old residual + delta, to the rounding of one float32
    subtraction and addition (a few units in the last place)."""
    sign = SignEF().bind(spec(*numels))
    delta, residual = uneven(numels, seed), uneven(numels, seed + 1) * 0.1
    msg, state = sign.encode(Message({"delta": delta}), {"residual": residual}, ctx())
    sent = sign.decode(msg, ctx()).arrays["delta"]
    e = delta + residual
    slack = 4 * EPS * (e.abs() + sent.abs())
    assert bool(((sent + state["residual"] - e).abs() <= slack).all())


@settings(max_examples=80, deadline=None)
@given(numels=LAYOUTS, seed=st.integers(0, 2**32 - 1))
def test_the_scaled_sign_contracts_exactly_and_per_layer_beats_one_scale(
    numels: list[int], seed: int
) -> None:
    """||e - C(e)||^2 = sum_l ||e_l||^2 - ||e_l||_1^2 / n_l (Karimireddy et al.'s scaled sign,
    per layer), at most what one scale for the whole vector leaves (Cauchy-Schwarz)."""
    e = uneven(numels, seed)
    per_layer = SignEF().bind(spec(*numels)).compress(e)[0]
    one = SignEF().bind(spec(sum(numels))).compress(e)[0]
    lost = float((e - per_layer).double().square().sum())
    layers = [x.double() for x in torch.split(e, numels)]
    identity = sum(float(x.square().sum() - x.abs().sum() ** 2 / len(x)) for x in layers)
    norm = float(e.double().square().sum())
    assert lost == pytest.approx(identity, abs=1e-5 * norm)
    assert lost <= float((e - one).double().square().sum()) + 1e-5 * norm


def test_zero_is_sent_as_plus_the_scale_and_the_padding_is_clear() -> None:
    sign = SignEF().bind(spec(3))
    sent, _ = sign.encode(Message({"delta": torch.tensor([0.0, -3.0, 0.0])}), {}, ctx())
    assert sent.arrays["delta"].tolist() == [0b1010_0000]
    assert sign.decode(sent, ctx()).arrays["delta"].tolist() == [1.0, -1.0, 1.0]


def test_without_error_feedback_nothing_is_kept() -> None:
    sign = SignEF(error_feedback=False).bind(spec(4))
    msg, state = sign.encode(Message({"delta": torch.ones(4)}), {"residual": torch.ones(4)}, ctx())
    assert state == {} and sign.client_state == {}
    assert sign.decode(msg, ctx()).arrays["delta"].tolist() == [1.0] * 4  # residual unused
    assert SignEF().client_state == {"residual": "float32"}


def good() -> tuple[SignEF, Message]:
    sign = SignEF().bind(spec(10, 3))
    delta = torch.randn(13, generator=torch.Generator().manual_seed(0))
    msg, _ = sign.encode(Message({"delta": delta, "other": torch.zeros(2)}), {}, ctx())
    return sign, msg


def changed(**arrays: Any) -> Message:
    _, sent = good()
    out = {**sent.arrays, **arrays}
    return Message({k: v for k, v in out.items() if v is not None}, sent.scalars)


def padded() -> Message:
    _, sent = good()
    bits = sent.arrays["delta"].clone()
    bits[-1] |= 1  # the 16th bit: past the 13 signs
    return changed(delta=bits)


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (lambda: changed(delta=torch.zeros(13)), "packed uint8 signs, got torch.float32"),
        (lambda: changed(delta=None), "packed uint8 signs, got NoneType"),
        (
            lambda: changed(delta=torch.zeros(3, dtype=torch.uint8)),
            "'delta' must be 2 bytes (13 signs), got (3,)",
        ),
        (lambda: changed(**{SCALE: None}), "'delta/scale' must be a float32 array, got NoneType"),
        (
            lambda: changed(**{SCALE: torch.ones(2, dtype=torch.float64)}),
            "'delta/scale' must be a float32 array, got torch.float64",
        ),
        (lambda: changed(**{SCALE: torch.ones(3)}), "must hold 2 scales (one per tensor)"),
        (lambda: changed(**{SCALE: torch.tensor([1.0, -1.0])}), "must be finite and >= 0"),
        (lambda: changed(**{SCALE: torch.tensor([1.0, math.inf])}), "must be finite and >= 0"),
        (padded, "the padding bits after the last sign are set"),
    ],
)
def test_a_hostile_message_is_refused_with_the_reason(message: Any, reason: str) -> None:
    sign, _ = good()
    with pytest.raises(MessageError, match=r"^sign_ef: .*" + re.escape(reason)):
        sign.decode(message(), ctx())


def test_decode_keeps_the_other_arrays() -> None:
    sign, msg = good()
    assert set(sign.decode(msg, ctx()).arrays) == {"delta", "other"}


# ---- whole runs ----

BASE: dict[str, Any] = {
    "seed": 0,
    "rounds": 8,
    "data": {"dataset": "digits", "num_clients": 10, "partition": {"kind": "iid"}},
    "model": {"name": "mlp"},
    "sampler": {"clients_per_round": 5},
    "client": {"epochs": 1, "batch_size": 16, "lr": 0.1},
    "run": {"threads": 1},
}


def experiment(transforms: list[dict[str, Any]], **extra: Any) -> Any:
    return ExperimentConfig.from_dict({**BASE, "transforms": transforms, **extra}).build()


def test_a_sign_run_sends_a_bit_a_coordinate_and_learns() -> None:
    """8 rounds of digits (measured: 0.76 with error feedback, 0.57 without, 0.83 dense).
    The upload is 32x smaller on the delta; the scales, the scalars and the framing of the
    wire bytes bring it to 26x for this 4,810-parameter MLP."""
    ef = run_experiment(experiment([{"name": "sign_ef"}]))
    plain = run_experiment(experiment([{"name": "sign_ef", "error_feedback": False}]))
    dense = run_experiment(experiment([], rounds=1))
    ratio = dense.history[0]["bytes_up"] / ef.history[0]["bytes_up"]
    assert 20 < ratio < 32, ratio
    final = ef.history[-1]["test_accuracy"], plain.history[-1]["test_accuracy"]
    assert final[0] > 0.7 and final[0] > final[1] + 0.1, final


def test_a_resumed_sign_run_equals_the_uninterrupted_one(tmp_path: Path) -> None:
    sign = ExperimentConfig.from_dict({**BASE, "transforms": [{"name": "sign_ef"}], "rounds": 4})
    resumed = interrupted_and_resumed(sign, tmp_path, after=2)
    store = RunStore(tmp_path)
    (info,) = store.list_runs()
    stored = [s for s in store.client_states(info.run_id, list(range(10))) if s]
    assert stored and all(float(s["transforms.0.sign_ef/residual"].abs().sum()) > 0 for s in stored)
    full = run_experiment(experiment([{"name": "sign_ef"}], rounds=4))
    assert learning(resumed) == learning(full)
    assert torch.equal(resumed.weights, full.weights)
