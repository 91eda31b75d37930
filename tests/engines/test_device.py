"""``run.device``: the inline and vectorized engines train and evaluate on an accelerator
with CPU's results within float tolerance; what cannot run there is refused up front.

The tests marked ``cuda`` run only where torch sees a CUDA device (none on this project's CI
machine: there they are skipped, and the accelerator path is untested)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import potluck.core.device as device_module
from potluck.algorithms import fedavg
from potluck.cli import app
from potluck.client import QFFL, ClientProgram, Ditto, FedNova, FedProx, Scaffold
from potluck.config import ExperimentConfig
from potluck.core.device import full_float32, resolve_device
from potluck.core.fake_device import FAKE, FakeAccelerator
from potluck.core.message import Message
from potluck.core.records import TRAIN, StageJob
from potluck.core.task import Task
from potluck.data import Federation
from potluck.engines.base import EngineOptions, choose_engine, make_engine
from potluck.models.zoo import small_cnn
from potluck.privacy.dp_sgd import DpSgd

cuda = pytest.mark.cuda  # skipped without CUDA, run last with it (conftest.py)
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def cnn() -> nn.Module:
    return small_cnn((1, 28, 28), 10)


def images(clients: int, n: int, seed: int = 0) -> Federation:
    g = torch.Generator().manual_seed(seed)
    data = [
        (
            torch.randn(n + 3 * c, 1, 28, 28, generator=g),
            torch.randint(0, 10, (n + 3 * c,), generator=g),
        )
        for c in range(clients)
    ]
    return Federation.from_client_data(data, test_fraction=0.25)


def digits(engine: str, device: str, store: str) -> ExperimentConfig:
    return ExperimentConfig.from_dict(
        {
            "rounds": 2,
            "data": {"dataset": "digits", "num_clients": 10},
            "model": {"name": "mlp"},
            "sampler": {"clients_per_round": 4},
            "run": {"engine": engine, "device": device, "threads": 1, "store": store},
        }
    )


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let "cuda" resolve on a machine without one, for what is decided before anything
    runs there (the engine choice, the refusals)."""
    monkeypatch.setattr(device_module, "_check_cuda", lambda name, device: None)


@no_cuda
def test_cuda_without_a_gpu_is_refused_with_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"run.device = 'cuda'.*sees no CUDA device"):
        digits("inline", "cuda", str(tmp_path)).build()
    result = CliRunner().invoke(
        app,
        [
            "run",
            "--set",
            "data.dataset='digits'",
            "--set",
            "run.device='cuda'",
            "--set",
            f"run.store='{tmp_path}'",
            "--set",
            "rounds=1",
        ],
    )
    assert result.exit_code != 0
    assert "sees no CUDA device" in " ".join(result.output.split())
    assert not list(tmp_path.glob("*/*"))  # nothing stored


@pytest.mark.parametrize("name", ["tpu", "meta", "cuda:x", ""])
def test_unknown_devices_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match=r"run\.device"):
        resolve_device(name)


@pytest.mark.parametrize("engine", ["pool", "ray"])
def test_engines_of_cpu_workers_refuse_an_accelerator(
    engine: str, tmp_path: Path, fake_cuda: None
) -> None:
    with pytest.raises(ValueError, match=rf"engine '{engine}' trains in CPU worker processes"):
        digits(engine, "cuda", str(tmp_path)).build()
    program = ClientProgram(Task(cnn), images(2, 8), fedavg())
    with pytest.raises(ValueError, match="CPU worker processes"):
        make_engine(engine, program, EngineOptions(device="cuda"))


def test_auto_on_an_accelerator_vectorizes_convolutions_and_never_picks_the_pool(
    fake_cuda: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    program = ClientProgram(Task(cnn), images(3, 8), fedavg())
    options = EngineOptions(workers=2, device="cuda")
    name, why = choose_engine(program, 10, options, run_steps=10)
    assert name == "vectorized" and "cuda" in why
    dropout = lambda: nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(784, 10))  # noqa: E731
    name, why = choose_engine(ClientProgram(Task(dropout), images(3, 8), fedavg()), 10, options)
    assert name == "inline" and "one client at a time on cuda" in why
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)  # as on a CPU machine
    cpu = choose_engine(program, 10, EngineOptions(workers=2), run_steps=10)[0]
    assert cpu == "pool"  # convolutions on CPU: the pool, as before


def test_a_process_that_used_cuda_gets_no_forked_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """PyTorch's autograd does not run in a process forked after CUDA's threads started (on
    an H200, ``auto`` picked the pool for a CPU run after a CUDA run in the same process,
    and every worker raised), so ``auto`` does not pick the pool there and an explicit pool
    is refused before it forks."""
    program = ClientProgram(Task(cnn), images(3, 8), fedavg())
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    name, why = choose_engine(program, 10, EngineOptions(workers=2), run_steps=10)
    assert name == "inline" and "no pool: this process has used CUDA" in why
    with pytest.raises(ValueError, match=r"engine 'pool' forks its workers, and this process"):
        make_engine("pool", program, EngineOptions(workers=2))


def test_an_explicit_cpu_device_is_the_default_bit_for_bit(tmp_path: Path) -> None:
    from potluck.orchestrator import run_experiment

    runs = [
        run_experiment(digits("inline", device, str(tmp_path / device)).build(), progress=False)
        for device in ("cpu", "cpu:0")
    ]
    assert torch.equal(runs[0].weights, runs[1].weights)
    timeless = [
        [{k: v for k, v in r.items() if "seconds" not in k} for r in run.history] for run in runs
    ]
    assert timeless[0] == timeless[1]


def _train_job(program: ClientProgram, k: int, w: torch.Tensor) -> StageJob:
    """Round 1's train stage for clients 0..k-1: the weights and each term's broadcast from
    its initial server state (SCAFFOLD's ``c``)."""
    shared = {"w": w}
    for ns, term in zip(program.term_ns, program.terms, strict=True):
        server = term.server_init(w)
        shared.update({f"{ns}/{key}": v for key, v in term.broadcast(server).items()})
    payloads = tuple(Message() for _ in range(k))
    return StageJob(TRAIN, 1, Message(shared), np.arange(k), payloads, tuple({} for _ in range(k)))


def _replies(term: object, engine: str, device: str) -> tuple[list[dict[str, torch.Tensor]], float]:
    terms = () if term is None else (term,)
    program = ClientProgram(Task(cnn), images(4, 10), fedavg(terms=terms), seed=5)
    eng = make_engine(engine, program, EngineOptions(device=device))
    w = program.initial_weights()
    replies = eng.run_stage(_train_job(program, 4, w))
    arrays = [
        {
            **r.message.arrays,
            "loss": torch.tensor(r.message.scalars["train_loss"]),
            **{f"state/{ns}/{k}": v for ns, st in r.state.items() for k, v in st.items()},
        }
        for r in replies
        if r is not None
    ]
    for a in arrays:  # the boundary stays on CPU, a client's kept state too (Ditto's model)
        assert all(v.device.type == "cpu" for v in a.values())
    return arrays, eng.evaluate_test(w).loss_sum


@pytest.mark.parametrize(
    "term",
    [None, FedProx(mu=0.1), Scaffold(), FedNova(), QFFL(q=1.0), Ditto(lam=0.1)],
    ids=["fedavg", "fedprox", "scaffold", "fednova", "qffl", "ditto"],
)
def test_inline_training_on_a_fake_device_equals_the_host_bit_for_bit(
    term: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The inline engine's device path (weights, optimizer and term state, data and batch
    indices moved for the steps; the upload back on the host) on the fake accelerator, which
    refuses a host tensor beside a device one as CUDA does and computes the same bits. The
    model stays put (``small_cnn`` has no buffers: the steps take every parameter from the
    moved weights); ``module.to`` and the ``torch.func`` transforms of DP-SGD and the
    vectorized engine are beyond what the fake can follow (their outputs lose its tensor
    class), so those run only in the ``cuda`` tests."""
    ref, ref_eval = _replies(term, "inline", "cpu")

    def place(program: ClientProgram, device: str | torch.device) -> None:
        program.device = FAKE

    monkeypatch.setattr(ClientProgram, "place", place)
    with FakeAccelerator():
        got, got_eval = _replies(term, "inline", "cpu")
    assert len(got) == len(ref) == 4
    for a, b in zip(got, ref, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in b)
    assert got_eval == ref_eval


@pytest.fixture
def float32_on_cuda() -> Iterator[None]:
    """Full float32 on CUDA. PyTorch runs cuDNN convolutions in TF32 (a 10-bit mantissa) by
    default; on an H200 that moved SCAFFOLD's control-variate update, which is in gradient
    units (the weight delta over K lr, here 100 times the delta), by up to 6e-4 on the
    vectorized engine, while every weight delta stayed within 1e-4 (TF32 is the likely
    cause: its unit roundoff is 4.9e-4)."""
    with full_float32():
        yield


@cuda
@pytest.mark.usefixtures("float32_on_cuda")
@pytest.mark.parametrize("engine", ["inline", "vectorized"])
@pytest.mark.parametrize(
    "term",
    [
        None,
        FedProx(mu=0.1),
        Scaffold(),
        FedNova(),
        QFFL(q=1.0),
        Ditto(lam=0.1),
        DpSgd(clip=1.0, noise_multiplier=0.5),
    ],
    ids=["fedavg", "fedprox", "scaffold", "fednova", "qffl", "ditto", "dp_sgd"],
)
def test_training_on_cuda_equals_cpu_within_float_tolerance(term: object, engine: str) -> None:
    ref, ref_eval = _replies(term, engine, "cpu")
    got, got_eval = _replies(term, engine, "cuda")
    assert len(got) == len(ref) == 4
    for a, b in zip(got, ref, strict=True):
        assert a.keys() == b.keys()
        for key in b:
            torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-4)
    assert got_eval == pytest.approx(ref_eval, rel=1e-5)


@cuda
@pytest.mark.usefixtures("float32_on_cuda")
@pytest.mark.parametrize("engine", ["inline", "vectorized", "auto"])
def test_a_run_on_cuda_ends_where_the_cpu_run_does(engine: str, tmp_path: Path) -> None:
    from potluck.orchestrator import resolve_engine, run_experiment

    def final(device: str) -> torch.Tensor:
        exp, _ = resolve_engine(digits(engine, device, str(tmp_path / device)).build())
        return run_experiment(exp, progress=False).weights

    torch.testing.assert_close(final("cuda"), final("cpu"), atol=1e-4, rtol=1e-4)


@no_cuda
def test_a_site_chooses_its_own_device(tmp_path: Path) -> None:
    from potluck.deployment import site_program

    config = digits("inline", "cpu", str(tmp_path)).to_dict()
    config["run"]["device"] = "cuda"  # the server's choice, not this site's
    program = site_program(config, 0)
    assert program.device == torch.device("cpu")
    result = CliRunner().invoke(
        app,
        [
            "client",
            "--server",
            "127.0.0.1:1",
            "--data",
            "federation",
            "--insecure",
            "--name",
            "site-0",
            "--device",
            "cuda",
            "--max-failures",
            "1",
        ],
    )
    assert result.exit_code != 0
    assert "sees no CUDA device" in " ".join(result.output.split())
