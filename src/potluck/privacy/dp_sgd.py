"""DP-SGD inside a client (Abadi et al. 2016, "Deep Learning with Differential Privacy",
CCS): example-level differential privacy of each client's local training.

At each local step the client takes a Poisson sample of its examples, each with probability
``q = B / n`` (``B`` the local optimizer's batch size, ``n`` its examples), computes every
sampled example's gradient alone (``torch.func.vmap`` over the examples,
``ClientProgram.example_gradients``), clips each to L2 norm ``clip``, sums them, adds
``N(0, (noise_multiplier * clip)^2)`` per coordinate and divides by the expected batch size
``B``. That gradient then goes through the other terms' corrections and the optimizer like
any other. Each step is accounted as ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``, a
client's steps self-composed over every round it trained in (``privacy.example``); each
client's step count and rate are its client state, and the round loop reports the largest
epsilon over clients as ``terms.<i>.dp_sgd/epsilon``.

What the rest of the algorithm computes from the noised gradients is post-processing:
momentum and weight decay, FedProx's proximal term (it depends on the weights and the global
model only), SCAFFOLD's correction and control variate (computed from the noised iterates and
the server's broadcast; the accounting already covers every step that made them), FedNova's
normaliser, the update transforms. A part that reads the client's data outside the steps
(q-FFL's loss at the global model, Ditto's personal model, both ``Need.READS_DATA``) is
refused with it. The metrics a client reports (``train_loss``, evaluation) are not private.

Noise: ``noise = "seed"`` draws from the run's seeded stream of the term for each client and
round (reproducible, equal on every engine; simulation only), ``"secure"`` from
``secure_gaussian`` (a ChaCha20 stream keyed by the operating system), which a deployment
requires.

Example:
    >>> import torch
    >>> term = DpSgd(clip=1.0, noise_multiplier=0.0)
    >>> grads = torch.tensor([[3.0, 4.0], [0.3, 0.4]])  # two examples' gradients
    >>> work = {"expected_batch": torch.tensor(2.0)}
    >>> step = term.reduce(torch.zeros(2), grads, torch.ones(2), torch.zeros(2), work)
    >>> [round(v, 4) for v in step.tolist()]  # (0.6, 0.8) + (0.3, 0.4), over 2
    [0.45, 0.6]
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from potluck.client.terms import Term
from potluck.core.params import ParamSpec
from potluck.core.parts import ClientView, Context, LocalResult, Need, State, TermOutput
from potluck.core.registry import register
from potluck.privacy.central import NORM_SLACK, check_gaussian, secure_gaussian
from potluck.privacy.example import largest_epsilon


def poisson_batches(
    n: int, rate: float, total: int, gen: torch.Generator
) -> Iterator[torch.Tensor]:
    """The example indices of ``total`` steps, each of the ``n`` examples in each step
    independently with probability ``rate`` (Poisson sampling; a step may have none).

    Example:
        >>> gen = torch.Generator().manual_seed(0)
        >>> sizes = [len(idx) for idx in poisson_batches(1000, 0.1, 200, gen)]
        >>> 95 < sum(sizes) / 200 < 105
        True
    """
    for _ in range(total):
        chosen = torch.rand(n, generator=gen, dtype=torch.float64) < rate
        yield torch.nonzero(chosen).reshape(-1)


def clip_scales(grads: torch.Tensor, clip: float) -> torch.Tensor:
    """Per row of a (B, d) stack of per-example gradients, the factor that brings its L2
    norm to at most ``clip`` (1 for smaller ones). Norms are taken in the gradients' dtype,
    ``NORM_SLACK`` larger than computed, so that rounding cannot leave a clipped row above
    ``clip``.

    Example:
        >>> clip_scales(torch.tensor([[3.0, 4.0], [0.3, 0.4]]), 1.0).tolist()[1]
        1.0
    """
    norms = torch.linalg.vector_norm(grads, dim=1) * (1 + NORM_SLACK)
    tiny = torch.finfo(grads.dtype).tiny
    return torch.clamp(clip / torch.clamp(norms, min=tiny), max=1.0)


@register("term", "dp_sgd")
@dataclass(frozen=True)
class DpSgd(Term):
    """DP-SGD's step: per-example clip to ``clip``, Gaussian noise of std
    ``noise_multiplier * clip`` on the sum, over the expected batch; Poisson-sampled examples.
    Epsilon is stated at ``delta`` per example of one client."""

    clip: float = 1.0
    noise_multiplier: float = 1.0
    noise: str = "seed"
    delta: float = 1e-5
    needs: ClassVar[frozenset[str]] = frozenset(
        {Need.PER_EXAMPLE_GRADIENTS, Need.DATA_ONLY_IN_STEPS}
    )
    client_state: ClassVar[dict[str, str]] = {"steps": "int64", "rate": "float64"}

    def __post_init__(self) -> None:
        check_gaussian(self.clip, self.noise_multiplier, self.noise)
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")

    def client_state_shapes(self, spec: ParamSpec) -> dict[str, tuple[int, ...]]:
        return {"steps": (), "rate": ()}

    # ---- the client half ------------------------------------------------------------------

    def begin(
        self, client: ClientView, w_global: torch.Tensor, broadcast: State, state: State
    ) -> State:
        batch = client.optimizer.batch_len(client.num_examples)
        return {
            "expected_batch": torch.tensor(float(max(batch, 1))),
            "steps": state.get("steps", torch.tensor(0, dtype=torch.int64)),
            "rate": state.get("rate", torch.tensor(0.0, dtype=torch.float64)),
        }

    def batches(
        self, n: int, batch_len: int, total: int, gen: torch.Generator
    ) -> Iterator[torch.Tensor]:
        return poisson_batches(n, batch_len / n if n else 0.0, total, gen)

    def draw(self, gen: torch.Generator, d: int) -> torch.Tensor:
        std = self.noise_multiplier * self.clip
        if std == 0:
            return torch.zeros(d)
        if self.noise == "secure":
            return secure_gaussian(d, std).float()
        return torch.randn(d, generator=gen) * std

    def reduce(
        self,
        w: torch.Tensor,
        grads: torch.Tensor,
        mask: torch.Tensor,
        draw: torch.Tensor,
        work: State,
    ) -> torch.Tensor:
        scales = clip_scales(grads, self.clip) * mask
        return (scales @ grads + draw) / work["expected_batch"]

    def finish(self, client: ClientView, result: LocalResult, work: State) -> TermOutput:
        n = client.num_examples
        rate = client.optimizer.batch_len(n) / n if n else 0.0
        steps = work["steps"] + result.steps
        # a client whose data changed: its steps at the largest rate bound its epsilon
        rate = max(rate, float(work["rate"]))
        return TermOutput(state={"steps": steps, "rate": torch.tensor(rate, dtype=torch.float64)})

    # ---- the server half -----------------------------------------------------------------

    def after_train(self, stages: Any, state: State, ctx: Context) -> State:
        """The largest example-level epsilon over every client so far (this term's server
        state): the round's members' from their step counts, or an earlier client's; reported
        as the round metric ``epsilon`` of the term's namespace."""
        counts = []
        for c in stages.members:
            mine = stages.state(int(c))
            if "steps" in mine:
                counts.append((float(mine["rate"]), int(mine["steps"])))
        spent = largest_epsilon(counts, self.noise_multiplier, self.delta)
        spent = max(spent, float(state.get("epsilon", 0.0)))
        stages.report("epsilon", spent)
        return {"epsilon": torch.tensor(spent, dtype=torch.float64)}


def example_mechanisms(algorithm: Any) -> list[tuple[str, DpSgd]]:
    """The DP-SGD terms of ``algorithm`` (namespace, term)."""
    return [(ns, part) for ns, part in algorithm.parts() if isinstance(part, DpSgd)]
