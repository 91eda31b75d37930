"""A user part that holds a client up: the identity transform, except that client ``c``
waits ``seconds`` before passing its update on in round ``rounds_of[c]`` (0: never). Named by
import path (``slow_parts:Pause``) in the tests that kill a site between two stages of a
round: while one member waits, the stage cannot end, so a site that already answered it can
be killed before the next stage is sent. The sites import it too (this directory is on their
``PYTHONPATH``).

Example:
    >>> from potluck.core.message import Message
    >>> from potluck.core.parts import part_context
    >>> m = Message(scalars={"weight": 1.0})
    >>> Pause(rounds_of=(0, 2)).encode(m, {}, part_context(0, 1, "transforms.0", 1))[0] is m
    True
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from potluck.core.message import Message
from potluck.core.parts import Context, State
from potluck.updates import Transform


@dataclass(frozen=True)
class Pause(Transform):
    """Client ``c`` waits ``seconds`` in round ``rounds_of[c]``."""

    rounds_of: tuple[int, ...] = ()
    seconds: float = 3.0

    def encode(self, message: Message, state: State, ctx: Context) -> tuple[Message, State]:
        c = -1 if ctx.client is None else int(ctx.client)
        if 0 <= c < len(self.rounds_of) and self.rounds_of[c] == ctx.round:
            time.sleep(self.seconds)
        return message, state
