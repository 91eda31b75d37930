"""Skellam noise from uniform bits: the integer noise of the distributed Skellam mechanism
(Agarwal, Kairouz, Liu 2021, "The Skellam Mechanism for Differentially Private Federated
Learning", NeurIPS).

``Sk(mu) = P1 - P2`` with ``P1, P2 ~ Poisson(mu / 2)`` independent is integer, symmetric,
of mean 0 and variance ``mu``, and the sum of independent ``Sk(mu_i)`` is exactly
``Sk(sum mu_i)``: the clients' shares add up to the noise the accountant counts, with no
divergence term (unlike sums of discrete Gaussians).

Poisson variates are drawn from uniforms: for ``lam < 10`` by multiplication (the number of
uniforms whose running product stays above ``exp(-lam)``), for ``lam >= 10`` by Hörmann's
transformed rejection with squeeze, PTRS (Hörmann 1993, "The transformed rejection method
for generating Poisson random variables", Insurance: Mathematics and Economics 12), both
exact in real arithmetic (NumPy's Poisson uses the same two). A uniform is
``(k + 1/2) / 2^53`` for the top 53 bits ``k`` of a 64-bit word, so it lies in (0, 1). The
words come from a byte source: the part's seeded stream (``seeded_bytes``, a simulation's
``noise = "seed"``: reproducible, equal on every engine) or a ChaCha20 keystream under a
fresh key from ``os.urandom`` (``secure_bytes``, ``"secure"``, which a deployment needs).

Example:
    >>> x = skellam(50.0, 100_000, seeded_bytes(np.random.default_rng(0)))
    >>> x.dtype, abs(float(x.mean())) < 0.1, abs(float(x.var()) / 50.0 - 1) < 0.02
    (dtype('int64'), True, True)
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

Bytes = Callable[[int], bytes]  # n -> n random bytes
PTRS_FROM = 10.0  # Hörmann's PTRS for lam >= 10, multiplication below


def seeded_bytes(rng: np.random.Generator) -> Bytes:
    """Bytes from a seeded NumPy stream (simulation only: the seed reproduces them)."""
    return rng.bytes


def secure_bytes() -> Bytes:
    """Bytes of a ChaCha20 keystream under a fresh 256-bit key (and nonce) from
    ``os.urandom``; each call continues the stream."""
    cipher = Cipher(algorithms.ChaCha20(os.urandom(32), os.urandom(16)), mode=None)
    encryptor = cipher.encryptor()
    return lambda n: encryptor.update(bytes(n))


def uniforms(source: Bytes, n: int) -> np.ndarray:
    """``n`` uniforms in (0, 1) (float64) from 8 bytes each of ``source``."""
    words = np.frombuffer(source(8 * n), dtype=np.uint64) >> np.uint64(11)
    return (words.astype(np.float64) + 0.5) / float(1 << 53)


def poisson(lam: float, n: int, source: Bytes) -> np.ndarray:
    """``n`` Poisson(``lam``) variates (int64) from the uniforms of ``source``.

    Example:
        >>> poisson(0.0, 3, seeded_bytes(np.random.default_rng(0))).tolist()
        [0, 0, 0]
    """
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"a Poisson mean must be a finite number >= 0, got {lam}")
    if lam == 0 or n == 0:
        return np.zeros(n, dtype=np.int64)
    if lam < PTRS_FROM:
        return _multiplication(lam, n, source)
    return _ptrs(lam, n, source)


def skellam(mu: float, n: int, source: Bytes) -> np.ndarray:
    """``n`` draws of the symmetric Skellam distribution of variance ``mu`` (int64): the
    difference of two independent Poisson(``mu / 2``) variates."""
    return poisson(mu / 2, n, source) - poisson(mu / 2, n, source)


def _multiplication(lam: float, n: int, source: Bytes) -> np.ndarray:
    """The count of uniforms whose running product stays above ``exp(-lam)``."""
    limit = math.exp(-lam)
    out = np.zeros(n, dtype=np.int64)
    product = np.ones(n, dtype=np.float64)
    pending = np.arange(n)
    while pending.size:
        product[pending] *= uniforms(source, pending.size)
        alive = product[pending] > limit
        out[pending[alive]] += 1
        pending = pending[alive]
    return out


def _ptrs(lam: float, n: int, source: Bytes) -> np.ndarray:
    """Hörmann's PTRS: a transformed-rejection proposal ``k`` from two uniforms, a squeeze
    that accepts most outright, and the exact ratio test against the Poisson pmf."""
    slam, loglam = math.sqrt(lam), math.log(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    log_inv_alpha = math.log(1.1239 + 1.1328 / (b - 3.4))
    vr = 0.9277 - 3.6224 / (b - 2)
    out = np.empty(n, dtype=np.int64)
    pending = np.arange(n)
    while pending.size:
        u = uniforms(source, pending.size) - 0.5
        v = uniforms(source, pending.size)
        us = 0.5 - np.abs(u)
        k = np.floor((2 * a / us + b) * u + lam + 0.43)
        accept = (us >= 0.07) & (v <= vr)
        test = ~accept & (k >= 0) & ~((us < 0.013) & (v > us))
        kt = k[test]
        lhs = np.log(v[test]) + log_inv_alpha - np.log(a / us[test] ** 2 + b)
        log_pmf = -lam + kt * loglam - torch.lgamma(torch.from_numpy(kt + 1)).numpy()
        accept[test] = lhs <= log_pmf
        out[pending[accept]] = k[accept].astype(np.int64)
        pending = pending[~accept]
    return out
