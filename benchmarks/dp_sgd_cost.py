"""The cost of example-level DP-SGD inside a client (issue 14): the time of a DP-SGD step
(``privacy.dp_sgd.DpSgd``: Poisson-sampled examples, per-example gradients by
``torch.func.vmap``, clip, noise) over the non-private step on the same model, on the inline
engine (one client) and the vectorized engine (a cohort), and Opacus 1.6's DP-SGD over its
own plain PyTorch loop, side by side in one run when Opacus is installed (``pip install
opacus==1.6.0`` after torch, or ``scripts/setup.sh --opacus``).

Models: the MLP 64-64-10 of the engine benchmarks (4,810 parameters) on 64 inputs and
``small_cnn`` (28,874 parameters) on 28x28x1 inputs (``models/zoo.py``); random inputs and
labels (a step's time does not depend on their values). Each client holds 320 examples and
trains one epoch at batch size 32 (10 steps; DP-SGD's Poisson samples hold 32 examples on
average), clip 1.0, noise multiplier 1.1, one torch thread. The vectorized engine trains a
cohort of 10 such clients at once. Each timing is the median (and the minimum) of 9 repeats,
the variants interleaved within each repeat (so that another process's load falls on all of
them alike); the first call of each variant is its start-up (``torch.func``'s first
``vmap``, Opacus's ``make_private``), reported in its own column and not in the step time.

Same work on both sides: the same number of steps, examples seen within a few percent (the
Poisson samples' sizes are random), the same clip and noise multiplier (checked), and one
step with noise multiplier 0 on the same batch gives the same weights in potluck and in
Opacus (``agreement``: largest difference).

Run from the repository root (about three minutes):
    .venv/bin/python benchmarks/dp_sgd_cost.py
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from _common import header, summary, train_cohort, write_result
from torch import nn

from potluck.algorithms import fedavg
from potluck.client.program import ClientProgram
from potluck.core.task import Task
from potluck.data import Federation
from potluck.engines.vectorized import VectorizedEngine
from potluck.models.zoo import mlp, small_cnn
from potluck.privacy.dp_sgd import DpSgd

MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "MLP 64-64-10": (lambda: mlp((64,), 10), (64,)),
    "small CNN": (lambda: small_cnn((1, 28, 28), 10), (1, 28, 28)),
}
EXAMPLES, BATCH, COHORT, REPEATS = 320, 32, 10, 9
CLIP, Z, LR = 1.0, 1.1, 0.1


def federation(shape: tuple[int, ...], clients: int) -> Federation:
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(EXAMPLES, *shape, generator=g), torch.randint(0, 10, (EXAMPLES,), generator=g))
        for _ in range(clients)
    ]
    return Federation.from_client_data(data)


Epoch = Callable[[], tuple[int, Callable[[], int]]]


class Variant:
    """One way to train: a callable that runs one epoch of every client and returns its
    steps per client and how to count the examples its steps saw (counted after the clock
    stops); its start-up (first call) and its timed repeats."""

    def __init__(self, name: str, run: Epoch, clients: int) -> None:
        self.name, self.run, self.clients = name, run, clients
        t0 = time.perf_counter()
        self.steps, count = run()
        self.startup_s = time.perf_counter() - t0
        self.seen = [count()]
        self.times: list[float] = []

    def once(self) -> None:
        t0 = time.perf_counter()
        steps, count = self.run()
        self.times.append(time.perf_counter() - t0)
        assert steps == self.steps, (self.name, steps, self.steps)
        self.seen.append(count())

    @property
    def examples(self) -> float:
        """Examples seen per client and epoch, on average over the calls."""
        return sum(self.seen) / len(self.seen) / self.clients

    def result(self) -> dict[str, Any]:
        per_step = [t / (self.steps * self.clients) for t in self.times]
        return {
            "startup_s": self.startup_s,
            "epoch_s": summary(self.times),
            "step_ms": {k: 1e3 * v for k, v in summary(per_step).items()},
            "steps_per_client": self.steps,
            "examples_per_client": self.examples,
        }


def potluck_inline(build: Callable[[], nn.Module], shape: tuple[int, ...], private: bool) -> Any:
    terms = (DpSgd(clip=CLIP, noise_multiplier=Z),) if private else ()
    algo = fedavg(clients_per_round=1, batch_size=BATCH, lr=LR, terms=terms)
    program = ClientProgram(Task(build), federation(shape, 1), algo, seed=0)
    w = program.initial_weights()
    counter = iter(range(1, 10**6))

    def run() -> tuple[int, Callable[[], int]]:
        rnd = next(counter)  # a fresh round: new batches and noise
        steps = int(program.train(0, rnd, w).message.scalars["num_steps"])
        return steps, lambda: seen(program, rnd, [0], steps)

    return run


def seen(program: ClientProgram, rnd: int, clients: list[int], steps: int) -> int:
    """Examples the clients' steps saw in round ``rnd``: their batches, drawn again from
    the same streams."""
    total = 0
    for c in clients:
        gen = program.seeds.torch("batch", rnd, c)
        total += sum(len(b) for b in program.batches(EXAMPLES, steps, gen))
    return total


def potluck_vectorized(
    build: Callable[[], nn.Module], shape: tuple[int, ...], private: bool
) -> Any:
    terms = (DpSgd(clip=CLIP, noise_multiplier=Z),) if private else ()
    algo = fedavg(clients_per_round=COHORT, batch_size=BATCH, lr=LR, terms=terms)
    program = ClientProgram(Task(build), federation(shape, COHORT), algo, seed=0)
    engine = VectorizedEngine(program)
    w, cohort = program.initial_weights(), np.arange(COHORT)
    counter = iter(range(1, 10**6))

    def run() -> tuple[int, Callable[[], int]]:
        rnd = next(counter)
        msgs = train_cohort(engine, algo, cohort, w, rnd)
        (steps,) = {int(m.scalars["num_steps"]) for m in msgs}
        return steps, lambda: seen(program, rnd, list(range(COHORT)), steps)

    return run


def opacus_loop(build: Callable[[], nn.Module], shape: tuple[int, ...], private: bool) -> Any:
    """Opacus 1.6's DP-SGD (``PrivacyEngine.make_private``: Poisson sampling, per-sample
    gradients by hooks, clip, noise) or the plain PyTorch loop it wraps."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = build()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(EXAMPLES, *shape, generator=g)
    y = torch.randint(0, 10, (EXAMPLES,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True, generator=g)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    if private:
        engine = PrivacyEngine(accountant="rdp")
        model, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=Z,
            max_grad_norm=CLIP,
            poisson_sampling=True,
        )
        assert optimizer.max_grad_norm == CLIP and optimizer.noise_multiplier == Z
    loss_fn = nn.CrossEntropyLoss()

    def run() -> tuple[int, Callable[[], int]]:
        steps = examples = 0
        for xb, yb in loader:
            optimizer.zero_grad()
            loss_fn(model(xb), yb).backward()
            optimizer.step()
            steps, examples = steps + 1, examples + len(yb)
        return steps, lambda: examples

    return run


def agreement(build: Callable[[], nn.Module], shape: tuple[int, ...]) -> float:
    """Largest weight difference after one step of lr 1, noise 0, on the same batch of 32,
    between potluck's DP-SGD reduction and Opacus's."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    program = ClientProgram(Task(build), federation(shape, 1), fedavg(terms=(DpSgd(),)))
    x, y = program._data(0, 1)
    x, y = x[:BATCH], y[:BATCH]
    w = program.initial_weights()
    grads, _ = program.example_gradients(program.spec.unflatten(w), x, y, torch.ones(BATCH))
    flat = torch.cat([grads[n].reshape(BATCH, -1) for n in program.spec.names], 1)
    term = DpSgd(clip=CLIP, noise_multiplier=0.0)
    step = term.reduce(w, flat, torch.ones(BATCH), torch.zeros(program.spec.size),
                       {"expected_batch": torch.tensor(float(BATCH))})  # fmt: skip
    ours = w - step

    model = build()
    program.spec.load_into(model, w)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    model, optimizer, loader = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0,
        max_grad_norm=CLIP, poisson_sampling=False,
    )  # fmt: skip
    optimizer.zero_grad()
    nn.CrossEntropyLoss()(model(x), y).backward()
    optimizer.step()
    theirs = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return float((ours - theirs).abs().max())


def measure(model: str, opacus: bool) -> dict[str, Any]:
    build, shape = MODELS[model]
    variants = {
        "inline_plain": Variant("inline_plain", potluck_inline(build, shape, False), 1),
        "inline_dp": Variant("inline_dp", potluck_inline(build, shape, True), 1),
        "vectorized_plain": Variant(
            "vectorized_plain", potluck_vectorized(build, shape, False), COHORT
        ),
        "vectorized_dp": Variant("vectorized_dp", potluck_vectorized(build, shape, True), COHORT),
    }
    if opacus:
        variants["opacus_plain"] = Variant("opacus_plain", opacus_loop(build, shape, False), 1)
        variants["opacus_dp"] = Variant("opacus_dp", opacus_loop(build, shape, True), 1)
    for _ in range(REPEATS):
        for v in variants.values():
            v.once()
    out: dict[str, Any] = {
        "model": model,
        "parameters": sum(p.numel() for p in build().parameters()),
    }
    out.update({name: v.result() for name, v in variants.items()})
    pairs = [(f"{side}_dp", f"{side}_plain") for side in ("inline", "vectorized", "opacus")]
    if opacus:
        pairs += [("inline_dp", "opacus_dp"), ("vectorized_dp", "opacus_dp")]
    for a, b in pairs:
        if a in out and b in out:
            for stat in ("median", "min"):  # min: the repeat least disturbed by other load
                ratio = out[a]["step_ms"][stat] / out[b]["step_ms"][stat]
                out[
                    f"{a}_over_{b.removesuffix('_plain')}" + ("" if stat == "median" else "_min")
                ] = ratio
    if opacus:
        out["agreement_max_abs_diff"] = agreement(build, shape)
    steps = {v.steps for v in variants.values()}
    assert steps == {EXAMPLES // BATCH}, steps  # the same number of steps everywhere
    for v in variants.values():  # Poisson samples: 320 examples per epoch, give or take
        assert abs(v.examples - EXAMPLES) < 0.1 * EXAMPLES, (v.name, v.examples)
    return out


def main() -> None:
    torch.set_num_threads(1)
    opacus = importlib.util.find_spec("opacus") is not None
    result = header("dp_sgd_cost")
    if opacus:
        import opacus as op

        result["opacus"] = op.__version__
    result["settings"] = {
        "examples_per_client": EXAMPLES, "batch_size": BATCH, "cohort": COHORT,
        "repeats": REPEATS, "clip": CLIP, "noise_multiplier": Z, "threads": 1,
    }  # fmt: skip
    rows = []
    for model in MODELS:
        rows.append(measure(model, opacus))
        r = rows[-1]
        line = [f"{model}: inline {r['inline_dp_over_inline']:.2f}x",
                f"vectorized {r['vectorized_dp_over_vectorized']:.2f}x"]  # fmt: skip
        if opacus:
            line += [f"opacus {r['opacus_dp_over_opacus']:.2f}x",
                     f"inline DP / opacus DP {r['inline_dp_over_opacus_dp']:.2f}",
                     f"agreement {r['agreement_max_abs_diff']:.1e}"]  # fmt: skip
        print(", ".join(line), flush=True)
    result["rows"] = rows
    print(write_result("dp_sgd_cost", result))


if __name__ == "__main__":
    main()
