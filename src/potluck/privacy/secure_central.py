"""Central DP on a secure sum: DP-FedAvg (McMahan, Ramage, Talwar, Zhang 2018) whose sum the
server only ever sees through secure aggregation (SecAgg+ or CKKS).

``dp_mean`` clips each update on the server, which must then see every update; with secure
aggregation it sees only the sum. So the clip moves to the clients: each clips its update to
L2 norm ``clip`` and sends it with weight 1 (its data size and loss withheld), the secure sum
adds up the ``m`` contributions that arrived, and the server adds ``N(0, (z clip)^2 I)`` to
that sum before releasing the mean, ``(sum + noise) / m``.

Trust model: the server sees the exact sum (the noise is its own), so the guarantee is
against everyone who sees the models (the clients, whoever gets the model later), not against
the server: against the server secure aggregation hides each update, and ``dskellam``
(distributed DP) is the variant whose noise the server cannot remove. A deployment must draw
the noise from ``os.urandom`` (``noise = "secure"``).

Accounting: under replace-one adjacency one client moves the sum by at most ``2 clip``, so a
round is the Gaussian mechanism of multiplier ``z / 2`` on a cohort sampled without
replacement; the ledger accounts it as it accounts ``dp_mean`` on a ``UniformSampler``.
Poisson sampling is refused: ``m``, which the server learns and the released mean divides
by, would tell whether a client took part. Dropouts are assumed independent of the data.

Example:
    >>> import torch
    >>> from potluck.core.message import Message
    >>> from potluck.core.parts import part_context
    >>> dp = SecureCentralGaussian(clip=1.0, noise_multiplier=0.0)
    >>> msg = Message({"delta": torch.tensor([3.0, 4.0])}, {"num_examples": 50, "weight": 50.0})
    >>> out, _ = dp.encode(msg, {}, part_context(0, 1, "transforms.0.central_dp", client=2))
    >>> [round(v, 4) for v in out.arrays["delta"].tolist()], out.scalars["weight"]
    ([0.6, 0.8], 1.0)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from potluck.core.message import Message
from potluck.core.parts import Context, Need, RoundAborted, State
from potluck.core.registry import register
from potluck.privacy.accounting import Poisson, Sampling
from potluck.privacy.central import check_gaussian, clip_scales, gaussian_noise, row_norms
from potluck.privacy.local import WITHHELD
from potluck.updates.base import Transform


@register("transform", "central_dp")
@dataclass(frozen=True)
class SecureCentralGaussian(Transform):
    """Clip each update to L2 norm ``clip`` on its client (weight 1); add Gaussian noise of
    std ``noise_multiplier * clip`` to the securely summed updates on the server."""

    clip: float = 1.0
    noise_multiplier: float = 1.0
    noise: str = "seed"
    label: ClassVar[str] = "central DP on secure aggregation"  # how the run describes it
    needs: ClassVar[frozenset[str]] = frozenset({Need.ONLY_THE_SUM, Need.ONLY_THE_DELTA})
    gives: ClassVar[frozenset[str]] = frozenset({Need.BOUNDED_SENSITIVITY, Need.EQUAL_WEIGHTS})

    def __post_init__(self) -> None:
        check_gaussian(self.clip, self.noise_multiplier, self.noise)

    def bind_cohort(self, expected_cohort: float) -> SecureCentralGaussian:
        """The mean divides by the contributors that arrived, not a fixed denominator."""
        return self

    def check_sampling(self, sampling: Sampling) -> None:
        """Refuse Poisson sampling (the contributors' count would reveal participation)."""
        if isinstance(sampling, Poisson):
            raise ValueError(
                "central_dp is accounted for a fixed-size cohort (UniformSampler: "
                "clients_per_round), not Poisson sampling: the released mean divides by the "
                "number of contributors, which would tell whether a client took part"
            )

    # ---- the client's half -------------------------------------------------------------

    def encode(self, message: Message, state: State, ctx: Context) -> tuple[Message, State]:
        delta = message.arrays["delta"]
        scale = clip_scales(row_norms(delta[None]), self.clip)[0]
        clipped = (delta.double() * scale).to(delta.dtype)
        return replace(message, arrays={"delta": clipped}, scalars=WITHHELD), state

    # ---- the server's half -------------------------------------------------------------

    def after_train(self, stages: Any, state: State, ctx: Context) -> State:
        """The contributors: the members whose update reached the secure sum."""
        return {"contributors": torch.tensor(len(stages.members), dtype=torch.int64)}

    def decode_aggregate(
        self, aggregate: torch.Tensor, state: State, ctx: Context
    ) -> tuple[torch.Tensor, State]:
        """The securely summed mean of the ``m`` contributors, plus ``N(0, (z clip)^2) / m``."""
        m = int(state.get("contributors", torch.tensor(0)))
        if m < 1:
            raise RoundAborted(f"{ctx.stream[0]}: no contribution to noise and release")
        std = self.noise_multiplier * self.clip
        noise = gaussian_noise(aggregate.numel(), std, self.noise, ctx) / m
        return (aggregate.double() + noise).to(aggregate.dtype), {}
