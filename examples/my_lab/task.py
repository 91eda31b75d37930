"""A user's own model and federation, named by import path so that a run started from
Python can be resumed from the command line and deployed (``[task] model = ...``,
``[data] federation = ...``).

Example:
    >>> fed = hospitals()
    >>> fed.num_clients, fed.source.input_shape
    (6, (30,))
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer
from torch import nn

from potluck import Federation


class TumourNet(nn.Module):
    """A small MLP for the 30 features of scikit-learn's breast-cancer set."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def hospitals() -> Federation:
    """Six "hospitals", each with a slice of the breast-cancer set and its own test set."""
    x, y = load_breast_cancer(return_X_y=True)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    site = np.arange(len(y)) % 6
    parts = [(x[site == s], y[site == s]) for s in range(6)]
    train = [(px[: len(px) * 3 // 4], py[: len(py) * 3 // 4]) for px, py in parts]
    test = [(px[len(px) * 3 // 4 :], py[len(py) * 3 // 4 :]) for px, py in parts]
    return Federation.from_client_data(train, client_tests=test)
