"""The honest-but-curious server: keep chosen clients' updates exactly as the server sees them.

A :class:`Capture` is an observer for ``run_experiment(..., on_updates=capture)``. In each
chosen round it keeps the updates of the chosen clients after the transforms' ``decode``
(what reaches the aggregator: a clipped and noised update under local DP, the whole delta
under central DP, whose noise is added only to the sum), with the global weights the client
started from (after the downlink's round trip, as the client received them) and what the
server knows of the client's local training: ``num_examples`` and ``num_steps`` from the
upload and the local optimizer's settings from the algorithm it configured.

Example:
    >>> import torch
    >>> from potluck import Experiment, Task, run_experiment
    >>> from potluck.algorithms import fedsgd
    >>> from potluck.data import Federation
    >>> g = torch.Generator().manual_seed(0)
    >>> clients = [(torch.randn(1, 4, generator=g), torch.tensor([i % 3])) for i in range(4)]
    >>> exp = Experiment(Task(lambda: torch.nn.Linear(4, 3)),
    ...                  Federation.from_client_data(clients), fedsgd(clients_per_round=4), 2)
    >>> capture = Capture.of(exp, clients=[1], rounds=[2])
    >>> _ = run_experiment(exp, on_updates=capture)
    >>> [(u.client, u.round, u.num_examples, u.lr, u.num_steps) for u in capture.updates]
    [(1, 2, 1, 1.0, 1)]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from potluck.core.message import Message

if TYPE_CHECKING:
    from potluck.algorithms.base import Algorithm
    from potluck.orchestrator import Experiment, RoundCallback, RunResult
    from potluck.store.sqlite import RunStore

__all__ = ["Capture", "CapturedUpdate", "as_trained", "capture_updates"]


@dataclass(frozen=True)
class CapturedUpdate:
    """One client's decoded update of one round and what the server knows about it.

    ``w_global``: the weights the client started from; ``delta``: its decoded update
    (``w_local - w_global`` before any client transform); ``scalars``: every number it
    uploaded (``train_loss``, ``clip_norm_before``...); ``lr``, ``batch_size``, ``epochs``
    and ``momentum``: the local optimizer the server configured. ``withheld``: the upload
    hid its counts (local DP sends ``num_examples`` 1 and ``num_steps`` 0); ``num_steps``
    is then the server's guess, its optimizer's steps for ``num_examples`` examples.
    """

    client: int
    round: int
    w_global: torch.Tensor
    delta: torch.Tensor
    num_examples: int
    num_steps: int
    lr: float
    batch_size: int | Literal["full"]
    epochs: int
    momentum: float = 0.0
    scalars: Mapping[str, float] = field(default_factory=dict)
    withheld: bool = False

    @property
    def full_batch(self) -> bool:
        """Whether every local step saw all the client's examples (FedSGD's case)."""
        return self.batch_size == "full" or self.batch_size >= self.num_examples


class Capture:
    """Keeps the decoded updates of ``clients`` (all when ``None``) in ``rounds`` (all when
    ``None``), in arrival order, in ``updates``; pass it to ``run_experiment`` as
    ``on_updates``. Make one with :meth:`of` so it knows the experiment's local training
    and downlink."""

    def __init__(
        self,
        algorithm: Algorithm,
        clients: Iterable[int] | None = None,
        rounds: Iterable[int] | None = None,
    ) -> None:
        self.algorithm = algorithm
        self.clients = None if clients is None else frozenset(int(c) for c in clients)
        self.rounds = None if rounds is None else frozenset(int(r) for r in rounds)
        if self.rounds is not None and min(self.rounds, default=1) < 1:
            raise ValueError(f"capture rounds start at 1, got {sorted(self.rounds)}")
        self.updates: list[CapturedUpdate] = []
        self.cohorts: dict[int, list[int]] = {}  # round -> clients whose update was accepted

    @classmethod
    def of(
        cls,
        experiment: Experiment,
        clients: Iterable[int] | None = None,
        rounds: Iterable[int] | None = None,
    ) -> Capture:
        """A capture for ``experiment``'s algorithm; its rounds must lie within the run."""
        capture = cls(experiment.algorithm, clients, rounds)
        late = sorted(r for r in capture.rounds or () if r > experiment.rounds)
        if late:
            raise ValueError(
                f"capture rounds {late} are after the run's last ({experiment.rounds})"
            )
        return capture

    def __call__(self, rnd: int, w: torch.Tensor, updates: Mapping[int, Message]) -> None:
        if self.rounds is not None and rnd not in self.rounds:
            return
        self.cohorts[rnd] = sorted(updates)
        chosen = [c for c in updates if self.clients is None or c in self.clients]
        if not chosen:
            return
        start = self._received(w)
        local = self.algorithm.local
        for cid in chosen:
            msg = updates[cid]
            scalars = {k: float(v) for k, v in msg.scalars.items() if isinstance(v, int | float)}
            delta = msg.arrays["delta"].detach().clone()
            num_examples, num_steps = int(scalars["num_examples"]), int(scalars["num_steps"])
            withheld = num_steps == 0 and bool(delta.any())  # no steps, yet it moved
            if withheld:
                num_steps = local.num_steps(max(num_examples, 1))
            self.updates.append(
                CapturedUpdate(
                    client=cid,
                    round=rnd,
                    w_global=start,
                    delta=delta,
                    num_examples=num_examples,
                    num_steps=num_steps,
                    lr=float(getattr(local, "lr", 1.0)),
                    batch_size=getattr(local, "batch_size", "full"),
                    epochs=int(getattr(local, "epochs", 1)),
                    momentum=float(getattr(local, "momentum", 0.0)),
                    scalars=scalars,
                    withheld=withheld,
                )
            )

    def _received(self, w: torch.Tensor) -> torch.Tensor:
        """The global weights as the clients received them (the downlink's round trip)."""
        message = Message({"w": w.detach().clone()})
        for down in self.algorithm.downlink:
            message = down.encode(message)
        for down in reversed(self.algorithm.downlink):
            message = down.decode(message)
        return message.arrays["w"]

    def get(self, client: int, rnd: int) -> CapturedUpdate:
        """The captured update of ``client`` in round ``rnd``; a clear error if there is
        none (naming the clients whose updates that round has)."""
        for u in self.updates:
            if u.client == client and u.round == rnd:
                return u
        if rnd not in self.cohorts:
            raise LookupError(f"round {rnd} was not captured (captured: {sorted(self.cohorts)})")
        if self.clients is not None and client not in self.clients:
            raise LookupError(
                f"client {client} was not captured (captured: {sorted(self.clients)})"
            )
        raise LookupError(
            f"client {client} has no accepted update in round {rnd}; that round's updates came "
            f"from clients {self.cohorts[rnd][:20]}"
        )


def as_trained(experiment: Experiment, **changes: Any) -> Experiment:
    """``experiment`` with ``changes`` (fewer rounds, another federation, seed...) and the
    noise it was calibrated to kept: its budget's ``target_epsilon`` is dropped, since
    building an ``Experiment`` calibrates the noise afresh to its rounds and federation.

    Example:
        >>> from potluck.algorithms import dp_fedavg
        >>> from potluck.privacy.ledger import PrivacyBudget
        >>> import torch; from potluck import Experiment, Task
        >>> from potluck.data import Federation
        >>> fed = Federation.from_client_data([(torch.randn(4, 2), torch.arange(4) % 2)] * 5)
        >>> exp = Experiment(Task(lambda: torch.nn.Linear(2, 2)), fed, dp_fedavg(rate=1.0), 10,
        ...                  privacy=PrivacyBudget(target_epsilon=4.0))
        >>> z = exp.algorithm.aggregator.noise_multiplier
        >>> as_trained(exp, rounds=2).algorithm.aggregator.noise_multiplier == z
        True
        >>> replace(exp, rounds=2).algorithm.aggregator.noise_multiplier < z  # recalibrated
        True
    """
    budget = experiment.privacy
    if budget is not None and budget.target_epsilon is not None:
        changes["privacy"] = replace(budget, target_epsilon=None)
    return replace(experiment, **changes)


def capture_updates(
    experiment: Experiment,
    *,
    clients: Iterable[int] | None = None,
    rounds: Iterable[int] | None = None,
    through: int | None = None,
    store: RunStore | str | Path | None = None,
    on_round: RoundCallback | None = None,
) -> tuple[RunResult, Capture]:
    """Run ``experiment`` (recorded in ``store`` if given) keeping the updates of
    ``clients`` in ``rounds``; the run's result and the capture.

    ``through = R`` replays only the first ``R`` rounds, in memory and evaluated on
    nothing: the updates of those rounds are the run's own (every random choice derives
    from the run seed), at a fraction of its cost; a noise multiplier calibrated to all
    its rounds is kept (``as_trained``).
    """
    from potluck.orchestrator import Evaluation, run_experiment

    if through is not None:
        if store is not None:
            raise ValueError("a replay of the first rounds (through) is not stored")
        if not 1 <= through <= experiment.rounds:
            raise ValueError(f"through must lie in 1..{experiment.rounds}, got {through}")
        quiet = Evaluation(every=through, centralized=False)
        experiment = as_trained(experiment, rounds=through, evaluation=quiet)
    capture = Capture.of(experiment, clients, rounds)
    result = run_experiment(experiment, store, on_round=on_round, on_updates=capture)
    return result, capture
