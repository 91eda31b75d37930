"""How well an attack did: image quality of a reconstruction, ROC of a membership score.

Image metrics take batches shaped ``(B, C, H, W)`` and the pixel range ``data_range`` (the
attacker's box, e.g. ``hi - lo`` of standardised Fashion-MNIST):

- PSNR, ``10 log10(range^2 / MSE)`` per image, then the mean over the batch.
- SSIM (Wang, Bovik, Sheikh, Simoncelli 2004, "Image Quality Assessment: From Error
  Visibility to Structural Similarity", IEEE TIP): an 11x11 Gaussian window of standard
  deviation 1.5 (narrowed to the largest odd size that fits a smaller image, 7 for 8x8
  digits), ``K1 = 0.01``, ``K2 = 0.03``, the mean of the SSIM map over the window's valid
  positions and the channels.

Membership metrics take scores (larger means "member") and the true membership: the ROC
curve, its area, the TPR at a low FPR (Carlini et al. 2022: the attack's worth is its true
positives when it may hardly ever be wrong) and the membership advantage ``max TPR - FPR``
(Yeom et al. 2018).

Example:
    >>> x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)).double()
    >>> psnr(x, x + 0.1, 1.0), ssim(x, x, 1.0)
    (20.0, 1.0)
    >>> fpr, tpr = roc_curve(np.array([0.9, 0.8, 0.3, 0.1]), np.array([1, 0, 1, 0]))
    >>> auc(fpr, tpr), advantage(fpr, tpr)
    (0.75, 0.5)
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

__all__ = [
    "advantage",
    "auc",
    "finite_or_none",
    "gaussian_window",
    "match_images",
    "psnr",
    "psnr_per_image",
    "roc_curve",
    "ssim",
    "ssim_per_image",
    "tpr_at_fpr",
]

SSIM_K1, SSIM_K2, SSIM_SIGMA, SSIM_WINDOW = 0.01, 0.03, 1.5, 11


def _images(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(
            f"image metrics need two batches of the same (B, C, H, W) shape, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    return a.detach().double(), b.detach().double()


def psnr_per_image(a: torch.Tensor, b: torch.Tensor, data_range: float) -> torch.Tensor:
    """Each image's PSNR in dB (``inf`` where the two are equal)."""
    a, b = _images(a, b)
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    mse = ((a - b) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float) -> float:
    """The mean PSNR of the batch, in dB, rounded to 1e-9.

    Example:
        >>> a = torch.zeros(1, 1, 4, 4)
        >>> psnr(a, a + 0.5, 1.0) == round(20 * math.log10(2), 9)
        True
    """
    return round(float(psnr_per_image(a, b, data_range).mean()), 9)


def gaussian_window(size: int, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """The normalised ``size x size`` Gaussian window (float64).

    Example:
        >>> w = gaussian_window(11)
        >>> w.shape, round(float(w.sum()), 12), bool(w[5, 5] == w.max())
        (torch.Size([11, 11]), 1.0, True)
    """
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim_per_image(a: torch.Tensor, b: torch.Tensor, data_range: float) -> torch.Tensor:
    """Each image's mean SSIM over its window positions and channels."""
    a, b = _images(a, b)
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    side = min(SSIM_WINDOW, a.shape[2], a.shape[3])
    size = side if side % 2 else side - 1
    if size < 1:
        raise ValueError(f"images of shape {tuple(a.shape[1:])} are too small for SSIM")
    channels = a.shape[1]
    window = gaussian_window(size).expand(channels, 1, size, size)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=channels)

    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return (num / den).flatten(1).mean(1)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float) -> float:
    """The mean SSIM of the batch, in [-1, 1].

    Example:
        >>> a, b = torch.full((1, 1, 8, 8), 0.25), torch.full((1, 1, 8, 8), 0.75)
        >>> c1 = 0.01**2  # two flat images differ only in luminance
        >>> abs(ssim(a, b, 1.0) - (2 * 0.25 * 0.75 + c1) / (0.25**2 + 0.75**2 + c1)) < 1e-9
        True
    """
    return round(float(ssim_per_image(a, b, data_range).mean()), 9)


def match_images(
    reconstructed: torch.Tensor, original: torch.Tensor, data_range: float
) -> np.ndarray:
    """For each reconstruction, the index of the original it is paired with: distinct
    originals, the pairing of largest total PSNR (a batch is reconstructed in any order).
    There may be more originals than reconstructions.

    Example:
        >>> x = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2), torch.full((1, 2, 2), 0.4)])
        >>> match_images(x.flip(0), x, 1.0).tolist(), match_images(x[1:2], x, 1.0).tolist()
        ([2, 1, 0], [1])
    """
    from scipy.optimize import linear_sum_assignment

    if (
        reconstructed.ndim != 4
        or original.ndim != 4
        or reconstructed.shape[1:] != original.shape[1:]
    ):
        raise ValueError(
            f"match_images needs (B, C, H, W) batches of one image shape, got "
            f"{tuple(reconstructed.shape)} and {tuple(original.shape)}"
        )
    if len(reconstructed) > len(original):
        raise ValueError(
            f"{len(reconstructed)} reconstructions but only {len(original)} originals to pair"
        )
    rec, orig = reconstructed.detach().double(), original.detach().double()
    mse = ((rec[:, None] - orig[None]) ** 2).flatten(2).mean(2)
    cost = -10 * torch.log10(data_range**2 / mse.clamp_min(1e-30))
    rows, cols = linear_sum_assignment(cost.numpy())
    return cols[np.argsort(rows)]


def roc_curve(scores: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates of "member if score >= t" at every distinct score,
    from (0, 0) to (1, 1); tied scores move together.

    Example:
        >>> fpr, tpr = roc_curve(np.array([1.0, 1.0, 0.0]), np.array([1, 0, 0]))
        >>> fpr.tolist(), tpr.tolist()
        ([0.0, 0.5, 1.0], [0.0, 1.0, 1.0])
    """
    scores, members = np.asarray(scores, dtype=np.float64), np.asarray(members).astype(bool)
    if scores.shape != members.shape or scores.ndim != 1:
        raise ValueError(
            f"scores and members must be 1-D of one length, got {scores.shape}, {members.shape}"
        )
    if not np.isfinite(scores).all():
        raise ValueError("membership scores must be finite")
    positives, negatives = int(members.sum()), int((~members).sum())
    if not positives or not negatives:
        raise ValueError(
            f"a ROC curve needs members and non-members, got {positives} and {negatives}"
        )
    order = np.argsort(-scores, kind="stable")
    s, m = scores[order], members[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last of each run of ties
    tp, fp = np.cumsum(m)[last], np.cumsum(~m)[last]
    return np.r_[0.0, fp / negatives], np.r_[0.0, tp / positives]


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """The area under the ROC curve (trapezoids), rounded to 1e-12."""
    return round(float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)), 12)


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, at: float) -> float:
    """The largest TPR of a threshold whose FPR is at most ``at`` (Carlini et al. 2022).

    Example:
        >>> tpr_at_fpr(np.array([0.0, 0.005, 0.02, 1.0]), np.array([0.0, 0.3, 0.5, 1.0]), 0.01)
        0.3
    """
    if not 0 <= at <= 1:
        raise ValueError(f"the FPR must lie in [0, 1], got {at}")
    return float(tpr[fpr <= at].max())


def advantage(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Yeom et al.'s membership advantage: the largest ``TPR - FPR`` of any threshold."""
    return round(float(np.max(tpr - fpr)), 12)


def finite_or_none(value: float) -> float | None:
    """``value`` for JSON: ``None`` when it is not finite (the PSNR of an exact copy).

    Example:
        >>> finite_or_none(math.inf), finite_or_none(3.5)
        (None, 3.5)
    """
    return value if math.isfinite(value) else None
