"""Membership inference against a run's final global model.

The question: was example ``(x, y)`` in the training data of some client of the run? The
attacker holds the released global model (anyone who receives it) and, for LiRA, trains
shadow models the way the run was trained, with potluck itself.

- **Loss threshold** (Yeom, Giacomelli, Fredrikson, Jha 2018, "Privacy Risk in Machine
  Learning: Analyzing the Connection to Overfitting", CSF): score ``-loss``; a member's
  loss tends to be lower.
- **LiRA** (Carlini, Chien, Nasr, Song, Terzis, Tramèr 2022, "Membership Inference Attacks
  From First Principles", S&P): the target's logit-scaled confidence
  ``phi = log(p_y / (1 - p_y))`` against Gaussians fitted per example to the shadows'
  confidences on it: *online*, the likelihood ratio of the shadows that trained on the
  example (IN) against those that did not (OUT); *offline*, only the OUT shadows, the
  one-sided test ``log P[Z < phi]`` for ``Z ~ N(mu_out, sigma_out^2)``. With few shadows
  one variance is fitted for all examples (``fixed_variance``, the paper's advice below 64).

**The population and the shadows.** Members are the training examples of the run's clients
(each client's local train split; all clients count as members, whether or not a sampled
cohort included them). Non-members are examples no client trained on: the source's held-out
test set and the clients' local test splits, cut into *held-out users* of the median
client's size, at most as many as there are clients. Each shadow is the run's experiment
(task, algorithm, DP mechanism, rounds) over a federation of as many users as the run has
clients, drawn from clients and held-out users together, with a seed of its own; every user
is in about the same number of shadows (as in Carlini et al.'s code: half of them when
there are as many held-out users as clients). In/out is **user-level**: a user's examples
are in a shadow together. Scores are per example.

Example:
    >>> rng = np.random.default_rng(0)
    >>> inside = shadow_assignment(100, 8, 50, rng)  # 8 shadows, each on half of 100 users
    >>> phi_shadow = 2.0 * inside + rng.normal(0, 0.5, (8, 100))  # IN: higher confidence
    >>> members = np.arange(100) < 50
    >>> online = lira_online(np.where(members, 2.0, 0.0), phi_shadow, inside)
    >>> float(online[members].min()) > 0 > float(online[~members].max())
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.special import log_ndtr

from potluck.attacks import metrics
from potluck.attacks.capture import as_trained
from potluck.attacks.model import AttackModel
from potluck.core.seeding import Seeds

if TYPE_CHECKING:
    from potluck.data.federation import Federation
    from potluck.data.sources import DataSource
    from potluck.orchestrator import Experiment

__all__ = [
    "FPRS",
    "METHODS",
    "MembershipReport",
    "Population",
    "attack_membership",
    "lira_offline",
    "lira_online",
    "loss_threshold",
    "shadow_assignment",
]

METHODS = ("loss", "lira_online", "lira_offline")
FPRS = (0.01, 0.001)  # the TPR is reported at these false positive rates


def loss_threshold(losses: np.ndarray) -> np.ndarray:
    """Yeom et al.'s score: the negated loss (a threshold on it is the attack)."""
    return -np.asarray(losses, dtype=np.float64)


def _fits(
    phi: np.ndarray, inside: np.ndarray, fixed_variance: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per example, the mean and standard deviation of the shadows' confidences where the
    example was in (``inside``) and where it was out; ``(K, M)`` arrays in."""
    phi, inside = np.asarray(phi, dtype=np.float64), np.asarray(inside, dtype=bool)
    if phi.shape != inside.shape or phi.ndim != 2:
        raise ValueError(
            f"shadow confidences and memberships must be (shadows, examples) arrays of one "
            f"shape, got {phi.shape} and {inside.shape}"
        )
    out = ~inside

    def moments(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        count = mask.sum(0)
        mean = np.where(mask, phi, 0).sum(0) / np.maximum(count, 1)
        resid = np.where(mask, phi - mean, 0) ** 2
        if fixed_variance:
            std = np.full(phi.shape[1], math.sqrt(resid.sum() / max(int(count.sum()), 1)))
        else:
            std = np.sqrt(resid.sum(0) / np.maximum(count, 1))
        return mean, np.maximum(std, 1e-6)

    mu_in, sd_in = moments(inside)
    mu_out, sd_out = moments(out)
    return mu_in, sd_in, mu_out, sd_out


def _log_normal(x: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> np.ndarray:
    return -0.5 * ((x - mu) / sd) ** 2 - np.log(sd) - 0.5 * math.log(2 * math.pi)


def lira_online(
    target: np.ndarray, shadow: np.ndarray, inside: np.ndarray, fixed_variance: bool = True
) -> np.ndarray:
    """Online LiRA: ``log N(phi; mu_in, s_in) - log N(phi; mu_out, s_out)`` per example, from
    the target's confidences ``target`` (``(M,)``) and the shadows' (``(K, M)``) with their
    memberships ``inside``. Every example needs an IN and an OUT shadow."""
    counts = np.asarray(inside, dtype=bool).sum(0)
    if np.any(counts == 0) or np.any(counts == np.shape(inside)[0]):
        raise ValueError("online LiRA needs every example in some shadows and out of others")
    mu_in, sd_in, mu_out, sd_out = _fits(shadow, inside, fixed_variance)
    phi = np.asarray(target, dtype=np.float64)
    return _log_normal(phi, mu_in, sd_in) - _log_normal(phi, mu_out, sd_out)


def lira_offline(
    target: np.ndarray, shadow: np.ndarray, inside: np.ndarray, fixed_variance: bool = True
) -> np.ndarray:
    """Offline LiRA: ``log P[Z < phi]`` for ``Z ~ N(mu_out, s_out^2)`` fitted to the OUT
    shadows only (the one-sided test; larger means more likely a member).

    Example:
        >>> shadow = np.array([[0.0, 1.0], [2.0, 1.0]])
        >>> lira_offline(np.array([1.0, 1.0]), shadow, np.zeros((2, 2), bool)).round(3).tolist()
        [-0.693, -0.693]
    """
    if np.any(np.asarray(inside, dtype=bool).all(0)):
        raise ValueError("offline LiRA needs every example out of some shadows")
    _, _, mu_out, sd_out = _fits(shadow, inside, fixed_variance)
    return log_ndtr((np.asarray(target, dtype=np.float64) - mu_out) / sd_out)


def shadow_assignment(users: int, shadows: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``(shadows, users)`` booleans, True where the user is in that shadow's federation:
    ``size`` users per shadow, chosen at random among those in the fewest shadows so far, so
    every user is in ``floor`` or ``ceil`` of ``shadows * size / users`` of them.

    Example:
        >>> keep = shadow_assignment(5, 4, 3, np.random.default_rng(0))
        >>> keep.sum(1).tolist(), sorted(set(keep.sum(0).tolist()))
        ([3, 3, 3, 3], [2, 3])
    """
    if not 1 <= size <= users:
        raise ValueError(f"a shadow of {size} users cannot be drawn from {users}")
    keep = np.zeros((shadows, users), dtype=bool)
    counts = np.zeros(users)
    for k in range(shadows):
        chosen = np.argsort(counts + rng.random(users))[:size]
        keep[k, chosen] = True
        counts[chosen] += 1
    return keep


@dataclass(frozen=True)
class Population:
    """Every user of the membership game: the run's clients (the first ``num_clients``,
    their local train splits) and held-out users (examples no client trained on), as rows
    of one ``source`` whose ``train`` holds all of them; ``users[u]`` are user ``u``'s
    rows."""

    source: DataSource
    users: tuple[np.ndarray, ...]
    num_clients: int

    @property
    def members(self) -> np.ndarray:
        """Whether each user is one of the run's clients."""
        return np.arange(len(self.users)) < self.num_clients

    @classmethod
    def of(cls, federation: Federation, seed: int = 0) -> Population:
        """The population of a run over ``federation``: its clients, then its held-out
        examples (the source's test set, the clients' local test splits) shuffled and cut
        into users of the median client's number of training examples, at most as many
        held-out users as clients."""
        from potluck.data.sources import ArrayDataset, DataSource

        xs, ys, users, held_x, held_y = [], [], [], [], []
        offset = 0
        for cid in range(federation.num_clients):
            data = federation.client(cid)
            xs.append(data.x_train)
            ys.append(data.y_train)
            users.append(np.arange(offset, offset + len(data.y_train)))
            offset += len(data.y_train)
            held_x.append(data.x_test)
            held_y.append(data.y_test)
        test = federation.source.test
        held_x.append(test.features())
        held_y.append(test.y)
        hx, hy = np.concatenate(held_x), np.concatenate(held_y)
        size = max(1, int(np.median(federation.num_examples_all())))
        order = Seeds(seed).numpy("membership", "held_out").permutation(len(hy))
        held = min(len(order) // size, federation.num_clients)
        for start in range(0, held * size, size):
            users.append(offset + np.sort(order[start : start + size]))
        if len(users) == federation.num_clients:
            raise ValueError(
                f"no held-out examples make a user of {size} examples (the test set and the "
                "clients' local test splits): there are no non-members to attack"
            )
        train = ArrayDataset(np.concatenate([*xs, hx]), np.concatenate([*ys, hy]))
        source = federation.source
        universe = DataSource(
            f"{source.name}+held_out", train, source.test, source.num_classes, source.input_shape
        )
        return cls(universe, tuple(users), federation.num_clients)

    def federation(self, users: np.ndarray, seed: int) -> Federation:
        """A federation of the given users (their examples all for training)."""
        from potluck.data.federation import Federation
        from potluck.data.partition import Partition

        part = Partition.from_lists([self.users[int(u)] for u in users])
        return Federation(self.source, part, test_fraction=0.0, seed=seed)


@dataclass(frozen=True)
class MembershipReport:
    """Scores of each method (larger: more likely a member) on the candidates, their true
    membership, and how the game was set up."""

    scores: dict[str, np.ndarray]
    is_member: np.ndarray
    shadows: int
    users: int
    num_clients: int
    target: dict[str, float] = field(default_factory=dict)  # loss and accuracy, in and out

    def roc(self, method: str) -> tuple[np.ndarray, np.ndarray]:
        return metrics.roc_curve(self.scores[method], self.is_member)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per method: ``auc``, ``advantage`` and ``tpr_at_1%_fpr``, ``tpr_at_0.1%_fpr``."""
        out: dict[str, dict[str, float]] = {}
        for method in self.scores:
            fpr, tpr = self.roc(method)
            row = {"auc": metrics.auc(fpr, tpr), "advantage": metrics.advantage(fpr, tpr)}
            for at in FPRS:
                row[f"tpr_at_{at * 100:g}%_fpr"] = metrics.tpr_at_fpr(fpr, tpr, at)
            out[method] = row
        return out

    def to_json(self, points: int = 200) -> dict[str, Any]:
        """The summary, the setting and each ROC curve thinned to about ``points`` points
        (spaced evenly in log FPR, so the low-FPR end survives)."""
        rocs = {}
        for method in self.scores:
            fpr, tpr = self.roc(method)
            grid = np.unique(np.r_[0, np.geomspace(1e-4, 1, points)])
            idx = np.unique(np.searchsorted(fpr, grid, side="right") - 1)
            rocs[method] = {"fpr": fpr[idx].round(6).tolist(), "tpr": tpr[idx].round(6).tolist()}
        return {
            "attack": "membership",
            "unit": "example (shadow models: user-level in/out)",
            "members": int(self.is_member.sum()),
            "nonmembers": int((~self.is_member).sum()),
            "shadows": self.shadows,
            "users": self.users,
            "clients": self.num_clients,
            "target": self.target,
            "methods": self.summary(),
            "roc": rocs,
        }


def _candidates(pop: Population, max_examples: int | None, rng: np.random.Generator) -> np.ndarray:
    """Rows of ``pop.source.train`` to score: members and non-members, at most
    ``max_examples`` of each (a random subset), members first."""
    member_rows = np.concatenate([pop.users[u] for u in range(pop.num_clients)])
    held_rows = np.concatenate([pop.users[u] for u in range(pop.num_clients, len(pop.users))])
    chosen = []
    for rows in (member_rows, held_rows):
        if max_examples is not None and len(rows) > max_examples:
            rows = np.sort(rng.choice(rows, max_examples, replace=False))
        chosen.append(rows)
    return np.concatenate(chosen)


def attack_membership(
    experiment: Experiment,
    weights: torch.Tensor,
    *,
    shadows: int = 8,
    max_examples: int | None = 5000,
    fixed_variance: bool = True,
    seed: int = 0,
    on_shadow: Callable[[int, int], None] | None = None,
) -> MembershipReport:
    """Loss-threshold and (with ``shadows >= 2``) online and offline LiRA against the global
    model ``weights`` of a run of ``experiment``, on at most ``max_examples`` members and as
    many non-members. ``on_shadow(k, shadows)`` is told as each shadow finishes.

    Shadows run the experiment without a store, evaluated only at the end and on nothing
    (they are not looked at), on the engine the experiment names (a deployed run's shadows
    are simulated, on the engine ``auto`` picks).
    """
    from potluck.orchestrator import Evaluation, run_experiment

    if shadows == 1 or shadows < 0:
        raise ValueError(f"LiRA needs at least 2 shadow models (or 0 for none), got {shadows}")
    pop = Population.of(experiment.federation, seed)
    rng = Seeds(seed).numpy("membership", "candidates")
    rows = _candidates(pop, max_examples, rng)
    owner = np.empty(len(pop.source.train), dtype=np.int64)
    for u, user_rows in enumerate(pop.users):
        owner[user_rows] = u
    is_member = owner[rows] < pop.num_clients
    x, y = pop.source.train.features(rows), pop.source.train.y[rows]
    model = AttackModel.of(experiment)
    losses, phi = model.scores(weights, x, y)
    scores = {"loss": loss_threshold(losses)}
    target = _target_stats(model, weights, x, y, losses, is_member)
    if shadows:
        keep = shadow_assignment(
            len(pop.users), shadows, pop.num_clients, Seeds(seed).numpy("shadows")
        )
        always = int(keep.all(0).sum())
        if always:
            raise ValueError(
                f"{always} users would be in all {shadows} shadows: {len(pop.users)} users "
                f"for shadows of {pop.num_clients}; train more shadows"
            )
        shadow_phi = np.empty((shadows, len(rows)))
        quiet = Evaluation(every=experiment.rounds, centralized=False)
        engine = "auto" if experiment.engine == "grpc" else experiment.engine  # simulated
        for k in range(shadows):
            users = np.flatnonzero(keep[k])
            shadow_seed = Seeds(seed).integer("shadow", k) % 2**31
            shadow = as_trained(
                experiment,
                federation=pop.federation(users, shadow_seed),
                seed=shadow_seed,
                evaluation=quiet,
                engine=engine,
                name=None,
                config=None,
            )
            w = run_experiment(shadow, progress=False).weights
            shadow_phi[k] = model.scores(w, x, y)[1]
            if on_shadow is not None:
                on_shadow(k + 1, shadows)
        inside = keep[:, owner[rows]]
        scores["lira_online"] = lira_online(phi, shadow_phi, inside, fixed_variance)
        scores["lira_offline"] = lira_offline(phi, shadow_phi, inside, fixed_variance)
    return MembershipReport(scores, is_member, shadows, len(pop.users), pop.num_clients, target)


def _target_stats(
    model: AttackModel,
    w: torch.Tensor,
    x: np.ndarray,
    y: np.ndarray,
    losses: np.ndarray,
    is_member: np.ndarray,
) -> dict[str, float]:
    """The target's mean loss and accuracy on the member and the non-member candidates."""
    correct = model.predict(w, x) == y
    return {
        "member_loss": float(losses[is_member].mean()),
        "nonmember_loss": float(losses[~is_member].mean()),
        "member_accuracy": float(correct[is_member].mean()),
        "nonmember_accuracy": float(correct[~is_member].mean()),
    }


def summary_rows(report: MembershipReport) -> Sequence[tuple[str, dict[str, float]]]:
    """The summary's rows in ``METHODS`` order (for printing)."""
    summary = report.summary()
    return [(m, summary[m]) for m in METHODS if m in summary]
