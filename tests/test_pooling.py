"""Channels-last max-pooling in evaluation: bit for bit the plain result, rewritten only
where it is exact and faster."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from potluck.algorithms import fedavg
from potluck.client import ClientProgram
from potluck.client.pooling import MIN_CHANNELS, channels_last_pooling
from potluck.core.task import Task
from potluck.data import Federation
from potluck.models.zoo import small_cnn


@settings(max_examples=60, deadline=None)
@given(
    channels=st.integers(1, 20),
    side=st.integers(4, 13),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 2),
    ceil_mode=st.booleans(),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_pooled_values_are_bit_for_bit_the_plain_ones(
    channels: int,
    side: int,
    kernel: int,
    stride: int,
    dilation: int,
    ceil_mode: bool,
    ties: bool,
    seed: int,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, channels, side, side, generator=gen)
    if ties:  # many equal values in a window, as after a ReLU
        x = x.round().clamp(min=0)
    padding = min(kernel // 2, 1)
    args = (kernel, stride, padding, dilation, ceil_mode)
    with torch.no_grad():
        plain = F.max_pool2d(x, *args)
        with channels_last_pooling():
            fast = F.max_pool2d(x, *args)
    assert torch.equal(plain, fast)
    assert fast.is_contiguous()


def _rewrites(x: torch.Tensor, **kwargs: object) -> bool:
    """Whether the call ran on a channels-last input (watched through torch.Tensor.contiguous)."""
    seen: list[torch.memory_format] = []
    original = torch.Tensor.contiguous

    def watch(self: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format):
        seen.append(memory_format)
        return original(self, memory_format=memory_format)

    torch.Tensor.contiguous = watch  # type: ignore[method-assign]
    try:
        with channels_last_pooling():
            F.max_pool2d(x, 2, **kwargs)
    finally:
        torch.Tensor.contiguous = original  # type: ignore[method-assign]
    return torch.channels_last in seen


def test_only_exact_and_faster_calls_are_rewritten() -> None:
    wide = torch.randn(2, MIN_CHANNELS, 8, 8)
    with torch.no_grad():
        assert _rewrites(wide)
        assert not _rewrites(torch.randn(2, MIN_CHANNELS - 1, 8, 8))  # not faster there
        assert not _rewrites(wide, return_indices=True)  # indices: left alone
    assert not _rewrites(wide.requires_grad_())  # a training step's pooling


def test_gradients_through_the_mode_are_the_plain_ones() -> None:
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    (g_plain,) = torch.autograd.grad(F.max_pool2d(x, 2).sum(), x)
    with channels_last_pooling():
        (g_mode,) = torch.autograd.grad(F.max_pool2d(x, 2).sum(), x)
    assert torch.equal(g_plain, g_mode)


def test_evaluation_of_a_cnn_equals_a_plain_forward() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(300, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (300,), generator=gen)
    fed = Federation.from_client_data([(x[:100], y[:100])])
    program = ClientProgram(Task(lambda: small_cnn((1, 28, 28), 10)), fed, fedavg(), seed=0)
    w = program.initial_weights()
    got = program.evaluate_arrays(w, x.numpy(), y.numpy())
    model = small_cnn((1, 28, 28), 10)
    program.spec.load_into(model, w)
    with torch.no_grad():
        loss = sum(
            float(F.cross_entropy(model(x[s : s + 256]), y[s : s + 256])) * len(y[s : s + 256])
            for s in range(0, 300, 256)
        )
        correct = int((model(x).argmax(1) == y).sum())
    assert got.n == 300
    assert got.correct == correct
    assert np.isclose(got.loss_sum, loss, rtol=0, atol=1e-9)
