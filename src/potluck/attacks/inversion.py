"""Gradient inversion: reconstruct a client's training examples from its update.

The curious server holds the model, the weights ``w`` the client started from and its
decoded update (``attacks.capture``). It turns the update into a *target gradient*
(:func:`target_gradient`) and searches for dummy examples whose gradient at ``w`` matches it:

- :class:`DLG`, Deep Leakage from Gradients (Zhu, Liu, Han 2019, NeurIPS): dummy inputs and
  soft labels, L-BFGS on the squared L2 distance between the gradients.
- :class:`IDLG`, improved DLG (Zhao, Mopuri, Bilen 2020, arXiv:2001.02610): the label read
  off the last layer's gradient (:func:`analytic_labels`, exact for one example under
  cross-entropy), then L-BFGS on the inputs only.
- :class:`InvertingGradients` (Geiping, Bauermeister, Dröge, Moeller 2020, "Inverting
  Gradients - How easy is it to break privacy in federated learning?", NeurIPS): the
  analytic labels, cosine distance between the gradients plus a total-variation prior,
  Adam on the *signed* gradient of the inputs with the learning rate cut tenfold at 3/8, 5/8
  and 7/8 of the iterations, inputs kept in the data's box, the best of ``restarts`` runs.

Gradients come from ``torch.func.functional_call`` of the task's model at the flat weight
vector, as a client computes them (``client/program.py``), in eval mode. The loss is the
task's cross-entropy with probability targets (one-hot for known labels).

Example:
    >>> import torch
    >>> from potluck.core.task import Task
    >>> model = AttackModel(Task(lambda: torch.nn.Linear(4, 3)), (4,), 3, (0.0, 1.0))
    >>> w = model.initial_weights()
    >>> x, y = torch.rand(1, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([2])
    >>> g = model.gradient(w, x, model.one_hot(y))
    >>> rec = IDLG(iterations=50).reconstruct(model, w, g, 1, torch.Generator().manual_seed(0))
    >>> rec.labels.tolist(), bool(torch.allclose(rec.x, x, atol=1e-3))
    ([2], True)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch

from potluck.attacks import metrics
from potluck.attacks.model import AttackModel
from potluck.client.terms import effective_steps

if TYPE_CHECKING:
    from potluck.attacks.capture import CapturedUpdate

__all__ = [
    "DLG",
    "IDLG",
    "METHODS",
    "InvertingGradients",
    "Reconstruction",
    "analytic_labels",
    "evaluate_reconstruction",
    "invert",
    "target_gradient",
    "total_variation",
]


def target_gradient(update: CapturedUpdate) -> torch.Tensor:
    """The gradient an update stands for: ``-delta / (lr * s)``, where ``s`` is the total
    weight of the local steps' gradients (``num_steps``, or with heavy-ball momentum
    FedNova's ``effective_steps``).

    For FedSGD (one full-batch step of rate 1) this is the client's gradient exactly. For
    FedAvg it is the mean of the gradients along the local trajectory, an approximation
    that worsens with more steps, a larger rate and smaller batches; weight decay and the
    terms' corrections (FedProx's proximal pull) are not undone.

    Example:
        >>> from potluck.attacks.capture import CapturedUpdate
        >>> u = CapturedUpdate(0, 1, torch.zeros(2), torch.tensor([-0.4, 0.2]), 8, 2, 0.1, 4, 1)
        >>> target_gradient(u).tolist()
        [2.0, -1.0]
    """
    if update.num_steps < 1:
        raise ValueError(f"client {update.client}'s update took no local steps: nothing to invert")
    steps = effective_steps(update.num_steps, update.momentum)
    return -update.delta / (update.lr * steps)


@dataclass(frozen=True)
class Reconstruction:
    """What an inversion found: inputs ``x`` (``(B, *input_shape)``, inside the box),
    their ``labels`` and the final gradient-matching ``loss``."""

    method: str
    x: torch.Tensor
    labels: torch.Tensor
    loss: float
    iterations: int


class Method(Protocol):
    name: ClassVar[str]

    def reconstruct(
        self,
        model: AttackModel,
        w: torch.Tensor,
        gradient: torch.Tensor,
        batch: int,
        generator: torch.Generator,
    ) -> Reconstruction: ...


def analytic_labels(model: AttackModel, gradient: torch.Tensor, batch: int) -> torch.Tensor:
    """The labels iDLG reads off the output layer's gradient (Zhao et al. 2020).

    Under cross-entropy the output layer's gradient row of class ``c`` (weights and bias)
    is ``(p_c - y_c) h`` for one example with features ``h``: the rows are parallel, and
    only the true class's coefficient is negative, so its row has negative cosine with all
    the others. That rule is exact for ``batch = 1`` whatever the sign of ``h``. For a
    larger batch the bias gradient ``mean(p) - mean(y)`` is negative for the classes
    present; the ``batch`` labels are shared among those in proportion to how negative it
    is (largest remainders), a heuristic that is exact when the batch's labels are distinct
    and the model is still near uniform.

    Example:
        >>> from potluck.core.task import Task
        >>> model = AttackModel(Task(lambda: torch.nn.Linear(3, 4)), (3,), 4, (-1.0, 1.0))
        >>> x = torch.tensor([[0.5, -1.0, 0.2]])
        >>> g = model.gradient(model.initial_weights(), x, model.one_hot(torch.tensor([3])))
        >>> analytic_labels(model, g, 1).tolist()
        [3]
    """
    weight_name, bias_name = model.last_layer()
    layers = model.spec.unflatten(gradient.detach())
    if batch == 1:
        rows = layers[weight_name]
        if bias_name is not None:
            rows = torch.cat([rows, layers[bias_name][:, None]], dim=1)
        unit = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-30)
        cosines = unit @ unit.T
        return cosines.sum(1).argmin().reshape(1)
    if bias_name is None:
        raise ValueError(
            "analytic labels for a batch of more than one example need the output layer's "
            "bias; use method 'dlg', which optimises the labels"
        )
    negative = (-layers[bias_name]).clamp_min(0).double()
    if not float(negative.sum()) > 0:
        raise ValueError("the output layer's bias gradient has no negative entry: no labels")
    share = negative / negative.sum() * batch
    counts = share.floor().long()
    rest = batch - int(counts.sum())
    counts[torch.argsort(share - counts, descending=True)[:rest]] += 1
    return torch.repeat_interleave(torch.arange(model.num_classes), counts)


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of vertically and horizontally adjacent pixels of
    ``(B, C, H, W)`` images (Geiping et al.'s image prior).

    Example:
        >>> float(total_variation(torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])))
        1.0
    """
    dy = (images[:, :, 1:, :] - images[:, :, :-1, :]).abs().mean()
    dx = (images[:, :, :, 1:] - images[:, :, :, :-1]).abs().mean()
    return dx + dy


def _dummy(model: AttackModel, batch: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(batch, *model.input_shape, generator=generator)
    return x.requires_grad_(True)


def _lbfgs(
    params: list[torch.Tensor], objective: Callable[[], torch.Tensor], iterations: int, lr: float
) -> tuple[float, list[torch.Tensor]]:
    """Minimise ``objective`` over ``params`` with L-BFGS (strong Wolfe line search); the
    best finite loss seen and the parameters where it was seen."""
    opt = torch.optim.LBFGS(
        params,
        lr=lr,
        max_iter=iterations,
        history_size=100,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
    )
    best: list[object] = [math.inf, [p.detach().clone() for p in params]]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective()
        value = float(loss.detach())
        if math.isfinite(value) and value < best[0]:  # type: ignore[operator]
            best[:] = [value, [p.detach().clone() for p in params]]
        if not math.isfinite(value):  # an overflowing trial point: the line search backs off
            return loss.detach()
        loss.backward()
        return loss

    opt.step(closure)
    return float(best[0]), best[1]  # type: ignore[arg-type, return-value]


def _check(model: AttackModel, w: torch.Tensor, gradient: torch.Tensor, batch: int) -> None:
    model.spec.check(w, "the weights the client started from")
    model.spec.check(gradient, "the target gradient")
    if batch < 1:
        raise ValueError(f"the batch to reconstruct must have at least 1 example, got {batch}")


def _boxed(model: AttackModel, x: torch.Tensor) -> torch.Tensor:
    return x.detach().clamp(*model.bounds)


@dataclass(frozen=True)
class DLG:
    """Deep Leakage from Gradients (Zhu, Liu, Han 2019): dummy inputs ``~ N(0, 1)`` and
    dummy label logits, both optimised by L-BFGS (``iterations``, rate ``lr``) to minimise
    ``||grad(x', softmax(y')) - target||^2``. The labels are the argmax of the soft ones."""

    iterations: int = 300
    lr: float = 1.0
    name: ClassVar[str] = "dlg"

    def reconstruct(
        self,
        model: AttackModel,
        w: torch.Tensor,
        gradient: torch.Tensor,
        batch: int,
        generator: torch.Generator,
    ) -> Reconstruction:
        _check(model, w, gradient, batch)
        x = _dummy(model, batch, generator)
        y = torch.randn(batch, model.num_classes, generator=generator).requires_grad_(True)

        def objective() -> torch.Tensor:
            g = model.gradient(w, x, y.softmax(-1), create_graph=True)
            return ((g - gradient) ** 2).sum()

        loss, (best_x, best_y) = _lbfgs([x, y], objective, self.iterations, self.lr)
        return Reconstruction(
            self.name, _boxed(model, best_x), best_y.argmax(-1), loss, self.iterations
        )


@dataclass(frozen=True)
class IDLG:
    """iDLG (Zhao et al. 2020): the labels from :func:`analytic_labels`, then DLG's L-BFGS
    on the dummy inputs only."""

    iterations: int = 300
    lr: float = 1.0
    name: ClassVar[str] = "idlg"

    def reconstruct(
        self,
        model: AttackModel,
        w: torch.Tensor,
        gradient: torch.Tensor,
        batch: int,
        generator: torch.Generator,
    ) -> Reconstruction:
        _check(model, w, gradient, batch)
        labels = analytic_labels(model, gradient, batch)
        targets = model.one_hot(labels)
        x = _dummy(model, batch, generator)

        def objective() -> torch.Tensor:
            return ((model.gradient(w, x, targets, create_graph=True) - gradient) ** 2).sum()

        loss, (best_x,) = _lbfgs([x], objective, self.iterations, self.lr)
        return Reconstruction(self.name, _boxed(model, best_x), labels, loss, self.iterations)


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 - cos(a, b)`` of two flat gradients."""
    return 1 - (a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-30)


@dataclass(frozen=True)
class InvertingGradients:
    """Inverting Gradients (Geiping et al. 2020): with the analytic labels, minimise
    ``1 - cos(grad(x'), target) + tv * TV(x')`` by Adam (rate ``lr``) on the sign of the
    gradient, the rate divided by 10 at 3/8, 5/8 and 7/8 of ``iterations``, ``x'`` clipped
    to the data's box after every step; the restart with the lowest loss is kept. ``tv``
    needs image inputs (set it to 0 for others)."""

    iterations: int = 1000
    lr: float = 0.1
    tv: float = 1e-2
    restarts: int = 1
    name: ClassVar[str] = "ig"
    milestones: ClassVar[tuple[float, ...]] = (3 / 8, 5 / 8, 7 / 8)  # of the iterations

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.restarts < 1:
            raise ValueError(
                f"InvertingGradients needs iterations and restarts >= 1, got "
                f"{self.iterations} and {self.restarts}"
            )
        if self.tv < 0:
            raise ValueError(f"InvertingGradients.tv must be >= 0, got {self.tv}")

    def reconstruct(
        self,
        model: AttackModel,
        w: torch.Tensor,
        gradient: torch.Tensor,
        batch: int,
        generator: torch.Generator,
    ) -> Reconstruction:
        _check(model, w, gradient, batch)
        if self.tv and model.image_shape is None:
            raise ValueError(
                f"a total-variation prior needs image inputs, not of shape {model.input_shape}"
                "; use tv = 0"
            )
        labels = analytic_labels(model, gradient, batch)
        targets = model.one_hot(labels)
        runs = [self._run(model, w, gradient, targets, generator) for _ in range(self.restarts)]
        loss, x = min(runs, key=lambda r: r[0])
        return Reconstruction(self.name, x, labels, loss, self.iterations)

    def _loss(
        self,
        model: AttackModel,
        w: torch.Tensor,
        target: torch.Tensor,
        y: torch.Tensor,
        x: torch.Tensor,
    ) -> torch.Tensor:
        loss = cosine_distance(model.gradient(w, x, y, create_graph=True), target)
        if self.tv:
            loss = loss + self.tv * total_variation(model.images(x))
        return loss

    def _run(
        self,
        model: AttackModel,
        w: torch.Tensor,
        target: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
    ) -> tuple[float, torch.Tensor]:
        x = _dummy(model, len(y), generator)
        with torch.no_grad():
            x.clamp_(*model.bounds)
        opt = torch.optim.Adam([x], lr=self.lr)
        steps = [int(self.iterations * m) for m in self.milestones]
        schedule = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=steps, gamma=0.1)
        for _ in range(self.iterations):
            loss = self._loss(model, w, target, y, x)
            (grad,) = torch.autograd.grad(loss, [x])
            x.grad = grad.sign()
            opt.step()
            schedule.step()
            with torch.no_grad():
                x.clamp_(*model.bounds)
        final = float(self._loss(model, w, target, y, x).detach())
        return (final if math.isfinite(final) else math.inf), x.detach()


METHODS: dict[str, Callable[..., Method]] = {"dlg": DLG, "idlg": IDLG, "ig": InvertingGradients}


def invert(
    update: CapturedUpdate,
    model: AttackModel,
    method: Method | None = None,
    *,
    batch: int | None = None,
    seed: int = 0,
) -> Reconstruction:
    """Reconstruct the examples behind a captured update with ``method`` (default
    :class:`InvertingGradients`); ``batch`` examples (default: the client's
    ``num_examples``, which its upload tells the server)."""
    method = method if method is not None else InvertingGradients()
    size = update.num_examples if batch is None else batch
    generator = torch.Generator().manual_seed(seed)
    return method.reconstruct(model, update.w_global, target_gradient(update), size, generator)


def evaluate_reconstruction(
    model: AttackModel, reconstruction: Reconstruction, x: torch.Tensor, y: torch.Tensor
) -> dict[str, object]:
    """PSNR and SSIM (``metrics``) of the reconstruction against the client's true examples
    ``(x, y)``, each reconstruction paired with a distinct original (``match_images``), and
    the label accuracy: the share of reconstructed labels equal to their original's.

    Returns ``psnr``, ``ssim``, ``label_accuracy``, ``psnr_per_image`` and ``matched`` (the
    original's index for each reconstruction)."""
    rec = model.images(reconstruction.x)
    orig = model.images(x.to(rec.dtype))
    matched = metrics.match_images(rec, orig, model.data_range)
    paired = orig[torch.from_numpy(matched)]
    per_image = metrics.psnr_per_image(rec, paired, model.data_range)
    labels = y[torch.from_numpy(matched)]
    return {
        "psnr": metrics.psnr(rec, paired, model.data_range),
        "ssim": metrics.ssim(rec, paired, model.data_range),
        "label_accuracy": float((reconstruction.labels == labels).double().mean()),
        "psnr_per_image": [metrics.finite_or_none(round(float(v), 6)) for v in per_image],
        "matched": matched.tolist(),
    }
