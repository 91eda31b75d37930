"""``Task``: what is learned. The user's model factory, loss and how a batch is fed.

:func:`check_outputs` runs a model once on a small batch and explains, before any training,
what would otherwise fail deep inside a round (a tuple output, labels beyond the outputs).

Example:
    >>> import torch
    >>> task = Task(model_fn=lambda: torch.nn.Linear(4, 3))
    >>> logits = torch.zeros(2, 3)
    >>> round(float(task.loss_fn(logits, torch.tensor([0, 1]))), 4)  # log(3)
    1.0986
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

__all__ = ["LossFn", "Task", "check_outputs", "count_correct", "cross_entropy"]

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
    ``model_fn`` is a factory (a class or a function), never a model instance.

    Example:
        >>> Task(model_fn=torch.nn.Linear(2, 2))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: Task(model_fn=...) got a model instance (Linear), ...
    """

    model_fn: Callable[[], torch.nn.Module]
    loss_fn: LossFn = cross_entropy
    correct_fn: LossFn = count_correct
    name: str = field(default="task")
    ref: str | None = field(default=None, compare=False)  # the import path it was loaded from

    def __post_init__(self) -> None:
        if isinstance(self.model_fn, torch.nn.Module):
            cls = type(self.model_fn).__name__
            raise TypeError(
                f"Task(model_fn=...) got a model instance ({cls}), but needs a factory that "
                "builds a fresh model each call (potluck builds one per client program and "
                f"worker): pass the class, Task(model_fn={cls}), or a function, "
                f"Task(model_fn=lambda: {cls}(...))"
            )
        for name in ("model_fn", "loss_fn", "correct_fn"):
            value = getattr(self, name)
            if not callable(value):
                raise TypeError(f"Task.{name} must be callable, got {type(value).__name__}")

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


def check_outputs(
    task: Task, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, where: str
) -> torch.Tensor:
    """Run ``model`` on the small batch ``(x, y)`` and refuse outputs training cannot use;
    the output if it can.

    Refused, with messages naming ``where`` (e.g. ``"client 3"``) and the fix: an output
    that is not a tensor (``TypeError``; e.g. an LSTM's ``(output, (h, c))``); an output
    whose first dimension is not the batch size; with the default ``cross_entropy`` loss and
    a 2-D ``(batch, C)`` output, labels outside ``[0, C)``; and a loss that is not a finite
    0-d tensor (``ValueError``). The forward pass runs in eval mode without gradients inside
    ``torch.random.fork_rng()``, so no global RNG moves and every module's training flag is
    restored afterwards; an exception from the model or the loss gets a note naming
    ``where``.

    Example:
        >>> task = Task(model_fn=lambda: torch.nn.Linear(4, 3))
        >>> model = task.build_model()
        >>> check_outputs(task, model, torch.zeros(2, 4), torch.tensor([0, 2]), where="c").shape
        torch.Size([2, 3])
        >>> x, bad = torch.zeros(2, 4), torch.tensor([0, 3])
        >>> check_outputs(task, model, x, bad, where="client 3")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: client 3: label 3 is out of range for the model's 3 outputs ...
    """
    with _quiet(model, x):
        raw = _run(lambda: model(x), where, f"the model's forward pass on x {_shape(x)}")
        out = _check_output(raw, len(x), where)
        if task.loss_fn is cross_entropy and out.ndim == 2:
            _check_labels(y, out.shape[1], where)
        loss = _run(lambda: task.loss_fn(out, y), where, "task.loss_fn(model(x), y)")
    _check_loss(loss, where)
    return out


@contextmanager
def _quiet(model: torch.nn.Module, x: torch.Tensor) -> Iterator[None]:
    """Eval mode, no gradients and a forked RNG; every module's training flag restored."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        with torch.random.fork_rng(devices=_cuda_devices(x)), torch.no_grad():
            model.eval()
            yield
    finally:
        for module, training in flags:
            module.training = training


def _cuda_devices(x: torch.Tensor) -> list[int]:
    """The CUDA device of ``x`` to fork the RNG of (none for CPU: CUDA stays uninitialised)."""
    if not x.is_cuda:
        return []
    return [x.device.index if x.device.index is not None else torch.cuda.current_device()]


def _run(fn: Callable[[], object], where: str, what: str) -> object:
    try:
        return fn()
    except Exception as exc:
        exc.add_note(f"potluck: raised by {what} for {where}")
        raise


def _shape(t: torch.Tensor) -> str:
    return f"of shape {tuple(t.shape)} and dtype {t.dtype}"


def _check_output(out: object, batch: int, where: str) -> torch.Tensor:
    if isinstance(out, tuple):
        raise TypeError(
            f"{where}: the model returned a tuple of {len(out)}, not a tensor (an nn.LSTM/GRU "
            "returns (output, state)); forward must return the logits tensor only, e.g. "
            "`out, _ = self.lstm(x)` then `return self.head(out[:, -1])`"
        )
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"{where}: the model returned a {type(out).__name__}, not a torch.Tensor; forward "
            "must return the logits tensor only (e.g. `return out.logits` for a Hugging Face "
            "model output)"
        )
    if out.ndim == 0 or out.shape[0] != batch:
        raise ValueError(
            f"{where}: the model's output has shape {tuple(out.shape)} for a batch of {batch} "
            "examples; its first dimension must be the batch (flatten with x.flatten(1), not "
            "x.view(-1); use batch_first=True for recurrent layers)"
        )
    return out


def _check_labels(y: torch.Tensor, num_outputs: int, where: str) -> None:
    """Integer class labels must index the model's ``num_outputs`` logits."""
    if y.is_floating_point() or y.is_complex() or y.numel() == 0:
        return  # class probabilities, or nothing to check
    low, high = int(y.min()), int(y.max())
    if high >= num_outputs:
        raise ValueError(
            f"{where}: label {high} is out of range for the model's {num_outputs} outputs "
            f"(cross_entropy needs labels in [0, {num_outputs})); give the model at least "
            f"{high + 1} outputs (its output size / num_classes), e.g. nn.Linear(..., {high + 1})"
        )
    if low < 0:
        raise ValueError(
            f"{where}: label {low} is negative; class labels must lie in [0, {num_outputs}) "
            "for cross_entropy (map them to 0..num_classes - 1)"
        )


def _check_loss(loss: object, where: str) -> None:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"{where}: task.loss_fn returned a {type(loss).__name__}, not a torch.Tensor; "
            "return the mean loss as a 0-d tensor"
        )
    if loss.ndim != 0:
        raise ValueError(
            f"{where}: task.loss_fn returned shape {tuple(loss.shape)}, not a 0-d tensor; "
            "return the mean loss over the batch (e.g. reduce with .mean())"
        )
    if not bool(torch.isfinite(loss)):
        raise ValueError(
            f"{where}: the loss on a first batch is {float(loss)}; check the model's output "
            "(e.g. log of 0, overflow) and the inputs (their scale, NaN) before training"
        )
