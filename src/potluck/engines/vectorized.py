"""The vectorized engine: a cohort trains as one batched computation with ``torch.func``.

K clients' flat weight vectors are stacked into a (K, d) tensor and their mini-batches into
(K, B, ...); one ``vmap(grad_and_value(loss))`` call gives all K gradients per step and one
``LocalSGD.step`` (elementwise, so it needs no ``vmap``) moves all K clients
(``torch.func`` docs: https://pytorch.org/docs/stable/func.api.html, and the model-ensembling
tutorial https://pytorch.org/tutorials/intermediate/ensembling.html, which stacks parameters
the same way). Each client gets exactly what ``ClientProgram.train`` gives it alone:

- **Same batches.** Each client's batch indices come from ``ClientProgram.batches`` (the
  code the inline engine uses: ``batch_order``, or the Poisson samples of a term that
  reduces per-example gradients) with its own ``("batch", round, cid)`` generator.
- **Unequal step counts.** Clients are sorted by step count (descending), so at step ``s``
  the clients still training are a prefix of the stack: only that prefix is computed and
  replaced, so steps a client does not take leave its weights and optimizer state untouched.
- **Unequal batch sizes** (small clients, an epoch's short last batch): batches are padded
  to the largest one with a 0/1 mask. The loss of a client's batch is
  ``sum_i m_i l_i / sum_i m_i``, where ``l_i`` is ``task.loss_fn`` applied to example ``i``
  alone (under a nested ``vmap``); for a mean loss (what ``Task`` asks for) this is the
  mean over the real examples, and so is its gradient (padded rows get weight exactly 0).
  The model must therefore treat examples independently: batch-norm without running
  statistics (batch statistics) is refused, and so is any random operation in a training
  step (dropout, also inside an ``nn.LSTM``: vmap's randomness cannot reproduce the inline
  engine's draws), found by one probe step under ``vmap`` when the engine is made, before
  anything is stored.
- **Terms.** ``ClientProgram.prepare`` (each term's ``begin`` and ``start``) and
  ``ClientProgram.conclude`` (``finish``, the upload and its encoding) run per client, as
  inline; the chain's ``gradient`` is ``vmap``-ed over the clients with their stacked
  working states. A term that declares it needs one client at a time
  (``Need.ONE_CLIENT_AT_A_TIME``) is refused. Whatever a term's ``finish`` trains per client
  (Ditto's personal model) runs there, one client at a time.
- **Per-example gradients** (a term that declares ``Need.PER_EXAMPLE_GRADIENTS``, DP-SGD):
  ``ClientProgram.example_gradients`` (``vmap`` over the examples) is ``vmap``-ed over the
  clients too, giving (K, B, d); what the term draws for a step (its noise) is drawn per
  client outside ``vmap`` from the client's own stream, as inline, and its ``reduce`` is
  ``vmap``-ed over the clients with the mask of real examples.
- **Other stages** (evaluation, a protocol's own) run as in the inline engine.

Results agree with the inline engine up to float32 rounding: batched matmuls and the
masked mean sum in a different order (about 1e-7 relative per step; see
``tests/contract/test_engines.py`` for the tolerance over whole runs).

Example:
    >>> import numpy as np
    >>> import torch
    >>> from potluck.algorithms import fedavg
    >>> from potluck.client import ClientProgram
    >>> from potluck.core.message import Message
    >>> from potluck.core.records import StageJob
    >>> from potluck.core.task import Task
    >>> from potluck.data import Federation
    >>> fed = Federation.from_client_data([(torch.randn(8, 2), torch.arange(8) % 2)] * 3)
    >>> program = ClientProgram(Task(lambda: torch.nn.Linear(2, 2)), fed, fedavg())
    >>> engine = VectorizedEngine(program, max_clients=2)
    >>> job = StageJob("train", 1, Message({"w": torch.zeros(6)}), np.array([0, 2]),
    ...                (Message(), Message()), ({}, {}))
    >>> [r.message.scalars["num_steps"] for r in engine.run_stage(job)]
    [1, 1]
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import prod
from typing import Any

import numpy as np
import torch
from torch.func import functional_call, grad_and_value, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from potluck.client.program import ClientProgram, Prepared, with_state
from potluck.client.sgd import OptState
from potluck.core.device import HOST, on_device
from potluck.core.parts import Need, State, describe_part, needs
from potluck.core.records import TRAIN, Reply, StageJob
from potluck.engines.inline import InlineEngine

DEFAULT_MEMORY_BUDGET = 2 * 2**30  # bytes for one chunk's stacked vectors and batches
_VECTORS_PER_CLIENT = 8  # w, gradient (per layer and joined), corrected, new w, momentum x2, ...


def check_vectorizable(program: ClientProgram) -> None:
    """Raise ``ValueError`` if the vectorized engine cannot give ``program``'s clients exactly
    what the inline engine gives them: a part that needs one client at a time, batch
    statistics, or a training step that draws random numbers (dropout) or has no batching
    rule, found by one probe step under ``vmap``.

    Example:
        >>> import torch
        >>> from potluck.algorithms import fedavg
        >>> from potluck.client import ClientProgram
        >>> from potluck.core.task import Task
        >>> from potluck.data import Federation
        >>> fed = Federation.from_client_data([(torch.randn(4, 2), torch.arange(4) % 2)])
        >>> net = lambda: torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
        >>> check_vectorizable(ClientProgram(Task(net), fed, fedavg()))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: the vectorized engine cannot batch this model's training step: ...
    """
    problem = vectorizing_problem(program, probe=True)
    if problem is not None:
        raise ValueError(problem)


def vectorizing_problem(program: ClientProgram, probe: bool = False) -> str | None:
    """Why the vectorized engine cannot train ``program``'s clients, or None if it can;
    ``probe``: also run one vmapped step (about a second the first time)."""
    for ns, part in program.algorithm.parts():
        if Need.ONE_CLIENT_AT_A_TIME in needs(part):
            return (
                f"the vectorized engine trains clients side by side, but {describe_part(ns, part)}"
                f' needs {Need.ONE_CLIENT_AT_A_TIME}. Use engine = "pool" or "inline".'
            )
    for name, module in program.model.named_modules():
        if isinstance(module, _BatchNorm):
            return (
                f"the vectorized engine cannot train models with batch statistics (module "
                f"{name!r} is {type(module).__name__}): padded examples would change them. Use "
                'GroupNorm or LayerNorm, or engine = "pool" or "inline".'
            )
    if probe:
        return _probe(program)
    return None


def _probe(program: ClientProgram) -> str | None:
    """Run one vmapped training step of two copies of the first client with data."""
    fed = program.federation
    cid = next((c for c in range(min(fed.num_clients, 50)) if fed.num_examples(c)), None)
    if cid is None:
        return None
    engine = VectorizedEngine.__new__(VectorizedEngine)
    engine.program = program
    engine._vmap()
    w = program.initial_weights()
    try:
        with torch.random.fork_rng():
            prep = program.prepare(cid, 0, w, _zero_broadcasts(program, w), {})
            x_all, y_all = program._data(cid, 0)
            dev = program.device
            x = torch.stack([x_all[:2], x_all[:2]]).to(dev)
            y = torch.stack([y_all[:2], y_all[:2]]).to(dev)
            mask = torch.ones(y.shape, device=dev)
            stacked_w = torch.stack([prep.w_start, prep.w_start]).to(dev)
            works = [
                on_device({k: torch.stack([v, v]) for k, v in work.items()}, dev)
                for work in prep.works
            ]
            gens = [torch.Generator().manual_seed(0)] * 2
            g, _ = engine._gradient(stacked_w, x, y, mask, works, gens)
            engine._correct(stacked_w, g, works)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return (
            "the vectorized engine cannot batch this model's training step: one probe step "
            f"under torch.func.vmap failed ({type(exc).__name__}: {first}). Dropout (also an "
            "LSTM's dropout) draws other random masks under vmap than one client at a time; "
            'other operations have no batching rule. Use engine = "pool" or "inline".'
        )
    return None


def _zero_broadcasts(program: ClientProgram, w: torch.Tensor) -> dict[str, State]:
    return {
        ns: term.broadcast(term.server_init(w))
        for ns, term in zip(program.term_ns, program.terms, strict=True)
    }


def _chain(program: ClientProgram) -> Any:
    """The terms' gradient corrections as one pure function of (w, g, works)."""
    terms = program.terms

    def correct(w: torch.Tensor, g: torch.Tensor, works: list[State]) -> torch.Tensor:
        for term, work in zip(terms, works, strict=True):
            g = term.gradient(w, g, work)
        return g

    return correct


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

    def to(self, device: torch.device) -> _Cohort:
        """The cohort with its data and batch schedule on ``device``."""
        moved = {key: getattr(self, key).to(device) for key in ("x", "y", "index", "mask")}
        return replace(self, **moved)


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
        self._vmap()

    def _vmap(self) -> None:
        """The batched functions: every member's gradient (its per-example gradients, if a
        term reduces them: ``ClientProgram.example_gradients`` under a second ``vmap``), the
        reducing term's ``reduce`` and the chain's corrections."""
        program = self.program
        self.reducer = program.reducer
        if self.reducer is None:
            self._grads = vmap(grad_and_value(self._client_loss))
        else:
            self._grads = vmap(program.example_gradients)
            self._reduce = vmap(program.terms[self.reducer].reduce)
        self._correct = vmap(_chain(program))

    # -- training ------------------------------------------------------------------------------

    def run_stage(self, job: StageJob) -> list[Reply | None]:
        """One reply per member, in order (as ``InlineEngine``); ``train`` batched."""
        if job.stage != TRAIN:
            return self.program.run_stage(job)
        w, broadcasts, kept = self.program.opened(job)
        rebuilt = [k for k, state in enumerate(kept) if state is not None]
        if len(rebuilt) < len(job.clients):  # some declined: train the others
            job = replace(
                job,
                clients=job.clients[rebuilt],
                payloads=tuple(job.payloads[k] for k in rebuilt),
                states=tuple(job.states[k] for k in rebuilt),
            )
        results: dict[int, Reply | None] = {}
        for chunk in self._chunks(len(job.clients)):
            results.update(self._train_chunk(job, w, broadcasts, chunk))
        out: list[Reply | None] = [None] * len(kept)
        for k, position in enumerate(rebuilt):
            out[position] = with_state(results[k], kept[position] or {})
        return out

    def _fitting_chunk(self) -> int:
        """Clients trained together: ``max_clients``, capped by a coarse memory estimate
        (stacked weight-sized vectors plus inputs of the largest batch)."""
        p = self.program
        batch = getattr(p.optimizer, "batch_size", "full")
        if not isinstance(batch, int):  # full batch: the largest client's
            batch = max(
                (p.federation.num_examples(c) for c in range(p.federation.num_clients)), default=1
            )
        example = prod(p.federation.source.input_shape)
        per_client = 4 * (_VECTORS_PER_CLIENT * p.spec.size + 2 * batch * example)
        if p.reducer is not None:  # per-example gradients: per layer, joined, scaled
            per_client += 4 * 3 * batch * p.spec.size
        fits = max(1, self.memory_budget // per_client)
        return fits if self.max_clients is None else min(fits, self.max_clients)

    def _chunks(self, k: int) -> list[range]:
        size = self.chunk_size
        return [range(start, min(start + size, k)) for start in range(0, k, size)]

    def _train_chunk(
        self, job: StageJob, w_global: torch.Tensor, broadcasts: dict[str, State], chunk: range
    ) -> dict[int, Reply | None]:
        program = self.program
        preps = {
            k: program.prepare(
                int(job.clients[k]),
                job.round,
                w_global,
                broadcasts,
                job.states[k],
                job.payloads[k],
            )
            for k in chunk
        }
        dev = program.device
        cohort = self._schedule(job, preps).to(dev)
        w = torch.stack([preps[k].w_start for k in cohort.positions]).to(dev)
        works = [
            {
                key: torch.stack([preps[k].works[t][key] for k in cohort.positions]).to(dev)
                for key in work
            }
            for t, work in enumerate(preps[chunk.start].works)
        ]
        steps = [program.example_step(preps[k]) for k in cohort.positions]
        gens = [step.gen for step in steps if step is not None]
        steered = torch.tensor([program.steered(preps[k].cid) for k in cohort.positions])
        steer = (steered.to(dev), w_global.to(dev))
        w, loss_sums, seen = self._steps(w, works, cohort, gens, steer)
        w = w.to(HOST)
        return {
            k: program.conclude(preps[k], w[row], loss_sums[row], seen[row])
            for row, k in enumerate(cohort.positions)
        }

    def _schedule(self, job: StageJob, preps: dict[int, Prepared]) -> _Cohort:
        """Gather the chunk's data and draw every member's batches (``program.batches``)."""
        p = self.program
        positions = sorted(preps, key=lambda k: -preps[k].steps)  # stable: ties keep order
        data = [p._data(preps[k].cid, preps[k].round) for k in positions]
        sizes = [len(y) for _, y in data]
        total = [preps[k].steps for k in positions]
        offsets = np.cumsum([0, *sizes[:-1]])
        batches = [
            list(
                p.batches(n, t, p.seeds.torch("batch", job.round, preps[k].cid), preps[k].optimizer)
            )
            for n, t, k in zip(sizes, total, positions, strict=True)
        ]
        index, mask = _pad_batches(batches, offsets)
        active = [sum(t > s for t in total) for s in range(index.shape[0])]
        xs, ys = [x for x, _ in data], [y for _, y in data]
        return _Cohort(positions, total, sizes, torch.cat(xs), torch.cat(ys), index, mask, active)

    def _steps(
        self,
        w: torch.Tensor,
        works: list[State],
        cohort: _Cohort,
        gens: list[torch.Generator],
        steer: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, list[float], list[int]]:
        """All members' local steps: the final stacked weights, and per member the sum of
        batch loss x batch size and the examples seen (as ``ClientProgram`` accumulates).
        ``gens``: the reducing term's stream of each member, if a term reduces; ``steer``:
        which members are attackers with a gradient of their own, and the global model."""
        steered, w_global = steer
        attack = self.program.attack if bool(steered.any()) else None
        opt = self.program.optimizer
        opt_state = opt.init(w)
        step_losses = torch.zeros(cohort.index.shape[:2], dtype=torch.float64, device=w.device)
        for s, a in enumerate(cohort.active):
            idx, m = cohort.index[s, :a], cohort.mask[s, :a]
            w_a, state_a = w[:a], {key: v[:a] for key, v in opt_state.items()}
            works_a = [{key: v[:a] for key, v in wk.items()} for wk in works]
            g, loss = self._gradient(w_a, cohort.x[idx], cohort.y[idx], m, works_a, gens[:a])
            g = self._correct(w_a, g, works_a)
            if attack is not None:
                g = torch.where(steered[:a, None], attack.gradient(w_a, g, w_global), g)
            w_a, state_a = opt.step(w_a, state_a, g)
            w, opt_state = _replace_prefix(w, w_a), _replace_state(opt_state, state_a)
            step_losses[s, :a] = loss.double() * m.sum(1).double()
        return w, step_losses.sum(0).tolist(), cohort.mask.sum((0, 2)).long().tolist()

    def _gradient(
        self,
        w: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor,
        works: list[State],
        gens: list[torch.Generator],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each member's gradient (a, d) before the corrections, and its batch loss: of the
        batch mean, or made by the reducing term from the per-example gradients (a, B, d)
        with what it draws for each member (outside ``vmap``, as the inline engine does)."""
        a, spec = len(w), self.program.spec
        grads, loss = self._grads(self._params(w), x, y, mask)
        if self.reducer is None:
            return torch.cat([grads[name].reshape(a, -1) for name in spec.names], 1), loss
        b = mask.shape[1]
        per_example = torch.cat(
            [grads[n].reshape(a, b, k) for n, k in zip(spec.names, spec.numels, strict=True)], 2
        )
        term = self.program.terms[self.reducer]
        draws = torch.stack([term.draw(gen, spec.size) for gen in gens]).to(w.device)
        return self._reduce(w, per_example, mask, draws, works[self.reducer]), loss

    def _params(self, w: torch.Tensor) -> State:
        """Stacked (K, ...) views of the model's parameters in ``w`` (K, d). Per-layer leaves,
        as in ``ClientProgram._grad``, so the gradient is not scattered into full-length
        buffers per parameter; the joined gradient is their concatenation."""
        spec, out, offset = self.program.spec, {}, 0
        for name, shape, n in zip(spec.names, spec.shapes, spec.numels, strict=True):
            out[name] = w[:, offset : offset + n].reshape(len(w), *shape)
            offset += n
        return out

    def _client_loss(
        self, params: State, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """One client's mean loss over the real (mask 1) examples of a padded batch."""
        logits = functional_call(self.program.model, params, (x,))
        per_example = vmap(self._example_loss)(logits, y)
        return (per_example * mask).sum() / mask.sum().clamp(min=1.0)

    def _example_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.program.task.loss_fn(logits.unsqueeze(0), y.unsqueeze(0))


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
