"""``ClientProgram``: what a client runs, independent of the engine that runs it.

It holds one model instance (built once), the federation's data access and the algorithm's
client-side parts: the local optimizer and its chain of gradient terms, the update
transforms and the downlink's decoding. Engines hand it a ``StageJob`` (``run_stage``) and
get one ``Reply`` per member: ``train`` (local training; the reply is the encoded update
and the client's new state), ``evaluate`` (loss and correct-count sums on the local test
split) or a part's own stage. Every random choice derives from the run seed.

Example:
    >>> import torch
    >>> from potluck.algorithms import fedavg
    >>> from potluck.core.task import Task
    >>> from potluck.data import Federation
    >>> fed = Federation.from_client_data([(torch.randn(20, 4), torch.arange(20) % 3)] * 2)
    >>> program = ClientProgram(Task(lambda: torch.nn.Linear(4, 3)), fed, fedavg(), seed=0)
    >>> msg = program.train(0, 1, program.initial_weights()).message
    >>> msg.arrays["delta"].shape, msg.scalars["num_examples"]
    (torch.Size([15]), 20)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.func import functional_call, grad_and_value, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from potluck.client.pooling import channels_last_pooling
from potluck.core.device import HOST, on_device, resolve_device
from potluck.core.message import Message, MessageError
from potluck.core.params import ParamSpec
from potluck.core.parts import (
    Context,
    LocalOptimizer,
    LocalResult,
    Need,
    PoisoningAttack,
    State,
    describe_part,
    gives,
    needs,
    part_context,
)
from potluck.core.records import EVALUATE, TRAIN, ClientState, Reply, StageJob
from potluck.core.seeding import Seeds
from potluck.core.task import Task, check_outputs, cross_entropy
from potluck.data.partition import Partition
from potluck.monitor.drift import (
    SUMMARIZE,
    DriftScenario,
    SummaryOptions,
    read_request,
    summarize,
    summary_message,
)

if TYPE_CHECKING:
    from potluck.algorithms.base import Algorithm
    from potluck.data.federation import ClientData, Federation

_log = logging.getLogger(__name__)
EVAL_BATCH = 256  # faster than 1024 on this CPU (benchmarks/default_run.py)
EVAL_KINDS = ("global", "personal", "finetuned")
Correction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def batch_order(n: int, b: int, total: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """The example indices of ``total`` mini-batches of a client with ``n`` examples: each
    epoch draws ``torch.randperm(n, generator=gen)`` and cuts it into batches of ``b`` (the
    last one of an epoch shorter). Every engine draws its batches here.

    Example:
        >>> gen = torch.Generator().manual_seed(0)
        >>> [len(idx) for idx in batch_order(5, 2, 4, gen)]
        [2, 2, 1, 2]
    """
    step = 0
    while step < total:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, b):
            yield order[start : start + b]
            step += 1
            if step == total:
                return


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


def evaluation_message(results: Mapping[str, EvalResult]) -> Message:
    """An evaluation reply: ``<kind>/loss_sum``, ``<kind>/correct`` and ``<kind>/n``."""
    scalars: dict[str, int | float | str] = {}
    for kind, r in results.items():
        scalars.update({f"{kind}/loss_sum": r.loss_sum, f"{kind}/correct": r.correct})
        scalars[f"{kind}/n"] = r.n
    return Message(scalars=scalars)


def parse_evaluation(message: Message, source: str) -> dict[str, EvalResult]:
    """The sums of an evaluation reply, checked (``MessageError`` naming ``source``).

    Example:
        >>> parse_evaluation(evaluation_message({"global": EvalResult(1.5, 2, 4)}), "client 0")
        {'global': EvalResult(loss_sum=1.5, correct=2, n=4)}
        >>> parse_evaluation(Message(scalars={"global/n": 4}), "client 3")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        potluck.core.message.MessageError: evaluation from client 3: missing or non-numeric ...
    """
    out: dict[str, EvalResult] = {}
    s = message.scalars
    for kind in EVAL_KINDS:
        if f"{kind}/n" not in s:
            continue
        loss, correct, n = (s.get(f"{kind}/{k}") for k in ("loss_sum", "correct", "n"))
        if not _number(loss) or not _integer(correct) or not _integer(n):
            raise MessageError(f"evaluation from {source}: missing or non-numeric {kind} sums")
        assert isinstance(loss, int | float) and isinstance(correct, int) and isinstance(n, int)
        if not (np.isfinite(loss) and 0 <= correct <= n and (n or loss == 0)):
            raise MessageError(
                f"evaluation from {source}: {kind} sums out of range (loss {loss}, "
                f"{correct} correct of {n})"
            )
        out[kind] = EvalResult(float(loss), correct, n)
    if "global" not in out:
        raise MessageError(f"evaluation from {source}: no global sums")
    return out


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _integer(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class _Client:
    """The ``ClientView`` a term sees: this client's data and round, the term's context."""

    program: ClientProgram
    ctx: Context
    x: torch.Tensor
    y: torch.Tensor
    steps: int

    @property
    def num_examples(self) -> int:
        return len(self.y)

    @property
    def optimizer(self) -> LocalOptimizer:
        return self.program.optimizer

    def train_loss(self, w: torch.Tensor) -> float:
        return self.program.evaluate_arrays(w, self.x.numpy(), self.y.numpy()).loss

    def local_steps(
        self, w: torch.Tensor, correct: Correction, stream: str
    ) -> tuple[torch.Tensor, float, int]:
        cid = self.ctx.client if self.ctx.client is not None else 0
        gen = self.program.seeds.torch(stream, self.ctx.round, cid)
        host = _on_host(correct, self.program.device)
        return self.program._local_steps(w, host, self.x, self.y, self.steps, gen)


@dataclass
class Prepared:
    """A client's local training set up: its terms' working states and where it starts."""

    cid: int
    round: int
    w_global: torch.Tensor
    w_start: torch.Tensor
    num_examples: int
    steps: int
    views: list[_Client]
    works: list[State]
    state: ClientState
    inbox: dict[str, Message]
    optimizer: LocalOptimizer


@dataclass
class ExampleStep:
    """How one client's local steps take their gradients from per-example ones: the term
    that reduces them (``Need.PER_EXAMPLE_GRADIENTS``), its working state, and the stream it
    draws from (its context's ``"draw"`` sub-stream for this client and round)."""

    term: Any
    work: State
    gen: torch.Generator


class ClientProgram:
    """Runs every stage for any client of a federation, reusing one model."""

    def __init__(
        self,
        task: Task,
        federation: Federation,
        algorithm: Algorithm,
        *,
        seed: int = 0,
        finetune_epochs: int = 0,
        attack: PoisoningAttack | None = None,
        attackers: Sequence[int] | None = None,
        summaries: SummaryOptions | None = None,
        drift: DriftScenario | None = None,
    ) -> None:
        self.task, self.federation, self.algorithm = task, federation, algorithm
        # what a client shares of its data in the ``summarize`` stage (``None``: it declines)
        # and, in simulation, the drift its data undergoes (``monitor.drift``)
        self.summaries, self.drift = summaries, drift
        self.drifting = (
            frozenset() if drift is None else drift.drifted(federation.num_clients, seed)
        )
        # a poisoning attack's malicious clients poison their data and craft their updates
        # here (``attackers``: by default the attack's own draw from the run seed)
        self.attack = attack
        if attack is not None and attackers is None:
            attackers = attack.attackers(federation.num_clients, seed).tolist()
        self.attackers = frozenset(int(c) for c in attackers or ())
        self.optimizer = algorithm.local
        self.seed, self.seeds = seed, Seeds(seed)
        with torch.random.fork_rng():
            torch.manual_seed(self.seeds.integer("init"))
            self.model = task.build_model()
        self.spec = ParamSpec.from_module(self.model)
        named = dict(algorithm.parts())
        self.term_ns = [ns for ns, _ in algorithm.parts() if ns.startswith("terms.")]
        self.transform_ns = [ns for ns, _ in algorithm.parts() if ns.startswith("transforms.")]
        self.terms = [named[ns].bind(self.spec, self.optimizer) for ns in self.term_ns]
        self.transforms = [named[ns].bind(self.spec) for ns in self.transform_ns]
        self.parts = {**named, **dict(zip(self.term_ns, self.terms, strict=True))}
        self.parts.update(zip(self.transform_ns, self.transforms, strict=True))
        self.member_downlinks = [
            (ns, p)
            for ns, p in algorithm.parts()
            if ns.startswith("downlink.") and hasattr(p, "decode_member")
        ]
        self.personal = next(
            (i for i, t in enumerate(self.terms) if Need.PERSONAL_MODEL in gives(t)), None
        )
        self.reducer = next(
            (i for i, t in enumerate(self.terms) if Need.PER_EXAMPLE_GRADIENTS in needs(t)), None
        )
        self.finetune: LocalOptimizer | None = None
        if finetune_epochs:
            self.finetune = replace(self.optimizer, epochs=finetune_epochs, max_steps=None)  # type: ignore[type-var]
        self._w0 = self.spec.from_module_values(self.model)
        self.device = HOST  # where the local steps and evaluations run (``place``)
        self._cached: tuple[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] | None = None
        self._request: tuple[Message, tuple[int, torch.Tensor]] | None = None  # summarize
        self._check_task()
        if self.reducer is not None:
            self._check_examples()

    def initial_weights(self) -> torch.Tensor:
        """The global model at round 0 (a copy; deterministic in the run seed)."""
        return self._w0.clone()

    def place(self, device: str | torch.device) -> None:
        """Run the local steps and the evaluations on ``device`` (``run.device``): the model
        (its buffers) moves there, and each client's weights, optimizer and term state and
        data for its steps; what goes in and comes out stays on CPU.

        Example:
            >>> from potluck.algorithms import fedavg
            >>> from potluck.data import Federation
            >>> fed = Federation.from_client_data([(torch.randn(4, 2), torch.arange(4) % 2)])
            >>> program = ClientProgram(Task(lambda: torch.nn.Linear(2, 2)), fed, fedavg())
            >>> program.place("cpu")
            >>> program.device
            device(type='cpu')
        """
        self.device = resolve_device(device)
        self.model.to(self.device)

    # ---- stages --------------------------------------------------------------------------

    def run_stage(self, job: StageJob) -> list[Reply | None]:
        """Every member's reply to ``job``, one after another."""
        members = zip(job.clients, job.payloads, job.states, strict=True)
        if job.stage == TRAIN:
            w, b, kept = self.opened(job)
            return [
                None if k is None else with_state(self.train(int(c), job.round, w, b, s, p), k)
                for (c, p, s), k in zip(members, kept, strict=True)
            ]
        if job.stage == EVALUATE:
            w = job.shared.arrays["w"]
            self.spec.check(w, "the evaluated global weights")
            return [Reply(evaluation_message(self.evaluate(int(c), w, s))) for c, _, s in members]
        if job.stage == SUMMARIZE:
            return [self.summarize(int(c), job.round, job.shared) for c in job.clients]
        ns, stage = self._part_stage(job.stage)
        part = self.parts[ns]
        out: list[Reply | None] = []
        for c, payload, state in members:
            ctx = part_context(self.seed, job.round, ns, int(c), inbox=payload)
            answer, new = part.client_stage(stage, job.shared, state.get(ns, {}), ctx)
            out.append(None if answer is None else Reply(answer, {ns: new} if new else {}))
        return out

    def _part_stage(self, stage: str) -> tuple[str, str]:
        ns, sep, name = stage.partition(":")
        part = self.parts.get(ns)
        if not sep or part is None or not hasattr(part, "client_stage"):
            raise ValueError(
                f"unknown stage {stage!r}: stages are 'train', 'evaluate' and "
                "'<part namespace>:<stage>' of a part with client_stage"
            )
        return ns, name

    def opened(
        self, job: StageJob
    ) -> tuple[torch.Tensor, dict[str, State], list[dict[str, State] | None]]:
        """The ``train`` job's broadcast as its members see it (``open``) and each member's
        new client state of the downlinks that send it a message of its own (``None``: it
        declines the round, its model could not be rebuilt). Those downlinks rebuild the
        server's weights exactly, so every member that does not decline trains from the
        same ``w``."""
        if not self.member_downlinks:
            return (*self.open(job.shared), [{}] * len(job.clients))
        kept: list[dict[str, State] | None] = []
        shared: Message | None = None
        for c, payload, state in zip(job.clients, job.payloads, job.states, strict=True):
            got = self._rebuilt(int(c), job.round, job.shared, payload, state)
            kept.append(None if got is None else got[1])
            if shared is None and got is not None:
                shared = got[0]
        if shared is None:  # nobody could rebuild it: nobody trains
            return self.initial_weights(), {}, kept
        return (*self.open(shared), kept)

    def _rebuilt(
        self, cid: int, round: int, shared: Message, payload: Message, state: ClientState
    ) -> tuple[Message, dict[str, State]] | None:
        inbox, kept = _inboxes(payload), {}
        for ns, down in reversed(self.member_downlinks):
            ctx = part_context(self.seed, round, ns, cid, inbox=inbox.get(ns))
            try:
                shared, kept[ns] = down.decode_member(shared, state.get(ns, {}), ctx)
            except MessageError as exc:
                _log.warning("client %d declines round %d: %s", cid, round, exc)
                return None
        return shared, kept

    def open(self, shared: Message) -> tuple[torch.Tensor, dict[str, State]]:
        """The broadcast as this client sees it: decoded by the downlink transforms (in
        reverse), split into the global weights and each term's broadcast."""
        for down in reversed(self.algorithm.downlink):
            shared = down.decode(shared)
        arrays = dict(shared.arrays)
        w = arrays.pop("w", None)
        if not isinstance(w, torch.Tensor):
            raise MessageError("the broadcast carries no global weights 'w'")
        self.spec.check(w, "the broadcast global weights")
        broadcasts: dict[str, State] = {}
        for name, t in arrays.items():
            ns, _, key = name.rpartition("/")
            broadcasts.setdefault(ns, {})[key] = t
        return w, broadcasts

    def cost(self, job: StageJob) -> list[int]:
        """Each member's estimated cost (local steps for ``train``, else 1): how engines
        split a stage among workers."""
        if job.stage != TRAIN:
            return [1] * len(job.clients)
        out = []
        for c, p in zip(job.clients, job.payloads, strict=True):
            opt = self.optimizer_for(p)
            n = self.federation.num_examples(int(c))
            out.append(max(1, self._steps(n, float(p.scalars.get("work", 1.0)), opt)))
        return out

    # ---- training ------------------------------------------------------------------------

    def steps_for(self, cid: int, work: float = 1.0, batch_size: int | None = None) -> int:
        """Local steps client ``cid`` takes when it completes ``work`` of its epochs (with
        batches of ``batch_size``, if it is given one)."""
        opt = self.optimizer if batch_size is None else self._batched(batch_size)
        return self._steps(self.federation.num_examples(cid), work, opt)

    def _steps(self, num_examples: int, work: float, optimizer: LocalOptimizer) -> int:
        full = optimizer.num_steps(num_examples)
        return min(full, max(1, int(work * full))) if full else 0

    def optimizer_for(self, payload: Message) -> LocalOptimizer:
        """A member's local optimizer: the run's, with the batch size its payload asks for
        (``batch_size``, a virtual clock's adaptive batches; never above the run's)."""
        b = payload.scalars.get("batch_size")
        if b is None:
            return self.optimizer
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise MessageError(f"payload batch_size must be a positive integer, got {b!r}")
        return self._batched(b)

    def _batched(self, batch_size: int) -> LocalOptimizer:
        current = getattr(self.optimizer, "batch_size", None)
        if not isinstance(current, int):
            raise ValueError(
                f"{type(self.optimizer).__name__} has no integer batch_size to adapt "
                f"(batch_size = {current!r})"
            )
        return replace(self.optimizer, batch_size=min(batch_size, current))  # type: ignore[type-var]

    def train(
        self,
        cid: int,
        round: int,
        w_global: torch.Tensor,
        broadcasts: Mapping[str, State] | None = None,
        state: ClientState | None = None,
        payload: Message | None = None,
    ) -> Reply | None:
        """Train client ``cid`` from ``w_global``: its encoded upload and new state (``None``
        if a transform drops it out of the round).
        ``payload``: the server's message for this client (``work``, its share of local
        work, and what earlier stages left for its parts)."""
        prep = self.prepare(cid, round, w_global, broadcasts or {}, state or {}, payload)
        x, y = self._data(cid, round)
        gen = self.seeds.torch("batch", round, cid)
        correct = self.correction([on_device(work, self.device) for work in prep.works])
        attack = self.attack
        if attack is not None and self.steered(cid):
            honest, anchor = correct, w_global.to(self.device)

            def correct(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
                return attack.gradient(w, honest(w, g), anchor)

        example = self.example_step(prep)
        w, loss_sum, seen = self._local_steps(
            prep.w_start, correct, x, y, prep.steps, gen, prep.optimizer, example=example
        )
        return self.conclude(prep, w, loss_sum, seen)

    def example_step(self, prep: Prepared) -> ExampleStep | None:
        """How ``prep``'s client reduces per-example gradients, if a term asks for them."""
        if self.reducer is None:
            return None
        i = self.reducer
        gen = prep.views[i].ctx.generator("draw")
        return ExampleStep(self.terms[i], on_device(prep.works[i], self.device), gen)

    def batches(
        self, n: int, total: int, gen: torch.Generator, optimizer: LocalOptimizer | None = None
    ) -> Iterator[torch.Tensor]:
        """The example indices of ``total`` local steps of a client with ``n`` examples,
        drawn from ``gen``: the reducing term's if there is one, else the shuffled epochs of
        ``batch_order``, in batches of ``optimizer``'s (default: the run's). Every engine
        draws its training batches here."""
        b = (optimizer or self.optimizer).batch_len(n)
        if self.reducer is not None:
            return self.terms[self.reducer].batches(n, b, total, gen)
        return batch_order(n, b, total, gen)

    def example_gradients(
        self, params: State, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor
    ) -> tuple[State, torch.Tensor]:
        """Each example's gradient of its own loss (``task.loss_fn`` on it alone), per
        parameter ``(B, *shape)``, with ``torch.func.vmap(grad)`` over the examples, and the
        batch's mean loss over the real (``mask`` 1) examples. Pure tensor code: the
        vectorized engine ``vmap`` s it over clients too. Random operations (dropout) draw
        one mask per example."""
        per_example = vmap(grad_and_value(self._example_loss), (None, 0, 0), randomness="different")
        grads, losses = per_example(params, x, y)
        return grads, (losses * mask).sum() / mask.sum().clamp(min=1.0)

    def _example_loss(self, params: State, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(self.model, params, (x.unsqueeze(0),))
        return self.task.loss_fn(logits, y.unsqueeze(0))

    def _example_grad(
        self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, example: ExampleStep
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A step's gradient from the per-example gradients of batch ``(x, y)`` as the
        reducing term makes it, and the batch's mean loss."""
        real = torch.ones(len(y), device=w.device)
        grads, loss = self.example_gradients(self.spec.unflatten(w), x, y, real)
        spec = self.spec
        pairs = zip(spec.names, spec.numels, strict=True)
        flat = torch.cat([grads[n].reshape(len(y), k) for n, k in pairs], 1)
        draw = example.term.draw(example.gen, self.spec.size).to(w.device)  # drawn on CPU
        return example.term.reduce(w, flat, real, draw, example.work), loss

    def prepare(
        self,
        cid: int,
        round: int,
        w_global: torch.Tensor,
        broadcasts: Mapping[str, State],
        state: ClientState,
        payload: Message | None = None,
    ) -> Prepared:
        """Everything before the local steps: the dropout seed, each term's ``begin`` and
        ``start``. Every engine trains from here."""
        torch.default_generator.manual_seed(self.seeds.integer("dropout", round, cid))
        payload = payload or Message()
        n = len(self._data(cid, round)[1])
        opt = self.optimizer_for(payload)
        steps = self._steps(n, float(payload.scalars.get("work", 1.0)), opt)
        inbox = _inboxes(payload)
        views = [self._view(cid, round, ns, steps, inbox.get(ns)) for ns in self.term_ns]
        works = [
            term.begin(view, w_global, broadcasts.get(ns, {}), state.get(ns, {}))
            for ns, term, view in zip(self.term_ns, self.terms, views, strict=True)
        ]
        self.model.train()
        w = w_global
        for term, work_state in zip(self.terms, works, strict=True):
            w = term.start(w, work_state)
        return Prepared(cid, round, w_global, w, n, steps, views, works, state, inbox, opt)

    def correction(self, works: Sequence[State]) -> Correction:
        """The terms' gradient corrections in chain order, as one function of (w, grad)."""
        terms = self.terms
        if not terms:
            return _identity
        if len(terms) == 1:
            term, work = terms[0], works[0]
            return lambda w, g: term.gradient(w, g, work)

        def chained(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
            for term, work in zip(terms, works, strict=True):
                g = term.gradient(w, g, work)
            return g

        return chained

    def conclude(self, prep: Prepared, w: torch.Tensor, loss_sum: float, seen: int) -> Reply | None:
        """Everything after the local steps: the terms' ``finish`` in chain order, the upload
        and its encoding by the transforms (each with its client state); ``None`` if a
        transform drops the client out of the round (its ``encode`` answers ``None``)."""
        n = prep.num_examples
        result = LocalResult(prep.w_global, w, w - prep.w_global, float(n), prep.steps)
        arrays: dict[str, torch.Tensor] = {}
        scalars: dict[str, int | float | str] = {"num_examples": n, "num_steps": prep.steps}
        new_state: dict[str, State] = {}
        chain = zip(self.term_ns, self.terms, prep.views, prep.works, strict=True)
        for ns, term, view, work_state in chain:
            out = term.finish(view, result, work_state)
            if out.delta is not None or out.weight is not None:
                result = replace(
                    result,
                    delta=result.delta if out.delta is None else out.delta,
                    weight=result.weight if out.weight is None else float(out.weight),
                )
            arrays.update({f"{ns}/{k}": v for k, v in out.arrays.items()})
            scalars.update({f"{ns}/{k}": v for k, v in out.scalars.items()})
            if out.state:
                new_state[ns] = out.state
        if self.attack is not None and self.attack.crafts and prep.cid in self.attackers:
            ctx = part_context(self.seed, prep.round, "attack", prep.cid)
            result = replace(result, delta=self.attack.craft(result.delta, ctx))
        if seen:
            scalars["train_loss"] = loss_sum / seen
        scalars["weight"] = result.weight
        message = Message(arrays={"delta": result.delta, **arrays}, scalars=scalars)
        for ns, transform in zip(self.transform_ns, self.transforms, strict=True):
            ctx = part_context(self.seed, prep.round, ns, prep.cid, inbox=prep.inbox.get(ns))
            encoded, t_state = transform.encode(message, prep.state.get(ns, {}), ctx)
            if encoded is None:
                return None
            message = encoded
            if t_state:
                new_state[ns] = t_state
        return Reply(message, new_state)

    def _view(
        self, cid: int, round: int, ns: str, steps: int, inbox: Message | None = None
    ) -> _Client:
        data = self._data(cid, round)
        n = self.federation.num_clients
        ctx = part_context(self.seed, round, ns, cid, num_clients=n, inbox=inbox)
        return _Client(self, ctx, data[0], data[1], steps)

    def _data(self, cid: int, round: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Client ``cid``'s training data in ``round`` as tensors (the last client's kept:
        a client's terms and its training ask for it several times in a row)."""
        drifted = self.drift is not None and cid in self.drifting and self.drift.active(round)
        cached = self._cached
        if cached is not None and cached[0] == (cid, drifted):
            return cached[1]
        data = self.federation.client(cid)
        tensors = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
        attack = self.attack
        if attack is not None and attack.poisons_data and cid in self.attackers:
            gen = self.seeds.torch("attack", "data", cid)
            tensors = attack.poison(*tensors, self.federation.source.num_classes, gen)
        if drifted and self.drift is not None:
            tensors = self.drift.apply(*tensors, self.seeds.torch("drift", "data", cid))
        self._cached = ((cid, drifted), tensors)
        return tensors

    def summarize(self, cid: int, round: int, shared: Message) -> Reply | None:
        """Client ``cid``'s summary of its training data in ``round`` (``monitor.drift``:
        label and input-value histograms over the broadcast's bins, noised as its options
        say); ``None`` when this program shares none."""
        if self.summaries is None:
            return None
        if self._request is None or self._request[0] is not shared:  # once per stage
            self._request = (shared, read_request(shared))
        classes, edges = self._request[1]
        x, y = self._data(cid, round)
        noised = self.summaries.noise > 0
        ctx = part_context(self.seed, round, "monitor.summary", cid) if noised else None
        labels, features = summarize(x, y, classes, edges, self.summaries, ctx)
        return Reply(summary_message(labels, features))

    def _forward(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, self.spec.unflatten(w), (x,))

    def _grad(
        self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient of the mean batch loss with respect to the flat vector, and the loss.

        Reverse-mode autograd through ``functional_call`` with one leaf per parameter (views
        of ``w``), joined into one flat gradient: for one client this costs half of
        ``torch.func.grad``, and unlike a single flat leaf it does not make autograd fill and
        add a full-length buffer per parameter (2.4x slower on McMahan's 2NN).
        """
        leaves = {n: t.detach().requires_grad_(True) for n, t in self.spec.unflatten(w).items()}
        loss = self.task.loss_fn(functional_call(self.model, leaves, (x,)), y)
        grads = torch.autograd.grad(
            loss, list(leaves.values()), allow_unused=True, materialize_grads=True
        )
        return torch.cat([g.reshape(-1) for g in grads]), loss.detach()

    def _local_steps(
        self,
        w: torch.Tensor,
        correct: Correction,
        x: torch.Tensor,
        y: torch.Tensor,
        total: int,
        gen: torch.Generator,
        optimizer: LocalOptimizer | None = None,
        example: ExampleStep | None = None,
    ) -> tuple[torch.Tensor, float, int]:
        """``total`` mini-batch steps from ``w``, each gradient passed through ``correct``
        (made from per-example gradients by ``example``'s term if given); (weights, summed
        batch loss, examples seen). They run on ``self.device``; the weights come back on CPU."""
        n, opt = len(y), optimizer or self.optimizer
        w, x, y = w.to(self.device), x.to(self.device), y.to(self.device)
        opt_state, seen = opt.init(w), 0
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        if example is None:
            batches = batch_order(n, opt.batch_len(n), total, gen)
        else:
            batches = self.batches(n, total, gen, opt)
        for idx in batches:
            if example is None:
                g, loss = self._grad(w, x[idx], y[idx])
            else:
                g, loss = self._example_grad(w, x[idx], y[idx], example)
            w, opt_state = opt.step(w, opt_state, correct(w, g))
            loss_sum += loss.double() * len(idx)  # no device sync per step
            seen += len(idx)
        return w.to(HOST), float(loss_sum), seen

    def steered(self, cid: int) -> bool:
        """Whether client ``cid`` is an attacker that trains with the attack's own gradient."""
        return self.attack is not None and self.attack.steers and cid in self.attackers

    def root_update(self, w_global: torch.Tensor, round: int, k: int) -> torch.Tensor:
        """The server's own update in ``round``: local training from ``w_global`` (this
        program's optimizer, no terms) on its root data, ``k`` examples of the source's
        training set drawn once from the run seed (FLTrust's small clean root dataset)."""
        train = self.federation.source.train
        if not 0 < k <= len(train.y):
            raise ValueError(
                f"aggregator.root_examples = {k}: the source's training set holds {len(train.y)}"
            )
        rows = np.sort(self.seeds.numpy("root").choice(len(train.y), size=k, replace=False))
        x, y = torch.from_numpy(train.features(rows)), torch.from_numpy(train.y[rows])
        torch.default_generator.manual_seed(self.seeds.integer("dropout", "root", round))
        self.model.train()
        gen = self.seeds.torch("root", round)
        w, _, _ = self._local_steps(w_global, _identity, x, y, self.optimizer.num_steps(k), gen)
        return w - w_global

    # ---- evaluation ----------------------------------------------------------------------

    @torch.no_grad()
    def evaluate_arrays(self, w: torch.Tensor, x: np.ndarray, y: np.ndarray) -> EvalResult:
        """Loss and correct-count sums of weights ``w`` on ``(x, y)`` (max-pooling in
        channels-last memory where that is faster: ``potluck.client.pooling``)."""
        self.model.eval()
        loss_sum, correct, w = 0.0, 0, w.to(self.device)
        with channels_last_pooling():
            for start in range(0, len(y), EVAL_BATCH):
                xb = torch.from_numpy(x[start : start + EVAL_BATCH]).to(self.device)
                yb = torch.from_numpy(y[start : start + EVAL_BATCH]).to(self.device)
                logits = self._forward(w, xb)
                loss_sum += float(self.task.loss_fn(logits, yb)) * len(yb)
                correct += int(self.task.correct_fn(logits, yb))
        return EvalResult(loss_sum, correct, len(y))

    def evaluate_test(self, w: torch.Tensor, rows: np.ndarray | slice | None = None) -> EvalResult:
        """Sums of ``w`` on the source's held-out test set (``rows`` of it, default all):
        the centralised evaluation. Engines with several workers split it at multiples of
        ``EVAL_BATCH``."""
        test = self.federation.source.test
        rows = slice(None) if rows is None else rows
        return self.evaluate_arrays(w, test.features(rows), test.y[rows])

    def evaluate(
        self, cid: int, w: torch.Tensor, state: ClientState | None = None
    ) -> dict[str, EvalResult]:
        """Client ``cid``'s local test metrics: of the global model (``"global"``), of its
        personal model if a term keeps one (``"personal"``), and of the global model after
        local fine-tuning if configured (``"finetuned"``)."""
        data = self.federation.client(cid)
        out = {"global": self.evaluate_arrays(w, data.x_test, data.y_test)}
        personal = self.personal_model(w, state or {})
        if personal is not None:
            out["personal"] = self.evaluate_arrays(personal, data.x_test, data.y_test)
        if self.finetune is not None:
            out["finetuned"] = self.evaluate_arrays(
                self._finetune(cid, w, data), data.x_test, data.y_test
            )
        return out

    def personal_model(self, w: torch.Tensor, state: ClientState) -> torch.Tensor | None:
        """The client's personal model (from the term that keeps one), or ``None``."""
        if self.personal is None:
            return None
        ns = self.term_ns[self.personal]
        return self.terms[self.personal].personalize(w, dict(state.get(ns, {})))

    def _finetune(self, cid: int, w: torch.Tensor, data: ClientData) -> torch.Tensor:
        """The global model after ``finetune`` local SGD on the client's training data."""
        assert self.finetune is not None
        x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
        steps = self.finetune.num_steps(len(y))
        self.model.train()
        gen = self.seeds.torch("finetune", cid)
        tuned, _, _ = self._local_steps(w, _identity, x, y, steps, gen, self.finetune)
        return tuned

    # ---- checks --------------------------------------------------------------------------

    def _check_task(self) -> None:
        """Refuse, before any training, a model whose outputs do not fit the task: run it on
        two examples of the first client with data, and check every label of the
        federation against the model's number of outputs."""
        fed = self.federation
        probe = next((c for c in range(min(fed.num_clients, 50)) if fed.num_examples(c)), None)
        if probe is None:
            return
        data = fed.client(probe)
        x, y = torch.from_numpy(data.x_train[:2]), torch.from_numpy(data.y_train[:2])
        out = check_outputs(self.task, self.model, x, y, where=f"client {probe}")
        if out.dim() == 2 and self.task.loss_fn is cross_entropy:
            _check_labels(fed, int(out.shape[1]))

    def _check_examples(self) -> None:
        """Refuse, before any training, a model whose per-example gradients a term cannot
        have: batch statistics (an example alone has none) or a step ``torch.func`` cannot
        take per example (one probe on two examples of the first client with data)."""
        term = describe_part(self.term_ns[self.reducer or 0], self.terms[self.reducer or 0])
        for name, module in self.model.named_modules():
            if isinstance(module, _BatchNorm):
                raise ValueError(
                    f"{term} needs per-example gradients, but module {name!r} is "
                    f"{type(module).__name__}, whose batch statistics mix the examples: use "
                    "GroupNorm or LayerNorm"
                )
        fed = self.federation
        probe = next((c for c in range(min(fed.num_clients, 50)) if fed.num_examples(c)), None)
        if probe is None:
            return
        x, y = self._data(probe, 0)
        try:
            with torch.random.fork_rng():
                self.example_gradients(self.spec.unflatten(self._w0), x[:2], y[:2], torch.ones(2))
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ValueError(
                f"{term} needs per-example gradients, but torch.func.vmap cannot take this "
                f"model's gradient one example at a time ({type(exc).__name__}: {first})"
            ) from exc


def _check_labels(fed: Federation, outputs: int) -> None:
    """Every label below the model's ``outputs``; else name the first client holding one."""
    labels = fed.source.train.y
    support = fed.partition.support()
    bad = np.flatnonzero(labels[support] >= outputs)
    if not len(bad):
        return
    label = int(labels[support[bad[0]]])
    if isinstance(fed.partition, Partition):
        sizes = fed.partition.sizes()
        holder = f"client {int(np.searchsorted(np.cumsum(sizes), bad[0], side='right'))}"
    else:
        holder = "the dataset clients draw from"
    raise ValueError(
        f"{holder} has label {label} but the model has {outputs} outputs: give the "
        f"model at least {int(labels.max()) + 1} outputs (num_classes), or relabel the data"
    )


def _on_host(correct: Correction, device: torch.device) -> Correction:
    """A term's own correction (its state is on CPU) for local steps on ``device``."""
    if device == HOST:
        return correct
    return lambda w, g: correct(w.to(HOST), g.to(HOST)).to(device)


def _identity(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return g


def with_state(reply: Reply | None, kept: Mapping[str, State]) -> Reply | None:
    """``reply`` with the downlinks' new client state ``kept`` added."""
    if reply is None or not kept:
        return reply
    return Reply(reply.message, {**reply.state, **kept}, reply.refused)


def _inboxes(payload: Message) -> dict[str, Message]:
    """What earlier stages left for each part: the payload's ``"<namespace>/<name>"``
    entries, by namespace."""
    arrays: dict[str, dict[str, torch.Tensor]] = {}
    scalars: dict[str, dict[str, int | float | str]] = {}
    for name, t in payload.arrays.items():
        ns, sep, key = name.rpartition("/")
        if sep:
            arrays.setdefault(ns, {})[key] = t
    for name, v in payload.scalars.items():
        ns, sep, key = name.rpartition("/")
        if sep:
            scalars.setdefault(ns, {})[key] = v
    return {ns: Message(arrays.get(ns, {}), scalars.get(ns, {})) for ns in {*arrays, *scalars}}
