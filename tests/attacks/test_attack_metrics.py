"""PSNR, SSIM, image pairing and the membership ROC against known values and references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from potluck.attacks import metrics

images = st.integers(0, 2**31 - 1).map(
    lambda s: torch.rand(2, 1, 9, 9, generator=torch.Generator().manual_seed(s)).double()
)


def test_psnr_of_a_constant_error_is_twenty_log_range_over_error() -> None:
    a = torch.zeros(3, 1, 8, 8, dtype=torch.float64)
    assert metrics.psnr(a, a + 0.25, 1.0) == round(20 * math.log10(4), 9)
    assert metrics.psnr(a, a + 0.25, 2.0) == round(20 * math.log10(8), 9)
    assert metrics.psnr(a, a, 1.0) == math.inf


def test_ssim_of_identical_images_is_one_and_of_flat_images_their_luminance_term() -> None:
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(0)).double()
    assert metrics.ssim(x, x, 1.0) == 1.0
    a, b = torch.full((1, 1, 16, 16), 0.1).double(), torch.full((1, 1, 16, 16), 0.7).double()
    c1 = (0.01 * 2.0) ** 2  # data range 2
    luminance = (2 * 0.1 * 0.7 + c1) / (0.1**2 + 0.7**2 + c1)
    assert metrics.ssim(a, b, 2.0) == pytest.approx(luminance, abs=1e-8)  # rounded to 1e-9


def test_ssim_of_an_inverted_image_is_near_minus_one() -> None:
    # x and 1 - x: alike in luminance about 0.5, opposite in structure (covariance -var)
    x = torch.rand(1, 1, 11, 11, generator=torch.Generator().manual_seed(1)).double()
    assert metrics.ssim(x, 1 - x, 1.0) < -0.95


@settings(max_examples=25, deadline=None)
@given(images, images, st.floats(0.0, 1.0))
def test_ssim_is_symmetric_and_bounded_and_psnr_non_negative_in_range(
    a: torch.Tensor, b: torch.Tensor, mix: float
) -> None:
    b = mix * a + (1 - mix) * b
    s = metrics.ssim(a, b, 1.0)
    assert -1.0 <= s <= 1.0
    assert s == pytest.approx(metrics.ssim(b, a, 1.0), abs=1e-12)
    assert metrics.psnr(a, b, 1.0) >= 0.0  # both in [0, 1]: MSE <= 1


def test_ssim_falls_as_noise_grows() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.rand(4, 1, 8, 8, generator=g).double()
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
    values = [metrics.ssim(x, x + s * noise, 1.0) for s in (0.0, 0.05, 0.2, 1.0)]
    assert values == sorted(values, reverse=True) and values[0] == 1.0


def test_match_images_undoes_a_permutation_and_pairs_a_subset() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.rand(6, 1, 8, 8, generator=g)
    perm = torch.randperm(6, generator=g)
    assert metrics.match_images(x[perm], x, 1.0).tolist() == perm.tolist()
    assert metrics.match_images(x[[4, 1]] + 0.01, x, 1.0).tolist() == [4, 1]
    with pytest.raises(ValueError, match="7 reconstructions but only 6"):
        metrics.match_images(torch.cat([x, x[:1]]), x, 1.0)


def test_image_metrics_refuse_unlike_batches() -> None:
    with pytest.raises(ValueError, match=r"same \(B, C, H, W\) shape"):
        metrics.psnr(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5), 1.0)
    with pytest.raises(ValueError, match="data_range must be > 0"):
        metrics.ssim(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), 0.0)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.booleans()), min_size=2, max_size=60))
def test_roc_and_auc_equal_scikit_learn_with_ties(pairs: list[tuple[int, bool]]) -> None:
    scores = np.array([float(s) for s, _ in pairs])
    members = np.array([m for _, m in pairs])
    if members.all() or not members.any():
        with pytest.raises(ValueError, match="needs members and non-members"):
            metrics.roc_curve(scores, members)
        return
    fpr, tpr = metrics.roc_curve(scores, members)
    ref_fpr, ref_tpr, _ = skm.roc_curve(members, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)
    assert metrics.auc(fpr, tpr) == pytest.approx(skm.roc_auc_score(members, scores), abs=1e-12)
    assert metrics.advantage(fpr, tpr) == pytest.approx(float(np.max(ref_tpr - ref_fpr)))


def test_tpr_at_low_fpr_of_a_perfect_and_of_a_useless_score() -> None:
    members = np.r_[np.ones(1000, bool), np.zeros(1000, bool)]
    fpr, tpr = metrics.roc_curve(np.where(members, 1.0, 0.0), members)
    assert metrics.tpr_at_fpr(fpr, tpr, 0.001) == 1.0 and metrics.auc(fpr, tpr) == 1.0
    fpr, tpr = metrics.roc_curve(np.zeros(2000), members)  # one threshold: all or nothing
    assert metrics.tpr_at_fpr(fpr, tpr, 0.01) == 0.0 and metrics.auc(fpr, tpr) == 0.5
    with pytest.raises(ValueError, match="must be finite"):
        metrics.roc_curve(np.array([0.0, np.nan]), np.array([True, False]))
