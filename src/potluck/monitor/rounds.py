"""The monitoring figures a run stores with every round (``Monitoring``, ``round_figures``).

From the round's own metrics and per-client metrics, and the rounds before it:

- convergence: ``train_loss_slope`` and ``accuracy_slope`` (least squares over the last
  ``window`` rounds), ``plateau`` (1 when the tracked loss, the test loss where there is
  one, has not improved by ``plateau_tol`` over ``window`` rounds), ``diverging`` (1 when
  the training loss is non-finite or past ``divergence_factor`` times its best);
- updates: ``update_norm_mean`` / ``_max`` and ``client_drift_mean`` / ``_max`` (each
  accepted client's distance to the round's aggregate, from its ``update_norm`` and
  ``client_drift``: scored where the server sees individual updates);
- fairness over the clients evaluated on their local test data: ``clients_accuracy_mean``,
  ``_var``, ``_min``, ``_worst10``, ``_gini`` (``clients_personal_accuracy_*`` for personal
  models) and ``group_<name>_accuracy`` per group of ``groups``;
- data drift (``summaries``): ``label_shift_max``, ``feature_shift_max`` and
  ``shifted_clients`` (past ``shift_threshold``), from the clients' ``label_shift`` and
  ``feature_shift``;
- cost: ``bytes_total`` (up and down, every round so far) and ``bytes_per_gain`` (bytes per
  point of accuracy, in percent, over a uniform guess ``1 / classes``).

A figure undefined in a round (the slope of one point, the cost of a gain not yet made, a
value a member's huge report overflowed) is left out of it rather than stored as NaN.

Example:
    >>> clients = [(0, {"eval_global_accuracy": 0.5}), (1, {"eval_global_accuracy": 1.0})]
    >>> figs = round_figures(Monitoring(), [{"train_loss": 1.0}], {"train_loss": 0.5},
    ...                      clients, classes=10)
    >>> figs["train_loss_slope"], figs["clients_accuracy_var"], figs["diverging"]
    (-0.5, 0.0625, 0.0)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from potluck.monitor import figures
from potluck.monitor.drift import SummaryOptions

PerClient = Sequence[tuple[int, Mapping[str, float]]]
_GROUP = re.compile(r"[A-Za-z0-9_]{1,40}")
_ACCURACY = ("test_accuracy", "fed_accuracy")  # the headline accuracy, first found
_LOSS = ("test_loss", "fed_loss", "train_loss")  # the tracked loss, first found


@dataclass(frozen=True)
class Monitoring:
    """What a run monitors besides its metrics (``[monitoring]``).

    ``summaries``: the clients that trained summarise their data (label and input-value
    histograms of ``summary_bins`` bins, ``monitor.drift``) in round 1 and every
    ``summary_every``-th round after it, and the server measures each one's shift from its
    first summary; ``summary_noise`` (std of Gaussian
    noise on each count) drawn from ``noise``; ``shift_threshold`` counts a client as
    shifted. ``groups``: client ids per group name, for per-group accuracy. ``window``,
    ``plateau_tol``, ``divergence_factor``: the convergence diagnostics'.
    """

    summaries: bool = False
    summary_bins: int = 16
    summary_every: int = 1
    summary_noise: float = 0.0
    noise: Literal["seed", "secure"] = "seed"
    shift_threshold: float = 0.2
    groups: Mapping[str, Sequence[int]] = field(default_factory=dict)
    window: int = 5
    plateau_tol: float = 1e-3
    divergence_factor: float = 2.0

    def __post_init__(self) -> None:
        if self.summary_bins < 2:
            raise ValueError(f"monitoring.summary_bins must be >= 2, got {self.summary_bins}")
        if self.summary_every < 1:
            raise ValueError(f"monitoring.summary_every must be >= 1, got {self.summary_every}")
        if not 0 < self.shift_threshold <= 1:
            raise ValueError(
                f"monitoring.shift_threshold must be in (0, 1], got {self.shift_threshold}"
            )
        if self.window < 2:
            raise ValueError(f"monitoring.window must be >= 2, got {self.window}")
        if not (math.isfinite(self.plateau_tol) and self.plateau_tol >= 0):
            raise ValueError(f"monitoring.plateau_tol must be >= 0, got {self.plateau_tol}")
        if not (math.isfinite(self.divergence_factor) and self.divergence_factor > 1):
            raise ValueError(
                f"monitoring.divergence_factor must be > 1, got {self.divergence_factor}"
            )
        for name, members in self.groups.items():
            if not _GROUP.fullmatch(name):
                raise ValueError(
                    f"monitoring.groups: group name {name!r} must be 1-40 letters, digits or _"
                )
            if not members or any(not isinstance(c, int) or c < 0 for c in members):
                raise ValueError(
                    f"monitoring.groups.{name}: a non-empty list of client ids (integers >= 0)"
                )

    def check_deployable(self) -> None:
        """Refuse summary noise drawn from the seed in a deployment (anyone holding the
        config could subtract it)."""
        if self.summaries and self.summary_noise > 0 and self.noise != "secure":
            raise ValueError(
                "monitoring.noise = 'seed': the sites' summary noise would follow from the "
                "config (anyone holding it could subtract it); a deployment needs "
                "monitoring.noise = 'secure'"
            )

    def check_clients(self, num_clients: int) -> None:
        """Refuse groups naming clients outside the federation."""
        for name, members in self.groups.items():
            outside = sorted(c for c in members if c >= num_clients)
            if outside:
                raise ValueError(
                    f"monitoring.groups.{name}: clients {outside[:5]} outside the federation "
                    f"of {num_clients}"
                )


def round_figures(
    options: Monitoring,
    history: Sequence[Mapping[str, float]],
    metrics: Mapping[str, float],
    per_client: PerClient,
    *,
    classes: int,
) -> dict[str, float]:
    """The round's monitoring figures (names in the module's docstring), the finite ones;
    ``history``: the metrics of the rounds before it (with their figures), oldest first."""
    series = [*history, metrics]
    recent = series[-options.window :]
    out = {
        "train_loss_slope": figures.slope([m.get("train_loss", math.nan) for m in recent]),
        "diverging": float(
            figures.diverging(
                [m["train_loss"] for m in series if "train_loss" in m], options.divergence_factor
            )
        ),
    }
    acc_name = next((k for k in _ACCURACY if k in metrics), None)
    if acc_name is not None:
        out["accuracy_slope"] = figures.slope([m.get(acc_name, math.nan) for m in recent])
    loss_name = next((k for k in _LOSS if k in metrics), None)
    if loss_name is not None:
        losses = [m[loss_name] for m in series if loss_name in m]
        out["plateau"] = float(
            figures.plateaued(losses, options.window, options.plateau_tol, lower=True)
        )
    out |= _spread(per_client, "update_norm") | _spread(per_client, "client_drift")
    out |= _fairness(options, per_client)
    if options.summaries:
        out |= _shifts(options, per_client)
    previous = history[-1].get("bytes_total", 0.0) if history else 0.0
    total = previous + metrics.get("bytes_up", 0.0) + metrics.get("bytes_down", 0.0)
    out["bytes_total"] = total
    if acc_name is not None:
        out["bytes_per_gain"] = figures.cost_per_gain(total, metrics[acc_name], 1.0 / classes)
    return {k: v for k, v in out.items() if math.isfinite(v)}  # undefined ones left out


def _values(per_client: PerClient, name: str) -> dict[int, float]:
    return {c: m[name] for c, m in per_client if name in m and math.isfinite(m[name])}


def _spread(per_client: PerClient, name: str) -> dict[str, float]:
    values = list(_values(per_client, name).values())
    if not values:
        return {}
    return {f"{name}_mean": sum(values) / len(values), f"{name}_max": max(values)}


def _fairness(options: Monitoring, per_client: PerClient) -> dict[str, float]:
    out: dict[str, float] = {}
    for kind, prefix in (("global", "clients_accuracy"), ("personal", "clients_personal_accuracy")):
        acc = _values(per_client, f"eval_{kind}_accuracy")
        out |= {f"{prefix}_{k}": v for k, v in figures.fairness(list(acc.values())).items()}
        if kind == "global" and options.groups:
            means = figures.group_means(acc, options.groups)
            out |= {f"group_{g}_accuracy": v for g, v in means.items()}
    return out


def _shifts(options: Monitoring, per_client: PerClient) -> dict[str, float]:
    labels, feats = _values(per_client, "label_shift"), _values(per_client, "feature_shift")
    if not labels:
        return {}
    worst = [max(labels[c], feats.get(c, 0.0)) for c in labels]
    return {
        "label_shift_max": max(labels.values()),
        "feature_shift_max": max(feats.values(), default=math.nan),
        "shifted_clients": float(sum(w > options.shift_threshold for w in worst)),
    }


def summarises(options: Monitoring, round: int) -> bool:
    """Whether the clients summarise their data in ``round`` (round 1, then every
    ``summary_every``-th).

    Example:
        >>> [r for r in range(1, 8) if summarises(Monitoring(True, summary_every=3), r)]
        [1, 4, 7]
    """
    return options.summaries and (round - 1) % options.summary_every == 0


def summary_options(options: Monitoring) -> SummaryOptions | None:
    """What a client of a run monitored this way shares (``None``: no summaries).

    Example:
        >>> summary_options(Monitoring(summaries=True, summary_noise=2.0)).noise
        2.0
    """
    if not options.summaries:
        return None
    return SummaryOptions(options.summary_noise, options.noise)
