"""FedAdagrad, FedAdam, FedYogi (Reddi et al. 2021, Algorithm 2): values, purity, bounds."""

from __future__ import annotations

import doctest
import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save

from potluck.algorithms import fedavg
from potluck.algorithms.base import from_config
from potluck.core.parts import part_context
from potluck.core.registry import RegistryError, build_part, part_config
from potluck.optim import ServerAdagrad, ServerAdam, ServerOptimizer, ServerYogi, adaptive

# Shared by the hand-computed cases: lr 1, beta1 0.5, tau 0.5 (so v starts at 0.25), beta2 0.75.
W0 = [0.0, 1.0, -1.0]
DELTA1 = [1.0, -2.0, 0.0]
DELTA2 = [-1.0, 0.5, 4.0]
# m1 = 0.5 * DELTA1 and m2 = 0.5 * m1 + 0.5 * DELTA2, the same for all three optimizers.
M1 = [0.5, -1.0, 0.0]
M2 = [-0.25, -0.25, 2.0]


def _two_steps(
    opt: ServerAdagrad | ServerAdam | ServerYogi,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    w = torch.tensor(W0)
    state = opt.init(w)
    for delta in (DELTA1, DELTA2):
        w, state = opt.step(w, torch.tensor(delta), state)
    return w, state


def _expected_w2(v1: list[float], v2: list[float]) -> list[float]:
    """w2 = w0 + m1 / (sqrt(v1) + tau) + m2 / (sqrt(v2) + tau) with lr 1 and tau 0.5."""
    return [
        w + a / (math.sqrt(p) + 0.5) + b / (math.sqrt(q) + 0.5)
        for w, a, p, b, q in zip(W0, M1, v1, M2, v2, strict=True)
    ]


def _check(opt: ServerAdagrad | ServerAdam | ServerYogi, v1: list[float], v2: list[float]) -> None:
    w, state = _two_steps(opt)
    assert state["m"].tolist() == pytest.approx(M2)
    assert state["v"].tolist() == pytest.approx(v2)
    assert w.tolist() == pytest.approx(_expected_w2(v1, v2), rel=1e-6)


def test_adagrad_two_steps_by_hand() -> None:
    # v1 = 0.25 + [1, 4, 0]; v2 = v1 + [1, 0.25, 16]
    _check(ServerAdagrad(lr=1.0, beta1=0.5, tau=0.5), [1.25, 4.25, 0.25], [2.25, 4.5, 16.25])


def test_adam_two_steps_by_hand() -> None:
    # v1 = 0.75 * 0.25 + 0.25 * [1, 4, 0] = [0.4375, 1.1875, 0.1875]
    # v2 = 0.75 * v1 + 0.25 * [1, 0.25, 16] = [0.328125 + 0.25, 0.890625 + 0.0625, 0.140625 + 4]
    _check(
        ServerAdam(lr=1.0, beta1=0.5, tau=0.5, beta2=0.75),
        [0.4375, 1.1875, 0.1875],
        [0.578125, 0.953125, 4.140625],
    )


def test_yogi_two_steps_by_hand() -> None:
    # step 1: v0 - D1² = [-0.75, -3.75, 0.25], signs [-1, -1, +1]:
    #   v1 = 0.25 + 0.25 * [1, 4, -0] = [0.5, 1.25, 0.25]
    # step 2: v1 - D2² = [-0.5, 1.0, -15.75], signs [-1, +1, -1]:
    #   v2 = v1 + 0.25 * [1, -0.25, 16] = [0.75, 1.1875, 4.25]
    _check(
        ServerYogi(lr=1.0, beta1=0.5, tau=0.5, beta2=0.75),
        [0.5, 1.25, 0.25],
        [0.75, 1.1875, 4.25],
    )


def test_yogi_moves_v_additively_where_adam_moves_it_multiplicatively() -> None:
    # Coordinates: a spike (D² = 4 > v = 0.25), a lull after a spike (D² = 0.25 < v = 4), and
    # D² = v = 1, where both leave v at 1.
    state = {"m": torch.zeros(3), "v": torch.tensor([0.25, 4.0, 1.0])}
    delta = torch.tensor([2.0, 0.5, 1.0])
    kwargs = {"lr": 1.0, "beta1": 0.5, "tau": 0.5, "beta2": 0.75}
    w_adam, adam = ServerAdam(**kwargs).step(torch.zeros(3), delta, state)
    w_yogi, yogi = ServerYogi(**kwargs).step(torch.zeros(3), delta, state)
    # Adam: 0.75 v + 0.25 D² = [0.1875 + 1, 3 + 0.0625, 0.75 + 0.25]
    assert adam["v"].tolist() == [1.1875, 3.0625, 1.0]
    # Yogi: v + 0.25 D² on the spike, v - 0.25 D² in the lull
    assert yogi["v"].tolist() == [1.25, 3.9375, 1.0]
    # So Yogi steps less on the spike and, having forgotten the old spike less, in the lull too.
    assert (w_yogi.abs()[:2] < w_adam.abs()[:2]).all()
    assert w_yogi[2] == w_adam[2]


@pytest.mark.parametrize(
    "opt",
    [ServerAdam(), ServerYogi(), ServerAdagrad(lr=0.5)],
    ids=["adam", "yogi", "adagrad"],
)
def test_converges_on_a_quadratic(opt: ServerAdagrad | ServerAdam | ServerYogi) -> None:
    # Clients that each step all the way to w* send mean_delta = -(w - w*).
    target = torch.tensor([1.0, -2.0, 0.5])
    w = torch.zeros(3)
    state = opt.init(w)
    for _ in range(300):
        w, state = opt.step(w, target - w, state)
    assert torch.allclose(w, target, atol=1e-4)


@pytest.mark.parametrize("cls", [ServerAdam, ServerYogi, ServerAdagrad])
def test_state_is_tensors_that_round_trip_through_safetensors(
    cls: type[ServerAdagrad | ServerAdam | ServerYogi],
) -> None:
    opt = cls()
    w = torch.tensor([0.5, -1.0, 2.0])
    state = opt.init(w)
    assert set(state) == {"m", "v"}
    assert all(isinstance(t, torch.Tensor) and t.shape == w.shape for t in state.values())
    assert torch.equal(state["v"], torch.full((3,), opt.tau**2))
    for s in (state, opt.step(w, torch.tensor([0.1, 0.2, -0.3]), state)[1]):
        loaded = load(save(s))
        assert loaded.keys() == s.keys()
        assert all(torch.equal(loaded[k], s[k]) for k in s)
        delta = torch.tensor([1.0, -1.0, 0.0])
        w_a, s_a = opt.step(w, delta, s)
        w_b, s_b = opt.step(w, delta, loaded)
        assert torch.equal(w_a, w_b) and all(torch.equal(s_a[k], s_b[k]) for k in s)


@pytest.mark.parametrize("cls", [ServerAdam, ServerYogi, ServerAdagrad])
def test_step_does_not_mutate_its_inputs(
    cls: type[ServerAdagrad | ServerAdam | ServerYogi],
) -> None:
    opt = cls()
    w, delta = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.1, 0.2, -0.3])
    state = opt.step(w, delta, opt.init(w))[1]
    before = (w.clone(), delta.clone(), {k: t.clone() for k, t in state.items()})
    opt.step(w, delta, state)
    assert torch.equal(w, before[0]) and torch.equal(delta, before[1])
    assert all(torch.equal(state[k], before[2][k]) for k in state)


def _step_bounds(opt: ServerAdagrad | ServerAdam | ServerYogi) -> tuple[float, float]:
    """(first step, any step) bounds on |w_{t+1} - w_t| per coordinate, from v_{-1} = tau².

    Write |step| <= lr |m_t| / sqrt(v_t) with |m_t| <= (1 - b1) sum_k b1^k |D_{t-k}|.
    First step: m_1 = (1 - b1) D_1, and v_1 >= (1 - b2) D_1² (Adagrad: b2 = 0); for Yogi with
    D_1² <= tau² use sqrt(v_1) + tau >= tau >= |D_1| instead.
    Any step, by Cauchy-Schwarz on sum_k b1^k |D_{t-k}|:
      Adagrad: v_t >= sum D_i², so |m_t| / sqrt(v_t) <= (1 - b1) / sqrt(1 - b1²).
      Adam: v_t >= (1 - b2) sum b2^k D_{t-k}², so the ratio is
            <= (1 - b1) / sqrt((1 - b2)(1 - b1² / b2)).
      Yogi: v_t >= b2 v_{t-1} and v_t >= c D_t² with c = min(b2, 1 - b2) (check both signs of
            v_{t-1} - D_t²), so v_t >= c b2^k D_{t-k}² and the ratio is
            <= (1 - b1) / (sqrt(c) (1 - b1 / sqrt(b2))).
    """
    lr, b1 = opt.lr, opt.beta1
    if isinstance(opt, ServerAdagrad):
        return lr * (1 - b1), lr * (1 - b1) / math.sqrt(1 - b1**2)
    first = lr * (1 - b1) / math.sqrt(1 - opt.beta2)
    if isinstance(opt, ServerAdam):
        return first, lr * (1 - b1) / math.sqrt((1 - opt.beta2) * (1 - b1**2 / opt.beta2))
    c = min(opt.beta2, 1 - opt.beta2)
    return first, lr * (1 - b1) / (math.sqrt(c) * (1 - b1 / math.sqrt(opt.beta2)))


# |D| <= 1e6 keeps D² (and Adagrad's running sum of them) finite in float32.
_deltas = st.lists(
    st.lists(
        st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32),
        min_size=4,
        max_size=4,
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from([ServerAdam, ServerYogi, ServerAdagrad]),
    lr=st.floats(1e-3, 10.0),
    beta1=st.floats(0.0, 0.9),
    beta2=st.floats(0.82, 0.999),  # > 0.9², as the any-step bounds for Adam and Yogi need
    tau=st.floats(1e-6, 1.0),
    deltas=_deltas,
)
def test_steps_are_finite_and_bounded(
    kind: type[ServerAdagrad | ServerAdam | ServerYogi],
    lr: float,
    beta1: float,
    beta2: float,
    tau: float,
    deltas: list[list[float]],
) -> None:
    opt: ServerAdagrad | ServerAdam | ServerYogi
    if issubclass(kind, ServerAdagrad):
        opt = kind(lr, beta1=beta1, tau=tau)
    else:
        opt = kind(lr, beta1=beta1, tau=tau, beta2=beta2)
    first, bound = _step_bounds(opt)
    state = opt.init(torch.zeros(4))
    for t, delta in enumerate(deltas):
        # The update does not depend on w, so from w = 0 the new w is exactly the step.
        step, state = opt.step(torch.zeros(4), torch.tensor(delta), state)
        assert torch.isfinite(step).all() and all(torch.isfinite(s).all() for s in state.values())
        limit = first if t == 0 else bound
        assert step.abs().max().item() <= limit * (1 + 1e-5)


def test_first_adam_step_bound_is_tight_for_large_deltas() -> None:
    opt = ServerAdam(lr=0.1)
    step, _ = opt.step(torch.zeros(1), torch.tensor([1e6]), opt.init(torch.zeros(1)))
    assert step.item() == pytest.approx(0.1 * 0.1 / math.sqrt(0.01), rel=1e-6)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: ServerAdam(lr=0.0), r"ServerAdam lr must be in \(0, inf\), got 0.0"),
        (lambda: ServerYogi(lr=-1.0), r"ServerYogi lr must be in \(0, inf\), got -1.0"),
        (lambda: ServerAdagrad(lr=math.inf), r"ServerAdagrad lr must be in \(0, inf\), got inf"),
        (lambda: ServerAdam(lr=math.nan), r"ServerAdam lr must be in \(0, inf\), got nan"),
        (lambda: ServerAdagrad(beta1=1.0), r"ServerAdagrad beta1 must be in \[0, 1\), got 1.0"),
        (lambda: ServerYogi(beta1=-0.1), r"ServerYogi beta1 must be in \[0, 1\), got -0.1"),
        (lambda: ServerAdam(tau=0.0), r"ServerAdam tau must be in \(0, inf\), got 0.0"),
        (lambda: ServerAdam(beta2=1.0), r"ServerAdam beta2 must be in \[0, 1\), got 1.0"),
        (lambda: ServerYogi(beta2=-0.5), r"ServerYogi beta2 must be in \[0, 1\), got -0.5"),
    ],
)
def test_bad_hyperparameters_are_refused_by_name(make: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("cls", [ServerAdam, ServerYogi, ServerAdagrad])
def test_step_takes_the_round_context_and_does_not_depend_on_it(
    cls: type[ServerAdagrad | ServerAdam | ServerYogi],
) -> None:
    opt = cls()
    w, delta = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.1, 0.2, -0.3])
    state = opt.init(w)
    w_plain, s_plain = opt.step(w, delta, state)
    for rnd in (1, 7):
        w_ctx, s_ctx = opt.step(w, delta, state, part_context(0, rnd, "server"))
        assert torch.equal(w_ctx, w_plain) and all(
            torch.equal(s_ctx[k], s_plain[k]) for k in s_plain
        )


@pytest.mark.parametrize(
    ("name", "cls"), [("adam", ServerAdam), ("yogi", ServerYogi), ("adagrad", ServerAdagrad)]
)
def test_adaptive_servers_are_named_parts_of_an_algorithm(
    name: str, cls: type[ServerAdagrad | ServerAdam | ServerYogi]
) -> None:
    opt = cls(lr=0.5, beta1=0.5, tau=0.01)
    assert isinstance(opt, ServerOptimizer)
    section = part_config("server", opt)
    assert section["name"] == name and section["lr"] == 0.5 and section["tau"] == 0.01
    assert build_part("server", section, "server") == opt
    algo = fedavg(clients_per_round=2, server=opt)
    assert dict(algo.parts())["server"] is opt
    assert from_config(algo.to_config()) == algo
    with pytest.raises(RegistryError, match=r"^server\.lrr: unknown parameter .*'lr'\?"):
        build_part("server", {"name": name, "lrr": 0.1}, "server")
    with pytest.raises(RegistryError, match=rf"^server: {cls.__name__} lr must be in \(0, inf\)"):
        build_part("server", {"name": name, "lr": 0.0}, "server")


def test_docstring_examples_run() -> None:
    result = doctest.testmod(adaptive)
    assert result.attempted >= 3 and result.failed == 0
