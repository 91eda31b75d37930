"""Local differential privacy: each client clips and noises its own update before it leaves
(the Gaussian mechanism applied on the client; see Kairouz, McMahan et al. 2021, "Advances
and Open Problems in Federated Learning", section 4.2, and Truex et al. 2020, "LDP-Fed").

The server, or anyone on the wire, sees only ``clip(delta) + N(0, (z clip)^2 I)``: the
guarantee holds against the server itself, which central DP (``privacy.central``) cannot
give. The price is noise that does not shrink with the cohort: the mean of ``m`` local
releases has noise std ``z clip / sqrt(m)`` per coordinate, against ``z clip / m`` centrally.
A client's data changes its clipped update by at most ``2 clip`` (replace-one: the server
knows the client took part), so each release is a Gaussian mechanism of multiplier ``z / 2``,
and a client's releases compose (``privacy.participation`` accounts each client from the
rounds it took part in; the statement names the most-participating one).

What else the client would report is withheld: the upload carries only the noised delta and
weight 1 (``num_examples`` 1, ``num_steps`` 0: the server learns neither the client's data
size nor its training loss), so the weighted mean becomes the plain mean of the releases.

Noise: ``noise = "seed"`` from the run seed (simulation only: anyone with the config could
subtract it), ``"secure"`` from a ChaCha20 stream keyed by ``os.urandom``, which a deployment
requires.

Example:
    >>> import torch
    >>> from potluck.core.message import Message
    >>> from potluck.core.parts import part_context
    >>> ldp = LocalGaussian(clip=1.0, noise_multiplier=0.0)
    >>> msg = Message({"delta": torch.tensor([3.0, 4.0])}, {"num_examples": 50, "train_loss": 0.3})
    >>> out, _ = ldp.encode(msg, {}, part_context(0, 1, "transforms.0.local_dp", client=2))
    >>> [round(v, 4) for v in out.arrays["delta"].tolist()], sorted(out.scalars.items())
    ([0.6, 0.8], [('num_examples', 1), ('num_steps', 0), ('weight', 1.0)])
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from potluck.core.message import Message
from potluck.core.parts import Context, Need, State
from potluck.core.registry import register
from potluck.privacy.central import (
    check_gaussian,
    clip_scales,
    gaussian_noise,
    row_norms,
)
from potluck.updates.base import Transform

WITHHELD = {"num_examples": 1, "num_steps": 0, "weight": 1.0}


@register("transform", "local_dp")
@dataclass(frozen=True)
class LocalGaussian(Transform):
    """Clip the client's update to L2 norm ``clip`` and add Gaussian noise of std
    ``noise_multiplier * clip`` to it, on the client; withhold everything else."""

    clip: float = 1.0
    noise_multiplier: float = 1.0
    noise: str = "seed"
    label: ClassVar[str] = "local DP"  # how the run describes its privacy
    needs: ClassVar[frozenset[str]] = frozenset({Need.ONLY_THE_DELTA})
    gives: ClassVar[frozenset[str]] = frozenset({Need.BOUNDED_SENSITIVITY, Need.EQUAL_WEIGHTS})

    def __post_init__(self) -> None:
        check_gaussian(self.clip, self.noise_multiplier, self.noise)

    def encode(self, message: Message, state: State, ctx: Context) -> tuple[Message, State]:
        delta = message.arrays["delta"]
        scale = clip_scales(row_norms(delta[None]), self.clip)[0]
        noise = gaussian_noise(delta.numel(), self.noise_multiplier * self.clip, self.noise, ctx)
        released = (delta.double() * scale + noise).to(delta.dtype)
        return replace(message, arrays={"delta": released}, scalars=WITHHELD), state
