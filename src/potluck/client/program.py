"""``ClientProgram``: what a client runs, independent of the engine that runs it.

It holds one model instance (built once), the federation's data access, the local rule and
the update transforms. ``train(cid, w, round)`` returns the client's encoded update message,
``evaluate(cid, w)`` its local test metrics. Every random choice derives from the run seed.

Example:
    >>> import torch
    >>> from potluck.core.task import Task
    >>> from potluck.data import Federation
    >>> fed = Federation.from_client_data([(torch.randn(20, 4), torch.arange(20) % 3)] * 2)
    >>> program = ClientProgram(Task(lambda: torch.nn.Linear(4, 3)), fed, LocalSGD(), seed=0)
    >>> msg = program.train(0, program.initial_weights(), round=1)
    >>> msg.arrays["delta"].shape, msg.scalars["num_examples"]
    (torch.Size([15]), 20)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.func import functional_call

from potluck.client.sgd import LocalSGD
from potluck.core.message import Message
from potluck.core.params import ParamSpec
from potluck.core.seeding import Seeds
from potluck.core.task import Task
from potluck.updates.base import Chain, EncodeContext

if TYPE_CHECKING:
    from potluck.data.federation import Federation

EVAL_BATCH = 1024


@dataclass(frozen=True)
class EvalResult:
    """Sums over a test set: mean loss is ``loss_sum / n``, accuracy ``correct / n``."""

    loss_sum: float
    correct: int
    n: int

    @property
    def loss(self) -> float:
        return self.loss_sum / self.n if self.n else float("nan")

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else float("nan")


class ClientProgram:
    """Runs local training and evaluation for any client of a federation, reusing one model."""

    def __init__(
        self,
        task: Task,
        federation: Federation,
        rule: LocalSGD,
        *,
        transforms: Chain | None = None,
        seed: int = 0,
    ) -> None:
        self.task = task
        self.federation = federation
        self.rule = rule
        self.transforms = transforms or Chain()
        self.seeds = Seeds(seed)
        with torch.random.fork_rng():
            torch.manual_seed(self.seeds.integer("init"))
            self.model = task.build_model()
        self.spec = ParamSpec.from_module(self.model)
        self._w0 = self.spec.from_module_values(self.model)

    def initial_weights(self) -> torch.Tensor:
        """The global model at round 0 (a copy; deterministic in the run seed)."""
        return self._w0.clone()

    def _forward(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, self.spec.unflatten(w), (x,))

    def _loss(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.task.loss_fn(self._forward(w, x), y)

    def _grad(
        self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient of the mean batch loss with respect to the flat vector, and the loss.

        Plain reverse-mode autograd through ``functional_call``: for one client it costs
        half of ``torch.func.grad`` per step, with the same result.
        """
        w = w.detach().requires_grad_(True)
        loss = self._loss(w, x, y)
        (g,) = torch.autograd.grad(loss, w)
        return g, loss.detach()

    def train(self, cid: int, w_global: torch.Tensor, round: int) -> Message:
        """Train client ``cid`` from ``w_global``; the encoded update message."""
        data = self.federation.client(cid)
        x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
        gen = self.seeds.torch("batch", round, cid)
        torch.manual_seed(self.seeds.integer("dropout", round, cid))
        self.model.train()
        w, loss_sum, seen, steps = self._local_sgd(w_global, x, y, gen)
        scalars: dict[str, int | float | str] = {"num_examples": len(y), "num_steps": steps}
        if seen:
            scalars["train_loss"] = loss_sum / seen
        msg = Message(arrays={"delta": w - w_global}, scalars=scalars)
        return self.transforms.encode(msg, EncodeContext(client_id=int(cid), round=round))

    def _local_sgd(
        self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, float, int, int]:
        """Run the rule's steps; (weights, summed batch loss, examples seen, steps)."""
        n, rule = len(y), self.rule
        total, b = rule.num_steps(n), rule.batch_len(n)
        state, loss_sum, seen, step = rule.init(w), 0.0, 0, 0
        while step < total:
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, b):
                idx = order[start : start + b]
                g, loss = self._grad(w, x[idx], y[idx])
                w, state = rule.step(w, state, g)
                loss_sum += float(loss) * len(idx)
                seen += len(idx)
                step += 1
                if step == total:
                    break
        return w, loss_sum, seen, step

    @torch.no_grad()
    def evaluate_arrays(self, w: torch.Tensor, x: np.ndarray, y: np.ndarray) -> EvalResult:
        """Loss and correct-count sums of weights ``w`` on ``(x, y)``."""
        self.model.eval()
        loss_sum, correct = 0.0, 0
        for start in range(0, len(y), EVAL_BATCH):
            xb = torch.from_numpy(x[start : start + EVAL_BATCH])
            yb = torch.from_numpy(y[start : start + EVAL_BATCH])
            logits = self._forward(w, xb)
            loss_sum += float(self.task.loss_fn(logits, yb)) * len(yb)
            correct += int(self.task.correct_fn(logits, yb))
        return EvalResult(loss_sum, correct, len(y))

    def evaluate(self, cid: int, w: torch.Tensor) -> EvalResult:
        """Client ``cid``'s local test metrics for global weights ``w``."""
        data = self.federation.client(cid)
        return self.evaluate_arrays(w, data.x_test, data.y_test)
