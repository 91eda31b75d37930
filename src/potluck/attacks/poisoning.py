"""Poisoning attacks: what a seeded fraction of malicious clients does to the federation.

An ``Attack`` names its malicious clients (``attackers``: a fraction of the federation drawn
from the run seed, the same on every engine and after a resume) and says what they do,
through up to three hooks:

- ``poison(x, y, num_classes, gen)``: their training data (label flipping, a backdoor
  trigger), before local training; the client trains on it as usual.
- ``gradient(w, g, w_global)`` (if it ``steers``): each local step's gradient, for a loss of
  the attackers' own (a backdoor's anomaly-evading term).
- ``craft(delta, ctx)``: their own update after local training and before the update
  transforms, knowing nothing but it (sign flipping, scaling, noise, model replacement).
  A deployed malicious ``potluck client --attack`` runs exactly these hooks.
- ``collude(malicious, benign, ctx)``: the round's malicious updates rewritten together,
  knowing each other's honest updates (``knowledge = "colluders"``, e.g. ALIE) or also every
  benign one (``"omniscient"``, e.g. IPM, Min-Max). The round loop runs it in simulation,
  after the updates are decoded and before they are aggregated: the side channel such
  attackers assume, which honest code never offers, so a deployment refuses them.

A malicious client sends whatever it likes, so a crafted update skips the client's update
transforms (its honest encoding reaches the decoder; the crafted delta replaces what it
decoded to). The attackers of each round are recorded (round metric ``malicious``, and
``malicious = 1`` among a client's metrics) so detection can be scored against them.

Example:
    >>> attack = SignFlip(fraction=0.25)
    >>> attack.attackers(8, seed=0).tolist()
    [5, 7]
    >>> attack.craft(torch.tensor([1.0, -2.0]), part_context(0, 1, "attack", 3)).tolist()
    [-1.0, 2.0]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

from potluck.core.parts import Context, part_context
from potluck.core.registry import register
from potluck.core.seeding import Seeds

__all__ = [
    "NAMESPACE",
    "Attack",
    "GaussianNoise",
    "Knowledge",
    "LabelFlip",
    "Scaling",
    "SignFlip",
    "check_attack",
]

Knowledge = Literal["own", "colluders", "omniscient"]
NAMESPACE = "attack"  # the attack's random streams: ("attack", round, client)


@dataclass(frozen=True)
class Attack:
    """A poisoning attack by ``fraction`` of the federation's clients (see the module)."""

    fraction: float = 0.2

    poisons_data: ClassVar[bool] = False  # has a ``poison`` hook
    crafts: ClassVar[bool] = False  # has a ``craft`` hook
    colludes: ClassVar[bool] = False  # has a ``collude`` hook

    def __post_init__(self) -> None:
        if isinstance(self.fraction, bool) or not (
            isinstance(self.fraction, int | float) and 0 <= self.fraction < 1
        ):
            raise ValueError(
                f"attack.fraction must be a number in [0, 1), the share of malicious clients, "
                f"got {self.fraction!r}"
            )

    @property
    def knowledge(self) -> Knowledge:
        """What the attackers know when they craft: their ``own`` update, the ``colluders'``
        honest updates, or every update of the round (``omniscient``)."""
        return "own"

    def attackers(self, num_clients: int, seed: int) -> np.ndarray:
        """The malicious clients: ``round(fraction * num_clients)`` ids, sorted, drawn
        from the run seed."""
        m = round(self.fraction * num_clients)
        rng = Seeds(seed).numpy(NAMESPACE, "attackers")
        return np.sort(rng.choice(num_clients, size=m, replace=False)).astype(np.int64)

    def poison(
        self, x: torch.Tensor, y: torch.Tensor, num_classes: int, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A malicious client's training data (the honest data: no data poisoning)."""
        return x, y

    def craft(self, delta: torch.Tensor, ctx: Context) -> torch.Tensor:
        """A malicious client's update from its honest one (unchanged by default)."""
        return delta

    @property
    def steers(self) -> bool:
        """Whether the attackers train with a loss of their own (``gradient``)."""
        return False

    def gradient(self, w: torch.Tensor, g: torch.Tensor, w_global: torch.Tensor) -> torch.Tensor:
        """An attacker's local-step gradient at ``w`` from the honest one ``g`` (with the
        round's global model ``w_global``): elementwise tensor code, which the vectorized
        engine applies to a stack of clients at once. The honest gradient by default."""
        return g

    def collude(self, malicious: torch.Tensor, benign: torch.Tensor, ctx: Context) -> torch.Tensor:
        """The round's (m, d) malicious updates from their honest versions and, for an
        omniscient attack, the (k, d) benign ones (else ``benign`` is empty)."""
        return malicious


def check_attack(attack: object) -> Attack:
    """``attack`` if it is an ``Attack``; a clear TypeError otherwise."""
    if not isinstance(attack, Attack):
        raise TypeError(
            "attack must be a potluck.attacks.poisoning.Attack (e.g. attacks.SignFlip()), "
            f"got {type(attack).__name__}"
        )
    return attack


@register("attack", "label_flip")
@dataclass(frozen=True)
class LabelFlip(Attack):
    """Label flipping (Tolpegin, Truex, Gursoy, Liu 2020, "Data Poisoning Attacks Against
    Federated Learning Systems", ESORICS; after Biggio et al. 2012): the attackers train on
    their data with labels ``source`` relabelled ``target``, or, with neither given, every
    label ``y`` relabelled ``C - 1 - y`` (C classes).

    Example:
        >>> LabelFlip().poison(torch.zeros(3, 1), torch.tensor([0, 1, 9]), 10, None)[1]
        tensor([9, 8, 0])
        >>> LabelFlip(source=1, target=7).poison(torch.zeros(2, 1), torch.tensor([1, 2]), 10,
        ...                                      None)[1]
        tensor([7, 2])
    """

    fraction: float = 0.2
    source: int | None = None
    target: int | None = None
    poisons_data: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.source is None) != (self.target is None):
            raise ValueError(
                "attack: label_flip takes both source and target (a targeted flip) or neither "
                f"(every label y becomes C - 1 - y), got source={self.source}, "
                f"target={self.target}"
            )
        for name in ("source", "target"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value < 0):
                raise ValueError(f"attack.{name} must be a class index >= 0, got {value!r}")

    def poison(
        self, x: torch.Tensor, y: torch.Tensor, num_classes: int, gen: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.source is None or self.target is None:
            return x, num_classes - 1 - y
        for label in (self.source, self.target):
            if label >= num_classes:
                raise ValueError(f"attack: label {label} outside the task's {num_classes} classes")
        return x, torch.where(y == self.source, self.target, y)


@register("attack", "sign_flip")
@dataclass(frozen=True)
class SignFlip(Attack):
    """Sign flipping (Li, Xu, Chen, Giannakis, Ling 2019, "RSA: Byzantine-Robust Stochastic
    Aggregation Methods for Distributed Learning from Heterogeneous Datasets", AAAI): each
    attacker sends ``-scale`` times its honest update.

    Example:
        >>> SignFlip(scale=4.0).craft(torch.tensor([0.5]), part_context(0, 1, "attack")).item()
        -2.0
    """

    fraction: float = 0.2
    scale: float = 1.0
    crafts: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive("scale", self.scale)

    def craft(self, delta: torch.Tensor, ctx: Context) -> torch.Tensor:
        return -self.scale * delta


@register("attack", "scaling")
@dataclass(frozen=True)
class Scaling(Attack):
    """Scaling, or explicit boosting (Bhagoji, Chakraborty, Mittal, Calo 2019, "Analyzing
    Federated Learning through an Adversarial Lens", ICML): each attacker sends ``factor``
    times its honest update.

    Example:
        >>> Scaling(factor=10.0).craft(torch.tensor([0.5]), part_context(0, 1, "attack")).item()
        5.0
    """

    fraction: float = 0.2
    factor: float = 10.0
    crafts: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive("factor", self.factor)

    def craft(self, delta: torch.Tensor, ctx: Context) -> torch.Tensor:
        return self.factor * delta


@register("attack", "gaussian")
@dataclass(frozen=True)
class GaussianNoise(Attack):
    """The Gaussian attack (Blanchard et al. 2017, "Machine Learning with Adversaries:
    Byzantine Tolerant Gradient Descent", NeurIPS; Fang et al. 2020): each attacker sends
    noise ``N(0, std^2)`` in every coordinate instead of its update, drawn from the attack's
    stream for the round and client.

    Example:
        >>> ctx = part_context(0, 1, "attack", client=2)
        >>> a = GaussianNoise(std=2.0).craft(torch.zeros(4), ctx)
        >>> bool(torch.equal(a, GaussianNoise(std=2.0).craft(torch.ones(4), ctx)))
        True
    """

    fraction: float = 0.2
    std: float = 1.0
    crafts: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive("std", self.std)

    def craft(self, delta: torch.Tensor, ctx: Context) -> torch.Tensor:
        noise = torch.randn(delta.shape, generator=ctx.generator(), dtype=torch.float32)
        return (self.std * noise).to(delta.dtype)


def attack_context(seed: int, round: int, client: int | None = None) -> Context:
    """The attack's context in ``round`` (for ``client``)."""
    return part_context(seed, round, NAMESPACE, client)


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not (
        isinstance(value, int | float) and math.isfinite(value) and value > 0
    ):
        raise ValueError(f"attack.{name} must be a finite number > 0, got {value!r}")
