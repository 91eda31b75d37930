"""Run inside a network namespace by test_ray.py (not a test module itself).

Connects to the Ray head at ``sys.argv[1]`` and prints one JSON line: the inline and Ray
runs of the same SCAFFOLD experiment, and what a failing client on Ray raises.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

from potluck.algorithms import Algorithm
from potluck.client import ClientProgram, LocalSGD
from potluck.config import ExperimentConfig
from potluck.core.message import Message
from potluck.core.records import TRAIN, StageJob
from potluck.core.task import Task
from potluck.data import Federation
from potluck.engines.base import EngineOptions
from potluck.engines.ray import RayEngine, RayEngineError
from potluck.orchestrator import TIMING_METRICS, run_experiment

BASE = {
    "rounds": 3,
    "data": {"dataset": "digits", "num_clients": 20, "partition": {"kind": "dirichlet"}},
    "model": {"name": "mlp"},
    "sampler": {"clients_per_round": 5},
    "client": {"epochs": 2, "batch_size": 8, "lr": 0.1},
    "algorithm": {"name": "scaffold"},
    "evaluation": {"federated_clients": 5},
    "run": {"threads": 1},
}


# user-written parts (examples/my_lab, on the actors' PYTHONPATH): a stateful sampler, a term
# with client and server state, a stateful transform, a part with two stages and dropouts,
# and the broadcast sent as bfloat16
USER = {
    "algorithm": {"name": "fedavg"},
    "sampler": {"name": "my_lab.sampler:RoundRobin", "clients_per_round": 5},
    "terms": [{"name": "my_lab.feddyn:FedDyn", "alpha": 0.01}],
    "transforms": [
        {"name": "my_lab.compress:SignEF"},
        {"name": "my_lab.beacon:Beacon", "drop": 0.3},
    ],
    "downlink": [{"name": "cast", "dtype": "bfloat16"}],
}


def history(
    engine: str, address: str | None = None, parts: dict | None = None
) -> dict[str, object]:
    run = {"engine": engine, "ray_address": address, "workers": 2}
    cfg = ExperimentConfig.from_dict({**BASE, **(parts or {}), "run": {**BASE["run"], **run}})
    result = run_experiment(cfg.build())
    learning = [{k: v for k, v in m.items() if k not in TIMING_METRICS} for m in result.history]
    return {"history": learning, "weights": result.weights.tolist()}


def failing_client(address: str) -> str:
    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if len(y) == 3:
            raise RuntimeError("client data is corrupt")
        return torch.nn.functional.cross_entropy(logits, y)

    fed = Federation.from_client_data(
        [(torch.randn(n, 4), torch.zeros(n, dtype=torch.long)) for n in (8, 3)], test_fraction=0
    )
    net = lambda: torch.nn.Linear(4, 2)  # noqa: E731  (cloudpickled to the actors)
    algo = Algorithm(local=LocalSGD(batch_size=4))
    program = ClientProgram(Task(net, loss_fn=loss), fed, algo)
    engine = RayEngine(program, EngineOptions(workers=2, ray_address=address))
    shared = Message({"w": program.initial_weights()})
    payloads = (Message(scalars={"work": 1.0}),) * 2
    job = StageJob(TRAIN, 1, shared, np.array([0, 1]), payloads, ({}, {}))
    try:
        engine.run_stage(job)
    except RayEngineError as exc:
        return str(exc)
    finally:
        engine.close()
    return "no error"


if __name__ == "__main__":
    address = sys.argv[1]
    out = {
        "inline": history("inline"),
        "ray": history("ray", address),
        "user_inline": history("inline", parts=USER),
        "user_ray": history("ray", address, parts=USER),
        "failure": failing_client(address),
    }
    print("RESULT " + json.dumps(out))
