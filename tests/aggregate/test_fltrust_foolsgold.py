"""FLTrust and FoolsGold: each equals a plain per-client reference (loops and NumPy) on random
stacks and is permutation invariant; FLTrust gives an update pointing away from the
server's no trust and rescales every update to the server's norm, and refuses a missing or
ill-shaped root update; FoolsGold gives sybils repeating one direction no weight, through a
history of each client's updates kept as server state; in whole runs both build from a
config and the CLI, the engines agree, and a resumed FoolsGold run equals an uninterrupted
one."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from potluck.aggregate import FLTrust, FoolsGold
from potluck.aggregate.fltrust import trust_scores
from potluck.aggregate.foolsgold import foolsgold_weights
from potluck.cli import app
from potluck.config import ExperimentConfig
from potluck.core.message import Message
from potluck.core.parts import Context, part_context
from potluck.engines import available_engines
from potluck.orchestrator import RunResult, resume_experiment, run_experiment
from potluck.store.sqlite import RunStore

FAST = settings(max_examples=25, deadline=None, derandomize=True)
seeds = st.integers(0, 2**32 - 1)


def stack(seed: int, k: int, d: int) -> np.ndarray:
    """Rows from a few scales (float32 values, as float64)."""
    rng = np.random.default_rng(seed)
    scales = rng.choice([0.1, 1.0, 10.0], size=(k, 1))
    return (rng.normal(size=(k, d)) * scales).astype(np.float32).astype(np.float64)


def t32(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x.astype(np.float32))


def close(got: torch.Tensor | np.ndarray, want: np.ndarray, scale: np.ndarray) -> None:
    got = got.double().numpy() if isinstance(got, torch.Tensor) else got
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * (1 + np.abs(scale).max()))


# ---- FLTrust ------------------------------------------------------------------------------


def root_ctx(root: torch.Tensor | None) -> Context:
    inbox = None if root is None else Message({"root_delta": root})
    return part_context(0, 1, "aggregator", inbox=inbox)


def fltrust(x: np.ndarray, root: np.ndarray) -> torch.Tensor:
    deltas = t32(x)
    return FLTrust().aggregate(deltas, torch.ones(len(x)), {}, root_ctx(t32(root)))[0]


def ref_fltrust(x: np.ndarray, g0: np.ndarray) -> tuple[np.ndarray, list[float]]:
    scores, total, out = [], 0.0, np.zeros(x.shape[1])
    for g in x:
        norms = np.linalg.norm(g) * np.linalg.norm(g0)
        ts = max(0.0, float(g @ g0) / norms) if norms > 0 else 0.0
        scores.append(ts)
        if ts > 0:
            out += ts * np.linalg.norm(g0) / np.linalg.norm(g) * g
            total += ts
    return (out / total if total > 0 else out), scores


@FAST
@given(seed=seeds, k=st.integers(1, 12), d=st.integers(1, 8))
def test_fltrust_equals_its_reference_and_is_permutation_invariant(
    seed: int, k: int, d: int
) -> None:
    x, root = stack(seed, k, d), stack(seed + 1, 1, d)[0]
    want, scores = ref_fltrust(x, root)
    got = fltrust(x, root)
    close(got, want, x)
    close(trust_scores(t32(x), t32(root)), np.array(scores), np.ones(1))
    perm = np.random.default_rng(seed).permutation(k)
    close(fltrust(x[perm], root), got.double().numpy(), x)


def test_fltrust_gives_a_sign_flipped_update_no_trust_and_rescales_a_scaled_one() -> None:
    honest, root = stack(3, 6, 20), stack(4, 1, 20)[0]
    honest = honest * np.sign(honest @ root)[:, None]  # all within 90 degrees of the root
    flipped = np.vstack([honest, -50 * honest[0]])
    assert float(trust_scores(t32(flipped), t32(root))[-1]) == 0.0
    torch.testing.assert_close(fltrust(flipped, root), fltrust(honest, root))
    scaled = np.vstack([honest, 1000 * honest[1]])  # as much as one more honest copy
    torch.testing.assert_close(fltrust(scaled, root), fltrust(np.vstack([honest, honest[1]]), root))
    norm = np.linalg.norm(root)
    assert np.linalg.norm(fltrust(honest[:1] * 1e4, root).numpy()) == pytest.approx(norm, 1e-5)


def test_fltrust_without_any_trusted_update_does_not_move() -> None:
    root = stack(5, 1, 10)[0]
    away = np.vstack([-root, -2 * root, np.zeros(10)])
    assert torch.equal(fltrust(away, root), torch.zeros(10))
    assert torch.equal(fltrust(stack(6, 3, 10), np.zeros(10)), torch.zeros(10))


@pytest.mark.parametrize(
    ("root", "message"),
    [
        (None, "needs the server's update on its root data, ctx.inbox.arrays['root_delta']"),
        (torch.zeros(3), "root_delta must be a floating (d,) = (4,) tensor like each update, "),
        (torch.zeros(2, 4), "got torch.float32 of shape (2, 4)"),
        (torch.zeros(4, dtype=torch.int64), "got torch.int64 of shape (4,)"),
        (torch.tensor([0.0, float("nan"), 0.0, 0.0]), "root_delta holds NaN or Inf"),
    ],
)
def test_fltrust_refuses_a_missing_or_bad_root_update(
    root: torch.Tensor | None, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        FLTrust().aggregate(torch.ones(2, 4), torch.ones(2), {}, root_ctx(root))
    with pytest.raises(ValueError, match="root_examples must be an int >= 1, got 0"):
        FLTrust(root_examples=0)


# ---- FoolsGold ----------------------------------------------------------------------------


def fg_ctx(members: list[int], num_clients: int) -> Context:
    return part_context(0, 1, "aggregator", num_clients=num_clients, members=tuple(members))


def foolsgold(
    agg: FoolsGold, x: np.ndarray, members: list[int], state: dict[str, torch.Tensor], n: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return agg.aggregate(t32(x), torch.ones(len(x)), state, fg_ctx(members, n))


def ref_weights(h: np.ndarray, kappa: float) -> tuple[np.ndarray, float]:
    """Algorithm 1 with the reference code's ``cs - I``, and the largest weight before the
    rescale (the rescale amplifies rounding as it nears 0)."""
    k = len(h)
    cs = np.zeros((k, k))
    for i in range(k):
        for j in range(k):
            norms = np.linalg.norm(h[i]) * np.linalg.norm(h[j])
            if i != j and norms > 0:
                cs[i, j] = h[i] @ h[j] / norms
    v = cs.max(axis=1)
    for i in range(k):
        for j in range(k):
            if i != j and v[j] > v[i]:
                cs[i, j] *= v[i] / v[j]
    alpha = np.clip(1 - cs.max(axis=1), 0, 1)
    top = alpha.max()
    out = []
    for a in alpha / top:
        a = 0.99 if a == 1 else a
        out.append(0.0 if a == 0 else float(np.clip(kappa * (np.log(a / (1 - a)) + 0.5), 0, 1)))
    return np.array(out), top


@FAST
@given(
    seed=seeds,
    n=st.integers(2, 10),
    d=st.integers(2, 8),
    rounds=st.integers(1, 3),
    kappa=st.sampled_from([0.5, 1.0, 2.0]),
)
def test_foolsgold_equals_its_reference_over_rounds_and_is_permutation_invariant(
    seed: int, n: int, d: int, rounds: int, kappa: float
) -> None:
    rng = np.random.default_rng(seed)
    agg, state, history = FoolsGold(kappa=kappa), {}, np.zeros((n, d))
    for r in range(rounds):
        members = sorted(rng.choice(n, size=rng.integers(1, n + 1), replace=False).tolist())
        x = stack(seed + r, len(members), d)
        history[members] += x
        alpha, top = ref_weights(history[members], kappa)
        assume(top > 0.05)
        got, new_state = foolsgold(agg, x, members, state, n)
        close(got, alpha @ x / alpha.sum(), x)
        perm = rng.permutation(len(members))
        shuffled, shuffled_state = foolsgold(agg, x[perm], [members[i] for i in perm], state, n)
        close(shuffled, got.double().numpy(), x)
        for name in ("clients", "history"):
            assert torch.equal(shuffled_state[name], new_state[name])
        state = new_state
    seen = np.flatnonzero(np.abs(history).sum(axis=1) > 0)
    assert state["clients"].tolist() == seen.tolist()
    close(state["history"], history[seen], history)


def test_foolsgold_gives_sybils_no_weight_and_keeps_honest_clients() -> None:
    """Ten honest clients with diverse updates, four sybils repeating one poisoned direction
    (with a little noise) for three rounds."""
    rng = np.random.default_rng(0)
    poison = rng.normal(size=200) * 3
    agg, state, n = FoolsGold(), {}, 14
    for _ in range(3):
        honest = rng.normal(size=(10, 200))
        sybils = poison + 0.05 * rng.normal(size=(4, 200))
        x = np.vstack([honest, sybils])
        got, state = foolsgold(agg, x, list(range(n)), state, n)
    alpha = foolsgold_weights(state["history"], 1.0)
    assert alpha[10:].max() == 0.0 and alpha[:10].min() > 0.9
    close(got, (alpha[:10].numpy() @ honest) / float(alpha[:10].sum()), x)


def test_foolsgold_remembers_sybils_through_its_state() -> None:
    """Sybils that repeated one direction in the first round and then send mostly noise stay
    without weight under the kept history; from a fresh state the noise hides them."""
    rng = np.random.default_rng(1)
    poison = rng.normal(size=100) * 3
    agg, n, members = FoolsGold(), 9, list(range(9))
    first = np.vstack([rng.normal(size=(6, 100)), np.tile(poison, (3, 1))])
    _, state = foolsgold(agg, first, members, {}, n)
    second = np.vstack([rng.normal(size=(6, 100)), rng.normal(size=(3, 100))])
    kept = state["history"].clone()
    _, later = foolsgold(agg, second, members, state, n)
    assert torch.equal(state["history"], kept)  # the state passed in is left as it was
    close(later["history"], first + second, first)
    assert foolsgold_weights(later["history"])[6:].max() == 0.0
    assert foolsgold_weights(t32(second))[6:].min() > 0.5


def test_foolsgold_keeps_one_row_per_client_seen_within_its_bound() -> None:
    agg = FoolsGold(max_history_bytes=3 * 10 * 4)
    _, state = foolsgold(agg, stack(0, 2, 10), [7, 2], {}, 50)
    _, state = foolsgold(agg, stack(1, 2, 10), [2, 30], state, 50)
    assert state["clients"].tolist() == [2, 7, 30] and state["history"].shape == (3, 10)
    with pytest.raises(ValueError) as err:
        foolsgold(agg, stack(2, 1, 10), [4], state, 50)
    assert str(err.value) == (
        "aggregator (FoolsGold): the history of 4 clients' updates of 10 parameters takes 160 "
        "bytes, over max_history_bytes = 120 (at most 2000 for all 50): raise "
        "max_history_bytes or federate fewer clients"
    )


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([], r"needs the client of each of the 2 updates in ctx.members, got 0 ids"),
        ([1, 1], r"ctx.members repeats a client: \(1, 1\)"),
        ([0, 5], r"ctx.members must be clients 0..4, got \(0, 5\)"),
    ],
)
def test_foolsgold_refuses_updates_without_their_clients(members: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        foolsgold(FoolsGold(), stack(0, 2, 3), members, {}, 5)


# ---- whole runs ---------------------------------------------------------------------------

BASE: dict[str, Any] = {
    "data": {"dataset": "digits", "num_clients": 20, "partition": {"kind": "dirichlet"}},
    "model": {"name": "mlp"},
    "sampler": {"clients_per_round": 8},
    "client": {"epochs": 1, "batch_size": 16, "lr": 0.1},
    "evaluation": {"federated_clients": 0},
}
AGGREGATORS = {
    "fltrust": {"name": "fltrust", "root_examples": 50},
    "foolsgold": {"name": "foolsgold"},
}


def config(name: str, engine: str = "inline") -> ExperimentConfig:
    run = {"engine": engine, "threads": 1}
    return ExperimentConfig.from_dict(
        {**BASE, "rounds": 3, "run": run, "aggregator": AGGREGATORS[name]}
    )


@cache
def whole_run(name: str, engine: str) -> RunResult:
    return run_experiment(config(name, engine).build())


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_each_runs_from_a_toml_file_with_the_cli(tmp_path: Path, name: str) -> None:
    settings = "\n".join(f"{k} = {v!r}" for k, v in AGGREGATORS[name].items())
    exp = tmp_path / "robust.toml"
    exp.write_text(
        "rounds = 2\n[data]\ndataset = 'digits'\nnum_clients = 10\n[model]\nname = 'mlp'\n"
        f"[sampler]\nclients_per_round = 6\n[aggregator]\n{settings}\n[run]\nthreads = 1\n"
    )
    result = CliRunner().invoke(app, ["run", str(exp), "--store", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert "round 2" in result.output and "done run" in result.output
    (info,) = RunStore(tmp_path / "runs").list_runs()
    assert info.config["aggregator"] == {**config(name).aggregator, **AGGREGATORS[name]}


@pytest.mark.skipif("vectorized" not in available_engines(), reason="no vectorized engine")
@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_the_inline_and_vectorized_engines_agree(name: str) -> None:
    ref, got = whole_run(name, "inline"), whole_run(name, "vectorized")
    assert ref.history[0]["test_loss"] != ref.history[-1]["test_loss"]  # the model moves
    torch.testing.assert_close(got.weights, ref.weights, atol=1e-5, rtol=1e-5)


def test_a_resumed_foolsgold_run_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    """The histories are checkpointed with the round: stopped after round 2 and resumed,
    the run ends where the uninterrupted one does."""

    class Stop(Exception):
        pass

    def stop_after_two(rnd: int, _metrics: object) -> None:
        if rnd == 2:
            raise Stop

    store = RunStore(tmp_path)
    with pytest.raises(Stop):
        run_experiment(config("foolsgold").build(), store, on_round=stop_after_two)
    (info,) = store.list_runs()
    found = store.latest_checkpoint(info.run_id)
    assert found is not None and found[0] == 2
    clients, history = (
        found[1].tensors["aggregator/clients"],
        found[1].tensors["aggregator/history"],
    )
    assert 8 <= clients.numel() <= 16 and history.shape[0] == clients.numel()
    resumed = resume_experiment(ExperimentConfig.from_dict(info.config).build(), store, info.run_id)
    assert torch.equal(resumed.weights, whole_run("foolsgold", "inline").weights)
