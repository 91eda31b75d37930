"""Defining behaviour of the first members of the five algorithm parts."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from potluck.aggregate import WeightedMean
from potluck.algorithms import fedavg, fedper, fedprox, fedsgd
from potluck.client import LocalSGD
from potluck.core.message import Message
from potluck.core.parts import Context, part_context
from potluck.core.seeding import Seeds
from potluck.optim import ServerSGD
from potluck.sampling import UniformSampler
from potluck.updates import ClipNorm


def weighted_mean(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``WeightedMean``'s aggregate (it keeps no state)."""
    agg, state = WeightedMean().aggregate(deltas, weights, {}, part_context(0, 1, "aggregator"))
    assert state == {}
    return agg


def sampling(seed: int, rnd: int) -> Context:
    """The sampler's context in round ``rnd`` of a run with ``seed``."""
    return Context(seed, rnd, ("sampling", rnd))


def test_fedavg_worked_example_three_clients() -> None:
    deltas = torch.tensor([[1.0, 0.8, 0.5], [1.2, 0.9, 0.6], [0.9, 0.7, 0.4]])
    agg = weighted_mean(deltas, torch.tensor([100.0, 200.0, 700.0]))
    torch.testing.assert_close(agg, torch.tensor([0.97, 0.75, 0.45]), rtol=0, atol=1e-6)


def test_fedavg_worked_example_five_clients() -> None:
    deltas = torch.tensor(
        [[1.0, 0.8, 0.5], [1.2, 0.9, 0.6], [0.9, 0.7, 0.4], [1.1, 0.85, 0.55], [1.3, 1.0, 0.65]]
    )
    agg = weighted_mean(deltas, torch.tensor([50.0, 150.0, 100.0, 300.0, 4000.0]))
    expected = torch.tensor([1.27173913, 0.97826087, 0.63478261])
    torch.testing.assert_close(agg, expected, rtol=0, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    arrays(
        np.float32,
        st.tuples(st.integers(1, 8), st.integers(1, 16)),
        elements=st.floats(-100, 100, width=32),
    ),
    st.data(),
)
def test_weighted_mean_properties(deltas: np.ndarray, data: st.DataObject) -> None:
    k = deltas.shape[0]
    weights = np.array(data.draw(st.lists(st.integers(1, 1000), min_size=k, max_size=k)), float)
    agg = weighted_mean(torch.from_numpy(deltas), torch.from_numpy(weights)).numpy()
    # a convex combination: inside the coordinate-wise hull, and equal to numpy's average
    assert np.all(agg >= deltas.min(0) - 1e-3) and np.all(agg <= deltas.max(0) + 1e-3)
    np.testing.assert_allclose(agg, np.average(deltas, axis=0, weights=weights), atol=1e-3)
    # scaling all weights does not change the mean; permuting clients does not either
    perm = np.random.default_rng(0).permutation(k)
    again = weighted_mean(torch.from_numpy(deltas[perm]), torch.from_numpy(weights[perm] * 7))
    np.testing.assert_allclose(again.numpy(), agg, atol=1e-4)


def test_weighted_mean_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="empty cohort"):
        weighted_mean(torch.zeros(0, 3), torch.zeros(0))
    with pytest.raises(ValueError, match=r"weights must have shape \(2,\)"):
        weighted_mean(torch.zeros(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="positive sum"):
        weighted_mean(torch.zeros(2, 3), torch.zeros(2))


def test_local_sgd_matches_torch_optim_sgd() -> None:
    torch.manual_seed(0)
    w0 = torch.randn(5)
    grads = [torch.randn(5) for _ in range(4)]
    rule = LocalSGD(lr=0.1, momentum=0.9, weight_decay=0.01)
    w, state = w0.clone(), rule.init(w0)
    for g in grads:
        w, state = rule.step(w, state, g)
    p = torch.nn.Parameter(w0.clone())
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    torch.testing.assert_close(w, p.detach())


def test_local_sgd_step_count() -> None:
    assert LocalSGD(epochs=2, batch_size=10).num_steps(25) == 6
    assert LocalSGD(epochs=5, batch_size=10, max_steps=3).num_steps(25) == 3
    assert LocalSGD(batch_size="full").num_steps(25) == 1
    assert LocalSGD(batch_size=None) == LocalSGD(batch_size="full")  # None means full batch
    assert LocalSGD(batch_size=None).batch_size == "full"
    assert LocalSGD().num_steps(0) == 0
    with pytest.raises(ValueError, match="client lr must be > 0"):
        LocalSGD(lr=0)


def test_server_sgd_is_fedavg_and_fedavgm() -> None:
    w = torch.tensor([1.0, 2.0])
    d = torch.tensor([0.5, -0.5])
    plain = ServerSGD()
    assert plain.step(w, d, plain.init(w))[0].tolist() == [1.5, 1.5]
    m = ServerSGD(lr=1.0, momentum=0.5)
    w1, s1 = m.step(w, d, m.init(w))
    w2, _ = m.step(w1, d, s1)
    # v1 = d, v2 = 0.5 d + d = 1.5 d
    torch.testing.assert_close(w2, w + d + 1.5 * d)


def test_uniform_sampler() -> None:
    cohort, state = UniformSampler(clients_per_round=10).sample(1_000_000, {}, sampling(0, 1))
    assert len(np.unique(cohort)) == 10 and cohort.max() < 1_000_000 and state == {}
    assert cohort.dtype == np.int64 and bool((np.diff(cohort) > 0).all())
    assert UniformSampler(fraction=0.01, min_clients=5).cohort_size(100) == 5
    assert UniformSampler().cohort_size(100) == 10  # neither given: 10 per round
    with pytest.raises(
        ValueError, match="cannot sample 20 clients per round from a federation of 5"
    ):
        UniformSampler(clients_per_round=20).cohort_size(5)
    with pytest.raises(ValueError, match="give one of clients_per_round or fraction, not both"):
        UniformSampler(clients_per_round=3, fraction=0.2)
    counts = np.zeros(20)
    for r in range(2000):
        counts[UniformSampler(clients_per_round=5).sample(20, {}, sampling(0, r))[0]] += 1
    assert counts.min() > 400 and counts.max() < 600  # 500 expected: uniform


def test_uniform_sampler_draws_from_the_runs_sampling_stream() -> None:
    sampler = UniformSampler(clients_per_round=7)
    for seed, rnd in ((0, 1), (3, 12)):
        cohort, _ = sampler.sample(50, {}, sampling(seed, rnd))
        expected = np.sort(Seeds(seed).numpy("sampling", rnd).choice(50, 7, replace=False))
        np.testing.assert_array_equal(cohort, expected)
    # reproducible in (seed, round); another round draws another cohort
    again, _ = sampler.sample(50, {}, sampling(3, 12))
    np.testing.assert_array_equal(again, sampler.sample(50, {}, sampling(3, 12))[0])
    assert not np.array_equal(again, sampler.sample(50, {}, sampling(3, 13))[0])


@settings(max_examples=50, deadline=None)
@given(
    arrays(np.float32, st.integers(1, 50), elements=st.floats(-1e3, 1e3, width=32)),
    st.floats(0.01, 100),
)
def test_clip_norm_bounds_norm_and_keeps_direction(delta: np.ndarray, c: float) -> None:
    t = torch.from_numpy(delta)
    m = Message(arrays={"delta": t}, scalars={"num_examples": 1})
    sent, state = ClipNorm(c).encode(m, {}, part_context(0, 1, "transforms.0.clip", client=0))
    out = sent.arrays["delta"]
    assert state == {} and sent.scalars["num_examples"] == 1
    norm = float(torch.linalg.vector_norm(t))
    assert float(torch.linalg.vector_norm(out)) <= c * (1 + 1e-5) + 1e-6
    if norm <= c:
        assert torch.equal(out, t)
    else:
        torch.testing.assert_close(out * (norm / c), t, rtol=1e-4, atol=1e-3)


def test_named_compositions() -> None:
    a = fedavg(clients_per_round=10, epochs=5, batch_size=10, lr=0.1, server_momentum=0.9)
    assert (a.name, a.local.epochs, a.server.momentum) == ("fedavg", 5, 0.9)
    s = fedsgd(fraction=0.1, lr=0.3)
    assert (s.local.max_steps, s.local.batch_size, s.local.lr, s.server.lr) == (1, "full", 1.0, 0.3)


def test_parts_have_namespaces_in_round_order() -> None:
    algo = fedprox(mu=0.1, clients_per_round=2, transforms=(ClipNorm(1.0),))
    assert [ns for ns, _ in algo.parts()] == [
        "sampler",
        "stragglers",
        "local",
        "terms.0.fedprox",
        "transforms.0.clip",
        "aggregator",
        "server",
    ]
    parts = dict(algo.parts())
    assert parts["terms.0.fedprox"] is algo.terms[0] and parts["server"] is algo.server
    # fedper's preset adds its own transform before the ones given
    ns = [ns for ns, _ in fedper(clients_per_round=2, transforms=(ClipNorm(1.0),)).parts()]
    assert ns[3:6] == ["terms.0.fedper", "transforms.0.keep_local", "transforms.1.clip"]
