"""Local SGD (epochs of mini-batch SGD with momentum and weight decay), written functionally.

The rule is a pure step over flat float32 tensors,
``(w, opt_state, grad) -> (w, opt_state)``, the same update as ``torch.optim.SGD``
(dampening 0, no Nesterov), so an engine may run it for one client or ``vmap`` it over many.
This is the client half of FedAvg (McMahan et al. 2017).

Example:
    >>> import torch
    >>> rule = LocalSGD(lr=0.1, momentum=0.9)
    >>> w, state = torch.ones(2), rule.init(torch.ones(2))
    >>> w, state = rule.step(w, state, torch.tensor([1.0, -1.0]))
    >>> [round(v, 6) for v in w.tolist()]
    [0.9, 1.1]
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil
from typing import Literal

import torch

from potluck.core.parts import Need
from potluck.core.registry import register

OptState = dict[str, torch.Tensor]


@register("optimizer", "sgd")
@dataclass(frozen=True)
class LocalSGD:
    """``epochs`` passes of mini-batch SGD over the client's data.

    ``batch_size="full"`` (or ``None``) means full batch. ``max_steps`` caps the total
    number of steps.
    """

    epochs: int = 1
    batch_size: int | Literal["full"] | None = 32
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    max_steps: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size is None:
            object.__setattr__(self, "batch_size", "full")
        if self.epochs < 1:
            raise ValueError(f"local epochs must be >= 1, got {self.epochs}")
        if self.batch_size != "full" and not (
            isinstance(self.batch_size, int) and self.batch_size >= 1
        ):
            raise ValueError(f'batch_size must be >= 1 or "full", got {self.batch_size!r}')
        if not self.lr > 0:
            raise ValueError(f"client lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"client momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")

    @property
    def gives(self) -> frozenset[str]:
        """More than one local step, unless ``max_steps`` is 1."""
        return frozenset() if self.max_steps == 1 else frozenset({Need.SEVERAL_LOCAL_STEPS})

    def batch_len(self, num_examples: int) -> int:
        if not isinstance(self.batch_size, int):
            return num_examples
        return min(self.batch_size, num_examples)

    def num_steps(self, num_examples: int) -> int:
        """Steps this rule takes on a client with ``num_examples`` examples."""
        if num_examples == 0:
            return 0
        steps = self.epochs * ceil(num_examples / self.batch_len(num_examples))
        return steps if self.max_steps is None else min(steps, self.max_steps)

    def init(self, w: torch.Tensor) -> OptState:
        return {"momentum": torch.zeros_like(w)} if self.momentum else {}

    def step(
        self, w: torch.Tensor, state: OptState, grad: torch.Tensor
    ) -> tuple[torch.Tensor, OptState]:
        if self.weight_decay:
            grad = grad + self.weight_decay * w
        if self.momentum:
            buf = self.momentum * state["momentum"] + grad
            return w - self.lr * buf, {"momentum": buf}
        return w - self.lr * grad, state
