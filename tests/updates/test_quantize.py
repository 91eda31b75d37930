"""Quantised uploads: QSGD is unbiased (a statistical test), its error is within the paper's
bound (and the max-norm variant's), the Hadamard rotation is orthonormal and shrinks the
error of a spiky update as Suresh et al. show; codes pack at ``bits`` per coordinate and
round-trip (hypothesis); a hostile message is refused with the reason; the bytes a run
counts are the packed ones; whole runs learn, from Python, TOML and the CLI; a transform
after the quantiser is refused."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from potluck.cli import app
from potluck.config import ExperimentConfig
from potluck.core.message import Message, MessageError
from potluck.core.params import ParamSpec
from potluck.core.parts import part_context
from potluck.models.zoo import build_model
from potluck.orchestrator import run_experiment
from potluck.store.sqlite import RunStore
from potluck.updates import bitpack
from potluck.updates.quantize import QSGD, SCALE, CastUpdate, QuantizeDownlink, hadamard


def spec(*numels: int) -> ParamSpec:
    return ParamSpec(tuple(f"p{i}" for i in range(len(numels))), tuple((n,) for n in numels))


def ctx(round: int = 1, client: int = 0) -> Any:
    return part_context(7, round, "transforms.0.qsgd", client=client)


def roundtrip(q: QSGD, x: torch.Tensor, round: int = 1, client: int = 0) -> torch.Tensor:
    c = ctx(round, client)
    sent, _ = q.encode(Message({"delta": x}), {}, c)
    return q.decode(sent, c).arrays["delta"]


# ---- packing ----


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), count=st.integers(0, 300), seed=st.integers(0, 2**32 - 1))
def test_codes_pack_at_bits_per_code_and_round_trip(bits: int, count: int, seed: int) -> None:
    codes = np.random.default_rng(seed).integers(0, 2**bits, count).astype(np.uint8)
    buf = bitpack.pack(codes, bits)
    assert buf.dtype == np.uint8 and len(buf) == math.ceil(count * bits / 8)
    np.testing.assert_array_equal(bitpack.unpack(buf, bits, count), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_the_packing_is_numpys_bit_stream(bits: int) -> None:
    """The fast paths keep the format (``QuantizeDownlink``'s wire): each code's ``bits`` low
    bits, most significant first, as ``np.packbits`` lays them out."""
    for count in (0, 1, 7, 8, 9, 4099):
        codes = np.random.default_rng(count).integers(0, 2**bits, count).astype(np.uint8)
        fields = np.unpackbits(codes.reshape(-1, 1), axis=1)[:, 8 - bits :]
        np.testing.assert_array_equal(bitpack.pack(codes, bits), np.packbits(fields.ravel()))


def test_a_packed_buffer_of_the_wrong_length_is_refused() -> None:
    with pytest.raises(MessageError, match="10 codes of 3 bits take 4 bytes"):
        bitpack.unpack(np.zeros(3, dtype=np.uint8), 3, 10)


# ---- QSGD ----


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(2, 8),
    block=st.sampled_from([0, 1, 7, 64]),
    norm=st.sampled_from(["max", "l2"]),
    numels=st.lists(st.integers(1, 90), min_size=1, max_size=3),
    seed=st.integers(0, 2**32 - 1),
)
def test_decode_of_encode_keeps_shape_dtype_and_the_error_bound(
    bits: int, block: int, norm: str, numels: list[int], seed: int
) -> None:
    q = QSGD(bits, block, norm).bind(spec(*numels))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(numels), generator=g) * 10 ** float(torch.rand(1, generator=g) * 6 - 3)
    out = roundtrip(q, x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    # every coordinate lands on one of the two levels around it: within one level's width
    c = ctx()
    sent, _ = q.encode(Message({"delta": x}), {}, c)
    lengths = torch.tensor(q._lengths())
    width = sent.arrays[SCALE].repeat_interleave(lengths)[: len(x)] / q.levels
    assert bool(((out - x).abs() <= width * (1 + 1e-5) + 1e-30).all())
    assert bool((torch.sign(out) * torch.sign(x) >= 0).all())  # never the wrong sign


@pytest.mark.parametrize(("norm", "rotate"), [("max", False), ("l2", False), ("max", True)])
def test_qsgd_is_unbiased(norm: str, rotate: bool) -> None:
    d, trials = 64, 4000
    q = QSGD(bits=2, block=16, norm=norm, rotate=rotate).bind(spec(d))  # type: ignore[arg-type]
    x = torch.randn(d, generator=torch.Generator().manual_seed(0))
    outs = torch.stack([roundtrip(q, x, round=r) for r in range(trials)])
    mean, sd = outs.mean(0), outs.std(0)
    # each coordinate's mean within 5 standard errors of the truth (1 level of 2 bits: the
    # rounding is far from deterministic), and the whole vector's error of the mean small
    assert bool(((mean - x).abs() <= 5 * sd / math.sqrt(trials) + 1e-6).all())
    assert float(torch.linalg.vector_norm(mean - x) / torch.linalg.vector_norm(x)) < 0.05


def test_the_variance_is_within_qsgds_bound_and_the_max_norm_variants() -> None:
    d, block, bits, trials = 256, 64, 3, 400
    x = torch.randn(d, generator=torch.Generator().manual_seed(1))
    blocks = x.view(-1, block)
    for norm in ("l2", "max"):
        q = QSGD(bits, block, norm).bind(spec(d))  # type: ignore[arg-type]
        s = q.levels
        err = torch.stack([roundtrip(q, x, round=r) - x for r in range(trials)])
        var = float((err**2).sum(1).mean())
        if norm == "l2":  # Alistarh et al., Lemma 3.1, per bucket of n coordinates
            n = block
            bound = min(n / s**2, math.sqrt(n) / s) * float((blocks**2).sum())
        else:  # a uniform grid of width scale / s: at most width^2 / 4 per coordinate
            bound = float((blocks.abs().amax(1) ** 2).sum()) * block / (4 * s**2)
        assert var <= bound, (norm, var, bound)
        assert var > 0.05 * bound  # not vacuous: the error is really of that order


def test_the_hadamard_rotation_is_orthonormal_and_its_own_inverse() -> None:
    rows = torch.randn(3, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    h = hadamard(torch.eye(8, dtype=torch.float64))
    torch.testing.assert_close(h @ h.T, torch.eye(8, dtype=torch.float64))
    torch.testing.assert_close(hadamard(hadamard(rows)), rows)
    torch.testing.assert_close(rows.norm(dim=1), hadamard(rows).norm(dim=1))


def butterflies(rows: torch.Tensor) -> torch.Tensor:
    """The plain Walsh-Hadamard butterflies, level by level (the reference order)."""
    y, (count, n), h = rows.clone(), rows.shape, 1
    while h < n:
        pairs = y.reshape(count, n // (2 * h), 2, h)
        a, b = pairs[:, :, 0, :], pairs[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2).reshape(count, n)
        h *= 2
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_fast_transform_is_bitwise_the_plain_butterflies(dtype: torch.dtype) -> None:
    """``fwht`` (QSGD's and distributed DP's) sums the same terms in the same order."""
    from potluck.updates.hadamard import fwht

    g = torch.Generator().manual_seed(5)
    for count, n in ((1, 1), (3, 2), (5, 4), (7, 64), (2, 1024), (1, 1 << 15)):
        rows = torch.randn(count, n, dtype=dtype, generator=g) * 1e3
        rows[0, 0] = -0.0
        out = fwht(rows)
        assert out.dtype == dtype and out.data_ptr() != rows.data_ptr()
        expect = butterflies(rows)
        assert torch.equal(out, expect) and torch.equal(out.signbit(), expect.signbit())


def test_the_rounding_lanes_give_the_same_message_on_one_thread_or_two() -> None:
    q = QSGD(bits=4, block=512, rotate=True).bind(spec(70_000, 3))
    x = torch.randn(70_003, generator=torch.Generator().manual_seed(6))
    threads = torch.get_num_threads()
    sent = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            sent.append(q.encode(Message({"delta": x}), {}, ctx())[0])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(sent[0].arrays[k], sent[1].arrays[k]) for k in ("delta", SCALE))


def test_rotation_shrinks_the_error_of_a_spiky_update() -> None:
    """Suresh et al.: a few large coordinates set the scale every other coordinate is
    quantised against; the rotation spreads them, and the mean squared error falls."""
    d = 1024
    x = torch.randn(d, generator=torch.Generator().manual_seed(3)) * 0.01
    x[[5, 700]] = torch.tensor([4.0, -3.0])
    errors = {}
    for rotate in (False, True):
        q = QSGD(bits=4, block=1024, rotate=rotate).bind(spec(d))
        err = torch.stack([roundtrip(q, x, round=r) - x for r in range(50)])
        errors[rotate] = float((err**2).sum(1).mean())
    assert errors[True] < errors[False] / 5, errors


def test_the_rotation_depends_on_the_round_and_the_client() -> None:
    q = QSGD(bits=8, block=8, rotate=True).bind(spec(8))
    signs = {(r, c): tuple(q._signs(ctx(r, c)).tolist()) for r in (1, 2) for c in (0, 1)}
    assert len(set(signs.values())) == 4


def test_the_packed_bytes_are_bits_per_coordinate_plus_the_scales() -> None:
    q = QSGD(bits=4, block=512).bind(spec(1000, 30))
    sent, _ = q.encode(Message({"delta": torch.randn(1030)}), {}, ctx())
    assert sent.nbytes == 3 * 512 * 4 // 8 + 3 * 4  # 3 padded blocks of 512, 3 scales
    per_layer = QSGD(bits=4, block=0).bind(spec(1000, 30))
    sent, _ = per_layer.encode(Message({"delta": torch.randn(1030)}), {}, ctx())
    assert sent.nbytes == math.ceil(1030 * 4 / 8) + 2 * 4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({SCALE: None}, "'delta/scale' must be a float32 array"),
        ({SCALE: torch.ones(3)}, "must hold 2 scales"),
        ({SCALE: torch.tensor([1.0, float("nan")])}, "must be finite and >= 0"),
        ({SCALE: torch.tensor([1.0, -1.0])}, "must be finite and >= 0"),
        ({"delta": torch.zeros(10)}, "the packed delta must be a uint8 array"),
        ({"delta": torch.zeros(10, dtype=torch.uint8)}, "take 64 bytes"),
        ({"delta": torch.zeros(64, dtype=torch.uint8)}, "a code is 0, which is no level"),
    ],
)
def test_a_hostile_message_is_refused_with_the_reason(change: dict, message: str) -> None:
    q = QSGD(bits=4, block=64).bind(spec(100))
    sent, _ = q.encode(Message({"delta": torch.randn(100)}), {}, ctx())
    arrays = {k: v for k, v in {**sent.arrays, **change}.items() if v is not None}
    with pytest.raises(MessageError, match=message):
        q.decode(Message(arrays), ctx())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 1}, "qsgd.bits must be 2 to 8"),
        ({"bits": 9}, "qsgd.bits must be 2 to 8"),
        ({"block": -1}, "qsgd.block must be >= 0"),
        ({"norm": "l1"}, "qsgd.norm must be 'max' or 'l2'"),
        ({"rotate": True, "block": 0}, "power of two"),
        ({"rotate": True, "block": 100}, "power of two"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QSGD(**kwargs)


# ---- casting ----


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_cast_update_halves_the_bytes_and_rounds_to_nearest(dtype: str) -> None:
    cast = CastUpdate(dtype)  # type: ignore[arg-type]
    x = torch.randn(1000, generator=torch.Generator().manual_seed(4))
    sent, _ = cast.encode(Message({"delta": x}), {}, ctx())
    assert sent.nbytes == 2000
    out = cast.decode(sent, ctx()).arrays["delta"]
    eps = {"bfloat16": 2**-8, "float16": 2**-11}[dtype]  # half a unit in the last place
    assert bool(((out - x).abs() <= x.abs() * eps).all())
    with pytest.raises(MessageError, match=f"the delta must be {dtype}"):
        cast.decode(Message({"delta": x}), ctx())


# ---- whole runs ----

FRAMING = 200  # bytes of an update's names, dtypes, shapes and scalars, at most
BASE: dict[str, Any] = {
    "seed": 0,
    "rounds": 6,
    "data": {"dataset": "digits", "num_clients": 10, "partition": {"kind": "iid"}},
    "model": {"name": "mlp"},
    "sampler": {"clients_per_round": 5},
    "client": {"epochs": 1, "batch_size": 16, "lr": 0.1},
}


def run(transforms: list[dict[str, Any]], **extra: Any) -> Any:
    cfg = ExperimentConfig.from_dict({**BASE, "transforms": transforms, **extra})
    return run_experiment(cfg.build())


@pytest.fixture(scope="module")
def dense() -> Any:
    return run([])


def test_quantised_runs_learn_and_count_the_packed_bytes(dense: Any) -> None:
    d = dense.weights.numel()
    q8 = run([{"name": "qsgd", "bits": 8}])
    q4 = run([{"name": "qsgd", "bits": 4, "rotate": True}])
    for result, bits in ((q8, 8), (q4, 4)):
        blocks = math.ceil(d / 512)
        per_update = blocks * 512 * bits // 8 + 4 * blocks
        for r, m in zip(dense.history, result.history, strict=True):
            # the packed codes and scales, and each update's framing (Message.wire_bytes)
            assert 0 < m["bytes_up"] - m["updates"] * per_update < m["updates"] * FRAMING
            assert 0 < r["bytes_up"] - r["updates"] * 4 * d < r["updates"] * FRAMING
    final = {k: r.history[-1]["test_accuracy"] for k, r in (("f32", dense), ("q8", q8), ("q4", q4))}
    assert final["f32"] > 0.5, final  # learning (chance: 0.1), and the quantised runs alike
    assert final["q8"] == pytest.approx(final["f32"], abs=0.02), final
    assert final["q4"] == pytest.approx(final["f32"], abs=0.03), final


def test_a_transform_after_the_quantiser_is_refused() -> None:
    with pytest.raises(ValueError, match=r"qsgd.*needs to be the last update transform"):
        run([{"name": "qsgd"}, {"name": "clip", "max_norm": 1.0}])


def test_the_cli_runs_a_quantised_experiment_from_toml(tmp_path: Path) -> None:
    toml = tmp_path / "q.toml"
    toml.write_text(
        "rounds = 2\n"
        '[data]\ndataset = "digits"\nnum_clients = 6\n'
        '[model]\nname = "mlp"\n'
        "[sampler]\nclients_per_round = 3\n"
        '[[transforms]]\nname = "qsgd"\nbits = 4\nblock = 256\nrotate = true\n'
    )
    out = CliRunner().invoke(app, ["run", str(toml), "--store", str(tmp_path / "runs")])
    assert out.exit_code == 0, out.output
    store = RunStore(tmp_path / "runs")
    (info,) = store.list_runs()
    assert info.config["transforms"] == [
        {"name": "qsgd", "bits": 4, "block": 256, "norm": "max", "rotate": True}
    ]
    d = sum(p.numel() for p in build_model("mlp", input_shape=(64,), num_classes=10).parameters())
    blocks = math.ceil(d / 256)
    for record in store.rounds(info.run_id):  # the stored bytes are the packed ones
        per_update = blocks * 256 // 2 + 4 * blocks
        framing = record.metrics["updates"] * FRAMING
        assert 0 < record.metrics["bytes_up"] - record.metrics["updates"] * per_update < framing


# ---- the downlink ----


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(1, 8),
    block=st.integers(1, 100),
    size=st.integers(0, 300),
    seed=st.integers(0, 2**32 - 1),
)
def test_a_quantised_broadcast_is_within_half_a_step(
    bits: int, block: int, size: int, seed: int
) -> None:
    down = QuantizeDownlink(bits, block)
    w = torch.randn(size, generator=torch.Generator().manual_seed(seed))
    extra = torch.arange(3, dtype=torch.int64)  # not float32: passed as it is
    sent = down.encode(Message({"w": w, "t/count": extra}, {"note": "x"}))
    back = down.decode(sent)
    assert set(back.arrays) == {"w", "t/count"} and back.scalars == {"note": "x"}
    assert torch.equal(back.arrays["t/count"], extra)
    out = back.arrays["w"]
    assert out.dtype == torch.float32 and out.shape == w.shape
    blocks = max(1, math.ceil(size / block))
    padded = torch.zeros(blocks * block)
    padded[:size] = w
    rows = padded.view(blocks, block)
    step = (rows.amax(1) - rows.amin(1)) / (2**bits - 1)
    half = step.repeat_interleave(block)[:size] / 2
    assert bool(((out - w).abs() <= half * (1 + 1e-4) + 1e-6).all())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"w/size": -1}, "bad size"),
        ({"w/grid": torch.ones(3)}, "needs 4 finite grid values"),
        ({"w/grid": torch.tensor([0.0, 1.0, float("inf"), 1.0])}, "needs 4 finite grid values"),
        ({"w": torch.zeros(3)}, "must be packed uint8 codes"),
        ({"w": torch.zeros(3, dtype=torch.uint8)}, "take 128 bytes"),
    ],
)
def test_a_malformed_broadcast_is_refused_by_the_client(change: dict, message: str) -> None:
    down = QuantizeDownlink(8, 64)
    sent = down.encode(Message({"w": torch.randn(100)}))
    arrays = {k: v for k, v in {**sent.arrays, **change}.items() if isinstance(v, torch.Tensor)}
    scalars = {
        **sent.scalars,
        **{k: v for k, v in change.items() if not isinstance(v, torch.Tensor)},
    }
    with pytest.raises(MessageError, match=message):
        down.decode(Message(arrays, scalars))


def test_an_8_bit_downlink_quarters_the_bytes_down_and_still_learns(dense: Any) -> None:
    q = run([], downlink=[{"name": "quantize", "bits": 8}])
    for f, h in zip(dense.history, q.history, strict=True):
        # a byte per weight, padded to whole blocks of 512 (4,810 -> 5,120), a grid per block
        assert 0.25 < h["bytes_down"] / f["bytes_down"] < 0.28
    assert not torch.equal(dense.weights, q.weights)  # clients trained from rounded weights
    final = (dense.history[-1]["test_accuracy"], q.history[-1]["test_accuracy"])
    assert final[1] == pytest.approx(final[0], abs=0.02), final
