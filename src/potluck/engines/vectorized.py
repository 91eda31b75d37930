"""The vectorized engine: a cohort trains as one batched computation with ``torch.func``.

K clients' flat weight vectors are stacked into a (K, d) tensor and their mini-batches into
(K, B, ...); one ``vmap(grad_and_value(loss))`` call gives all K gradients per step and one
``LocalSGD.step`` (elementwise, so it needs no ``vmap``) moves all K clients
(``torch.func`` docs: https://pytorch.org/docs/stable/func.api.html, and the model-ensembling
tutorial https://pytorch.org/tutorials/intermediate/ensembling.html, which stacks parameters
the same way). Each client gets exactly what ``ClientProgram.train`` gives it alone:

- **Same batches.** Each client's batch indices come from ``batch_order`` (the code the
  inline engine uses) with its own ``("batch", round, cid)`` generator.
- **Unequal step counts.** Clients are sorted by step count (descending), so at step ``s``
  the clients still training are a prefix of the stack: only that prefix is computed and
  replaced, so steps a client does not take leave its weights and optimizer state untouched.
- **Unequal batch sizes** (small clients, an epoch's short last batch): batches are padded
  to the largest one with a 0/1 mask. The loss of a client's batch is
  ``sum_i m_i l_i / sum_i m_i``, where ``l_i`` is ``task.loss_fn`` applied to example ``i``
  alone (under a nested ``vmap``); for a mean loss (what ``Task`` asks for) this is the
  mean over the real examples, and so is its gradient (padded rows get weight exactly 0).
  The model must therefore treat examples independently: batch-norm without running
  statistics (batch statistics) and dropout (vmap randomness cannot reproduce the inline
  engine's draws) are refused.
- **Rules.** ``begin``/``start``/``finish`` run per client before and after the step loop;
  ``gradient`` is ``vmap``-ed over the clients with their stacked rule states. q-FFL's loss
  at the global model uses ``ClientProgram.evaluate_arrays`` per client, as the inline
  engine does. Ditto's second (personal) model is refused: use ``engine = "inline"``.
- **Uploads** are built and encoded per client after training, exactly as inline.

Results agree with the inline engine up to float32 rounding: batched matmuls and the
masked mean sum in a different order (about 1e-7 relative per step; see
``tests/contract/test_engines.py`` for the tolerance over whole runs).

Example:
    >>> import numpy as np
    >>> import torch
    >>> from potluck.client import ClientProgram, LocalSGD
    >>> from potluck.client.program import RoundInput
    >>> from potluck.core.task import Task
    >>> from potluck.data import Federation
    >>> fed = Federation.from_client_data([(torch.randn(8, 2), torch.arange(8) % 2)] * 3)
    >>> program = ClientProgram(Task(lambda: torch.nn.Linear(2, 2)), fed, LocalSGD())
    >>> engine = VectorizedEngine(program, max_clients=2)
    >>> job = RoundInput(1, torch.zeros(6), np.array([0, 2]), {}, ({}, {}), np.ones(2))
    >>> [r.message.scalars["num_steps"] for r in engine.train(job)]
    [1, 1]
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from potluck.client.program import (
    ClientProgram,
    ClientResult,
    RoundInput,
    batch_order,
)
from potluck.client.rules import LocalRule, Tensors
from potluck.client.sgd import OptState
from potluck.engines.inline import InlineEngine

DEFAULT_MEMORY_BUDGET = 2 * 2**30  # bytes for one chunk's stacked vectors and batches
_VECTORS_PER_CLIENT = 8  # w, gradient (per layer and joined), corrected, new w, momentum x2, ...
_DROPOUT = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def check_vectorizable(program: ClientProgram) -> None:
    """Raise ``ValueError`` if the vectorized engine cannot give ``program``'s clients exactly
    what the inline engine gives them (dropout, batch statistics, a second personal model).

    Example:
        >>> import torch
        >>> from potluck.client import ClientProgram, LocalSGD
        >>> from potluck.core.task import Task
        >>> from potluck.data import Federation
        >>> fed = Federation.from_client_data([(torch.randn(4, 2), torch.arange(4) % 2)])
        >>> net = lambda: torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
        >>> check_vectorizable(ClientProgram(Task(net), fed, LocalSGD()))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: the vectorized engine cannot train models with dropout (module '1' ...
    """
    problem = vectorizing_problem(program.model, program.rule)
    if problem is not None:
        raise ValueError(problem)


def vectorizing_problem(model: nn.Module, rule: LocalRule) -> str | None:
    """Why the vectorized engine cannot train ``model`` under ``rule``, or None if it can."""
    if rule.personal_lambda is not None:
        return (
            f"the vectorized engine does not support rule {rule.name!r}: it trains a second, "
            'personal model per client (Ditto). Use engine = "inline".'
        )
    for name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, _DROPOUT):
            return (
                f"the vectorized engine cannot train models with dropout (module {name!r} is "
                f"{kind}): vmap draws different random masks than the inline engine. "
                'Use engine = "inline".'
            )
        if isinstance(module, _BatchNorm):
            return (
                f"the vectorized engine cannot train models with batch statistics (module "
                f"{name!r} is {kind}): padded examples would change them. Use GroupNorm or "
                'LayerNorm, or engine = "inline".'
            )
    return None


@dataclass(frozen=True)
class _Cohort:
    """A chunk of clients' training data and batch schedule, sorted by step count.

    ``x``/``y``: all members' examples concatenated; ``index[s, k, j]``: the row of ``x`` of
    example ``j`` of member ``k``'s batch at step ``s`` (0 where padded), ``mask`` the same
    shape, 1.0 for real examples; ``active[s]``: how many members (a prefix) take step ``s``.
    """

    positions: list[int]  # job positions of the members, most steps first
    steps: list[int]
    num_examples: list[int]
    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    mask: torch.Tensor
    active: list[int]


class VectorizedEngine(InlineEngine):
    """Trains a cohort (in chunks of at most ``max_clients``, and as many as fit in
    ``memory_budget_bytes``, default 2 GiB) as one batched ``torch.func`` computation;
    evaluation (not the hot path) is the inline engine's."""

    name = "vectorized"

    def __init__(
        self,
        program: ClientProgram,
        *,
        max_clients: int | None = None,
        memory_budget_bytes: int | None = None,
    ) -> None:
        if max_clients is not None and max_clients < 1:
            raise ValueError(f"max_clients must be >= 1 or None, got {max_clients}")
        if memory_budget_bytes is not None and memory_budget_bytes < 1:
            raise ValueError(f"memory_budget_bytes must be >= 1, got {memory_budget_bytes}")
        check_vectorizable(program)
        self.program = program
        self.max_clients = max_clients
        self.memory_budget = memory_budget_bytes or DEFAULT_MEMORY_BUDGET
        self.chunk_size = self._fitting_chunk()
        self._grads = vmap(grad_and_value(self._client_loss))
        self._correct = vmap(program.rule.gradient)

    # -- training ------------------------------------------------------------------------------

    def train(self, job: RoundInput) -> list[ClientResult]:
        """One ``ClientResult`` per cohort member, in cohort order (as ``InlineEngine``)."""
        results: dict[int, ClientResult] = {}
        for chunk in self._chunks(len(job.cohort)):
            results.update(self._train_chunk(job, chunk))
        return [results[k] for k in range(len(job.cohort))]

    def _fitting_chunk(self) -> int:
        """Clients trained together: ``max_clients``, capped by a coarse memory estimate
        (stacked weight-sized vectors plus inputs of the largest batch)."""
        p = self.program
        batch = p.optimizer.batch_size or max(
            (p.federation.num_examples(c) for c in range(p.federation.num_clients)), default=1
        )
        example = prod(p.federation.source.input_shape)
        per_client = 4 * (_VECTORS_PER_CLIENT * p.spec.size + 2 * batch * example)
        fits = max(1, self.memory_budget // per_client)
        return fits if self.max_clients is None else min(fits, self.max_clients)

    def _chunks(self, k: int) -> list[range]:
        size = self.chunk_size
        return [range(start, min(start + size, k)) for start in range(0, k, size)]

    def _train_chunk(self, job: RoundInput, chunk: range) -> dict[int, ClientResult]:
        program, rule = self.program, self.program.rule
        program.model.train()
        states = [self._client_state(job, k) for k in chunk]
        rule_states = [rule.begin(job.w, job.broadcast or {}, s) for s in states]
        cohort = self._schedule(job, chunk)
        order = [k - chunk.start for k in cohort.positions]
        w = torch.stack([rule.start(job.w, rule_states[i]) for i in order])
        stacked = {key: torch.stack([rule_states[i][key] for i in order]) for key in rule_states[0]}
        w, loss_sums, seen = self._steps(w, stacked, cohort)
        return {
            k: self._finish(
                job,
                k,
                w[row],
                rule_states[k - chunk.start],
                (cohort.steps[row], cohort.num_examples[row]),
                (loss_sums[row], seen[row]),
            )
            for row, k in enumerate(cohort.positions)
        }

    def _client_state(self, job: RoundInput, k: int) -> Tensors:
        """Member ``k``'s state as ``ClientProgram.train`` sees it (q-FFL: with its loss at the
        global model, computed by the same code)."""
        state = dict(job.states[k] or {})
        if self.program.rule.needs_global_loss:
            data = self.program.federation.client(int(job.cohort[k]))
            at_global = self.program.evaluate_arrays(job.w, data.x_train, data.y_train)
            state["global_loss"] = torch.tensor(at_global.loss)
        return state

    def _schedule(self, job: RoundInput, chunk: range) -> _Cohort:
        """Gather the chunk's data and draw every member's batches (``batch_order``)."""
        p = self.program
        steps = {k: p.steps_for(int(job.cohort[k]), float(job.work[k])) for k in chunk}
        positions = sorted(chunk, key=lambda k: -steps[k])  # stable: ties keep cohort order
        data = [p.federation.client(int(job.cohort[k])) for k in positions]
        sizes = [len(d.y_train) for d in data]
        xs = [torch.from_numpy(d.x_train) for d in data]
        ys = [torch.from_numpy(d.y_train) for d in data]
        total = [steps[k] for k in positions]
        offsets = np.cumsum([0, *sizes[:-1]])
        batches = [
            list(batch_order(n, p.optimizer.batch_len(n), t, p.seeds.torch("batch", job.round, c)))
            for n, t, c in zip(sizes, total, (int(job.cohort[k]) for k in positions), strict=True)
        ]
        index, mask = _pad_batches(batches, offsets)
        active = [sum(t > s for t in total) for s in range(index.shape[0])]
        return _Cohort(positions, total, sizes, torch.cat(xs), torch.cat(ys), index, mask, active)

    def _steps(
        self, w: torch.Tensor, rule_state: Tensors, cohort: _Cohort
    ) -> tuple[torch.Tensor, list[float], list[int]]:
        """All members' local steps: the final stacked weights, and per member the sum of
        batch loss x batch size and the examples seen (as ``ClientProgram`` accumulates)."""
        opt = self.program.optimizer
        opt_state = opt.init(w)
        step_losses = torch.zeros(cohort.index.shape[:2], dtype=torch.float64)
        for s, a in enumerate(cohort.active):
            idx, m = cohort.index[s, :a], cohort.mask[s, :a]
            w_a, state_a = w[:a], {key: v[:a] for key, v in opt_state.items()}
            grads, loss = self._grads(self._params(w_a), cohort.x[idx], cohort.y[idx], m)
            g = torch.cat([grads[name].reshape(a, -1) for name in self.program.spec.names], 1)
            g = self._correct(w_a, g, {key: v[:a] for key, v in rule_state.items()})
            w_a, state_a = opt.step(w_a, state_a, g)
            w, opt_state = _replace_prefix(w, w_a), _replace_state(opt_state, state_a)
            step_losses[s, :a] = loss.double() * m.sum(1).double()
        return w, step_losses.sum(0).tolist(), cohort.mask.sum((0, 2)).long().tolist()

    def _params(self, w: torch.Tensor) -> Tensors:
        """Stacked (K, ...) views of the model's parameters in ``w`` (K, d). Per-layer leaves,
        as in ``ClientProgram._grad``, so the gradient is not scattered into full-length
        buffers per parameter; the joined gradient is their concatenation."""
        spec, out, offset = self.program.spec, {}, 0
        for name, shape, n in zip(spec.names, spec.shapes, spec.numels, strict=True):
            out[name] = w[:, offset : offset + n].reshape(len(w), *shape)
            offset += n
        return out

    def _client_loss(
        self, params: Tensors, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """One client's mean loss over the real (mask 1) examples of a padded batch."""
        logits = functional_call(self.program.model, params, (x,))
        per_example = vmap(self._example_loss)(logits, y)
        return (per_example * mask).sum() / mask.sum().clamp(min=1.0)

    def _example_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.program.task.loss_fn(logits.unsqueeze(0), y.unsqueeze(0))

    def _finish(
        self,
        job: RoundInput,
        k: int,
        w: torch.Tensor,
        rule_state: Tensors,
        counts: tuple[int, int],
        loss: tuple[float, int],
    ) -> ClientResult:
        """Member ``k``'s upload and new state from its trained weights, as inline:
        ``counts`` = (steps, examples), ``loss`` = (sum of batch loss x size, examples seen)."""
        p, cid = self.program, int(job.cohort[k])
        torch.default_generator.manual_seed(p.seeds.integer("dropout", job.round, cid))
        out = p.rule.finish(job.w, w, rule_state, counts[0], p.optimizer.lr)
        msg = p.upload(cid, job.round, job.w, w, out, counts, loss)
        return ClientResult(msg, dict(out.state))


def _pad_batches(
    batches: list[list[torch.Tensor]], offsets: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """(steps, members, width) rows into the members' concatenated data, and the 0/1 mask of
    real examples, from each member's list of batch indices (``batches[k][s]``).

    Example:
        >>> index, mask = _pad_batches([[torch.tensor([1, 0])], []], np.array([0, 2]))
        >>> index.tolist(), mask.tolist()
        ([[[1, 0], [0, 0]]], [[[1.0, 1.0], [0.0, 0.0]]])
    """
    lens = [[len(idx) for idx in member] for member in batches]
    width = max((n for member in lens for n in member), default=0)
    index = torch.zeros(max(map(len, lens), default=0), len(batches), width, dtype=torch.long)
    mask = torch.zeros(index.shape)
    flat = [n for member in lens for n in member]
    if not flat:
        return index, mask
    step = np.concatenate([np.repeat(np.arange(len(m)), m) for m in lens])
    member = np.repeat(np.arange(len(lens)), [sum(m) for m in lens])
    column = np.arange(sum(flat)) - np.repeat(np.cumsum([0, *flat[:-1]]), flat)
    rows = torch.cat([torch.cat(m) for m in batches if m]) + torch.from_numpy(offsets[member])
    where = (torch.from_numpy(step), torch.from_numpy(member), torch.from_numpy(column))
    index[where] = rows
    mask[where] = 1.0
    return index, mask


def _replace_prefix(full: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """``full`` with its first ``len(prefix)`` rows replaced (no copy when they are all)."""
    if len(prefix) == len(full):
        return prefix
    return torch.cat((prefix, full[len(prefix) :]))


def _replace_state(full: OptState, prefix: OptState) -> OptState:
    return {key: _replace_prefix(full[key], prefix[key]) for key in full}
