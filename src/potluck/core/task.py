"""``Task``: what is learned. The user's model factory, loss and how a batch is fed.

Example:
    >>> import torch
    >>> task = Task(model_fn=lambda: torch.nn.Linear(4, 3))
    >>> logits = torch.zeros(2, 3)
    >>> round(float(task.loss_fn(logits, torch.tensor([0, 1]))), 4)  # log(3)
    1.0986
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of class logits against integer labels."""
    return F.cross_entropy(logits, y)


def count_correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Number of correct argmax predictions (a 0-d tensor)."""
    return (logits.argmax(dim=-1) == y).sum()


@dataclass(frozen=True)
class Task:
    """A model factory plus its loss and correct-count metric.

    ``loss_fn`` must return the *mean* loss over the batch; ``correct_fn`` the number of
    correct predictions. The model must have float32 parameters and no buffers that change
    during training (batch-norm running statistics): use GroupNorm or LayerNorm instead.
    """

    model_fn: Callable[[], torch.nn.Module]
    loss_fn: LossFn = cross_entropy
    correct_fn: LossFn = count_correct
    name: str = field(default="task")

    def build_model(self) -> torch.nn.Module:
        """Build the model and check that potluck can train it functionally."""
        model = self.model_fn()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model_fn must return a torch.nn.Module, got {type(model).__name__}")
        for name, buf in model.named_buffers():
            if buf.is_floating_point():
                raise ValueError(
                    f"model buffer {name!r} would change during training (e.g. batch-norm "
                    "running statistics); potluck's engines train parameters only. "
                    "Replace BatchNorm with GroupNorm/LayerNorm, or pass "
                    "track_running_stats=False."
                )
        return model
