"""Small victims for the attack tests: clients holding a few 8x8 digits, an MLP; and
``one_thread``, an autouse fixture for the modules that import it (torch's tiny kernels
run 20x slower with two threads on a machine that is busy elsewhere)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from potluck import Experiment, Task
from potluck.algorithms import fedsgd
from potluck.data import Federation
from potluck.data.sources import load_source
from potluck.models.zoo import build_model

DIGITS = load_source("digits")


def mlp() -> torch.nn.Module:
    return build_model("mlp", input_shape=(64,), num_classes=10)


TASK = Task(mlp, name="digits-mlp")


def digit_clients(n: int = 8, each: int = 1) -> Federation:
    """``n`` clients of ``each`` examples: client ``i`` holds the digits training set's
    examples ``i * each`` to ``(i + 1) * each - 1``."""
    x, y = DIGITS.train.x[: n * each], DIGITS.train.y[: n * each]
    clients = [(x[i * each : (i + 1) * each], y[i * each : (i + 1) * each]) for i in range(n)]
    return Federation.from_client_data(clients, test=(DIGITS.test.x, DIGITS.test.y), num_classes=10)


def fedsgd_run(rounds: int = 1, n: int = 8, **algorithm: Any) -> Experiment:
    """FedSGD over ``digit_clients(n)``, every client in every round."""
    algo = fedsgd(clients_per_round=n, lr=0.1, **algorithm)
    return Experiment(TASK, digit_clients(n), algo, rounds)


def mean_image_psnr(index: int) -> float:
    """The PSNR of the digits' mean image against example ``index``: what an attacker
    gets without looking at the update."""
    from potluck.attacks.metrics import psnr

    x = torch.from_numpy(DIGITS.train.x).reshape(-1, 1, 8, 8).double()
    mean = x.mean(0, keepdim=True)
    return psnr(mean, x[index : index + 1], 1.0)


def example(index: int, count: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Examples ``index`` to ``index + count - 1`` of the digits training set."""
    x = np.ascontiguousarray(DIGITS.train.x[index : index + count])
    return torch.from_numpy(x), torch.from_numpy(DIGITS.train.y[index : index + count])


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
