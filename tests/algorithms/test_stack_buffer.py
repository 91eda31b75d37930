"""The reused (K, d) stack equals ``torch.stack`` whatever the sequence of cohorts."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from potluck.aggregate import StackBuffer, WeightedMean
from potluck.core.parts import part_context


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.integers(1, 5)), min_size=1, max_size=6))
def test_stack_buffer_equals_torch_stack_across_rounds(rounds: list[tuple[int, int]]) -> None:
    buf = StackBuffer()
    gen = torch.Generator().manual_seed(len(rounds))
    for k, d in rounds:
        rows = [torch.randn(d, generator=gen) for _ in range(k)]
        got = buf.stack(rows)
        assert torch.equal(got, torch.stack(rows))
        weights = torch.rand(k, generator=gen) + 0.1
        ctx = part_context(0, 1, "aggregator")
        mean_of_buffer, _ = WeightedMean().aggregate(got, weights, {}, ctx)
        mean_of_stack, _ = WeightedMean().aggregate(torch.stack(rows), weights, {}, ctx)
        assert torch.equal(mean_of_buffer, mean_of_stack)


def test_stack_buffer_reuses_memory_for_smaller_cohorts_and_grows() -> None:
    buf = StackBuffer()
    big = buf.stack([torch.ones(4)] * 5)
    small = buf.stack([torch.zeros(4)] * 2)
    assert small.data_ptr() == big.data_ptr()
    assert torch.equal(small, torch.zeros(2, 4))
    grown = buf.stack([torch.ones(4)] * 7)
    assert grown.shape == (7, 4)
    other_dtype = buf.stack([torch.ones(4, dtype=torch.float64)])
    assert other_dtype.dtype == torch.float64


def test_stack_buffer_refuses_bad_rows() -> None:
    buf = StackBuffer()
    with pytest.raises(ValueError, match="zero rows"):
        buf.stack([])
    with pytest.raises(ValueError, match="1-D"):
        buf.stack([torch.ones(2, 2)])
    with pytest.raises(RuntimeError):
        buf.stack([torch.ones(3), torch.ones(4)])
