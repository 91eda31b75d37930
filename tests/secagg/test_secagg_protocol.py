"""SecAgg+ over in-memory messages, its server view instrumented (``secagg_harness``): the
unmasked sum is the plain sum of the encodings exactly, for any dropouts before any stage;
the round aborts exactly when a needed secret has fewer than ``t`` shares; a masked input
looks uniform; the server never sees an individual's input or a client's secret; a
tampered or replayed share is detected and its sender named."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from secagg_harness import Outcome, View, bound, encoded_sum, inputs_for, secure_round

from potluck.core.message import Message, MessageError
from potluck.secagg import SecAgg, protocol
from potluck.secagg.graph import degree
from potluck.secagg.parts import STAGES

D = 6


def expected_abort(out: Outcome, clients: list[int], k: int, part: SecAgg) -> bool:
    """The threshold rule, from the sets of who answered each stage: too few advertised for
    any client to have t neighbours; or a survivor's self-mask seed, or the mask key of a
    client that shared and dropped next to a survivor, with fewer than t of its neighbours
    among those who answered the unmask stage."""
    drops = out.view.drops
    u1 = set(clients) - drops.get("advertise", set())
    k1 = min(k, len(u1) - 1)
    if u1 and part.threshold_for(k1) > k1:
        return True
    u3 = set(out.uploads)
    if not u3:
        return False
    t = part.threshold_for(k1)
    table = dict(zip(out.server["u1"].tolist(), out.server["table"].tolist(), strict=True))
    u2 = set(out.server["u2"].tolist())
    u4 = u3 - drops.get("unmask", set())
    dropped_with_survivor = {v for v in u2 - u3 if u3 & set(table[v])}
    return any(len(u4 & set(table[w])) < t for w in u3 | dropped_with_survivor)


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(2, 12),
    neighbours=st.sampled_from(["log", "all", 2, 4]),
    threshold=st.sampled_from([0.3, 0.5, 1.0, 1, 2]),
    leave=st.lists(st.sampled_from([*STAGES, *["never"] * 6]), min_size=12, max_size=12),
    bits=st.sampled_from([32, 64]),
)
def test_unmasked_sum_is_exact_and_aborts_exactly_below_threshold(
    n: int, neighbours: int | str, threshold: float, leave: list[str], bits: int
) -> None:
    part = bound(
        SecAgg(neighbours, threshold, quantization_bits=12, bits=bits, max_weight=100.0), D
    )
    clients = [3 * i + 1 for i in range(n)]  # ids need not be 0..n-1
    drops = {s: {c for c, x in zip(clients, leave, strict=False) if x == s} for s in STAGES}
    k = degree(n, neighbours)
    if isinstance(threshold, int) and threshold > k:
        return  # refused before the round (tested below)
    inputs = inputs_for(clients, D, seed=n)
    out = secure_round(part, inputs, drops)
    aborts = expected_abort(out, clients, k, part)
    assert (out.aborted is not None) == aborts, out.aborted
    if out.total is not None:
        survivors = sorted(out.uploads)
        assert np.array_equal(out.total, encoded_sum(part, inputs, survivors))
        assert int(out.total[-1]) == len(survivors)
        weights = np.array([inputs[c][1] for c in survivors])
        plain = sum(np.clip(inputs[c][0], -1, 1) * inputs[c][1] for c in survivors) / weights.sum()
        tol = len(survivors) * 2 / (2**11 * weights.sum() / 100.0)
        assert np.abs(out.mean.numpy() - plain).max() <= tol


def test_a_threshold_count_above_the_neighbours_is_refused() -> None:
    part = bound(SecAgg(neighbours=2, threshold=3), D)
    with pytest.raises(ValueError, match="threshold 3 is above the 2 neighbours of each of 5"):
        secure_round(part, inputs_for([0, 1, 2, 3, 4], D))


def test_complete_graph_survives_any_dropout_of_fewer_than_n_minus_t() -> None:
    part = bound(SecAgg(neighbours="all", threshold=0.5), D)
    clients = list(range(10))
    inputs = inputs_for(clients, D)
    drops = {"masked_input": {2, 5}, "unmask": {7}}  # 9 neighbours each, t = 5
    out = secure_round(part, inputs, drops)
    assert out.aborted is None and sorted(out.uploads) == [0, 1, 3, 4, 6, 7, 8, 9]
    assert np.array_equal(out.total, encoded_sum(part, inputs, sorted(out.uploads)))
    assert out.view.metrics == {
        "neighbours": 9, "threshold": 5, "advertised": 10, "shared": 10, "masked": 8,
        "unmasked": 7,
    }  # fmt: skip


def test_an_abort_before_unmasking_reveals_no_share() -> None:
    part = bound(SecAgg(neighbours=2, threshold=2), D)  # a ring: every neighbour is needed
    clients = list(range(6))
    out = secure_round(part, inputs_for(clients, D), {"masked_input": {3}})
    assert out.aborted is not None and "no share was revealed" in out.aborted
    assert not any("b_shares" in m.arrays or "sk_shares" in m.arrays for m in out.view.seen)


# ---- what the server sees ------------------------------------------------------------------


def _chi_square_bytes(values: np.ndarray) -> float:
    counts = np.bincount(np.frombuffer(values.tobytes(), dtype=np.uint8), minlength=256)
    expected = counts.sum() / 256
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("bits", [32, 64])
def test_a_masked_input_is_indistinguishable_from_uniform(bits: int) -> None:
    """Chi-square of its bytes against uniform, 255 degrees of freedom: the 1e-6 quantile is
    about 370; the plain encoding of the same (constant) input is far from uniform."""
    d = 8192
    part = bound(SecAgg(neighbours=4, bits=bits), d)
    inputs = {c: (np.full(d, 0.25, np.float32), 10.0) for c in range(6)}
    out = secure_round(part, inputs)
    masked = out.uploads[2].arrays["delta"].numpy()
    assert _chi_square_bytes(masked) < 370
    plain = part.encoding().encode(inputs[2][0], 10.0, np.random.default_rng(0))
    assert _chi_square_bytes(plain) > 10_000
    # and each 32-bit limb's top byte (the most structured one in a plain encoding) too
    limbs = masked.view(np.uint32)
    top = np.bincount(limbs >> 24, minlength=256)
    assert float(((top - top.mean()) ** 2 / top.mean()).sum()) < 370


def test_the_server_never_sees_an_individual_input_or_a_client_secret() -> None:
    part = bound(SecAgg(neighbours=4, threshold=0.5, bits=32), D)
    clients = list(range(8))
    inputs = inputs_for(clients, D)
    out = secure_round(part, inputs, {"masked_input": {6}})  # one dropout: its key is rebuilt
    assert out.aborted is None
    fp = part.encoding()
    individual = [fp.encode(*inputs[c], out.view.ctx(c).rng("rounding")).tobytes() for c in clients]
    secrets = [
        protocol._bytes(out.view.states[c][name])
        for c in clients
        for name in ("c_sk", "s_sk", "b")
        if name in out.view.states.get(c, {})
    ]
    assert len(secrets) == 3 * 8
    server_side = [*out.view.seen, *out.view.sent, Message(out.server)]
    blob = b"".join(t.numpy().tobytes() for m in server_side for t in m.arrays.values())
    assert not any(vec in blob for vec in individual)
    # the dropped client's mask key is reconstructed by design; every other secret stays
    revealed = protocol._bytes(out.view.states[6]["s_sk"])
    assert not any(s in blob for s in secrets if s != revealed)
    for c in clients:  # nor a slice of an unmasked input (the weighted coordinates)
        assert individual[c][: 4 * D] not in blob


BoxOf = Callable[[View, torch.Tensor], torch.Tensor]
OnLeave = Callable[[View, int, Message], Message]


def _replace_box(receiver: int, sender: int, box_of: BoxOf) -> OnLeave:
    """Tamper with the inbox of ``receiver``: the box from ``sender`` replaced by
    ``box_of(view, box)``."""

    def tamper(view: View, client: int, message: Message) -> Message:
        if client != receiver:
            return message
        boxes = message.arrays["ciphertexts"].clone()
        row = message.arrays["senders"].tolist().index(sender)
        boxes[row] = box_of(view, boxes[row])
        return Message({**message.arrays, "ciphertexts": boxes})

    return tamper


def _flipped(view: View, box: torch.Tensor) -> torch.Tensor:
    out = box.clone()
    out[40] ^= 1
    return out


def _reflected(view: View, box: torch.Tensor) -> torch.Tensor:
    """Client 1's own box for client 3, handed back to it as 3's: the same X25519 key (the
    pair's), so only the associated data (sender, receiver) tells them apart."""
    sent = next(m for m in view.seen if "ciphertexts" in m.arrays and _is_from(view, m, 1))
    row = view.states[1]["neighbours"].tolist().index(3)
    return sent.arrays["ciphertexts"][row]


def _is_from(view: View, message: Message, client: int) -> bool:
    return bool(torch.equal(message.arrays["b_hash"], _b_hash(view, client)))


def _b_hash(view: View, client: int) -> torch.Tensor:
    import hashlib

    digest = hashlib.sha256(protocol._bytes(view.states[client]["b"])).digest()
    return torch.frombuffer(bytearray(digest), dtype=torch.uint8)


@pytest.mark.parametrize(("how", "box_of"), [("tampered", _flipped), ("reflected", _reflected)])
def test_a_tampered_or_reflected_share_is_detected_and_its_sender_named(
    how: str, box_of: BoxOf
) -> None:
    part = bound(SecAgg(neighbours="all"), D)
    inputs = inputs_for(list(range(5)), D)
    out = secure_round(part, inputs, on_leave=_replace_box(1, 3, box_of))
    assert out.aborted is not None, how
    assert "client 1 received shares from client 3 that fail authentication" in out.aborted
    assert out.total is None and out.mean is None


def test_a_share_replayed_from_an_earlier_round_is_detected_and_its_sender_named() -> None:
    part = bound(SecAgg(neighbours="all"), D)
    inputs = inputs_for(list(range(5)), D)
    old = secure_round(part, inputs, rnd=1).view.inbox[1]  # what client 1 received in round 1
    out = secure_round(part, inputs, rnd=2, on_leave=lambda v, c, m: old if c == 1 else m)
    assert out.aborted is not None and "client 1 received shares from client 0" in out.aborted


# ---- the clients' own checks ---------------------------------------------------------------


def test_a_client_refuses_to_unmask_when_the_server_lies_about_who_dropped() -> None:
    part = bound(SecAgg(neighbours="all"), D)
    out = secure_round(part, inputs_for(list(range(4)), D))
    state, ctx = out.view.states[0], out.view.ctx(0)
    both = Message({"survivors": torch.tensor([0, 1, 2]), "dropped": torch.tensor([2, 3])})
    with pytest.raises(MessageError, match="overlap"):
        protocol.unmask(both, state, ctx)
    too_few = Message({"survivors": torch.tensor([0]), "dropped": torch.tensor([1, 2, 3])})
    assert protocol.unmask(too_few, state, ctx) is None  # t = 2 of 3 neighbours must survive


def test_a_client_with_too_few_senders_does_not_send_its_masked_input() -> None:
    part = bound(SecAgg(neighbours="all", threshold=3), D)
    out = secure_round(part, inputs_for(list(range(4)), D), {"share": {1, 2}})
    assert out.uploads == {} and out.aborted is None  # each has one sender, below t = 3
