"""The five parts of an algorithm as protocols with explicit state and randomness.

Every part follows the optax / FedJAX shape: ``init`` makes its state, then pure updates
take the state and a ``Context`` and return the new state. Nothing a part needs between
rounds lives on the part object: a pool worker or a Ray actor holds a *copy* of it and a
resumed run a *new* one. The orchestrator keeps server-side state in the round's
checkpoint, keyed by (part, name), and client-side state in the run store, keyed by
(client, part, name); parts never touch the store or torch's global generator.

- ``Sampler``: which clients take part (``init``, ``sample``).
- ``LocalOptimizer`` plus a chain of ``GradientTerm`` s: local training (``client/``).
- ``Transform``: the update on its way out, ``encode`` on the client, ``decode`` on the
  server per message, and optionally ``decode_aggregate`` of the aggregate; ``Downlink``
  the broadcast on its way down.
- ``Aggregator``: combines the updates (``init``, ``aggregate``).
- ``ServerOptimizer``: moves the global model (``init``, ``step``).

Any part may also declare what it ``needs`` and ``gives`` (see ``Need``) so impossible
combinations are refused before a run starts, and may run extra *stages* of a round
(``before_train`` / ``after_train`` on the server, ``client_stage`` on the client). A part
whose client state holds a round's secrets says ``secret_state = True`` (the round loop keeps
it between the round's stages and never stores it); a transform whose ``encode`` may answer
``None`` drops its client out of the round there; one that decodes only the aggregate may
upload a delta of another form (``encoded_delta(size) -> (length, dtype)``) and run a stage
on the aggregate before decoding it (``after_aggregate``); a server half that cannot finish
a round safely raises ``RoundAborted``.

Example:
    >>> ctx = Context(seed=0, round=3, stream=("noise", 3, 7), client=7)
    >>> a = torch.randn(2, generator=ctx.generator())
    >>> b = torch.randn(2, generator=Context(0, 3, ("noise", 3, 7), client=7).generator())
    >>> bool(torch.equal(a, b))
    True
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch

from potluck.core.message import Message, Scalar
from potluck.core.seeding import Key, Seeds

if TYPE_CHECKING:
    from potluck.core.params import ParamSpec

State = dict[str, torch.Tensor]


class Need(StrEnum):
    """What a part may need from, or give to, the rest of an algorithm."""

    INDIVIDUAL_UPDATES = "individual updates"
    ONLY_THE_SUM = "only the sum of the updates"
    BOUNDED_SENSITIVITY = "a bounded sensitivity (a clip before it)"
    PLAIN_SERVER_STEP = "the server step w + mean delta (server SGD, lr 1, no momentum)"
    PERSONAL_MODEL = "a personal model per client"
    SEVERAL_LOCAL_STEPS = "more than one local step per client"
    ONE_CLIENT_AT_A_TIME = "one client at a time (no batching of clients)"
    ONLY_THE_DELTA = "nothing but the delta uploaded (another upload reaches the server unnoised)"
    FIXED_DENOMINATOR = "a fixed denominator (an aggregate for any number of updates, even none)"
    WEIGHTED_UPDATES = "the updates' aggregation weights honoured"
    EQUAL_WEIGHTS = "every update counted alike (their weights ignored)"
    PER_EXAMPLE_GRADIENTS = "per-example gradients (each local step's from its reduce hook)"
    DATA_ONLY_IN_STEPS = "the client's data used only through the local steps' gradients"
    READS_DATA = "the client's data read outside the local steps' gradients"
    MODULAR_SUM = "the updates summed modulo 2^bits (aggregator secagg_sum)"
    INTEGER_UPDATES = "updates encoded as integers modulo 2^bits (transform secagg)"
    LAST_TRANSFORM = "to be the last update transform (one after it would see only its encoding)"
    CIPHERTEXT_SUM = "the ciphertexts added homomorphically (aggregator ckks_sum)"
    CIPHERTEXT_UPDATES = "updates encrypted with CKKS (transform ckks)"
    LINEAR_AGGREGATE = "a linear aggregate (the weighted mean: a mean of sketches is a sketch)"
    LAST_DOWNLINK = "to be the last downlink transform (one after it would see only its encoding)"
    ON_DEVICE = "torch operations on the updates' own device (aggregation on run.device)"


class RoundAborted(Exception):
    """Raised by a part's server half (a stage hook, ``aggregate``, ``decode_aggregate``) when
    its protocol cannot finish the round safely (secure aggregation below its threshold): the
    round loop logs the reason, applies nothing (the model and every part's server state stay
    as they were, no client state is stored) and goes on with the next round."""


@dataclass(frozen=True)
class Context:
    """Where a part is called: the round, the client (``None`` on the server), and the
    part's random stream, derived from the run seed and ``stream`` (by default
    ``(part namespace, round, client)``). ``num_clients`` is the federation's size;
    ``inbox`` what an earlier stage of the round left for this client and part (for the
    aggregator, also the server's own update on its root data, ``root_delta``, when it asks
    for one with a ``root_examples`` attribute); ``members`` the clients of the updates an
    aggregator combines, in the order of its stack; ``available`` (for a sampler) the ids of
    the clients online now, on a virtual clock whose devices are not always online (``None``:
    every client)."""

    seed: int
    round: int
    stream: tuple[Key, ...]
    client: int | None = None
    num_clients: int = 0
    inbox: Message | None = None
    members: tuple[int, ...] = ()
    available: np.ndarray | None = field(default=None, compare=False)

    def generator(self, *path: Key) -> torch.Generator:
        """A torch generator of this part's stream (``path`` for sub-streams)."""
        return Seeds(self.seed).torch(*self.stream, *path)

    def rng(self, *path: Key) -> np.random.Generator:
        """A NumPy generator of this part's stream."""
        return Seeds(self.seed).numpy(*self.stream, *path)


def part_context(
    seed: int, round: int, namespace: str, client: int | None = None, **extra: Any
) -> Context:
    """The context of part ``namespace`` in ``round`` (for ``client``): its stream is
    ``(namespace, round[, client])``.

    Example:
        >>> part_context(0, 2, "transforms.0.clip", client=5).stream
        ('transforms.0.clip', 2, 5)
    """
    stream: tuple[Key, ...] = (namespace, round) if client is None else (namespace, round, client)
    return Context(seed, round, stream, client, **extra)


# ---- part 1: the sampler -------------------------------------------------------------------


@runtime_checkable
class Sampler(Protocol):
    """Which clients take part in a round."""

    def init(self, num_clients: int) -> State: ...

    def cohort_size(self, num_clients: int) -> int:
        """The cohort size (expected size, for random ones); raises if impossible."""
        ...

    def sample(self, num_clients: int, state: State, ctx: Context) -> tuple[np.ndarray, State]:
        """Sorted unique client ids (int64) and the new state."""
        ...


# ---- part 2: local training ----------------------------------------------------------------


@runtime_checkable
class LocalOptimizer(Protocol):
    """The client's base optimizer: a pure step over flat float32 tensors."""

    @property
    def lr(self) -> float: ...

    @property
    def momentum(self) -> float: ...

    @property
    def epochs(self) -> int: ...

    def num_steps(self, num_examples: int) -> int: ...

    def batch_len(self, num_examples: int) -> int: ...

    def init(self, w: torch.Tensor) -> State: ...

    def step(
        self, w: torch.Tensor, state: State, grad: torch.Tensor
    ) -> tuple[torch.Tensor, State]: ...


class ClientView(Protocol):
    """What a gradient term may ask of the client it runs on (``ClientProgram`` gives it)."""

    @property
    def ctx(self) -> Context: ...

    @property
    def num_examples(self) -> int: ...

    @property
    def steps(self) -> int:
        """Local steps this client takes this round."""
        ...

    @property
    def optimizer(self) -> LocalOptimizer: ...

    def train_loss(self, w: torch.Tensor) -> float:
        """Mean training loss of weights ``w`` on this client's training data."""
        ...

    def local_steps(
        self, w: torch.Tensor, correct: Any, stream: str
    ) -> tuple[torch.Tensor, float, int]:
        """This round's number of local steps from ``w`` on this client's data, each gradient
        passed through ``correct(w, g)``, batches drawn from sub-stream ``stream``:
        (weights, summed batch loss, examples seen)."""
        ...


@dataclass(frozen=True)
class LocalResult:
    """Local training's outcome as the terms' ``finish`` sees it, in chain order: ``delta``
    and ``weight`` are the upload so far (earlier terms may have replaced them)."""

    w_global: torch.Tensor
    w: torch.Tensor
    delta: torch.Tensor
    weight: float
    steps: int


@dataclass(frozen=True)
class TermOutput:
    """What a term's ``finish`` returns: a replacement ``delta`` or aggregation ``weight``
    (``None``: keep), arrays and scalars to upload (under the term's namespace) and the
    client's new state for this term."""

    delta: torch.Tensor | None = None
    weight: float | None = None
    arrays: State = field(default_factory=dict)
    scalars: dict[str, Scalar] = field(default_factory=dict)
    state: State = field(default_factory=dict)


@dataclass(frozen=True)
class Contributions:
    """The round's accepted updates as one part's server half sees them: the aggregation
    weights and, per update, the arrays and scalars that part uploaded."""

    clients: np.ndarray
    weights: torch.Tensor
    arrays: tuple[Mapping[str, torch.Tensor], ...]
    scalars: tuple[Mapping[str, Scalar], ...]


@runtime_checkable
class GradientTerm(Protocol):
    """One member of local training's chain (FedProx's proximal term, SCAFFOLD's
    correction, ...), with its server half. ``potluck.client.terms.Term`` has defaults for
    every hook; ``gradient`` must be pure tensor code (the vectorized engine ``vmap`` s it).

    ``uploads`` names the (d,)-vectors and ``upload_scalars`` the numbers its ``finish``
    sends, so the server can check them before the term's ``server_update`` reads them.
    """

    uploads: tuple[str, ...]
    upload_scalars: tuple[str, ...]

    def bind(self, spec: ParamSpec, optimizer: LocalOptimizer) -> GradientTerm: ...

    def server_init(self, w: torch.Tensor) -> State: ...

    def broadcast(self, state: State) -> State: ...

    def begin(
        self, client: ClientView, w_global: torch.Tensor, broadcast: State, state: State
    ) -> State:
        """The term's working state for this local training (from its client state)."""
        ...

    def start(self, w: torch.Tensor, work: State) -> torch.Tensor: ...

    def gradient(self, w: torch.Tensor, grad: torch.Tensor, work: State) -> torch.Tensor: ...

    def finish(self, client: ClientView, result: LocalResult, work: State) -> TermOutput: ...

    def server_update(
        self, state: State, aggregate: torch.Tensor, contributions: Contributions, ctx: Context
    ) -> tuple[torch.Tensor, State]: ...

    def personalize(self, w_global: torch.Tensor, state: State) -> torch.Tensor | None:
        """The client's personal model for evaluation, or ``None``."""
        ...


@runtime_checkable
class ExampleReducer(Protocol):
    """A gradient term that makes each local step's gradient from per-example gradients (it
    declares ``Need.PER_EXAMPLE_GRADIENTS``; ``potluck.client.terms.Term`` has defaults):
    which examples each step sees (``batches``, from the client's batch stream), what it draws
    for each step (``draw``, outside any ``vmap``, from its own stream for the client and
    round) and how a step's (B, d) per-example gradients, with the 0/1 ``mask`` of real
    examples (padding is 0), become the step's gradient (``reduce``: pure tensor code, which
    the vectorized engine ``vmap`` s over clients). The chain's ``gradient`` corrections then
    apply to that gradient, in chain order."""

    def batches(
        self, n: int, batch_len: int, total: int, gen: torch.Generator
    ) -> Iterator[torch.Tensor]: ...

    def draw(self, gen: torch.Generator, d: int) -> torch.Tensor: ...

    def reduce(
        self,
        w: torch.Tensor,
        grads: torch.Tensor,
        mask: torch.Tensor,
        draw: torch.Tensor,
        work: State,
    ) -> torch.Tensor: ...


# ---- part 3: update transforms ------------------------------------------------------------


@runtime_checkable
class Transform(Protocol):
    """One stage of the update pipeline (``potluck.updates.Transform`` has defaults).

    ``encode`` runs on the client with the transform's client state (a message of ``None``:
    the client drops out of the round); ``decode`` on the server per message (dequantise,
    unpack); ``decode_aggregate`` on the aggregate (unmask a secure sum), with the
    transform's server state.
    """

    def bind(self, spec: ParamSpec) -> Transform: ...

    def server_init(self, w: torch.Tensor) -> State: ...

    def encode(
        self, message: Message, state: State, ctx: Context
    ) -> tuple[Message | None, State]: ...

    def decode(self, message: Message, ctx: Context) -> Message: ...

    def decode_aggregate(
        self, aggregate: torch.Tensor, state: State, ctx: Context
    ) -> tuple[torch.Tensor, State]: ...


@runtime_checkable
class Downlink(Protocol):
    """A broadcast transform: ``encode`` once per round on the server, ``decode`` on each
    client. One that sends each member its own message adds ``encode_members(shared,
    members, state, ctx) -> (shared, {member: message}, state)`` (after every downlink's
    ``encode``, with its server state) and ``decode_member(shared, state, ctx) -> (shared,
    state)`` (first on the client, with its client state and its message in ``ctx.inbox``;
    a ``MessageError`` declines the round): ``updates.delta.DeltaDownlink``."""

    def encode(self, message: Message) -> Message: ...

    def decode(self, message: Message) -> Message: ...


# ---- part 4: the aggregator ---------------------------------------------------------------


@runtime_checkable
class Aggregator(Protocol):
    """How the server combines a (K, d) stack of updates with (K,) weights."""

    def init(self, w: torch.Tensor) -> State: ...

    def aggregate(
        self, deltas: torch.Tensor, weights: torch.Tensor, state: State, ctx: Context
    ) -> tuple[torch.Tensor, State]: ...


# ---- part 5: the server optimizer ---------------------------------------------------------


@runtime_checkable
class ServerOptimizer(Protocol):
    """How the aggregate (the negative pseudo-gradient) moves the global model."""

    def init(self, w: torch.Tensor) -> State: ...

    def step(
        self, w: torch.Tensor, mean_delta: torch.Tensor, state: State, ctx: Context
    ) -> tuple[torch.Tensor, State]: ...


# ---- the threat model: a poisoning attack (``potluck.attacks``) --------------------------


@runtime_checkable
class PoisoningAttack(Protocol):
    """What a client program asks of a poisoning attack (``potluck.attacks.poisoning.Attack``
    implements it): its malicious clients, and what they do to their data and their update."""

    poisons_data: ClassVar[bool]
    crafts: ClassVar[bool]

    def attackers(self, num_clients: int, seed: int) -> np.ndarray: ...

    def poison(
        self, x: torch.Tensor, y: torch.Tensor, num_classes: int, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def craft(self, delta: torch.Tensor, ctx: Context) -> torch.Tensor: ...

    @property
    def steers(self) -> bool:
        """Whether its attackers' local steps follow ``gradient`` (their own training loss)."""
        ...

    def gradient(self, w: torch.Tensor, g: torch.Tensor, w_global: torch.Tensor) -> torch.Tensor:
        """An attacker's gradient from the honest one (pure elementwise tensor code)."""
        ...


# ---- declared needs -------------------------------------------------------------------------


def needs(part: object) -> frozenset[str]:
    """What ``part`` declares it needs (an attribute or property ``needs``; none if absent).

    Example:
        >>> from potluck.client.terms import QFFL
        >>> sorted(needs(QFFL()))  # doctest: +NORMALIZE_WHITESPACE
        ['the server step w + mean delta (server SGD, lr 1, no momentum)',
         "the updates' aggregation weights honoured"]
    """
    return frozenset(str(n) for n in getattr(part, "needs", ()))


def gives(part: object) -> frozenset[str]:
    """What ``part`` declares it gives."""
    return frozenset(str(g) for g in getattr(part, "gives", ()))


def describe_part(namespace: str, part: object) -> str:
    """``namespace (ClassName)``, how messages name a part.

    Example:
        >>> from potluck.aggregate import WeightedMean
        >>> describe_part("aggregator", WeightedMean())
        'aggregator (WeightedMean)'
    """
    return f"{namespace} ({type(part).__name__})"


def composition_problems(parts: Sequence[tuple[str, object]]) -> list[str]:
    """Why ``parts`` (namespace, part, in algorithm order: sampler, stragglers, local
    optimizer, terms, transforms, downlink, aggregator, server) cannot work together; empty
    if they can. A need is met by a part that gives it; ``BOUNDED_SENSITIVITY`` only by a
    transform *before* the one that needs it.

    Example:
        >>> from potluck.client.personal import Ditto, FedPer
        >>> composition_problems([("terms.0.ditto", Ditto()), ("terms.1.fedper", FedPer())])
        ... # doctest: +ELLIPSIS
        ['terms.0.ditto (Ditto) and terms.1.fedper (FedPer) both give a personal model...']
    """
    problems: list[str] = []
    givers: dict[str, list[int]] = {}
    for i, (_, part) in enumerate(parts):
        for gift in gives(part):
            givers.setdefault(gift, []).append(i)
    personal = givers.get(Need.PERSONAL_MODEL, [])
    if len(personal) > 1:
        a, b = (describe_part(*parts[i]) for i in personal[:2])
        problems.append(
            f"{a} and {b} both give a personal model per client: an algorithm keeps at most one"
        )
    for i, (ns, part) in enumerate(parts):
        for need in needs(part):
            problem = _unmet(need, i, parts, givers)
            if problem:
                problems.append(f"{describe_part(ns, part)} needs {need}, but {problem}")
    return problems


# the slot that conventionally gives a need, named when nothing does
_PROVIDER = {
    Need.PLAIN_SERVER_STEP: "server",
    Need.SEVERAL_LOCAL_STEPS: "local",
    Need.LINEAR_AGGREGATE: "aggregator",
}


def _unmet(
    need: str, i: int, parts: Sequence[tuple[str, object]], givers: Mapping[str, list[int]]
) -> str | None:
    if need == Need.INDIVIDUAL_UPDATES:
        summed = givers.get(Need.ONLY_THE_SUM, [])
        if summed:
            return f"{describe_part(*parts[summed[0]])} gives the server only their sum"
        return None
    if need == Need.WEIGHTED_UPDATES:
        equal = givers.get(Need.EQUAL_WEIGHTS, [])
        if equal:
            return f"{describe_part(*parts[equal[0]])} counts every update alike"
        return None
    if need == Need.ONLY_THE_DELTA:
        uploading = [
            (ns, p)
            for ns, p in parts
            if getattr(p, "uploads", ()) or getattr(p, "upload_scalars", ())
        ]
        if uploading:
            ns, p = uploading[0]
            what = [*getattr(p, "uploads", ()), *getattr(p, "upload_scalars", ())]
            return f"{describe_part(ns, p)} also uploads {what}, which it would not protect"
        return None
    if need == Need.ONE_CLIENT_AT_A_TIME:
        return None  # asked of the engine, which refuses the part if it batches clients
    if need == Need.PER_EXAMPLE_GRADIENTS:  # asked of the client program, which computes them
        if not isinstance(parts[i][1], ExampleReducer):
            return "it lacks the batches, draw and reduce hooks (client.terms.Term has them)"
        earlier = [j for j in range(i) if need in needs(parts[j][1])]
        if earlier:
            return f"so does {describe_part(*parts[earlier[0]])}: one term reduces them"
        return None
    if need == Need.DATA_ONLY_IN_STEPS:
        readers = givers.get(Need.READS_DATA, [])
        if readers:
            return f"{describe_part(*parts[readers[0]])} reads it outside them, unprotected"
        return None
    if need in (Need.LAST_TRANSFORM, Need.LAST_DOWNLINK):
        chain = "transforms." if need == Need.LAST_TRANSFORM else "downlink."
        later = [j for j in range(i + 1, len(parts)) if parts[j][0].startswith(chain)]
        if later:
            return f"{describe_part(*parts[later[0]])} comes after it"
        return None
    if need == Need.BOUNDED_SENSITIVITY:
        if any(j < i for j in givers.get(need, [])):
            return None
        return "no transform before it bounds it: put a clip (e.g. ClipNorm) first"
    if need in givers:
        return None
    slot = _PROVIDER.get(Need(need)) if need in Need._value2member_map_ else None
    provider = next(((ns, p) for ns, p in parts if ns == slot), None)
    if provider is not None:
        return f"{describe_part(*provider)} ({_params(provider[1])}) does not give it"
    return "no part of the algorithm gives it"


def _params(part: object) -> str:
    import dataclasses

    if not dataclasses.is_dataclass(part):
        return "its settings"
    fields = dataclasses.fields(part)
    return ", ".join(f"{f.name}={getattr(part, f.name)!r}" for f in fields if f.init)
