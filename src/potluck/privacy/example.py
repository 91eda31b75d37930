"""Example-level privacy accounting of DP-SGD inside the clients (``privacy.dp_sgd``).

Each local step of DP-SGD is a Gaussian mechanism of noise multiplier ``z`` on the sum of the
clipped per-example gradients of a Poisson sample of the client's examples, each taken with
probability ``q = B / n`` (``B`` the optimizer's batch size, ``n`` the client's examples):
``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` under add-or-remove-one adjacency (Abadi et
al. 2016; Mironov, Talwar, Zhang 2019 for its RDP). A client's steps compose adaptively over
every round it trained in, ``SelfComposedDpEvent(step, T)``: whatever else the client
computes from the noised gradients (momentum, FedProx's and SCAFFOLD's corrections, its
uploads) is post-processing. The unit of privacy is **one example of one client**; the
client's number of examples is treated as public (it sets ``q`` and the step count, and
FedAvg uploads it as the aggregation weight), as Abadi et al. treat the dataset size.

Each client's count of steps and its rate are its DP-SGD term's client state, so resuming a
run continues them. ``largest_epsilon`` is the epsilon of the most exposed client, which the
round loop reports.

Example:
    >>> round(example_epsilon(0.01, 1000, 1.1, 1e-5), 4)  # dp-accounting's RDP value
    1.7118
    >>> example_epsilon(0.5, 0, 1.0, 1e-5), example_epsilon(0.5, 3, 0.0, 1e-5)
    (0.0, inf)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from potluck.privacy.accounting import _quiet


@functools.cache
def _orders() -> tuple[float, ...]:
    """dp-accounting's RDP orders (imported here: it loads SciPy, ~1.4 s)."""
    from dp_accounting.rdp import rdp_privacy_accountant

    return tuple(float(a) for a in rdp_privacy_accountant.DEFAULT_RDP_ORDERS)


@functools.lru_cache(maxsize=1024)
def _step_rdp(rate: float, noise_multiplier: float) -> np.ndarray:
    """The RDP, at every order of dp-accounting's RDP accountant, of one DP-SGD step: what
    ``RdpAccountant.compose(PoissonSampledDpEvent(rate, GaussianDpEvent(z)))`` adds, from
    the function it calls. Composing ``T`` steps multiplies it by ``T``, so each client's
    epsilon costs one such computation per sample rate (35 to 150 ms) instead of one per
    step count; ``tests/test_dp_sgd.py`` checks the result against the accountant itself."""
    from dp_accounting.rdp import rdp_privacy_accountant

    with _quiet():
        step = rdp_privacy_accountant._compute_rdp_poisson_subsampled_gaussian(
            q=rate, noise_multiplier=noise_multiplier, orders=np.array(_orders())
        )
    return np.asarray(step, dtype=np.float64)


@functools.lru_cache(maxsize=4096)
def example_epsilon(rate: float, steps: int, noise_multiplier: float, delta: float) -> float:
    """Epsilon at ``delta`` of ``steps`` DP-SGD steps at sample rate ``rate`` and noise
    multiplier ``noise_multiplier``: dp-accounting's RDP accountant's value for
    ``SelfComposedDpEvent(PoissonSampledDpEvent(rate, GaussianDpEvent(z)), steps)`` (0 for
    no step, infinite without noise)."""
    if steps == 0 or rate == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    from dp_accounting import rdp

    with _quiet():
        eps, _ = rdp.compute_epsilon(_orders(), steps * _step_rdp(rate, noise_multiplier), delta)
    return float(eps)


def frontier(counts: Iterable[tuple[float, int]]) -> list[tuple[float, int]]:
    """The (rate, steps) pairs no other pair dominates (an equal or larger rate and at least
    as many steps): epsilon grows with both, so the largest one is among these.

    Example:
        >>> frontier([(0.1, 5), (0.1, 9), (0.2, 3), (0.05, 9), (0.2, 1)])
        [(0.2, 3), (0.1, 9)]
    """
    best: dict[float, int] = {}
    for rate, steps in counts:
        best[rate] = max(steps, best.get(rate, 0))
    out: list[tuple[float, int]] = []
    for rate in sorted(best, reverse=True):  # from the largest rate down
        if not out or best[rate] > out[-1][1]:
            out.append((rate, best[rate]))
    return out


def largest_epsilon(
    counts: Iterable[tuple[float, int]], noise_multiplier: float, delta: float
) -> float:
    """The largest example-level epsilon over clients given as (rate, steps) pairs.

    Example:
        >>> pairs = [(0.1, 50), (0.1, 20), (0.05, 50)]
        >>> largest_epsilon(pairs, 1.0, 1e-5) == example_epsilon(0.1, 50, 1.0, 1e-5)
        True
    """
    pairs = frontier(counts)
    return max((example_epsilon(q, t, noise_multiplier, delta) for q, t in pairs), default=0.0)


def client_counts(states: Iterable[Mapping[str, Any]], namespace: str) -> list[tuple[float, int]]:
    """The (rate, steps) pairs of the clients' stored states (``<namespace>/rate``,
    ``<namespace>/steps``) of one DP-SGD term; clients without them are left out."""
    rate, steps = f"{namespace}/rate", f"{namespace}/steps"
    return [(float(s[rate]), int(s[steps])) for s in states if rate in s and steps in s]


def example_statement(
    counts: Sequence[tuple[float, int]], noise_multiplier: float, clip: float, delta: float
) -> tuple[str, float]:
    """The example-level privacy statement of DP-SGD clients with ``counts`` (rate, steps),
    and its epsilon: the most exposed client's, computed afresh.

    Example:
        >>> text, eps = example_statement([(0.1, 30), (0.2, 10)], 1.1, 1.0, 1e-5)
        >>> text.startswith(f"({eps:.4g}, 1e-05)-DP at the level of one example")
        True
    """
    eps = largest_epsilon(counts, noise_multiplier, delta)
    pairs = frontier(counts) or [(0.0, 0)]
    worst = max(pairs, key=lambda p: example_epsilon(*p, noise_multiplier, delta))
    statement = (
        f"({eps:.4g}, {delta:g})-DP at the level of one example of one client (example-level), "
        f"by DP-SGD in local training: per-example gradients clipped to L2 norm {clip:g}, "
        f"noise multiplier {noise_multiplier:g}, Poisson sampling of each client's examples; "
        f"the most exposed of {len(counts)} clients took {worst[1]} steps at rate "
        f"{worst[0]:.4g}; RDP accountant (dp-accounting); a client's number of examples is "
        "public"
    )
    return statement, eps
