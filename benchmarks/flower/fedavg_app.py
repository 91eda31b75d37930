"""Flower 1.42 side of ``benchmarks/compare_flower.py``: FedAvg in Flower's Ray simulation on
the clients, cohorts and initial weights that the driver exported from potluck.

Runs in Flower's own virtual environment (``scripts/setup_flower.sh``), not potluck's; it
imports neither potluck nor scikit-learn. The driver writes a data directory with:

- ``x_train.npy``, ``y_train.npy``, ``x_test.npy``, ``y_test.npy``: potluck's arrays (float32
  features exactly as potluck feeds them, int64 labels);
- ``client_indices.npy`` + ``client_offsets.npy``: client ``c`` trains on rows
  ``client_indices[client_offsets[c]:client_offsets[c + 1]]`` of the train arrays, in
  potluck's order;
- ``cohorts.npy``: ``(rounds, k)`` potluck's cohort of every round;
- ``init.npz``: potluck's round-0 weights by parameter name (a strict ``load_state_dict``);
- ``spec.json``: model, epochs, batch size, lr, rounds, clients, evaluation batch.

The ServerApp runs Flower's ``FedAvg`` (weighted by ``num-examples``; federated evaluation
off, centralised evaluation of the test set each round through ``evaluate_fn``), choosing
nodes with Flower's own ``sample_nodes`` and telling node ``i`` of the sample to train
potluck's cohort member ``i`` (``cid`` in its config). ClientApps run plain PyTorch
(``torch.optim.SGD``, one torch thread): ``epochs`` passes, each a ``torch.randperm`` cut into
batches (the last one shorter), the same schedule as potluck's ``batch_order``; the
permutations come from a generator of their own, so batch order differs from potluck's.

Usage (run by the driver inside a network namespace with only loopback up):
    PYTHONPATH=benchmarks/flower FLWR_TELEMETRY_ENABLED=0 \\
        .venv-flower/bin/python benchmarks/flower/fedavg_app.py --data DIR --out RESULT.json

It prints one line ``FLOWER_RESULT {json}`` and writes the same JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable
from functools import cache
from math import prod
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from torch import nn

DATA_ENV = "POTLUCK_FLOWER_DATA"  # inherited by Ray's raylet and workers
SERVER_RESULT = "flower_server_result.json"  # written by the ServerApp, read by main()


# -- the models: exact copies of potluck.models.zoo (same module tree, so same names) ------


def _conv_stack(channels: int, widths: tuple[int, int]) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, widths[0], 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(widths[0], widths[1], 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
    )


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """potluck's ``logreg``, ``mlp`` (hidden 64), ``mlp2nn`` (McMahan's 2NN) or ``small_cnn``."""
    if name == "logreg":
        return nn.Sequential(nn.Flatten(), nn.Linear(prod(input_shape), num_classes))
    if name == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(prod(input_shape), 64), nn.ReLU(), nn.Linear(64, num_classes)
        )
    if name == "mlp2nn":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(prod(input_shape), 200),
            nn.ReLU(),
            nn.Linear(200, 200),
            nn.ReLU(),
            nn.Linear(200, num_classes),
        )
    if name == "small_cnn":
        c, h, w = input_shape
        return nn.Sequential(
            _conv_stack(c, (8, 16)),
            nn.Linear(16 * (h // 4) * (w // 4), 32),
            nn.ReLU(),
            nn.Linear(32, num_classes),
        )
    raise ValueError(f"no Flower copy of potluck model {name!r}")


# -- data (cached per process: a Ray actor serves many clients) ----------------------------


def data_dir() -> Path:
    return Path(os.environ[DATA_ENV])


@cache
def spec() -> dict[str, Any]:
    return json.loads((data_dir() / "spec.json").read_text())


@cache
def arrays(name: str) -> np.ndarray:
    """One exported array; the train features memory-mapped (one copy in the page cache,
    shared by every Ray worker), the rest read into memory."""
    return np.load(data_dir() / f"{name}.npy", mmap_mode="r" if name == "x_train" else None)


def client_data(cid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Client ``cid``'s train examples (a copy of its rows), as potluck gives them."""
    lo, hi = (int(v) for v in arrays("client_offsets")[cid : cid + 2])
    idx = np.asarray(arrays("client_indices")[lo:hi])
    x = np.ascontiguousarray(arrays("x_train")[idx])
    y = np.ascontiguousarray(arrays("y_train")[idx])
    return torch.from_numpy(x), torch.from_numpy(y)


def make_net() -> nn.Module:
    s = spec()
    return build_model(s["model"], tuple(s["input_shape"]), int(s["num_classes"]))


# -- ClientApp ------------------------------------------------------------------------------

client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """``epochs`` of mini-batch SGD on the client named in the config; weights back."""
    torch.set_num_threads(1)
    s, config = spec(), msg.content["config"]
    cid, rnd = int(config["cid"]), int(config["server-round"])
    x, y = client_data(cid)
    net = make_net()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=float(config["lr"]))
    gen = torch.Generator().manual_seed(int(s["seed"]) * 1_000_003 + rnd * 100_003 + cid)
    n = len(y)
    b = min(int(s["batch_size"]), n)
    loss_sum = 0.0
    for _ in range(int(s["epochs"])):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, b):
            idx = order[start : start + b]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
    metrics = MetricRecord({"train_loss": loss_sum / (n * int(s["epochs"])), "num-examples": n})
    content = RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


# -- ServerApp ------------------------------------------------------------------------------

server_app = ServerApp()
EVAL_SECONDS: dict[int, float] = {}
EVAL_DONE: dict[int, float] = {}  # perf_counter when round r's evaluation ended
TRAIN_REPLIES: dict[int, dict[str, int]] = {}  # per round: answers, errors, examples trained


class CohortFedAvg(FedAvg):
    """Flower's FedAvg, its sampled nodes told to train potluck's cohort of the round."""

    def __init__(self, cohorts: np.ndarray, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cohorts = cohorts

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        cohort = self.cohorts[server_round - 1]
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, len(cohort))
        messages = []
        for node_id, cid in zip(node_ids, cohort, strict=True):
            cfg = ConfigRecord({**config, "server-round": server_round, "cid": int(cid)})
            messages.append(
                Message(
                    content=RecordDict({"arrays": arrays, "config": cfg}),
                    message_type=MessageType.TRAIN,
                    dst_node_id=node_id,
                )
            )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's aggregation, counting the answers first (the driver checks that every
        member answered and trained all of its examples)."""
        replies = list(replies)
        good = [m for m in replies if not m.has_error()]
        TRAIN_REPLIES[server_round] = {
            "answers": len(good),
            "errors": len(replies) - len(good),
            "examples": sum(int(m.content["metrics"]["num-examples"]) for m in good),
        }
        return super().aggregate_train(server_round, replies)


def central_eval(server_round: int, record: ArrayRecord) -> MetricRecord:
    """Loss and accuracy of the global model on the whole test set (batches of 256)."""
    t0 = time.perf_counter()
    net = make_net()
    net.load_state_dict(record.to_torch_state_dict())
    net.eval()
    x_all, y_all = arrays("x_test"), arrays("y_test")
    batch, loss_sum, correct = int(spec()["eval_batch"]), 0.0, 0
    with torch.no_grad():
        for start in range(0, len(y_all), batch):
            x = torch.from_numpy(x_all[start : start + batch])
            y = torch.from_numpy(y_all[start : start + batch])
            logits = net(x)
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    n = len(y_all)
    EVAL_DONE[server_round] = time.perf_counter()
    EVAL_SECONDS[server_round] = EVAL_DONE[server_round] - t0
    return MetricRecord({"loss": loss_sum / n, "accuracy": correct / n})


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    s = spec()
    cohorts = np.load(data_dir() / "cohorts.npy")
    n, k = int(s["num_clients"]), int(cohorts.shape[1])
    init = np.load(data_dir() / "init.npz")
    initial = ArrayRecord({name: torch.from_numpy(init[name]) for name in init.files})
    strategy = CohortFedAvg(
        cohorts,
        fraction_train=k / n,
        fraction_evaluate=0.0,
        min_train_nodes=k,
        min_evaluate_nodes=0,
        min_available_nodes=n,
    )
    t0, start_epoch = time.perf_counter(), time.time()
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        train_config=ConfigRecord({"lr": float(s["lr"])}),
        num_rounds=int(s["rounds"]),
        evaluate_fn=central_eval,
    )
    strategy_s, end_epoch = time.perf_counter() - t0, time.time()
    history = result.evaluate_metrics_serverapp
    rounds = int(s["rounds"])
    server = dict(
        strategy_start_s=strategy_s,
        strategy_start_epoch=start_epoch,
        strategy_end_epoch=end_epoch,
        train_replies=[TRAIN_REPLIES.get(r, {}) for r in range(1, rounds + 1)],
        round0_eval_s=EVAL_SECONDS.get(0, 0.0),
        eval_seconds=[EVAL_SECONDS.get(r, 0.0) for r in range(rounds + 1)],
        round_seconds=[EVAL_DONE[r] - EVAL_DONE[r - 1] for r in range(1, rounds + 1)],
        test_accuracy=[float(history[r]["accuracy"]) for r in range(rounds + 1)],
        test_loss=[float(history[r]["loss"]) for r in range(rounds + 1)],
        final_test_accuracy=float(history[rounds]["accuracy"]),
        final_test_loss=float(history[rounds]["loss"]),
    )
    (data_dir() / SERVER_RESULT).write_text(json.dumps(server))


def main() -> None:
    from flwr.simulation import run_simulation

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="directory exported by the driver")
    parser.add_argument("--out", required=True, help="write the result JSON here")
    parser.add_argument("--cpus", type=int, default=1, help="Ray CPUs (= concurrent clients)")
    args = parser.parse_args()
    os.environ[DATA_ENV] = str(Path(args.data).resolve())
    here = str(Path(__file__).resolve().parent)  # Ray workers import this module by name
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    torch.set_num_threads(1)  # the ServerApp's centralised evaluation
    t0 = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=int(spec()["num_clients"]),
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": args.cpus, "include_dashboard": False},
        },
    )
    result = json.loads((data_dir() / SERVER_RESULT).read_text())
    result.update(run_simulation_s=time.perf_counter() - t0, ray_cpus=args.cpus)
    line = json.dumps(result)
    Path(args.out).write_text(line + "\n")
    print(f"FLOWER_RESULT {line}", flush=True)


if __name__ == "__main__":
    # run the apps from the module imported by name, so Ray pickles them by reference
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import fedavg_app

    fedavg_app.main()
