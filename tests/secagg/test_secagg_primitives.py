"""The building blocks of secure aggregation: Shamir sharing (property-tested), the
cryptography, the fixed-point encoding and the graph."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from potluck.secagg import crypto, shamir
from potluck.secagg.encoding import FixedPoint
from potluck.secagg.graph import degree, harary

secrets = st.binary(min_size=32, max_size=32)


# ---- Shamir --------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(secret=secrets, m=st.integers(1, 40), data=st.data())
def test_any_t_shares_reconstruct_the_secret(secret: bytes, m: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, m))
    xs = data.draw(st.lists(st.integers(1, 10_000), min_size=m, max_size=m, unique=True))
    shares = shamir.split(secret, xs, t)
    chosen = data.draw(st.lists(st.sampled_from(range(m)), min_size=t, max_size=t, unique=True))
    points = [(xs[i], shares[i]) for i in chosen]
    assert shamir.combine(points) == secret
    others = [xs[i] for i in range(m) if i not in chosen]
    for base in (tuple(x for x, _ in points), (*(x for x, _ in points[::-1]), *others[:1])):
        assert shamir.combine(points, base) == secret  # from the weights of a superset
    back = [shamir.from_bytes(shamir.to_bytes(y)) for y in shares]
    assert back == shares


@settings(max_examples=60, deadline=None)
@given(secret=secrets, other=secrets, t=st.integers(2, 8), data=st.data())
def test_fewer_than_t_shares_are_consistent_with_any_secret(
    secret: bytes, other: bytes, t: int, data: st.DataObject
) -> None:
    """t - 1 shares and *any* other secret lie on one polynomial of degree t - 1 (so the
    shares say nothing about which); a wrong share does not give the secret back."""
    xs = list(range(1, t + 1))
    shares = shamir.split(secret, xs, t)
    partial = [(x, y) for x, y in zip(xs[:-1], shares[:-1], strict=True)]
    # the polynomial through (0, other) and the t - 1 shares, evaluated at x_t
    lagrange = _evaluate([(0, int.from_bytes(other, "big")), *partial], xs[-1])
    assert shamir.combine([*partial, (xs[-1], lagrange)]) == other
    wrong = (shares[-1] + data.draw(st.integers(1, 2**64))) % shamir.PRIME
    try:
        assert shamir.combine([*partial, (xs[-1], wrong)]) != secret
    except ValueError as exc:  # the wrong secret is not even 32 bytes
        assert "a share is wrong" in str(exc)


def _evaluate(points: list[tuple[int, int]], x: int) -> int:
    p, total = shamir.PRIME, 0
    for i, (xi, yi) in enumerate(points):
        num = den = 1
        for j, (xj, _) in enumerate(points):
            if j != i:
                num, den = num * (x - xj) % p, den * (xi - xj) % p
        total = (total + yi * num * pow(den, -1, p)) % p
    return total


def test_fresh_coefficients_each_split() -> None:
    xs = [1, 2, 3]
    assert shamir.split(bytes(32), xs, 2) != shamir.split(bytes(32), xs, 2)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: shamir.split(bytes(31), [1], 1), "a secret has 32 bytes"),
        (lambda: shamir.split(bytes(32), [1, 1], 1), "distinct"),
        (lambda: shamir.split(bytes(32), [0, 1], 1), "share points must be in"),
        (lambda: shamir.split(bytes(32), [1], 0), "at least 1"),
        (lambda: shamir.combine([]), "no shares"),
        (lambda: shamir.from_bytes(b"\xff" * 66), "below the field's prime"),
        (lambda: shamir.from_bytes(b"\x00" * 65), "a share has 66 bytes"),
    ],
)
def test_shamir_refuses_bad_input(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


# ---- cryptography ----------------------------------------------------------------------------


def test_keys_are_bound_to_their_purpose_and_round() -> None:
    sk_a, pk_a = crypto.keypair()
    sk_b, pk_b = crypto.keypair()
    key = crypto.agree(sk_a, pk_b, b"mask", 1)
    assert key == crypto.agree(sk_b, pk_a, b"mask", 1) and len(key) == 32
    assert key not in {crypto.agree(sk_a, pk_b, b"share", 1), crypto.agree(sk_a, pk_b, b"mask", 2)}
    assert crypto.public_key(sk_a) == pk_a
    with pytest.raises(ValueError, match="key agreement failed"):
        crypto.agree(sk_a, bytes(32), b"mask", 1)  # a small-order point


def test_a_sealed_share_opens_only_untouched_under_its_own_associated_data() -> None:
    key = crypto.derive(b"k" * 32, b"share", 1)
    ad = crypto.associated(1, 4, 5)
    box = crypto.seal(key, b"share bytes", ad)
    assert crypto.unseal(key, box, ad) == b"share bytes"
    assert box != crypto.seal(key, b"share bytes", ad)  # a fresh nonce each time
    others = [crypto.associated(2, 4, 5), crypto.associated(1, 5, 4), crypto.associated(1, 4, 6)]
    assert all(crypto.unseal(key, box, other) is None for other in others)
    flipped = bytearray(box)
    flipped[-1] ^= 1
    assert crypto.unseal(key, bytes(flipped), ad) is None
    assert crypto.unseal(key, box[:20], ad) is None


@pytest.mark.parametrize("bits", [32, 64])
def test_masks_are_a_keyed_uniform_stream(bits: int) -> None:
    key, other = crypto.derive(b"a" * 32, b"self", 1), crypto.derive(b"b" * 32, b"self", 1)
    mask = crypto.expand(key, 20_000, bits)
    assert mask.dtype == crypto.DTYPES[bits] and mask.shape == (20_000,)
    assert np.array_equal(mask, crypto.expand(key, 20_000, bits))
    assert not np.array_equal(mask[:100], crypto.expand(other, 100, bits))
    assert np.array_equal(crypto.expand(key, 100, bits), mask[:100])  # a prefix of the stream
    counts = np.bincount(np.frombuffer(mask.tobytes(), np.uint8), minlength=256)
    expected = counts.sum() / 256
    assert ((counts - expected) ** 2 / expected).sum() < 370  # chi-square, 255 dof, p ~ 1e-6


# ---- fixed point -----------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(1, 20),
    q=st.integers(8, 24),
    clip=st.floats(0.1, 10.0),
    seed=st.integers(0, 2**31),
)
def test_the_decoded_sum_is_the_weighted_mean_within_the_rounding_error(
    n: int, q: int, clip: float, seed: int
) -> None:
    fp = FixedPoint(clip, q, 32, 500.0)
    rng = np.random.default_rng(seed)
    deltas = rng.uniform(-2 * clip, 2 * clip, (n, 7)).astype(np.float32)
    weights = rng.uniform(0, 500, n)
    weights[0] = 500.0
    total = sum(fp.encode(x, w, rng) for x, w in zip(deltas, weights, strict=True))
    mean = fp.decode(np.asarray(total))
    clipped = np.clip(deltas.astype(np.float64), -clip, clip)
    plain = (weights[:, None] * clipped).sum(0) / weights.sum()
    bound = n * (clip + np.abs(plain)) / (fp.scale * weights.sum() / 500.0 - n)
    assert np.all(np.abs(mean - plain) <= bound)
    assert int(fp.signed(np.asarray(total))[-1]) == n


def test_stochastic_rounding_is_unbiased() -> None:
    fp = FixedPoint(1.0, 4, 32, 1.0)  # 1 -> 8: 0.3 encodes to 2.4, rounded to 2 or 3
    draws = fp.signed(fp.encode(np.full(40_000, 0.3, np.float32), 1.0, np.random.default_rng(1)))
    values = draws[:-2]
    assert set(values.tolist()) == {2, 3}
    assert abs(values.mean() - 2.4) < 0.02


def test_the_overflow_check_names_the_settings_to_change() -> None:
    FixedPoint(1.0, 20, 32, 1.0).check_capacity(4095)
    with pytest.raises(ValueError) as err:
        FixedPoint(1.0, 20, 32, 1.0, "transforms.1.secagg").check_capacity(4096)
    message = str(err.value)
    assert message.startswith("transforms.1.secagg: 4096 clients can sum to 4096 * 2^19")
    assert "lower quantization_bits to at most 19" in message and "bits = 64" in message
    FixedPoint(1.0, 19, 32, 1.0).check_capacity(4096)  # the advice is enough
    FixedPoint(1.0, 20, 64, 1.0).check_capacity(4096)


def test_a_weight_above_max_weight_is_refused() -> None:
    fp = FixedPoint(1.0, 20, 32, 100.0, "transforms.0.secagg")
    with pytest.raises(ValueError, match=r"max_weight = 100\], got 120: raise max_weight"):
        fp.encode(np.zeros(3, np.float32), 120.0, np.random.default_rng(0))


# ---- the graph -------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 60), k=st.integers(1, 70), seed=st.integers(0, 1000))
def test_the_harary_graph_is_k_regular_and_symmetric(n: int, k: int, seed: int) -> None:
    members = np.arange(n, dtype=np.int64) * 7 + 3
    kk = degree(n, k)
    table = harary(members, kk, np.random.default_rng(seed))
    assert table.shape == (n, kk) and (kk % 2 == 0 or kk == n - 1)
    index = {int(c): i for i, c in enumerate(members)}
    for i, row in enumerate(table):
        assert len(set(row.tolist())) == len(row) and int(members[i]) not in row
        assert all(int(members[i]) in table[index[int(v)]] for v in row)


def test_the_degree_is_about_log_n() -> None:
    assert [degree(n, "log") for n in (2, 10, 100, 1000, 10**6)] == [1, 4, 8, 10, 20]
    assert degree(50, "all") == 49 and degree(50, 7) == 8 and degree(1, "log") == 0
    assert all(degree(n, "log") >= math.log2(n) for n in range(3, 2000))
