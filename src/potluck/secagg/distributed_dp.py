"""Distributed differential privacy composed with secure aggregation: the distributed Skellam
mechanism (Agarwal, Kairouz, Liu 2021, "The Skellam Mechanism for Differentially Private
Federated Learning", NeurIPS) on SecAgg+ (``parts.SecAgg``), as the transform
``DistributedSkellam`` (registered ``dskellam``) with the ``SecureSum`` aggregator.

Each client clips its update to L2 norm ``clip``, scales, rotates and rounds it to integers
and adds its share of Skellam noise *before* masking (``ddp_encoding``), so the server only
ever unmasks a noised sum. A share's variance is the accounted noise over the ``h =
min_survivors - colluders`` honest survivors a round needs, ``(noise_multiplier *
2^(quantization_bits - 1))^2 / h`` in integer units: the sum of any ``h`` honest shares is
``Sk(mu)``, ``mu = (noise_multiplier * c)^2`` for a clip of ``c`` units, which
``privacy.distributed`` accounts. The server decodes the noised sum over the survivors'
count: the updates count alike, their weights are not used.

Trust model (what the guarantee assumes and what weakens it):

- *The server* is honest-but-curious, as for SecAgg+ (``protocol``): it sees the noised sum
  of the survivors' encodings and who took part, never one client's encoding. The
  guarantee against it is ``epsilon_server`` (no amplification by sampling: it drew the
  cohort); against anyone who sees only the models it is the run's ``epsilon``, amplified.
- *Dropouts* take their noise with them. The server aborts the round before unmasking
  (nothing revealed) when fewer than ``min_survivors`` masked inputs arrived, and each
  survivor declines to unmask when the server's list of survivors is shorter, so a released
  sum always carries at least ``h`` honest shares; a round with more survivors carries more
  noise than accounted.
- *Colluding clients* know their own shares and can help the server subtract them:
  ``colluders`` is how many survivors may collude, and their noise is not counted (``h``
  excludes them). SecAgg+'s own bound on collusion (fewer than ``t`` of a client's
  neighbours) still holds for the masks.
- *Clients* follow the protocol (they clip, and add their noise); the noise comes from
  ``os.urandom`` through ChaCha20 in a deployment (``noise = "secure"``), from the run seed
  only in a simulation (``"seed"``, refused by remote engines: anyone with the config could
  subtract it). The rotation and the stochastic rounding follow the run seed: they are not
  secret, the sensitivity holds for every outcome of the rounding.

Example:
    >>> ddp = DistributedSkellam(clip=0.5, noise_multiplier=1.0).bind_cohort(10)
    >>> ddp.min_survivors, ddp.honest, ddp.release().mu == (1.0 * 2**19) ** 2
    (8, 8, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch

from potluck.core.message import Message
from potluck.core.params import ParamSpec
from potluck.core.parts import Context, Need, RoundAborted, State
from potluck.core.registry import register
from potluck.privacy.central import NOISE_SOURCES
from potluck.privacy.distributed import Release
from potluck.privacy.skellam import Bytes, secure_bytes, seeded_bytes
from potluck.secagg import protocol
from potluck.secagg.ddp_encoding import ROUNDING_SLACK, SkellamEncoding
from potluck.secagg.parts import _TORCH, SecAgg
from potluck.secagg.rotation import padded

MAX_QUANTIZATION_BITS = 31  # a rounded vector's squared norm stays exact in float64 checks


@register("transform", "dskellam")
@dataclass(frozen=True)
class DistributedSkellam(SecAgg):
    """SecAgg+ whose clients add distributed Skellam noise before masking: updates clipped
    to L2 norm ``clip``; ``noise_multiplier``: the accounted noise's std over the clip;
    ``min_survivors``: the masked inputs a round needs (a fraction of the cohort, or a
    count), ``colluders`` of them not trusted; ``noise``: ``"seed"`` (simulation) or
    ``"secure"``. The SecAgg+ settings (``neighbours``, ``threshold``, ``bits``,
    ``dropout``) as for ``SecAgg``; ``quantization_bits``: a clipped update's norm is
    ``2^(quantization_bits - 1)`` integer units. ``clip_range`` and ``max_weight`` do not
    apply (the clip is in L2 norm; every update counts alike)."""

    clip_range: float = field(default=1.0, init=False, repr=False)
    max_weight: float = field(default=1.0, init=False, repr=False)
    clip: float = 1.0
    noise_multiplier: float = 1.0
    min_survivors: int | float = 0.8
    colluders: int = 0
    noise: str = "seed"
    label: ClassVar[str] = "distributed DP"  # how the run describes its privacy
    gives: ClassVar[frozenset[str]] = SecAgg.gives | {Need.EQUAL_WEIGHTS}

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be a finite number > 0, got {self.clip}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if self.noise not in NOISE_SOURCES:
            raise ValueError(f"noise must be one of {NOISE_SOURCES}, got {self.noise!r}")
        if self.quantization_bits > MAX_QUANTIZATION_BITS:
            raise ValueError(
                f"quantization_bits must be at most {MAX_QUANTIZATION_BITS} for distributed "
                f"DP, got {self.quantization_bits}"
            )
        m = self.min_survivors
        if isinstance(m, bool) or not (
            (isinstance(m, int) and m >= 1) or (isinstance(m, float) and 0 < m <= 1)
        ):
            raise ValueError(
                f"min_survivors must be a fraction of the cohort in (0, 1] or a count >= 1, "
                f"got {m!r}"
            )
        if isinstance(self.colluders, bool) or self.colluders < 0:
            raise ValueError(f"colluders must be a count >= 0, got {self.colluders!r}")
        if isinstance(m, int) and m <= self.colluders:
            raise ValueError(
                f"min_survivors = {m} must exceed colluders = {self.colluders}: the noise of "
                "the honest survivors is what the accountant counts"
            )

    # ---- the accountant's view ---------------------------------------------------------

    def bind_cohort(self, cohort: float) -> DistributedSkellam:
        """This part with ``min_survivors`` a count for a cohort of ``cohort`` clients
        (refused above it)."""
        m = self.min_survivors
        count = m if isinstance(m, int) else max(1, math.ceil(m * cohort))
        if count > cohort:
            raise ValueError(
                f"min_survivors = {count} is above the cohort of {cohort:g} clients: every "
                "round would abort; lower min_survivors or sample more clients per round"
            )
        return replace(self, min_survivors=count)

    @property
    def honest(self) -> int:
        """``h``: the honest survivors whose noise a released sum always carries."""
        if not isinstance(self.min_survivors, int):
            raise RuntimeError("DistributedSkellam needs its cohort first (bind_cohort)")
        return self.min_survivors - self.colluders

    def release_at(self, noise_multiplier: float) -> Release:
        """A round's release at ``noise_multiplier``: the rounded norm bound and the
        accounted noise variance, in integer units."""
        unit = float(1 << (self.quantization_bits - 1))
        return Release((1 + ROUNDING_SLACK) * unit, (noise_multiplier * unit) ** 2)

    def release(self) -> Release:
        return self.release_at(self.noise_multiplier)

    # ---- the encoding ------------------------------------------------------------------

    def bind(self, spec: ParamSpec) -> DistributedSkellam:
        bound = replace(self)
        object.__setattr__(bound, "size", spec.size)
        bound._encoding("dskellam", 0.0).check_rounding()
        return bound

    def encoding(self, where: str = "dskellam") -> SkellamEncoding:
        """The encoding of this part's updates (``where``: its namespace), each client's
        noise variance the accounted one over the ``honest`` survivors."""
        return self._encoding(where, self.release().mu / self.honest)

    def _encoding(self, where: str, variance: float) -> SkellamEncoding:
        if not self.size:
            raise RuntimeError("DistributedSkellam must be bound to a model's ParamSpec (bind)")
        return SkellamEncoding(
            self.clip, self.quantization_bits, self.bits, self.size, variance, where
        )

    def encoded_delta(self, size: int) -> tuple[int, torch.dtype]:
        """The masked input: the rotated coordinates (``size`` padded to a power of two)
        and the count, modulo ``2^bits``."""
        return padded(size) + 1, _TORCH[self.bits]

    # ---- the client's half -------------------------------------------------------------

    def client_stage(
        self, stage: str, shared: Message, state: State, ctx: Context
    ) -> tuple[Message | None, State]:
        survivors = shared.arrays.get("survivors")
        if stage == "unmask" and survivors is not None and len(survivors) < self.min_survivors:
            return None, {}  # fewer honest shares in the sum than accounted: no unmasking
        return super().client_stage(stage, shared, state, ctx)

    def encode(self, message: Message, state: State, ctx: Context) -> tuple[Message | None, State]:
        if self._drops(ctx, "masked_input", state):
            return None, {}
        encoding = self.encoding(str(ctx.stream[0])).for_round(
            ctx.seed, ctx.round, self._noise_source(ctx)
        )
        return protocol.mask_input(message, state, ctx, encoding)

    def _noise_source(self, ctx: Context) -> Bytes:
        return secure_bytes() if self.noise == "secure" else seeded_bytes(ctx.rng("noise"))

    # ---- the server's half -------------------------------------------------------------

    def after_train(self, stages: Any, state: State, ctx: Context) -> State:
        """Abort before unmasking when fewer than ``min_survivors`` masked inputs arrived
        (their sum would carry less noise than accounted); else SecAgg+'s unmasking."""
        arrived = len(stages.members)
        if arrived < self.min_survivors:
            stages.report("masked", arrived)
            raise RoundAborted(
                f"{ctx.stream[0]}: {arrived} masked inputs arrived, fewer than min_survivors "
                f"= {self.min_survivors} (the noise the accountant counts); no share was "
                "revealed"
            )
        return super().after_train(stages, state, ctx)

    def decode_aggregate(
        self, aggregate: torch.Tensor, state: State, ctx: Context
    ) -> tuple[torch.Tensor, State]:
        total = self.unmasked(aggregate, state)
        ns = str(ctx.stream[0])
        mean = self.encoding(ns).for_round(ctx.seed, ctx.round).decode(total)
        return torch.from_numpy(mean.astype(np.float32)), {}
