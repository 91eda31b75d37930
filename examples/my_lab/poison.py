"""A colluding poisoning attack written as a user would: the attackers of each round pool
their honest updates and all send their mean, reversed and stretched by ``scale`` (a
colluding sign flip, in the spirit of Li et al. 2019's sign flipping, with the noise of
each attacker's own update averaged away), and each of them also trains on labels shifted
by one class (a data poisoning of its own, Tolpegin et al. 2020).

Example:
    >>> import torch
    >>> from potluck.attacks.poisoning import attack_context
    >>> honest = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    >>> CollectiveFlip(scale=2.0).collude(honest, honest[:0], attack_context(0, 1)).tolist()
    [[-4.0, -2.0], [-4.0, -2.0]]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from potluck.attacks.poisoning import Attack, Knowledge
from potluck.core.parts import Context


@dataclass(frozen=True)
class CollectiveFlip(Attack):
    """The attackers send ``-scale`` times the mean of their honest updates, and train on
    labels ``(y + 1) mod C``."""

    fraction: float = 0.2
    scale: float = 2.0
    poisons_data: ClassVar[bool] = True
    colludes: ClassVar[bool] = True

    @property
    def knowledge(self) -> Knowledge:
        return "colluders"

    def poison(
        self, x: torch.Tensor, y: torch.Tensor, num_classes: int, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return x, (y + 1) % num_classes

    def collude(self, malicious: torch.Tensor, benign: torch.Tensor, ctx: Context) -> torch.Tensor:
        return (-self.scale * malicious.mean(0)).expand_as(malicious).clone()
