"""A/B evaluation on the clients' local test data, with a paired significance test: two
global models (``ab_test``), or the global model against each client's personalised one
(``ab_personal``).

Each client's accuracy under model A and model B is measured on that client's own test
split; the per-client differences (B minus A) are tested with the Wilcoxon signed-rank test
(Wilcoxon, "Individual comparisons by ranking methods", Biometrics Bulletin 1945), which
needs no normality of the differences, and summarised by their mean with a 95 % Student-t
interval. Pairing by client removes the between-client spread that an unpaired comparison
would have to overcome, which is why one federation's clients are enough to tell versions
apart.

Example:
    >>> import torch
    >>> from potluck import Experiment, Federation, Task
    >>> from potluck.algorithms import fedavg
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(400, 2, generator=g)
    >>> y = (x[:, 0] > 0).long()
    >>> fed = Federation.from_client_data([(x[i::8], y[i::8]) for i in range(8)],
    ...                                   test_fraction=0.5)
    >>> exp = Experiment(Task(lambda: torch.nn.Linear(2, 2)), fed, fedavg(clients_per_round=2),
    ...                  rounds=1)
    >>> good = torch.tensor([-5.0, 0.0, 5.0, 0.0, 0.0, 0.0])  # predicts x[0] > 0
    >>> result = ab_test(exp, -good, good)
    >>> result.winner, result.clients, result.accuracy_b
    ('b', 8, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from potluck.core.records import ClientState
    from potluck.orchestrator import Experiment


@dataclass(frozen=True)
class ABResult:
    """What an A/B evaluation found; ``winner`` is ``"a"``, ``"b"`` or ``"none"`` (no
    significant difference at ``alpha``)."""

    clients: int
    accuracy_a: float  # mean over the clients
    accuracy_b: float
    mean_difference: float  # B minus A, per client, averaged
    ci95: tuple[float, float]
    p_value: float
    alpha: float
    winner: str
    per_client: tuple[tuple[int, float, float], ...]  # (client, accuracy A, accuracy B)

    def summary(self, a: str = "A", b: str = "B") -> str:
        """One line, the models called ``a`` and ``b``."""
        lo, hi = self.ci95
        won = {"a": f"{a} is better", "b": f"{b} is better"}.get(self.winner)
        return (
            f"{self.clients} clients: {a} {self.accuracy_a:.4f}, {b} {self.accuracy_b:.4f}, "
            f"{b} - {a} {self.mean_difference:+.4f} (95 % CI {lo:+.4f} to {hi:+.4f}), "
            f"Wilcoxon p = {self.p_value:.3g}: " + (won or "no significant difference")
        )


def ab_test(
    experiment: Experiment,
    a: torch.Tensor,
    b: torch.Tensor,
    clients: Sequence[int] | None = None,
    alpha: float = 0.05,
) -> ABResult:
    """Models ``a`` and ``b`` (flat weight vectors of ``experiment``'s task) on the local
    test data of ``clients`` (default: every client with test examples)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    program = experiment.algorithm.client_program(
        experiment.task, experiment.federation, seed=experiment.seed
    )
    size = program.spec.size
    for label, w in (("a", a), ("b", b)):
        if w.shape != (size,):
            raise ValueError(f"model {label} has shape {tuple(w.shape)}; the task needs ({size},)")
    fed = experiment.federation
    ids = range(fed.num_clients) if clients is None else clients
    rows = []
    for cid in ids:
        data = fed.client(int(cid))
        if len(data.y_test) == 0:
            continue
        acc_a = program.evaluate_arrays(a, data.x_test, data.y_test).accuracy
        acc_b = program.evaluate_arrays(b, data.x_test, data.y_test).accuracy
        rows.append((int(cid), acc_a, acc_b))
    if len(rows) < 2:
        raise ValueError("an A/B test needs at least two clients with local test data")
    return paired_test(rows, alpha)


def ab_personal(
    experiment: Experiment,
    w: torch.Tensor,
    states: Mapping[int, ClientState],
    alpha: float = 0.05,
) -> ABResult:
    """The global model ``w`` (A) against each client's personalised model (B: what the
    algorithm's personalising term, FedPer or Ditto, makes of ``w`` and the client's state
    ``states[c]``, by part namespace) on that client's local test data. Clients without a
    personal model (never trained, no test data) are left out.

    Example:
        >>> from potluck import Experiment, Federation, Task
        >>> from potluck.algorithms import ditto
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(400, 2, generator=g)
        >>> fed = Federation.from_client_data(
        ...     [(x[i::4], (x[i::4, i % 2] > 0).long()) for i in range(4)], test_fraction=0.5)
        >>> exp = Experiment(Task(lambda: torch.nn.Linear(2, 2)), fed,
        ...                  ditto(clients_per_round=4), rounds=1)
        >>> own = [torch.tensor([-5.0, 0, 5, 0, 0, 0]), torch.tensor([0, -5.0, 0, 5, 0, 0])]
        >>> states = {c: {"terms.0.ditto": {"personal": own[c % 2]}} for c in range(4)}
        >>> r = ab_personal(exp, torch.zeros(6), states)  # a global model that knows nothing
        >>> r.clients, r.accuracy_b, r.mean_difference > 0.4
        (4, 1.0, True)
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    program = experiment.algorithm.client_program(
        experiment.task, experiment.federation, seed=experiment.seed
    )
    if program.personal is None:
        raise ValueError(
            f"{experiment.algorithm.name} keeps no personal models (FedPer or Ditto do)"
        )
    program.spec.check(w, "the global model")
    fed, rows = experiment.federation, []
    for cid, state in sorted(states.items()):
        data = fed.client(int(cid))
        personal = program.personal_model(w, state)
        if personal is None or len(data.y_test) == 0:
            continue
        acc_global = program.evaluate_arrays(w, data.x_test, data.y_test).accuracy
        acc_personal = program.evaluate_arrays(personal, data.x_test, data.y_test).accuracy
        rows.append((int(cid), acc_global, acc_personal))
    return paired_test(rows, alpha)


def paired_test(rows: Sequence[tuple[int, float, float]], alpha: float = 0.05) -> ABResult:
    """The A/B comparison of per-client accuracies ``(client, accuracy A, accuracy B)``,
    however they were measured (here, or by deployed clients: ``rollout.serving``).

    Example:
        >>> r = paired_test([(0, 0.5, 0.75), (1, 0.5, 0.5), (2, 0.25, 0.5)])
        >>> r.mean_difference, r.winner
        (0.16666666666666666, 'none')
    """
    if len(rows) < 2:
        raise ValueError("an A/B test needs at least two clients with local test data")
    from scipy import stats

    acc = np.array([[ra, rb] for _, ra, rb in rows], dtype=np.float64)
    diff = acc[:, 1] - acc[:, 0]
    mean = float(diff.mean())
    half = 0.0
    if len(diff) > 1 and diff.std(ddof=1) > 0:
        half = float(stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / math.sqrt(len(diff)))
    p = 1.0 if not np.any(diff) else float(stats.wilcoxon(diff, zero_method="zsplit").pvalue)
    winner = "none" if p >= alpha else ("b" if mean > 0 else "a")
    return ABResult(
        clients=len(rows),
        accuracy_a=float(acc[:, 0].mean()),
        accuracy_b=float(acc[:, 1].mean()),
        mean_difference=mean,
        ci95=(mean - half, mean + half),
        p_value=p,
        alpha=alpha,
        winner=winner,
        per_client=tuple((int(c), float(a), float(b)) for c, a, b in rows),
    )
