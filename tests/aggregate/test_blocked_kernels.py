"""The kernels that work block by block (issue 16's throughput fixes) give what the whole
stack at once gives: the weighted mean's batched product, and the per-coordinate rules
(median, trimmed mean, Bulyan's closest-to-median mean) over many small blocks of
coordinates, NaN and infinities included (a NaN counts as the largest value, as in a sort)."""

from __future__ import annotations

import pytest
import torch

from potluck.aggregate import byzantine
from potluck.aggregate.coordinate import trimmed_mean
from potluck.aggregate.krum import closest_to_median_mean
from potluck.aggregate.mean import BLOCKS, weighted_sum


def whole_sort_median(x: torch.Tensor) -> torch.Tensor:
    ordered, k = x.sort(dim=0).values, x.shape[0]
    return (ordered[(k - 1) // 2] + ordered[k // 2]) / 2


def whole_sort_trimmed(x: torch.Tensor, b: int) -> torch.Tensor:
    k = x.shape[0]
    kept = x.sort(dim=0).values[b : k - b]
    return (kept.sum(dim=0, dtype=torch.float64) / (k - 2 * b)).to(x.dtype)


def whole_closest_mean(x: torch.Tensor, beta: int) -> torch.Tensor:
    nearest = (x - whole_sort_median(x)).abs().topk(beta, dim=0, largest=False).indices
    return x.gather(0, nearest).sum(dim=0, dtype=torch.float64) / beta


def stack(seed: int, k: int, d: int, special: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(k, d, generator=gen) * torch.rand(k, 1, generator=gen) * 10
    if special:
        u = torch.rand(k, d, generator=gen)
        x[u < 0.05] = float("nan")
        x[(u >= 0.05) & (u < 0.1)] = float("inf")
        x[(u >= 0.1) & (u < 0.15)] = -float("inf")
    return x


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


@pytest.mark.parametrize("k", [1, 2, 5, 12])
@pytest.mark.parametrize("d", [1, BLOCKS - 1, 3 * BLOCKS + 5])
def test_the_batched_weighted_sum_equals_the_vector_matrix_product(k: int, d: int) -> None:
    x = stack(k * d, k, d, special=False)
    w = torch.rand(k, generator=torch.Generator().manual_seed(d))
    torch.testing.assert_close(weighted_sum(w, x, batched=0), w @ x)


@pytest.mark.parametrize("block", [1, 7, 64])
@pytest.mark.parametrize("seed", range(6))
def test_per_coordinate_rules_give_the_same_block_by_block(
    monkeypatch: pytest.MonkeyPatch, block: int, seed: int
) -> None:
    monkeypatch.setattr(byzantine, "BLOCK", block)
    k, d = 3 + 4 * seed, 10 + 13 * seed
    x = stack(seed, k, d, special=seed % 2 == 0)
    assert same(byzantine.coordinate_median(x), whole_sort_median(x))
    assert same(trimmed_mean(x, (k - 1) // 3), whole_sort_trimmed(x, (k - 1) // 3))
    finite = stack(seed, k, d, special=False)
    assert same(closest_to_median_mean(finite, k // 3), whole_closest_mean(finite, k // 3))
