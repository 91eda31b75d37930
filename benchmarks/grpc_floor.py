"""The transport floor of ``deploy_loopback``: the deployment protocol served by bare grpcio.

A server for ``deploy_loopback``'s light clients that speaks the same protocol as
``potluck server`` (join, long-poll, task, update, ack, done, over ``Coordinator.Call`` with
the same chunks and the same TLS credentials) and does nothing else: no potluck code, no
checksum, no decoding, no validation, no aggregation, no store. Each round's task is the
model's bytes framed once per round, the same bytes for every client (its task id is left at
zero: nothing checks the answers); an update is received to its last byte and acknowledged
unread. A round
starts when every client polls and ends when the last update's last byte has arrived.

Its rounds are therefore what any Python grpcio server with 200 handler threads (potluck's
server architecture) must spend to move these bytes to and from these clients on this
machine: the floor under potluck's round time, measured with the same clients in the same
run. Started by ``deploy_loopback.py`` (modes ``floor-tls`` and ``floor-insecure``):

    python benchmarks/grpc_floor.py SPEC.json

``SPEC.json``: ``clients``, ``rounds``, ``model_size`` (float32 values), ``pki`` (the PKI
directory, or null for plaintext), ``poll_timeout_s`` and ``out`` (where the rounds go, as
JSON: ``round``, ``started_at``, ``round_seconds``, ``bytes_down``, ``bytes_up``).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

SERVICE, CHUNK = "potluck.v1.Coordinator", 1 << 20  # as potluck.deploy.wire


class Floor:
    """The round loop and ``Coordinator.Call`` of the floor server."""

    def __init__(self, pb: Any, clients: int, rounds: int, size: int, poll_s: float) -> None:
        self.pb, self.clients, self.rounds, self.poll_s = pb, clients, rounds, poll_s
        body = pb.Envelope()
        body.arrays.add(name="w", dtype="float32", shape=[size], data=bytes(4 * size))
        self.body = body.SerializeToString()
        self.lock = threading.Lock()
        self.cv = threading.Condition(self.lock)  # the round loop waits here
        self.polls = threading.Condition(self.lock)  # the polling clients wait here
        self.round = 0  # the open round (0: not started)
        self.done = False
        self.polling: set[str] = set()  # clients that polled (ready for round 1)
        self.served: set[str] = set()  # clients that got the open round's task
        self.updates = 0  # updates fully received in the open round
        self.frames: list[bytes] = []  # the open round's task, framed (its task id zeroed)
        self.log: list[dict[str, Any]] = []

    def frame(self, env: Any) -> list[bytes]:
        data = env.SerializeToString()
        return [self.pb.Chunk(total=len(data), offset=0, data=data).SerializeToString()]

    def task_frames(self, rnd: int) -> list[bytes]:
        """The round's task: the header first (kind, run, round, task id), then the weights."""
        head = self.pb.Envelope(kind="task", run_id="floor", round=rnd, task_id=bytes(16))
        data = head.SerializeToString() + self.body
        total = len(data)
        return [
            self.pb.Chunk(total=total, offset=k, data=data[k : k + CHUNK]).SerializeToString()
            for k in range(0, total, CHUNK)
        ]

    def Call(self, request: Iterable[bytes], context: Any) -> Iterator[bytes]:  # gRPC's name
        first, size = b"", 0
        for raw in request:  # every byte is received; only the first chunk is looked at
            first = first or raw
            size += len(raw)
        chunk = self.pb.Chunk.FromString(first)
        kind = "update"  # an envelope of several chunks (its header comes last)
        if chunk.total == len(chunk.data):
            env = self.pb.Envelope.FromString(chunk.data)
            kind = env.kind
        if kind == "join":
            yield from self.frame(self.pb.Envelope(kind="welcome", run_id="floor"))
        elif kind == "poll":
            yield from self.poll(env.client)
        else:
            yield from self.update(size)

    def poll(self, name: str) -> list[bytes]:
        deadline = time.monotonic() + self.poll_s
        with self.lock:
            self.polling.add(name)
            self.cv.notify_all()
            while not self.done and (self.round == 0 or name in self.served):
                left = deadline - time.monotonic()
                if left <= 0:
                    return self.frame(self.pb.Envelope(kind="wait", run_id="floor"))
                self.polls.wait(left)
            if self.done:
                return self.frame(self.pb.Envelope(kind="done", run_id="floor"))
            self.served.add(name)
            self.log[-1]["bytes_down"] += sum(map(len, self.frames))
            return self.frames

    def update(self, size: int) -> list[bytes]:
        with self.cv:
            self.updates += 1
            self.log[-1]["bytes_up"] += size
            self.cv.notify_all()
        return self.frame(self.pb.Envelope(kind="ack", run_id="floor"))

    def run(self) -> None:
        """All rounds: wait for every client, then open each round when the last one ended."""
        with self.cv:
            while len(self.polling) < self.clients:
                self.cv.wait()
        for rnd in range(1, self.rounds + 1):
            frames = self.task_frames(rnd)
            with self.cv:
                self.frames, self.served, self.updates = frames, set(), 0
                self.log.append({"round": rnd, "started_at": time.time()})
                self.log[-1].update(bytes_down=0, bytes_up=0)
                self.round = rnd
                self.polls.notify_all()
                while self.updates < self.clients:
                    self.cv.wait()
                self.log[-1]["round_seconds"] = time.time() - self.log[-1]["started_at"]
        with self.lock:
            self.done = True
            self.polls.notify_all()


def credentials(pki: Path) -> Any:
    """Mutual TLS exactly as ``potluck server`` sets it up (``deployment.ServerTLS``)."""
    return grpc.ssl_server_credentials(
        [((pki / "server-hub.key").read_bytes(), (pki / "server-hub.pem").read_bytes())],
        root_certificates=(pki / "ca.pem").read_bytes(),
        require_client_auth=True,
    )


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    pb, _ = grpc.protos_and_services("potluck/deploy/potluck.proto")
    floor = Floor(pb, spec["clients"], spec["rounds"], spec["model_size"], spec["poll_timeout_s"])
    options = [
        ("grpc.max_receive_message_length", 4 * CHUNK),
        ("grpc.max_send_message_length", 4 * CHUNK),
    ]  # as potluck.deploy.server.serve
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=256), options=options)
    method = grpc.stream_stream_rpc_method_handler(floor.Call)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"Call": method}),)
    )
    pki = spec["pki"]
    listen = "127.0.0.1:0"
    port = (
        server.add_secure_port(listen, credentials(Path(pki)))
        if pki
        else server.add_insecure_port(listen)
    )
    server.start()
    print(f"listening on {listen} (port {port})", flush=True)
    floor.run()
    Path(spec["out"]).write_text(json.dumps(floor.log))
    time.sleep(min(spec["poll_timeout_s"], 2.0))  # let waiting polls hear "done"
    server.stop(grace=1.0).wait()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # the .proto file
    main(sys.argv[1])
