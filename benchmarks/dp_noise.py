"""The cost of DP-FedAvg's server step (issue 14): Gaussian noise from the run's seeded
stream (torch's Philox-free CPU generator, float64) against ``secure_gaussian`` (a ChaCha20
keystream keyed by ``os.urandom``, then Box-Muller), and the whole noised mean
(``GaussianMean.aggregate``: clip, sum, noise, divide) against FedAvg's weighted mean
(``WeightedMean``) on the same stack of 100 updates, side by side in one run.

Model sizes: logistic regression on Fashion-MNIST (7,850), McMahan et al.'s 2NN (199,210)
and CNN (1,663,370). Each timing is the median of 7 repeats after one warm-up call, one
thread (``torch.set_num_threads(1)``). The headline ratios are secure / seeded noise and
noised mean / weighted mean; both sides draw or reduce the same numbers of elements (checked
by the shapes and the noise's standard deviation).

Run from the repository root (about a minute):
    .venv/bin/python benchmarks/dp_noise.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from _common import header, summary, write_result

from potluck.aggregate.mean import WeightedMean
from potluck.core.parts import part_context
from potluck.privacy.central import GaussianMean, gaussian_noise

SIZES = {"logreg (Fashion-MNIST)": 7_850, "2NN": 199_210, "CNN (McMahan)": 1_663_370}
COHORT = 100
REPEATS = 7


def timed(fn: Callable[[], torch.Tensor]) -> tuple[dict[str, float], torch.Tensor]:
    out = fn()  # warm-up
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return summary(times), out


def row(model: str, d: int) -> dict[str, object]:
    ctx = part_context(0, 1, "aggregator")
    seeded, a = timed(lambda: gaussian_noise(d, 1.0, "seed", ctx))
    secure, b = timed(lambda: gaussian_noise(d, 1.0, "secure", ctx))
    assert a.shape == b.shape == (d,)
    deltas, weights = torch.randn(COHORT, d) * 0.01, torch.ones(COHORT)
    plain, _ = timed(lambda: WeightedMean().aggregate(deltas, weights, {}, ctx)[0])
    noised = {}
    for source in ("seed", "secure"):
        agg = GaussianMean(clip=1.0, noise_multiplier=1.0, denominator=COHORT, noise=source)
        noised[source], _ = timed(lambda agg=agg: agg.aggregate(deltas, weights, {}, ctx)[0])
    return {
        "model": model,
        "d": d,
        "noise_seeded_s": seeded,
        "noise_secure_s": secure,
        "noise_std_seeded_secure": (float(a.std()), float(b.std())),
        "secure_over_seeded": secure["median"] / seeded["median"],
        "weighted_mean_s": plain,
        "noised_mean_seeded_s": noised["seed"],
        "noised_mean_secure_s": noised["secure"],
        "noised_over_weighted_seeded": noised["seed"]["median"] / plain["median"],
        "noised_over_weighted_secure": noised["secure"]["median"] / plain["median"],
    }


def main() -> None:
    torch.set_num_threads(1)
    result = header("dp_noise")
    rows = []
    for model, d in SIZES.items():
        rows.append(row(model, d))
        r = rows[-1]
        print(model, d, f"secure/seeded {r['secure_over_seeded']:.2f}",
              f"noised/weighted {r['noised_over_weighted_seeded']:.2f}",
              f"(secure {r['noised_over_weighted_secure']:.2f})")  # fmt: skip
    result["settings"] = {"cohort": COHORT, "repeats": REPEATS, "threads": 1}
    result["rows"] = rows
    result["median_secure_over_seeded"] = statistics.median(
        float(r["secure_over_seeded"])
        for r in rows  # type: ignore[arg-type]
    )
    print(write_result("dp_noise", result))


if __name__ == "__main__":
    main()
