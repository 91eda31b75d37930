"""The curious server's capture: the chosen updates, decoded as the server sees them, with
the weights the client started from and what the server knows of its training."""

from __future__ import annotations

import pytest
import torch
from victims import (
    fedsgd_run,
    one_thread,  # noqa: F401  (autouse)
)

from potluck import Experiment
from potluck.attacks.capture import Capture, capture_updates
from potluck.orchestrator import run_experiment
from potluck.privacy.ledger import PrivacyBudget
from potluck.privacy.local import LocalGaussian
from potluck.updates.base import Cast, ClipNorm, KeepLocal


def test_keeps_the_chosen_clients_and_rounds_with_their_starting_weights() -> None:
    exp = fedsgd_run(rounds=3, n=4)
    result, capture = capture_updates(exp, clients=[1, 3], rounds=[1, 3])
    assert [(u.round, u.client) for u in capture.updates] == [(1, 1), (1, 3), (3, 1), (3, 3)]
    assert capture.cohorts == {1: [0, 1, 2, 3], 3: [0, 1, 2, 3]}
    first = capture.get(1, 1)
    program = exp.algorithm.client_program(exp.task, exp.federation, seed=exp.seed)
    torch.testing.assert_close(first.w_global, program.initial_weights())
    two_rounds = run_experiment(type(exp)(exp.task, exp.federation, exp.algorithm, 2))
    torch.testing.assert_close(capture.get(3, 3).w_global, two_rounds.weights)
    # FedSGD: the server's lr, not the client's; one full-batch step of rate 1
    assert (first.lr, first.num_steps, first.num_examples, first.full_batch) == (1.0, 1, 1, True)
    assert "train_loss" in first.scalars and not first.withheld
    assert result.weights.shape == first.delta.shape


def test_updates_are_decoded_as_the_server_sees_them() -> None:
    clip = ClipNorm(0.05)
    _, capture = capture_updates(fedsgd_run(transforms=(clip,)), rounds=[1])
    for u in capture.updates:
        assert float(u.delta.norm()) <= 0.05 * (1 + 1e-5)
        assert u.scalars["clip_norm_before"] > 0.05  # the client's report, decoded too
    _, kept = capture_updates(fedsgd_run(transforms=(KeepLocal(),)), clients=[0], rounds=[1])
    update = kept.get(0, 1)
    head = 64 * 10 + 10  # the MLP's last layer: zeros after the server's decode
    assert update.delta.shape == update.w_global.shape and not update.delta[-head:].any()


def test_local_dp_withholds_the_counts_and_the_server_guesses_them() -> None:
    ldp = LocalGaussian(clip=1.0, noise_multiplier=0.5)
    _, capture = capture_updates(fedsgd_run(transforms=(ldp,)), clients=[2], rounds=[1])
    update = capture.get(2, 1)
    assert update.withheld and (update.num_examples, update.num_steps) == (1, 1)
    assert set(update.scalars) == {"num_examples", "num_steps", "weight"}


def test_the_downlink_round_trip_gives_the_weights_the_client_received() -> None:
    exp = fedsgd_run(rounds=2, n=2, downlink=(Cast("bfloat16"),))
    _, capture = capture_updates(exp, clients=[0], rounds=[2])
    w = capture.get(0, 2).w_global
    assert w.dtype == torch.float32 and torch.equal(w, w.to(torch.bfloat16).float())


def test_a_replay_of_the_first_rounds_captures_the_runs_own_updates() -> None:
    exp = fedsgd_run(rounds=4, n=3)
    _, full = capture_updates(exp, clients=[1], rounds=[2])
    replay, short = capture_updates(exp, clients=[1], rounds=[2], through=2)
    assert len(replay.history) == 2
    assert torch.equal(full.get(1, 2).delta, short.get(1, 2).delta)
    with pytest.raises(ValueError, match=r"through must lie in 1\.\.4"):
        capture_updates(exp, through=5)


def test_a_replay_keeps_the_noise_calibrated_to_all_the_runs_rounds() -> None:
    ldp = LocalGaussian(clip=1.0, noise_multiplier=1.0)
    base = fedsgd_run(rounds=6, n=3, transforms=(ldp,))
    exp = Experiment(base.task, base.federation, base.algorithm, 6, privacy=PrivacyBudget(
        target_epsilon=8.0))  # fmt: skip
    _, full = capture_updates(exp, clients=[0], rounds=[2])
    _, short = capture_updates(exp, clients=[0], rounds=[2], through=2)
    assert torch.equal(full.get(0, 2).delta, short.get(0, 2).delta)


def test_clear_errors_for_what_was_not_captured() -> None:
    exp = fedsgd_run(rounds=2, n=3)
    with pytest.raises(ValueError, match=r"capture rounds \[3\] are after the run's last \(2\)"):
        Capture.of(exp, rounds=[2, 3])
    _, capture = capture_updates(exp, clients=[0], rounds=[2])
    with pytest.raises(LookupError, match="round 1 was not captured"):
        capture.get(0, 1)
    with pytest.raises(LookupError, match=r"client 2 was not captured \(captured: \[0\]\)"):
        capture.get(2, 2)
