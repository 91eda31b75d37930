"""The round loop end to end: determinism, learning, validation, kill-and-resume."""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from potluck import Experiment, Federation, Task, resume_experiment, run_experiment
from potluck.algorithms import fedavg
from potluck.cli import app
from potluck.client import Term
from potluck.config import ExperimentConfig
from potluck.core.message import Message, MessageError
from potluck.core.parts import Context, TermOutput
from potluck.orchestrator import TIMING_METRICS, Evaluation
from potluck.store.sqlite import RunBusyError, RunStore
from potluck.updates import Transform

DIGITS = {
    "rounds": 6,
    "data": {"dataset": "digits", "num_clients": 20, "partition": {"kind": "iid"}},
    "model": {"name": "mlp"},
    "sampler": {"clients_per_round": 5},
    "client": {"epochs": 2, "batch_size": 8, "lr": 0.1},
    "evaluation": {"federated_clients": 5},
}


def learning_metrics(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in m.items() if k not in TIMING_METRICS} for m in history]


def test_same_seed_same_metrics_different_seed_different() -> None:
    cfg = ExperimentConfig.from_dict(DIGITS)
    a = run_experiment(cfg.build())
    b = run_experiment(cfg.build())
    assert learning_metrics(a.history) == learning_metrics(b.history)
    assert torch.equal(a.weights, b.weights)
    c = run_experiment(ExperimentConfig.from_dict({**DIGITS, "seed": 1}).build())
    assert learning_metrics(c.history) != learning_metrics(a.history)


def test_fedavg_learns_digits_and_records_everything(tmp_path: Path) -> None:
    cfg = ExperimentConfig.from_dict({**DIGITS, "rounds": 12})
    store = RunStore(tmp_path)
    result = run_experiment(cfg.build(), store)
    # 12 rounds of FedAvg on digits with an MLP reach 0.89-0.90 over seeds 0-2; chance is 0.10
    assert result.final["test_accuracy"] > 0.85
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    rounds = store.rounds(result.run_id)
    assert [r.round for r in rounds] == list(range(1, 13))
    assert {
        "cohort_size",
        "train_loss",
        "bytes_up",
        "bytes_down",
        "test_accuracy",
        "fed_accuracy",
        "round_seconds",
    } <= set(rounds[-1].metrics)
    clients = store.client_metrics(result.run_id, round=1)
    trained = [c for _, c, m in clients if "num_examples" in m]
    evaluated = [c for _, c, m in clients if "eval_global_accuracy" in m]
    assert len(trained) == 5 and len(evaluated) == 5  # 5 sampled to train, 5 to evaluate
    info = store.get_run(result.run_id)
    assert info.status == "finished" and info.last_round == 12
    assert info.summary["test_accuracy"] == result.final["test_accuracy"]
    assert (info.run_dir / "report.html").exists() and (info.run_dir / "curves.svg").exists()
    last_round, ckpt = store.latest_checkpoint(result.run_id)
    assert last_round == 12 and torch.equal(ckpt.tensors["global"], result.weights)


def test_fedavg_with_full_participation_one_step_equals_fedsgd_math() -> None:
    """One local full-batch step with lr=eta and server lr 1 moves w by -eta * weighted grad."""
    g = torch.Generator().manual_seed(0)
    clients = [
        (torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g)) for n in (10, 30)
    ]
    fed = Federation.from_client_data(clients)
    task = Task(lambda: torch.nn.Linear(3, 2))
    algo = fedavg(clients_per_round=2, batch_size=None, lr=0.5)
    exp = Experiment(
        task,
        fed,
        replace(algo, local=replace(algo.local, max_steps=1)),
        rounds=1,
        evaluation=Evaluation(centralized=False),
    )
    result = run_experiment(exp)
    model = task.build_model()
    torch.manual_seed(0)
    from potluck.client import ClientProgram
    from potluck.core.params import ParamSpec

    w0 = ClientProgram(task, fed, algo).initial_weights()
    spec = ParamSpec.from_module(model)
    spec.load_into(model, w0)
    grads = []
    for x, y in clients:
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    expected = w0 - 0.5 * (10 * grads[0] + 30 * grads[1]) / 40
    torch.testing.assert_close(result.weights, expected)


@dataclass(frozen=True)
class PoisonClient(Transform):
    """A transform that turns client 3's update into NaN (a broken or malicious client)."""

    def encode(self, message: Message, state: dict, ctx: Context) -> tuple[Message, dict]:
        if ctx.client != 3:
            return message, state
        return replace(message, arrays={"delta": message.arrays["delta"] * math.nan}), state


def test_nan_update_is_refused_naming_the_client(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    clients = [
        (torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g)) for _ in range(5)
    ]
    exp = Experiment(
        Task(lambda: torch.nn.Linear(4, 3)),
        Federation.from_client_data(clients),
        fedavg(clients_per_round=5, transforms=(PoisonClient(),)),
        rounds=2,
        evaluation=Evaluation(centralized=False),
    )
    store = RunStore(tmp_path)
    with pytest.raises(MessageError, match="update from client 3: array 'delta' contains NaN"):
        run_experiment(exp, store)
    (info,) = store.list_runs()
    assert info.status == "failed" and info.last_round == 0


def _cli(*args: str, store: Path) -> list[str]:
    return [sys.executable, "-m", "potluck.cli", *args, "--store", str(store)]


def _committed_rounds(store: Path) -> int:
    db = store / "potluck.db"
    if not db.exists():
        return 0
    with sqlite3.connect(db) as conn:
        try:
            return conn.execute("SELECT COUNT(*) FROM rounds").fetchone()[0]
        except sqlite3.OperationalError:
            return 0


@pytest.mark.parametrize("checkpoint_every", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_sigkill_then_resume_equals_uninterrupted(tmp_path: Path, checkpoint_every: int) -> None:
    sets = [
        "--set",
        "rounds=8",
        "--set",
        'data.dataset="digits"',
        "--set",
        "data.num_clients=20",
        "--set",
        'model.name="mlp"',
        "--set",
        "sampler.clients_per_round=4",
        "--set",
        "client.batch_size=8",
        "--set",
        f"run.checkpoint_every={checkpoint_every}",
        "--set",
        "evaluation.federated_clients=4",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(_cli("run", *sets, store=clean), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(
        _cli("run", *sets, store=killed),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while _committed_rounds(killed) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _committed_rounds(killed) < 8, "the run finished before it could be killed"
    ((run_id, status),) = [(i.run_id, i.status) for i in RunStore(killed).list_runs()]
    assert status == "interrupted"  # not "running" forever
    listed = CliRunner().invoke(app, ["runs", "--store", str(killed)]).output
    assert "interrupted" in listed and "potluck resume" in listed
    subprocess.run(_cli("resume", run_id, store=killed), check=True, env=env, capture_output=True)

    a, b = RunStore(clean), RunStore(killed)
    ((ra,), (rb,)) = a.list_runs(), b.list_runs()
    assert rb.status == "finished" and rb.last_round == 8
    hist_a = learning_metrics([r.metrics for r in a.rounds(ra.run_id)])
    hist_b = learning_metrics([r.metrics for r in b.rounds(rb.run_id)])
    assert hist_a == hist_b
    assert torch.equal(
        a.latest_checkpoint(ra.run_id)[1].tensors["global"],
        b.latest_checkpoint(rb.run_id)[1].tensors["global"],
    )


def test_resume_in_process_after_interruption(tmp_path: Path) -> None:
    cfg = ExperimentConfig.from_dict({**DIGITS, "rounds": 4})
    full = run_experiment(cfg.build())

    class Stop(Exception):
        pass

    def stop_after_two(rnd: int, _metrics: object) -> None:
        if rnd == 2:
            raise Stop

    store = RunStore(tmp_path)
    with pytest.raises(Stop):
        run_experiment(cfg.build(), store, on_round=stop_after_two)
    (info,) = store.list_runs()
    assert info.status == "failed" and info.last_round == 2
    resumed = resume_experiment(cfg.build(), store, info.run_id)
    assert learning_metrics(resumed.history) == learning_metrics(full.history)
    assert torch.equal(resumed.weights, full.weights)


class DropoutMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(64, 32), torch.nn.Dropout(0.2), torch.nn.Linear(32, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_an_engine_refusal_happens_before_anything_is_stored(tmp_path: Path) -> None:
    cfg = ExperimentConfig.from_dict(
        {
            **DIGITS,
            "task": {"model": "test_orchestrator:DropoutMLP"},
            "run": {"engine": "vectorized"},
        }
    )
    store = RunStore(tmp_path)
    with pytest.raises(ValueError, match="inline"):
        run_experiment(cfg.build(), store)
    assert store.list_runs() == []


def test_a_bfloat16_downlink_halves_the_bytes_down_and_still_learns() -> None:
    full = run_experiment(ExperimentConfig.from_dict({**DIGITS, "rounds": 4}).build())
    cast = {**DIGITS, "rounds": 4, "downlink": [{"name": "cast", "dtype": "bfloat16"}]}
    half = run_experiment(ExperimentConfig.from_dict(cast).build())
    for f, h in zip(full.history, half.history, strict=True):
        # half the weights' bytes; the framing (names, dtypes, shapes) is not halved
        framing = 2 * h["bytes_down"] - f["bytes_down"]
        assert 0 < framing < 200 * h["cohort_size"] and h["bytes_up"] == f["bytes_up"]
    assert not torch.equal(full.weights, half.weights)  # clients trained from rounded weights
    # and learn as well: the rounding is 2^-8 relative (here the accuracies are equal)
    assert half.final["test_accuracy"] == pytest.approx(full.final["test_accuracy"], abs=0.02)
    assert half.final["test_accuracy"] > 2 * half.history[0]["test_accuracy"]


class TupleNet(torch.nn.Module):
    """Returns (logits, hidden) like an LSTM: training could not use it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc(x), x


@pytest.mark.parametrize(
    ("model", "labels", "error", "words"),
    [
        (TupleNet, 3, TypeError, ("client 0", "return the logits tensor only")),
        (lambda: torch.nn.Linear(4, 3), 5, ValueError, ("3 outputs", "at least 5 outputs")),
    ],
)
def test_a_task_that_cannot_train_is_refused_before_anything_is_stored(
    tmp_path: Path, model: object, labels: int, error: type, words: tuple[str, ...]
) -> None:
    g = torch.Generator().manual_seed(0)
    clients = [(torch.randn(10, 4, generator=g), torch.arange(10) % labels) for _ in range(3)]
    exp = Experiment(
        Task(model),  # type: ignore[arg-type]
        Federation.from_client_data(clients),
        fedavg(clients_per_round=2),
        rounds=1,
    )
    store = RunStore(tmp_path)
    with pytest.raises(error) as info:
        run_experiment(exp, store)
    for word in words:
        assert word in str(info.value)
    assert store.list_runs() == []


@dataclass(frozen=True)
class Weightless(Term):
    """A term that gives every update aggregation weight 0 (as a hostile client could)."""

    def finish(self, client: object, result: object, work: dict) -> TermOutput:
        return TermOutput(weight=0.0)


def test_updates_of_total_weight_zero_leave_the_model_where_it_was(
    caplog: pytest.LogCaptureFixture,
) -> None:
    exp = ExperimentConfig.from_dict({**DIGITS, "rounds": 2}).build()
    exp = replace(exp, algorithm=replace(exp.algorithm, terms=(Weightless(),)), config=None)
    start = exp.algorithm.client_program(exp.task, exp.federation, seed=exp.seed)
    result = run_experiment(exp)
    assert torch.equal(result.weights, start.initial_weights())
    assert [m["updates"] for m in result.history] == [5.0, 5.0]
    assert "the model is not moved" in caplog.text


@dataclass(frozen=True)
class Huge(Term):
    """One client's update is finite but enormous, and it claims an enormous weight."""

    target: int = 0

    def finish(self, client: Any, result: Any, work: dict) -> TermOutput:
        if client.ctx.client != self.target:
            return TermOutput()
        return TermOutput(delta=result.delta / result.delta.abs().max() * 3e38, weight=1e12)


def _digits_with(**deploy: float) -> tuple[Experiment, int]:
    """DIGITS for 3 rounds with ``Huge`` on a client sampled in round 1 (server lr 2)."""
    cfg = ExperimentConfig.from_dict(
        {**DIGITS, "rounds": 3, "deploy": deploy, "server": {"name": "sgd", "lr": 2.0}}
    )
    exp = cfg.build()
    target = int(exp.algorithm.sampler.sample(20, {}, Context(exp.seed, 1, ("sampling", 1)))[0][0])
    algorithm = replace(exp.algorithm, terms=(Huge(target),))
    return replace(exp, algorithm=algorithm, config=None), target


def test_server_bounds_refuse_an_enormous_update_and_weight() -> None:
    bounded, target = _digits_with(max_update_norm=1e3, max_weight=1e6)
    with pytest.raises(
        MessageError, match=rf"client {target}: 'delta' has L2 norm 1.879\d*e\+39, above"
    ):
        run_experiment(bounded)
    weight_only, target = _digits_with(max_weight=1e6)
    with pytest.raises(MessageError, match=rf"client {target}: aggregation weight 1e\+12 is"):
        run_experiment(weight_only)


def test_a_round_whose_model_would_not_be_finite_is_not_applied(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Finite, the enormous update overflows float32 in the new model (server lr 2)."""
    exp, _ = _digits_with()
    start = exp.algorithm.client_program(exp.task, exp.federation, seed=exp.seed)
    result = run_experiment(exp)
    assert bool(torch.isfinite(result.weights).all())
    assert "round 1: the new global model would hold NaN or Inf" in caplog.text
    assert not torch.equal(result.weights, start.initial_weights())  # later rounds went on


def test_resuming_a_run_that_is_still_executing_is_refused(tmp_path: Path) -> None:
    """Another process holds the run (it is executing there): resuming it here is refused
    before anything is touched, from Python and from the CLI."""
    cfg = ExperimentConfig.from_dict({**DIGITS, "rounds": 2})
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg.build(), tmp_path, on_round=_interrupt_after(1))
    (info,) = RunStore(tmp_path).list_runs()
    holder = "import sys, time; from potluck.store.sqlite import RunStore\n"
    holder += "RunStore(sys.argv[1]).hold(sys.argv[2]); print('held', flush=True); time.sleep(120)"
    proc = subprocess.Popen(
        [sys.executable, "-c", holder, str(tmp_path), info.run_id], stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"held"
        with pytest.raises(RunBusyError, match=f"still executing \\(pid {proc.pid}"):
            resume_experiment(cfg.build(), tmp_path, info.run_id)
        out = CliRunner().invoke(app, ["resume", info.run_id, "--store", str(tmp_path)])
        assert out.exit_code != 0 and "still executing" in out.output
        assert RunStore(tmp_path).get_run(info.run_id).last_round == 1  # nothing touched
    finally:
        proc.kill()
        proc.wait()
    resume_experiment(cfg.build(), tmp_path, info.run_id)  # its process is gone
    after = RunStore(tmp_path).get_run(info.run_id)
    assert after.status == "finished" and after.last_round == 2


def _interrupt_after(rounds: int) -> Any:
    def stop(rnd: int, metrics: dict[str, float]) -> None:
        if rnd == rounds:
            raise KeyboardInterrupt

    return stop
