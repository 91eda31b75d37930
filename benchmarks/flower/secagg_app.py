"""Flower 1.42 side of ``benchmarks/compare_flower_secagg.py``: Flower's own SecAgg+
(``flwr.server.workflow.SecAggPlusWorkflow`` on the server, ``flwr.client.mod.secaggplus_mod``
on the clients) in Flower's Ray simulation, each client returning a fixed random vector.

Runs in Flower's own virtual environment (``scripts/setup_flower.sh``) and imports nothing of
potluck. The driver writes a spec JSON: ``n`` clients (supernodes), vector length ``d``, the
seed, the SecAgg+ settings (``num_shares`` = neighbours + 1: Flower counts a client among its
own share holders; ``reconstruction_threshold``; clipping range, quantization range, modulus,
``max_weight``) and a schedule of rounds, each ``plain`` (Flower's default FedAvg round, the
plaintext reference) or ``secagg`` with an optional dropout: ``after_masked_input`` (the
chosen clients answer the unmask stage with an error, so their self-mask seeds are rebuilt
from their neighbours' shares) or ``after_share_keys`` (they answer the masked-vector stage
with an error, so their pairwise-mask keys are rebuilt and those masks removed).

Client ``i`` (Flower's ``partition-id``) returns ``d`` values uniform in [-0.5, 0.5] (float32)
with a weight of 1 to 600 (``num_examples``), drawn from ``default_rng([seed, i])`` exactly as
the potluck side draws them; the chosen dropouts of round ``r`` are ``default_rng([seed, n,
r]).choice(n, round(rate * n))`` on both sides.

Measured, per round: the wall time of the fit round (``SecAggPlusWorkflow.__call__`` or
``default_fit_workflow``); per stage, the server's own time (the stage's wall time less the
time inside ``grid.send_and_receive``, where the server waits for the clients), each client's
own time inside ``secaggplus_mod`` less the ClientApp it wraps (a mod around it times both;
drawing the vector is excluded, FitRes conversion is counted as the ClientApp's), and the
payload bytes each client receives and sends (array data and record values: bytes and
strings by length, numbers 8 bytes; no names, no framing, as potluck's ``Message.nbytes``).
The strategy (``flwr.server.strategy.FedAvg``) checks every round's aggregate against the
weighted mean of the same vectors computed in float64; its own time (FedAvg's average, which
after SecAgg+ re-averages ``n`` copies of the unmasked mean, and the check) is recorded apart
and left out of the protocol's server time. The global model the clients download is one
float, so that no model download sits inside the protocol's timing (potluck's side has none).

Usage (run by the driver inside a network namespace with only loopback up):
    PYTHONPATH=benchmarks/flower FLWR_TELEMETRY_ENABLED=0 \\
        .venv-flower/bin/python benchmarks/flower/secagg_app.py --spec SPEC.json --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.default_workflows import default_fit_workflow
from flwr.serverapp import Grid, ServerApp
from secagg_inputs import client_input, dropouts  # the potluck side draws the same

SPEC_ENV = "POTLUCK_FLOWER_SECAGG_SPEC"  # inherited by Ray's raylet and workers
BENCH = "bench"  # the config record a client's timing and bytes travel back in
DROP_STAGE = {"after_masked_input": Stage.UNMASK, "after_share_keys": Stage.COLLECT_MASKED_VECTORS}


@cache
def spec() -> dict[str, Any]:
    return json.loads(Path(os.environ[SPEC_ENV]).read_text())


def payload_bytes(content: RecordDict) -> int:
    """Array data and record values (bytes, strings by length, numbers 8 bytes)."""
    total = sum(len(a.data) for rec in content.array_records.values() for a in rec.values())
    for records in (content.config_records, content.metric_records):
        total += sum(_value_bytes(v) for rec in records.values() for v in rec.values())
    return total


def _value_bytes(value: Any) -> int:
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, str):
        return len(value.encode())
    return 1 if isinstance(value, bool) else 8


# -- ClientApp ------------------------------------------------------------------------------

DRAW_S = [0.0]  # the time the last fit spent drawing its vector (same process as the mod)


class VectorClient(NumPyClient):
    """Returns its fixed vector and weight; ``pid`` in the metrics lets the server check."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
        t0 = time.perf_counter()
        s = spec()
        x, weight = client_input(int(s["seed"]), self.pid, int(s["d"]))
        DRAW_S[0] = time.perf_counter() - t0
        return [x], weight, {"pid": self.pid}


def client_fn(context: Context) -> Any:
    return VectorClient(int(context.node_config["partition-id"])).to_client()


def bench_mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """Around ``secaggplus_mod`` (for SecAgg+ messages) or the plain ClientApp: times the
    client's work, counts its bytes, drops it out where the schedule says."""
    pid = int(ctxt.node_config["partition-id"])
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    stage = str(configs[Key.STAGE]) if configs is not None else "train"
    rnd = int(msg.metadata.group_id)
    down = payload_bytes(msg.content)
    entry = spec()["schedule"][rnd - 1]
    drop = entry.get("dropout")
    if (
        drop
        and stage == DROP_STAGE[drop]
        and pid in dropouts(int(spec()["seed"]), int(spec()["n"]), rnd, float(entry["rate"]))
    ):
        info = {"pid": pid, "stage": stage, "down_b": down, "dropped": True}
        return Message(Error(code=0, reason=json.dumps(info)), reply_to=msg)
    app_s = [0.0]

    def app(m: Message, c: Context) -> Message:
        DRAW_S[0] = 0.0
        t0 = time.perf_counter()
        out = call_next(m, c)
        app_s[0] = time.perf_counter() - t0 - DRAW_S[0]
        return out

    DRAW_S[0] = 0.0
    t0 = time.perf_counter()
    reply = secaggplus_mod(msg, ctxt, app) if configs is not None else app(msg, ctxt)
    own = time.perf_counter() - t0 - DRAW_S[0] - (app_s[0] if configs is not None else 0.0)
    info = {"pid": pid, "stage": stage, "client_s": own, "app_s": app_s[0], "down_b": down}
    info["up_b"] = payload_bytes(reply.content)
    reply.content.config_records[BENCH] = ConfigRecord({"json": json.dumps(info)})
    return reply


client_app = ClientApp(client_fn=client_fn, mods=[bench_mod])


# -- ServerApp ------------------------------------------------------------------------------


class Recorder:
    """Per round: wall time, each stage's wall and waiting time, the clients' reports."""

    def __init__(self) -> None:
        self.rounds: list[dict[str, Any]] = []
        self.stage = ""
        self.first_round_epoch = 0.0

    def begin_round(self, rnd: int, entry: dict[str, Any]) -> None:
        if rnd == 1:
            self.first_round_epoch = time.time()
        self.rounds.append({"round": rnd, **entry, "stages": {}, "clients": []})
        self.stage = "train"

    @property
    def current(self) -> dict[str, Any]:
        return self.rounds[-1]

    def stage_record(self, name: str) -> dict[str, float]:
        return self.current["stages"].setdefault(name, {"wall_s": 0.0, "wait_s": 0.0})

    def wrap(self, grid: Grid) -> None:
        """Time ``grid.send_and_receive`` and collect the clients' reports from replies."""
        original = grid.send_and_receive

        def send_and_receive(messages: Any, *, timeout: float | None = None) -> Any:
            t0 = time.perf_counter()
            replies = list(original(messages, timeout=timeout))
            self.stage_record(self.stage)["wait_s"] += time.perf_counter() - t0
            for reply in replies:
                if reply.has_error():
                    info = json.loads(reply.error.reason or "{}")
                else:
                    info = json.loads(str(reply.content.config_records.pop(BENCH)["json"]))
                self.current["clients"].append(info)
            return replies

        grid.send_and_receive = send_and_receive  # type: ignore[method-assign]


RECORDER = Recorder()


class TimedSecAggPlus(SecAggPlusWorkflow):
    """Flower's ``SecAggPlusWorkflow``, each stage's wall time recorded."""

    def _timed(self, name: str, stage: Any, grid: Grid, context: Any, state: Any) -> bool:
        RECORDER.stage = name
        t0 = time.perf_counter()
        ok = bool(stage(grid, context, state))
        RECORDER.stage_record(name)["wall_s"] += time.perf_counter() - t0
        if ok:
            RECORDER.current.setdefault("completed", []).append(name)
        return ok

    def setup_stage(self, grid: Grid, context: Any, state: Any) -> bool:
        return self._timed(Stage.SETUP, super().setup_stage, grid, context, state)

    def share_keys_stage(self, grid: Grid, context: Any, state: Any) -> bool:
        return self._timed(Stage.SHARE_KEYS, super().share_keys_stage, grid, context, state)

    def collect_masked_vectors_stage(self, grid: Grid, context: Any, state: Any) -> bool:
        stage = super().collect_masked_vectors_stage
        return self._timed(Stage.COLLECT_MASKED_VECTORS, stage, grid, context, state)

    def unmask_stage(self, grid: Grid, context: Any, state: Any) -> bool:
        return self._timed(Stage.UNMASK, super().unmask_stage, grid, context, state)


TINY = ndarrays_to_parameters([np.zeros(1, dtype=np.float32)])


class CheckedFedAvg(FedAvg):
    """Flower's FedAvg; every aggregate checked against the float64 weighted mean of the
    same vectors; the global model kept at one float (nothing to download)."""

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        t0 = time.perf_counter()
        params, _ = super().aggregate_fit(server_round, results, failures)
        fedavg_s = time.perf_counter() - t0
        secure = RECORDER.current["kind"] == "secagg"
        t1 = time.perf_counter()
        # after SecAgg+ every result carries the unmasked mean; plain: FedAvg's average
        source = results[0][1].parameters if secure else params
        got = parameters_to_ndarrays(source)[0].astype(np.float64)
        pids = sorted(int(fitres.metrics["pid"]) for _, fitres in results)
        s = spec()
        total, weights = np.zeros(int(s["d"])), 0
        for pid in pids:
            x, w = client_input(int(s["seed"]), pid, int(s["d"]))
            total += w * x.astype(np.float64)
            weights += w
        expected = total / weights
        RECORDER.current.update(
            strategy_fedavg_s=fedavg_s,
            check_s=time.perf_counter() - t1,
            aggregated=pids,
            max_error=float(np.abs(got - expected).max()),
            expected_fingerprint=[float(expected.sum()), *map(float, expected[:3])],
            failures=len(failures),
        )
        return TINY, {}


def fit_workflow(grid: Grid, context: Any) -> None:
    """One fit round as the schedule says: SecAgg+ or Flower's default (plaintext)."""
    rnd = int(context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
    entry = spec()["schedule"][rnd - 1]
    RECORDER.begin_round(rnd, entry)
    t0 = time.perf_counter()
    if entry["kind"] == "secagg":
        sa = spec()["secagg"]
        TimedSecAggPlus(
            num_shares=int(sa["num_shares"]),
            reconstruction_threshold=int(sa["reconstruction_threshold"]),
            max_weight=float(sa["max_weight"]),
            clipping_range=float(sa["clipping_range"]),
            quantization_range=int(sa["quantization_range"]),
            modulus_range=int(sa["modulus_range"]),
        )(grid, context)
    else:
        default_fit_workflow(grid, context)
        stage = RECORDER.stage_record("train")
        stage["wall_s"] = time.perf_counter() - t0
    RECORDER.current["wall_s"] = time.perf_counter() - t0


server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    s = spec()
    n = int(s["n"])
    RECORDER.wrap(grid)
    strategy = CheckedFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=n,
        min_evaluate_clients=0,
        min_available_clients=n,
        initial_parameters=TINY,
    )
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=len(s["schedule"])), strategy=strategy
    )
    DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)
    result = {"first_round_epoch": RECORDER.first_round_epoch, "rounds": RECORDER.rounds}
    Path(s["server_out"]).write_text(json.dumps(result))


def main() -> None:
    from flwr.simulation import run_simulation

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", required=True, help="the driver's spec JSON")
    parser.add_argument("--out", required=True, help="write the result JSON here")
    parser.add_argument("--cpus", type=int, default=1, help="Ray CPUs (= concurrent clients)")
    args = parser.parse_args()
    os.environ[SPEC_ENV] = str(Path(args.spec).resolve())
    here = str(Path(__file__).resolve().parent)  # Ray workers import this module by name
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    t0 = time.perf_counter()
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=int(spec()["n"]),
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": args.cpus, "include_dashboard": False},
            },
        )
    except Exception as exc:  # e.g. Ray's start-up timing out on a loaded machine
        print(f"run_simulation failed: {exc!r}", file=sys.stderr, flush=True)
        os._exit(1)  # the ServerApp thread would keep waiting for nodes that never come
    result = json.loads(Path(spec()["server_out"]).read_text())
    result.update(run_simulation_s=time.perf_counter() - t0, ray_cpus=args.cpus)
    Path(args.out).write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    # run the apps from the module imported by name, so Ray pickles them by reference
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import secagg_app

    secagg_app.main()
