"""A two-stage protocol around training: commit-then-reveal of each client's random value
(a public random beacon that no single client can bias, Blum 1983's coin flipping).

Before training each cohort member draws 32 random bytes, keeps them as its own client
state and answers only their SHA-256 (``commit``); after training the members reveal the
bytes (``reveal``) and the server checks each against its commitment. A member may drop out
between the two stages (``drop`` is its probability, drawn from its own stream); the round
goes on with the others. The beacon is the XOR of the revealed values; the round metrics
count commitments, reveals and dropouts. An identity transform otherwise, it shows a part
that runs stages of its own on every engine and over the network.

Example:
    >>> import torch
    >>> from potluck.core.message import Message
    >>> from potluck.core.parts import part_context
    >>> ctx = part_context(0, 1, "transforms.0.Beacon", client=3)
    >>> answer, state = Beacon().client_stage("commit", Message(), {}, ctx)
    >>> answer.arrays["commitment"].shape, state["secret"].dtype
    (torch.Size([32]), torch.uint8)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from potluck.core.message import Message
from potluck.core.parts import Context, State
from potluck.updates import Transform


def _digest(secret: torch.Tensor) -> torch.Tensor:
    return torch.frombuffer(
        bytearray(hashlib.sha256(secret.numpy().tobytes()).digest()), dtype=torch.uint8
    )


@dataclass(frozen=True)
class Beacon(Transform):
    """Commit before training, reveal after; ``drop``: chance of leaving in between."""

    drop: float = 0.0
    client_state: ClassVar[dict[str, str]] = {"secret": "uint8"}

    def __post_init__(self) -> None:
        if not 0 <= self.drop <= 1:
            raise ValueError(f"Beacon drop must be in [0, 1], got {self.drop}")

    # -- the client's half ------------------------------------------------------------------

    def client_stage(
        self, stage: str, shared: Message, state: State, ctx: Context
    ) -> tuple[Message | None, State]:
        if stage == "commit":
            secret = torch.randint(0, 256, (32,), dtype=torch.uint8, generator=ctx.generator())
            return Message({"commitment": _digest(secret)}), {"secret": secret}
        if stage == "reveal":
            if float(ctx.rng("drop").random()) < self.drop:
                return None, state  # gone between the stages
            return Message({"secret": state["secret"]}), state
        raise ValueError(f"Beacon has no stage {stage!r}")

    # -- the server's half ------------------------------------------------------------------

    def before_train(self, stages: Any, state: State, ctx: Context) -> State:
        commitments = stages.run("commit")
        stages.report("committed", len(commitments))
        return {f"c{cid}": m.arrays["commitment"] for cid, m in commitments.items()}

    def after_train(self, stages: Any, state: State, ctx: Context) -> State:
        revealed = stages.run("reveal")
        beacon = torch.zeros(32, dtype=torch.uint8)
        valid = 0
        for cid, message in revealed.items():
            secret = message.arrays.get("secret")
            committed = state.get(f"c{cid}")
            if (
                isinstance(secret, torch.Tensor)
                and committed is not None
                and secret.dtype == torch.uint8
                and secret.shape == (32,)
                and torch.equal(_digest(secret), committed)
            ):
                beacon ^= secret
                valid += 1
        commitments = sum(1 for k in state if k.startswith("c"))
        stages.report("revealed", valid)
        stages.report("dropped", commitments - len(revealed))
        return {"beacon": beacon}
