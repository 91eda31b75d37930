"""Sparsified uploads: the index coding round-trips (hypothesis) at far fewer than 32 bits an
index and refuses every malformed stream with the reason; error feedback loses nothing
(sent + new residual == old residual + delta, exactly); top-k contracts as Stich et al.'s
Lemma says and random-k in expectation (a statistical test); DGC's momentum correction is
plain error feedback at momentum 0 and masks what it sent; a hostile message is refused
with the reason; a run counts the encoded bytes, learns at 1 %, resumes to the same result,
and runs from TOML and the CLI."""

from __future__ import annotations

import math
import re
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
from potluck.orchestrator import resume_experiment, run_experiment
from potluck.store.sqlite import RunStore
from potluck.testing import learning
from potluck.updates.indices import decode_indices, encode_indices
from potluck.updates.sparsify import INDEX, RandomK, Sparsifier, TopK, kept


def spec(d: int) -> ParamSpec:
    return ParamSpec(("w",), ((d,),))


def ctx(round: int = 1, client: int = 0) -> Any:
    return part_context(3, round, "transforms.0.sparse", client=client)


def dense(t: Sparsifier, sent: Message) -> torch.Tensor:
    return t.decode(sent, ctx()).arrays["delta"]


# ---- the index coding ----


@st.composite
def index_sets(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    size = draw(st.one_of(st.integers(1, 70), st.integers(71, 5000), st.just(200_000)))
    layout = draw(st.sampled_from(["uniform", "runs", "all", "none"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if layout == "all":
        return np.arange(size), size
    if layout == "none":
        return np.array([], dtype=np.int64), size
    count = draw(st.integers(0, size)) if size <= 5000 else int(rng.integers(0, size))
    if layout == "uniform":
        return np.sort(rng.choice(size, count, replace=False)), size
    start = int(rng.integers(0, size - count + 1))  # one contiguous run: a whole layer
    return np.arange(start, start + count), size


@settings(max_examples=120, deadline=None)
@given(case=index_sets())
def test_the_index_coding_round_trips_within_the_bitmap_size(case: tuple[np.ndarray, int]) -> None:
    idx, size = case
    buf = encode_indices(idx, size)
    assert buf.dtype == np.uint8 and buf.ndim == 1
    assert len(buf) <= 1 + math.ceil(size / 8)  # never more than the bitmap
    out = decode_indices(buf, size, len(idx))
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, idx)


@pytest.mark.parametrize(("density", "most_bits"), [(0.001, 12.0), (0.01, 8.5), (0.1, 5.0)])
def test_an_index_costs_far_fewer_than_32_bits(density: float, most_bits: float) -> None:
    """Measured on 1.66 M coordinates (the McMahan CNN): 11.5, 8.11 and 4.76 bits an index;
    the entropy bounds are 11.4, 8.08 and 4.69."""
    size = 1_660_000
    count = kept(density, size)
    idx = np.sort(np.random.default_rng(0).choice(size, count, replace=False))
    buf = encode_indices(idx, size)
    bits = 8 * len(buf) / count
    entropy = -(density * math.log2(density) + (1 - density) * math.log2(1 - density)) / density
    assert entropy <= bits < most_bits
    assert buf[0] != 0  # Rice-coded, not the bitmap


def test_a_dense_set_takes_the_bitmap() -> None:
    idx = np.arange(0, 1000, 2)
    buf = encode_indices(idx, 1000)
    assert buf[0] == 0 and len(buf) == 1 + 125


def rice(idx: list[int], size: int) -> np.ndarray:
    buf = encode_indices(np.array(idx, dtype=np.int64), size)
    assert buf[0] != 0
    return buf


def with_byte(buf: np.ndarray, at: int, value: int) -> np.ndarray:
    out = buf.copy()
    out[at] = value
    return out


SPARSE = [5, 200, 201, 700]  # 4 of 1000: Rice-coded in 6 bytes
BITMAP = encode_indices(np.arange(0, 10, 2), 10)  # 5 of 10: a bitmap of 2 bytes


@pytest.mark.parametrize(
    ("buf", "size", "count", "message"),
    [
        (np.zeros(3, np.int32), 10, 1, "must be a 1-D uint8 array, got int32"),
        (np.zeros((2, 2), np.uint8), 10, 1, "must be a 1-D uint8 array, got uint8 (2, 2)"),
        (np.zeros(0, np.uint8), 10, 0, "empty (no header byte)"),
        (with_byte(BITMAP, 0, 30), 10, 5, "unknown coding 30 (0: bitmap, 1 to 5"),
        (BITMAP[:-1], 10, 5, "a bitmap of 10 bits takes 2 bytes, got 1"),
        (np.append(BITMAP, 0).astype(np.uint8), 10, 5, "takes 2 bytes, got 3"),
        (with_byte(BITMAP, 2, BITMAP[2] | 1), 10, 5, "the bitmap's padding bits are set"),
        (BITMAP, 10, 4, "the bitmap holds 5 indices, expected 4"),
        (rice(SPARSE, 1000)[:-1], 1000, 4, "truncated"),
        (rice(SPARSE, 1000), 1000, 5, "truncated"),
        (np.append(rice(SPARSE, 1000), 0).astype(np.uint8), 1000, 4, "but the 4 codes end"),
        (rice(SPARSE, 1000), 1000, 3, "but the 3 codes end within"),
        (rice(SPARSE, 1000), 700, 4, "index 700 is out of range [0, 700)"),
        (np.array([1, 0, 0, 0], np.uint8), 8, 1, "3 bytes of Rice code, longer than the bitmap"),
    ],
)
def test_a_malformed_index_stream_is_refused_with_the_reason(
    buf: np.ndarray, size: int, count: int, message: str
) -> None:
    with pytest.raises(MessageError, match="index coding: .*" + re.escape(message)):
        decode_indices(buf, size, count)


def test_set_padding_bits_in_a_rice_code_are_refused() -> None:
    buf = rice(SPARSE, 1000)
    with_padding = with_byte(buf, len(buf) - 1, buf[-1] | 1)
    with pytest.raises(MessageError, match="the Rice code's padding bits are set"):
        decode_indices(with_padding, 1000, 4)


# ---- error feedback ----

SPARSIFIERS = [
    lambda f: TopK(f),
    lambda f: RandomK(f),
]


@settings(max_examples=80, deadline=None)
@given(
    d=st.integers(1, 300),
    fraction=st.floats(1e-3, 1.0),
    which=st.sampled_from([0, 1]),
    seed=st.integers(0, 2**32 - 1),
)
def test_error_feedback_loses_nothing(d: int, fraction: float, which: int, seed: int) -> None:
    """sent + new residual == old residual + delta, bit for bit."""
    t = SPARSIFIERS[which](fraction).bind(spec(d))
    g = torch.Generator().manual_seed(seed)
    delta, residual = torch.randn(d, generator=g), torch.randn(d, generator=g) * 0.1
    sent, state = t.encode(Message({"delta": delta}), {"residual": residual}, ctx())
    assert sent.arrays["delta"].shape == (kept(fraction, d),)
    decoded = dense(t, sent)
    assert torch.equal(decoded + state["residual"], delta + residual)
    assert torch.equal(state["residual"][decoded != 0], torch.zeros(int((decoded != 0).sum())))


@settings(max_examples=80, deadline=None)
@given(d=st.integers(1, 400), fraction=st.floats(1e-3, 1.0), seed=st.integers(0, 2**32 - 1))
def test_top_k_contracts_as_stich_et_al_lemma_says(d: int, fraction: float, seed: int) -> None:
    """||e - top_k(e)||^2 <= (1 - k/d) ||e||^2, and top-k leaves the smallest behind."""
    t = TopK(fraction, error_feedback=False).bind(spec(d))
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(d, generator=g) * torch.rand(d, generator=g) ** 3  # uneven magnitudes
    sent, _ = t.encode(Message({"delta": e}), {}, ctx())
    rest = (e - dense(t, sent)).double()
    k, norm = kept(fraction, d), float(e.double().square().sum())
    assert float(rest.square().sum()) <= (1 - k / d) * norm * (1 + 1e-12)
    if k < d:
        assert float(rest.abs().max()) <= float(sent.arrays["delta"].abs().min())


def test_random_k_contracts_in_expectation() -> None:
    """E ||e - rand_k(e)||^2 = (1 - k/d) ||e||^2: the mean over 2,000 draws (clients and
    rounds: each its own stream) within 4 of its standard errors (a false failure about
    once in 16,000 seeds; the seed is fixed)."""
    d, fraction = 200, 0.1
    t = RandomK(fraction, error_feedback=False).bind(spec(d))
    e = torch.randn(d, generator=torch.Generator().manual_seed(1)) ** 3  # uneven magnitudes
    norm = float(e.double().square().sum())
    ratios = []
    for client in range(2000):
        sent, _ = t.encode(Message({"delta": e}), {}, ctx(round=1 + client % 7, client=client))
        rest = (e - t.decode(sent, ctx()).arrays["delta"]).double()
        ratios.append(float(rest.square().sum()) / norm)
    r = np.array(ratios)
    stderr = r.std(ddof=1) / math.sqrt(len(r))
    assert abs(r.mean() - (1 - kept(fraction, d) / d)) < 4 * stderr
    assert stderr > 0  # the draws differ between clients and rounds


def test_random_k_draws_from_the_round_and_client_stream() -> None:
    t = RandomK(0.1).bind(spec(500))
    e = torch.ones(500)

    def drawn(round: int, client: int) -> list[int]:
        sent, _ = t.encode(Message({"delta": e}), {}, ctx(round, client))
        return torch.nonzero(t.decode(sent, ctx()).arrays["delta"]).ravel().tolist()

    assert drawn(1, 0) == drawn(1, 0)
    assert len({tuple(drawn(r, c)) for r, c in [(1, 0), (1, 1), (2, 0)]}) == 3


# ---- DGC's momentum correction ----


def dgc_reference(deltas: list[torch.Tensor], m: float, k: int) -> list[torch.Tensor]:
    """Lin et al.'s Algorithm (one worker): u = m u + g, v = v + u, send top-k of v, then
    zero u and v where it was sent (momentum factor masking)."""
    u, v, sent = torch.zeros_like(deltas[0]), torch.zeros_like(deltas[0]), []
    for g in deltas:
        u = m * u + g
        v = v + u
        idx = torch.topk(v.abs(), k).indices
        out = torch.zeros_like(v)
        out[idx] = v[idx]
        u[idx], v[idx] = 0.0, 0.0
        sent.append(out)
    return sent


def run_chain(t: TopK, deltas: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[Any]]:
    state: dict[str, torch.Tensor] = {}
    sent, states = [], []
    for r, g in enumerate(deltas, 1):
        msg, state = t.encode(Message({"delta": g}), state, ctx(round=r))
        sent.append(dense(t, msg))
        states.append(state)
    return sent, states


@pytest.mark.parametrize("m", [0.0, 0.5, 0.9])
def test_dgc_follows_lin_et_al_and_is_plain_error_feedback_at_momentum_zero(m: float) -> None:
    g = torch.Generator().manual_seed(5)
    deltas = [torch.randn(300, generator=g) for _ in range(6)]
    t = TopK(0.05, momentum=m).bind(spec(300))
    sent, states = run_chain(t, deltas)
    ref = dgc_reference(deltas, m, t.k)
    for a, b in zip(sent, ref, strict=True):
        assert torch.equal(a, b)
    if m == 0:
        plain, _ = run_chain(TopK(0.05).bind(spec(300)), deltas)
        assert all(torch.equal(a, b) for a, b in zip(sent, plain, strict=True))
        assert t.client_state == {"residual": "float32"}
        return
    assert t.client_state == {"u": "float32", "v": "float32"}
    for out, state in zip(sent, states, strict=True):  # factor masking
        at = out != 0
        assert int(at.sum()) == t.k
        assert not bool(state["u"][at].any()) and not bool(state["v"][at].any())
        assert bool(state["u"][~at].all()) and bool(state["v"][~at].all())
    # the momentum matters: the second round's sends differ from plain error feedback
    plain, _ = run_chain(TopK(0.05).bind(spec(300)), deltas)
    assert not torch.equal(sent[1], plain[1])


# ---- settings and hostile messages ----


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TopK(0.0), r"top_k.fraction must be in \(0, 1\], got 0.0"),
        (lambda: RandomK(1.5), r"random_k.fraction must be in \(0, 1\], got 1.5"),
        (lambda: TopK(0.1, momentum=1.0), r"top_k.momentum must be in \[0, 1\)"),
        (lambda: TopK(0.1, False, 0.9), "top_k.momentum needs error_feedback = true"),
    ],
)
def test_bad_settings_are_refused(make: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_without_error_feedback_nothing_is_kept() -> None:
    t = TopK(0.1, error_feedback=False).bind(spec(50))
    _, state = t.encode(Message({"delta": torch.randn(50)}), {}, ctx())
    assert state == {} and t.client_state == {} and t.client_state_shapes(spec(50)) == {}


def good(d: int = 1000) -> tuple[TopK, Message]:
    t = TopK(0.01).bind(spec(d))
    delta = torch.randn(d, generator=torch.Generator().manual_seed(0))
    sent, _ = t.encode(Message({"delta": delta, "other": torch.zeros(2)}), {}, ctx())
    return t, sent


def changed(**arrays: Any) -> Message:
    _, sent = good()
    out = {**sent.arrays, **arrays}
    return Message({k: v for k, v in out.items() if v is not None}, sent.scalars)


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (lambda: changed(delta=torch.zeros(10, dtype=torch.float64)), "float32 kept values"),
        (lambda: changed(delta=torch.zeros(11)), "must hold k = 10 values, got shape (11,)"),
        (lambda: changed(delta=torch.zeros(5, 2)), "must hold k = 10 values, got shape (5, 2)"),
        (lambda: changed(delta=torch.full((10,), math.nan)), "'delta' contains NaN or Inf"),
        (lambda: changed(delta=None), "'delta' must be the float32 kept values, got NoneType"),
        (lambda: changed(**{INDEX: None}), "missing the coded coordinates 'delta/index'"),
        (
            lambda: changed(**{INDEX: torch.zeros(4, dtype=torch.int32)}),
            "'delta/index': index coding: must be a 1-D uint8 array, got int32",
        ),
        (
            lambda: changed(**{INDEX: torch.zeros(0, dtype=torch.uint8)}),
            "'delta/index': index coding: empty",
        ),
        (
            lambda: changed(
                **{INDEX: torch.from_numpy(encode_indices(np.arange(0, 900, 100), 1000))}
            ),
            "index coding: truncated",
        ),
    ],
)
def test_a_hostile_message_is_refused_with_the_reason(message: Any, reason: str) -> None:
    t, _ = good()
    with pytest.raises(MessageError, match=r"^top_k: .*" + re.escape(reason)):
        t.decode(message(), ctx())


def test_decode_gives_the_dense_delta_and_keeps_the_other_arrays() -> None:
    t, sent = good()
    out = t.decode(sent, ctx())
    assert set(out.arrays) == {"delta", "other"}
    assert out.arrays["delta"].dtype == torch.float32 and out.arrays["delta"].shape == (1000,)


def test_the_fraction_is_read_as_written() -> None:
    assert kept(0.07, 100) == 7 and kept(1e-9, 100) == 1 and kept(0.3, 10) == 3


# ---- whole runs ----

BASE: dict[str, Any] = {
    "seed": 0,
    "rounds": 20,
    "data": {"dataset": "digits", "num_clients": 10, "partition": {"kind": "iid"}},
    "model": {"name": "mlp"},
    "sampler": {"clients_per_round": 10},
    "client": {"epochs": 1, "batch_size": 16, "lr": 0.1},
    "run": {"threads": 1},
}


def experiment(transforms: list[dict[str, Any]], **extra: Any) -> Any:
    return ExperimentConfig.from_dict({**BASE, "transforms": transforms, **extra}).build()


def test_a_run_counts_the_encoded_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each member's ``bytes_up`` is its encoded message's (the k values and the index
    bytes), far below the dense delta's."""
    encoded: dict[tuple[int, int], Message] = {}
    encode = TopK.encode

    def recording(self: TopK, message: Message, state: Any, c: Any) -> Any:
        out, new = encode(self, message, state, c)
        encoded[c.round, c.client] = out
        return out, new

    monkeypatch.setattr(TopK, "encode", recording)
    exp = experiment([{"name": "top_k", "fraction": 0.01}], rounds=3)
    store = RunStore(tmp_path)
    result = run_experiment(exp, store)
    assert result.run_id is not None
    d = result.weights.numel()
    k = kept(0.01, d)
    per_client = [(r, c, m) for r, c, m in store.client_metrics(result.run_id) if "bytes_up" in m]
    assert len(per_client) == len(encoded) == 30
    for rnd, client, metrics in per_client:
        sent = encoded[rnd, client]
        index = sent.arrays[INDEX]
        assert sent.nbytes == 4 * k + len(index)
        assert 8 * (len(index) - 1) / k < 10  # bits per index, past the header byte
        assert metrics["bytes_up"] == sent.wire_bytes
    plain = run_experiment(experiment([], rounds=1))
    assert result.history[0]["bytes_up"] < plain.history[0]["bytes_up"] / 25


def test_top_k_at_one_percent_with_error_feedback_learns() -> None:
    """20 rounds of digits at 1 % of the coordinates: well above chance (0.1), and error
    feedback is what makes it learn (measured: 0.83 with it, 0.63 without, 0.88 dense)."""
    ef = run_experiment(experiment([{"name": "top_k", "fraction": 0.01}]))
    plain = run_experiment(
        experiment([{"name": "top_k", "fraction": 0.01, "error_feedback": False}])
    )
    final = ef.history[-1]["test_accuracy"], plain.history[-1]["test_accuracy"]
    assert final[0] > 0.7 and final[0] > final[1] + 0.1, final


def test_random_k_and_dgc_runs_learn() -> None:
    """8 rounds (measured: random-k at 25 % 0.76, 0.27 without error feedback; DGC at 1 %,
    momentum 0.5, 0.72, plain error feedback 0.55)."""
    final = {
        name: run_experiment(experiment([section], rounds=8)).history[-1]["test_accuracy"]
        for name, section in {
            "random_k": {"name": "random_k", "fraction": 0.25},
            "random_k_no_ef": {"name": "random_k", "fraction": 0.25, "error_feedback": False},
            "dgc": {"name": "top_k", "momentum": 0.5},
        }.items()
    }
    assert final["random_k"] > 0.6 and final["random_k_no_ef"] < final["random_k"] - 0.2, final
    assert final["dgc"] > 0.6, final


def test_a_resumed_dgc_run_equals_the_uninterrupted_one(tmp_path: Path) -> None:
    """DGC's ``u`` and ``v`` are client state in the store: a run interrupted after round 2
    and resumed from its stored config ends where the uninterrupted one does."""

    class Stop(Exception):
        pass

    def stop_after_two(rnd: int, _metrics: object) -> None:
        if rnd == 2:
            raise Stop

    section = {"name": "top_k", "fraction": 0.05, "momentum": 0.9}
    extra = {"rounds": 4, "sampler": {"clients_per_round": 4}}
    store = RunStore(tmp_path)
    with pytest.raises(Stop):
        run_experiment(experiment([section], **extra), store, on_round=stop_after_two)
    (info,) = store.list_runs()
    states = store.client_states(info.run_id, list(range(10)))
    stored = [s for s in states if s]
    assert stored and all(
        set(s) == {"transforms.0.top_k/u", "transforms.0.top_k/v"} for s in stored
    )
    resumed = resume_experiment(ExperimentConfig.from_dict(info.config).build(), store, info.run_id)
    full = run_experiment(experiment([section], **extra))
    assert learning(resumed) == learning(full)
    assert torch.equal(resumed.weights, full.weights)


def test_a_transform_after_top_k_is_refused() -> None:
    with pytest.raises(ValueError, match=r"top_k.*needs to be the last update transform"):
        experiment([{"name": "top_k"}, {"name": "clip", "max_norm": 1.0}])


def test_the_cli_runs_top_k_from_toml(tmp_path: Path) -> None:
    toml = tmp_path / "topk.toml"
    toml.write_text(
        "rounds = 2\n"
        '[data]\ndataset = "digits"\nnum_clients = 6\n'
        '[model]\nname = "mlp"\n'
        "[sampler]\nclients_per_round = 3\n"
        '[[transforms]]\nname = "top_k"\nfraction = 0.01\n'
    )
    out = CliRunner().invoke(app, ["run", str(toml), "--store", str(tmp_path / "runs")])
    assert out.exit_code == 0, out.output
    store = RunStore(tmp_path / "runs")
    (info,) = store.list_runs()
    assert info.config["transforms"] == [
        {"name": "top_k", "fraction": 0.01, "error_feedback": True, "momentum": 0.0}
    ]
    states = store.client_states(info.run_id, list(range(6)))
    assert any("transforms.0.top_k/residual" in s for s in states)
    for record in store.rounds(info.run_id):
        assert 0 < record.metrics["bytes_up"] < record.metrics["updates"] * 1000  # dense: 19 kB
