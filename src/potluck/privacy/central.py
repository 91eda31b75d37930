"""User-level central differential privacy: DP-FedAvg's noised mean (McMahan, Ramage,
Talwar, Zhang 2018, "Learning Differentially Private Recurrent Language Models", ICLR).

Each update is clipped to L2 norm ``clip`` (here, on the server, so the sensitivity holds
whatever a client sends; a ``clip`` transform on the clients may clip it first), the clipped
updates are summed with weight 1 each, Gaussian noise of standard deviation
``noise_multiplier * clip`` is added to the sum, and the sum is divided by a fixed
denominator: the sampler's expected cohort size, not the number of updates (which depends on
who took part). One client changes the sum by at most ``clip``, so each round is a Gaussian
mechanism of noise multiplier ``noise_multiplier``; ``privacy.accounting`` composes the
rounds with their sampling.

Noise: ``noise = "seed"`` draws it from the run's seeded stream (reproducible; for
simulation only: anyone with the config could subtract it); ``"secure"`` from a ChaCha20
stream keyed by the operating system's entropy (``secure_gaussian``), which a deployment
requires.

Example:
    >>> import torch
    >>> from potluck.core.parts import part_context
    >>> agg = GaussianMean(clip=1.0, noise_multiplier=0.0, denominator=2.0)
    >>> deltas = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    >>> mean, _ = agg.aggregate(deltas, torch.ones(2), {}, part_context(0, 1, "aggregator"))
    >>> [round(v, 4) for v in mean.tolist()]  # (0.6, 0.8) + (0.3, 0.4), over 2
    [0.45, 0.6]
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from potluck.core.parts import Context, Need, State
from potluck.core.registry import register

NOISE_SOURCES = ("seed", "secure")


@register("aggregator", "dp_mean")
@dataclass(frozen=True)
class GaussianMean:
    """DP-FedAvg's aggregate: clipped updates summed, noised, over a fixed denominator
    (``None``: the sampler's expected cohort size, set when the run starts)."""

    clip: float = 1.0
    noise_multiplier: float = 1.0
    denominator: float | None = None
    noise: str = "seed"
    label: ClassVar[str] = "central DP"  # how the run describes its privacy
    needs: ClassVar[frozenset[str]] = frozenset({Need.ONLY_THE_DELTA})
    gives: ClassVar[frozenset[str]] = frozenset({Need.FIXED_DENOMINATOR, Need.EQUAL_WEIGHTS})

    def __post_init__(self) -> None:
        check_gaussian(self.clip, self.noise_multiplier, self.noise)
        if self.denominator is not None and not self.denominator > 0:
            raise ValueError(f"denominator must be > 0, got {self.denominator}")

    def bind_cohort(self, expected_cohort: float) -> GaussianMean:
        """This aggregator with its denominator: ``expected_cohort`` unless one is given."""
        return self if self.denominator is not None else replace(self, denominator=expected_cohort)

    def init(self, w: torch.Tensor) -> State:
        return {}

    def aggregate(
        self, deltas: torch.Tensor, weights: torch.Tensor, state: State, ctx: Context
    ) -> tuple[torch.Tensor, State]:
        if self.denominator is None:
            raise RuntimeError("GaussianMean needs a denominator: bind_cohort(expected cohort)")
        total = clipped_sum(deltas, clip_scales(row_norms(deltas), self.clip))
        total += gaussian_noise(total.shape[0], self.noise_multiplier * self.clip, self.noise, ctx)
        return (total / self.denominator).to(deltas.dtype), state


def check_gaussian(clip: float, noise_multiplier: float, noise: str) -> None:
    """Refuse a Gaussian mechanism's settings: ``clip`` a finite number > 0,
    ``noise_multiplier`` >= 0, ``noise`` one of ``NOISE_SOURCES``.

    Example:
        >>> check_gaussian(1.0, -1.0, "seed")
        Traceback (most recent call last):
        ...
        ValueError: noise_multiplier must be >= 0, got -1.0
    """
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be a finite number > 0, got {clip}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if noise not in NOISE_SOURCES:
        raise ValueError(f"noise must be one of {NOISE_SOURCES}, got {noise!r}")


def gaussian_noise(d: int, std: float, source: str, ctx: Context, *path: str) -> torch.Tensor:
    """``d`` draws of N(0, std^2) (float64): from the part's seeded stream (sub-stream
    ``path``) or, ``source = "secure"``, from ``secure_gaussian``; zeros for ``std = 0``.

    Example:
        >>> from potluck.core.parts import part_context
        >>> gaussian_noise(3, 0.0, "seed", part_context(0, 1, "aggregator")).tolist()
        [0.0, 0.0, 0.0]
    """
    if std == 0:
        return torch.zeros(d, dtype=torch.float64)
    if source == "secure":
        return secure_gaussian(d, std)
    return torch.randn(d, generator=ctx.generator(*path), dtype=torch.float64) * std


NORM_SLACK = 1e-5  # above the relative error of a float32 norm of 10^8 elements


def row_norms(deltas: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each row of a (K, d) stack (computed in its dtype: in float64 it
    would take 18 times as long for a 1.6M-parameter CNN), as float64."""
    return torch.linalg.vector_norm(deltas, dim=1).double()


def clip_scales(norms: torch.Tensor, clip: float) -> torch.Tensor:
    """Per row, the factor that brings its norm to at most ``clip`` (1 for the others); a
    norm is taken ``NORM_SLACK`` larger than computed, so that its rounding cannot leave a
    clipped row above ``clip``."""
    padded = torch.clamp(norms * (1 + NORM_SLACK), min=1e-300)
    return torch.clamp(clip / padded, max=1.0)


def clipped_sum(deltas: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``sum_k scales_k deltas_k`` (float64), one fused reduction over the stack as in
    FedAvg's weighted mean (no clipped copy of the stack)."""
    if deltas.shape[0] == 0:
        return deltas.new_zeros(deltas.shape[1], dtype=torch.float64)
    return (scales.to(deltas.dtype) @ deltas).double()


def clipped(deltas: torch.Tensor, clip: float) -> torch.Tensor:
    """Each row of a (K, d) stack scaled to L2 norm at most ``clip`` (float64).

    Example:
        >>> norms = clipped(torch.tensor([[3.0, 4.0], [0.3, 0.4]]), 1.0).norm(dim=1)
        >>> [round(n, 4) for n in norms.tolist()]  # 1 / (1 + NORM_SLACK), and 0.5
        [1.0, 0.5]
    """
    return deltas.double() * clip_scales(row_norms(deltas), clip)[:, None]


def secure_gaussian(d: int, std: float) -> torch.Tensor:
    """``d`` Gaussian draws of standard deviation ``std`` (float64) from a ChaCha20
    keystream under a fresh key from ``os.urandom``: 53-bit uniforms in (0, 1), then
    Box-Muller.

    Example:
        >>> x = secure_gaussian(100_000, 2.0)
        >>> abs(float(x.mean())) < 0.05, abs(float(x.std()) - 2.0) < 0.05
        (True, True)
    """
    n = d + d % 2
    cipher = Cipher(algorithms.ChaCha20(os.urandom(32), os.urandom(16)), mode=None)
    stream = cipher.encryptor().update(bytes(8 * n))
    bits = np.frombuffer(stream, dtype=np.uint64) >> np.uint64(11)
    u = (bits.astype(np.float64) + 0.5) / float(1 << 53)  # in (0, 1), never 0
    u1, u2 = u[: n // 2], u[n // 2 :]
    radius = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])
    return torch.from_numpy(z[:d] * std)
