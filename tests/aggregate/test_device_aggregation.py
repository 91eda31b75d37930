"""Aggregation on ``run.device``: every aggregator that says it runs on the updates' device
(``Need.ON_DEVICE``) computes there exactly what it computes on the host, its state and
output stay there, and a whole run that stacks, aggregates and scores there ends where the
host run does, checkpoints and resume included.

Without a GPU on this project's CI machine, the device is ``potluck.core.fake_device``'s
fake accelerator: the same CPU kernels (so results must be equal bit for bit) behind a
device that refuses host tensors and NumPy as CUDA would. The tests marked ``cuda`` run
the real thing where torch sees a CUDA device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import potluck.orchestrator as orchestrator_module
from potluck.aggregate import WeightedMean
from potluck.config import ExperimentConfig
from potluck.core import registry
from potluck.core.device import HOST, aggregation_device, on_device
from potluck.core.fake_device import FAKE, FakeAccelerator, OnFake
from potluck.core.message import Message
from potluck.core.parts import Context, Need, State, gives, part_context
from potluck.orchestrator import RunResult, run_experiment
from potluck.privacy.central import GaussianMean
from potluck.store.sqlite import RunStore
from potluck.testing import interrupted_and_resumed, learning

cuda = pytest.mark.cuda  # skipped without CUDA, run last with it (conftest.py)
FAST = settings(max_examples=10, deadline=None, derandomize=True)
ON_DEVICE = sorted(
    name
    for name in registry.names("aggregator")
    if str(Need.ON_DEVICE) in gives(registry.lookup("aggregator", name, "aggregator"))
)


def _context(k: int, root: torch.Tensor | None) -> Context:
    inbox = Message({"root_delta": root}) if root is not None else None
    return part_context(0, 1, "aggregator", num_clients=2 * k, members=tuple(range(k)), inbox=inbox)


def _two_rounds(
    agg: Any, deltas: torch.Tensor, weights: torch.Tensor, root: torch.Tensor
) -> tuple[list[torch.Tensor], State]:
    state = on_device(agg.init(torch.zeros(deltas.shape[1])), deltas.device)
    ctx, outs = _context(deltas.shape[0], root), []
    for scale in (1.0, 0.5):
        out, state = agg.aggregate(deltas * scale, weights, state, ctx)
        outs.append(out)
    return outs, state


def test_ours_that_run_on_the_device_are_the_robust_family_and_the_mean() -> None:
    host_only = set(registry.names("aggregator")) - set(ON_DEVICE)
    # private ones draw their noise on the host; secure ones sum encodings on the host
    assert host_only == {"ckks_sum", "dp_ftrl", "dp_mean", "dp_mean_adaptive", "secagg_sum"}


@FAST
@given(
    name=st.sampled_from(ON_DEVICE),
    k=st.integers(7, 12),
    d=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_each_gives_on_the_device_its_host_result_bit_for_bit(
    name: str, k: int, d: int, seed: int
) -> None:
    agg = registry.lookup("aggregator", name, "aggregator")()
    g = torch.Generator().manual_seed(seed)
    deltas, root = torch.randn(k, d, generator=g), torch.randn(d, generator=g)
    weights = torch.rand(k, generator=g, dtype=torch.float64) + 0.1
    want, want_state = _two_rounds(agg, deltas, weights, root)
    with FakeAccelerator():
        got, state = _two_rounds(agg, deltas.to(FAKE), weights.to(FAKE), root.to(FAKE))
        assert all(out.device == FAKE for out in got)
        assert all(v.device == FAKE for v in state.values())
        got, state = [out.to(HOST) for out in got], on_device(state, HOST)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    assert state.keys() == want_state.keys()
    assert all(torch.equal(state[key], want_state[key]) for key in state)


class HostZeros:
    """A user-style aggregator that makes a host tensor beside the stack (no ``device=``)."""

    gives = frozenset({Need.ON_DEVICE})

    def init(self, w: torch.Tensor) -> State:
        return {}

    def aggregate(
        self, deltas: torch.Tensor, weights: torch.Tensor, state: State, ctx: Context
    ) -> tuple[torch.Tensor, State]:
        return deltas.mean(0) + torch.zeros(deltas.shape[1]), state


def test_the_fake_device_refuses_a_host_tensor_as_a_gpu_would() -> None:
    with FakeAccelerator(), pytest.raises(RuntimeError, match="host tensors of shapes"):
        HostZeros().aggregate(torch.ones(3, 4).to(FAKE), torch.ones(3), {}, _context(3, None))


def test_the_aggregation_device_is_cuda_only_for_aggregators_that_say_so() -> None:
    gpu = torch.device("cuda")  # a name: nothing is placed
    assert aggregation_device(WeightedMean(), gpu) == gpu
    assert aggregation_device(HostZeros(), gpu) == gpu
    assert aggregation_device(GaussianMean(), gpu) == HOST
    assert aggregation_device(object(), gpu) == HOST  # a user's that says nothing
    assert aggregation_device(WeightedMean(), torch.device("mps")) == HOST  # no float64
    assert aggregation_device(WeightedMean(), HOST) == HOST


BASE: dict[str, Any] = {
    "rounds": 3,
    "data": {"dataset": "digits", "num_clients": 16},
    "model": {"name": "mlp"},
    "sampler": {"clients_per_round": 8},
    "client": {"epochs": 1, "batch_size": 16, "lr": 0.1},
    "detection": {"scores": ["norm", "cosine", "krum"]},
    "run": {"engine": "inline", "threads": 1},
}
RUNS = [
    {"name": "mean"},
    {"name": "multi_krum", "byzantine": 1, "selected": 4},
    {"name": "centered_clipping", "tau": 0.3},
    {"name": "fltrust", "root_examples": 32},
    {"name": "foolsgold"},
]


def _config(
    aggregator: dict[str, Any], store: str | None = None, engine: str = "inline"
) -> ExperimentConfig:
    run = {**BASE["run"], "engine": engine, **({"store": store} if store else {})}
    return ExperimentConfig.from_dict({**BASE, "aggregator": aggregator, "run": run})


@pytest.fixture
def fake_aggregation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs aggregate on the fake device wherever their aggregator says it can."""

    def placed(aggregator: object, device: torch.device) -> torch.device:
        return FAKE if aggregation_device(aggregator, torch.device("cuda")) != HOST else HOST

    monkeypatch.setattr(orchestrator_module, "aggregation_device", placed)
    step = orchestrator_module._Loop._step

    def on_the_host_after(loop: Any, *args: Any) -> Any:
        state = step(loop, *args)
        kept = [state.w, *(v for slot in state.slots.values() for v in slot.values())]
        assert not any(isinstance(t, OnFake) for t in kept), "state left on the device"
        return state

    monkeypatch.setattr(orchestrator_module._Loop, "_step", on_the_host_after)


def _weights_and_learning(result: RunResult) -> tuple[torch.Tensor, list[dict[str, float]]]:
    return result.weights, learning(result)


@pytest.mark.parametrize(
    ("aggregator", "engine"),
    [*((a, "inline") for a in RUNS), (RUNS[0], "vectorized"), (RUNS[1], "vectorized")],
    ids=lambda v: v["name"] if isinstance(v, dict) else v,
)
def test_a_run_aggregating_on_the_device_ends_where_the_host_run_does(
    aggregator: dict[str, Any], engine: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    want_w, want = _weights_and_learning(run_experiment(_config(aggregator, engine=engine).build()))
    request.getfixturevalue("fake_aggregation")
    store = str(tmp_path / "store")
    with FakeAccelerator():
        result = run_experiment(_config(aggregator, store, engine).build(), RunStore(store))
    got_w, got = _weights_and_learning(result)
    assert not isinstance(got_w, OnFake)  # the model is on the host
    assert torch.equal(got_w, want_w)
    assert got == want  # scores, flags and drift included


def test_a_resumed_run_aggregating_on_the_device_equals_the_uninterrupted_one(
    tmp_path: Path, fake_aggregation: None
) -> None:
    cfg = _config({"name": "foolsgold"})  # its state: every client's history
    with FakeAccelerator():
        whole = run_experiment(cfg.build())
        resumed = interrupted_and_resumed(cfg, tmp_path, after=1)
    assert torch.equal(resumed.weights, whole.weights)


@cuda
@pytest.mark.parametrize("aggregator", RUNS, ids=lambda a: a["name"])
def test_a_run_aggregating_on_cuda_ends_near_the_host_run(aggregator: dict[str, Any]) -> None:
    want = run_experiment(_config(aggregator).build()).weights
    cfg = ExperimentConfig.from_dict(
        {**BASE, "aggregator": aggregator, "run": {**BASE["run"], "device": "cuda"}}
    )
    got = run_experiment(cfg.build()).weights
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
