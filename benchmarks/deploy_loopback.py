"""Deployment on loopback: the real ``potluck server`` against many light clients (issue 4).

The server is ``.venv/bin/potluck server`` in its own process, running an experiment of
``--clients`` clients that all take part in every round (model ``--model``, Fashion-MNIST,
evaluation off, one torch thread), in three modes: mutual TLS (one EC client certificate per
client, issued with ``potluck.deploy.certs``), ``--insecure``, and mutual TLS with glibc's
default malloc behaviour (``tls+glibc``: ``deploy.reuse_memory = false``). Two more modes,
``floor-tls`` and ``floor-insecure``, serve the same clients with a bare grpcio server that
only moves the bytes (``grpc_floor.py``): the transport's floor under potluck's round time,
measured in the same run. The clients are
*light*: a few processes (``--procs``) each run ``clients / procs`` clients as threads, each
with its own gRPC channel (its own TCP and TLS connection). They do not train and never
import torch: they join, long-poll, read each task (the header is parsed, every byte is
received, none is checked) and answer it with a real reply, so that the server and the
protocol are what is measured. The replies are computed once, in the driver (``reply_body``),
one per light-client process (``--distinct-updates``, the default; with
``--no-distinct-updates`` every process sends client 0's, as all did before 2026-12-03:
every update then equalled the round's aggregate, a client drift of 0 for all): client ``i``
of the experiment, for process ``i``, trained for round 1 by the program a ``potluck
client`` site runs, from the initial weights as the server broadcasts them, its upload
encoded by the experiment's transforms and packed with its new client state as a site packs it
(``0/m/delta``, ``0/s/<part>/<name>``, the scalars ``num_examples``, ``num_steps``,
``weight``, ``train_loss``); it is serialized by ``wire.encode`` and each light client only
appends the routing fields (the driver checks that the result reassembles into that reply
and has the length of the envelope ``wire`` would send).

**Compression** (``--compression NAME[,NAME...]``, issue 17): one deployment per setting and
mode, into ``deploy_loopback_compression.json``. A setting is an upload scheme of ``UPLINK``
(``none``, ``qsgd8``, ``qsgd4``, ``top_k1``: top-k 1 % with error feedback,
``top_k1_no_ef``, ``sign_ef``, ``powersgd4``: rank 4 with error feedback and warm start),
optionally with ``+q8``, the broadcast quantised to 8 bits (``[[downlink]] quantize``); it
becomes the server's ``[[transforms]]`` and ``[[downlink]]`` sections and the light clients'
reply. The stateful schemes' client state (error-feedback residual, PowerSGD's ``q``) stays
on each site, as a ``potluck client`` keeps a ``site_state`` part's state: it travels
neither down with the tasks nor up with the replies, so the light clients' reply holds only
the upload (before that was built, the state lived on the server and travelled both ways:
the first run of this benchmark, BENCHMARKS §24). Per setting: round 1 and the median of the
later rounds of the round time, the run store's ``bytes_up`` and ``bytes_down``, the gRPC
bytes the clients sent and received, the bytes on loopback and the server's CPU, their
ratios to ``none`` in the same run, and whether the server accepted every update
(``updates`` = the clients, none failed or refused).

Measured per round: the server's ``round_seconds`` (run store); the gRPC message bytes the
clients received and sent, and the bytes on the loopback interface (whole machine, TLS,
HTTP/2 and TCP/IP included); the server's CPU seconds and minor page faults
(``/proc/PID/stat`` sampled every 0.1 s) and resident memory; the light clients' CPU; and,
from the clients' timestamps, when the tasks and the acknowledgements arrived. The server's
peak memory is its ``ru_maxrss`` (``wait4``). With ``perf`` installed, the server is sampled
at 499 Hz and its CPU time over the rounds is split by symbol into buckets (page faults,
memcpy, SHA-256, ...). Right after each deployment, the raw transfer time of the same bytes:
TCP over 127.0.0.1 in as many parallel streams as cores, 1 MiB writes; the same over TLS 1.3
(Python's ``ssl``); AES-GCM alone (``cryptography``). *Overhead* = round latency / raw
transfer time. Last, in a fresh process that tunes malloc as the server does, a per-stage
profile of the server path for one envelope of the model's size (``wire.encode``, chunk
frames and SHA-256, a round's weights encoded once, ``wire.receive``, validation), the
aggregation (fresh stack, reused stack, running sum) and the ``Hub`` alone.

Run from the repository root (the issue-4 setting is the default; about 7 minutes):
    .venv/bin/python benchmarks/deploy_loopback.py
Small, for development:
    .venv/bin/python benchmarks/deploy_loopback.py --clients 20 --procs 2 --rounds 2
With compression (issue 17; about 10 minutes):
    .venv/bin/python benchmarks/deploy_loopback.py --clients 100 --rounds 4 \\
        --compression none,qsgd8,qsgd4,top_k1,top_k1_no_ef,sign_ef,powersgd4,qsgd8+q8
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from _common import call_seconds, cpu_times, header, summary, write_result

CALL = "/potluck.v1.Coordinator/Call"
CHUNK = 1 << 20  # wire.DEFAULT_CHUNK_BYTES (the light clients do not import wire: it needs torch)
VENV_BIN = Path(sys.executable).parent
PERF_HZ = 499


def _pb() -> Any:
    """The wire's protobuf classes, compiled from the proto without importing torch."""
    import grpc

    pb, _ = grpc.protos_and_services("potluck/deploy/potluck.proto")
    return pb


# ---- light client (runs in the client processes) -----------------------------------------


class UpdateEncoder:
    """Serialized chunks of a reply envelope, built fast: ``body`` (a real reply without its
    routing fields, from ``reply_body``) and a header (run, round, task id, client) last.

    A protobuf message may be the concatenation of its parts, so the body's bytes, their
    SHA-256 state and every chunk that holds only body bytes are computed once per process;
    per update only the header, the last chunk(s) and a copy of the hash state are new.
    """

    def __init__(self, pb: Any, body: bytes, chunk_bytes: int = CHUNK) -> None:
        self.pb, self.chunk, self.body = pb, chunk_bytes, body
        self.hash = hashlib.sha256(self.body)
        self._prefix: dict[int, list[bytes]] = {}
        self._lock = threading.Lock()

    def chunks(self, run_id: str, rnd: int, task_id: bytes, client: str) -> list[bytes]:
        pb, c, body = self.pb, self.chunk, self.body
        head = pb.Envelope(run_id=run_id, round=rnd, task_id=task_id, client=client)
        tail_head = head.SerializeToString()
        total, full = len(body) + len(tail_head), len(body) // c
        with self._lock:
            prefix = self._prefix.get(total)
            if prefix is None:
                prefix = [
                    pb.Chunk(
                        total=total, offset=k * c, data=body[k * c : (k + 1) * c]
                    ).SerializeToString()
                    for k in range(full)
                ]
                self._prefix[total] = prefix
        digest = self.hash.copy()
        digest.update(tail_head)
        tail = body[full * c :] + tail_head
        out = list(prefix)
        for start in range(0, len(tail), c):
            last = start + c >= len(tail)
            out.append(
                pb.Chunk(
                    total=total,
                    offset=full * c + start,
                    data=tail[start : start + c],
                    sha256=digest.digest() if last else b"",
                ).SerializeToString()
            )
        return out


def _varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it (IndexError if cut off)."""
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def chunk_fields(raw: bytes) -> tuple[int, memoryview]:
    """``total`` and ``data`` (a view, not a copy) of a serialized ``Chunk``."""
    view, pos, total, data = memoryview(raw), 0, 0, memoryview(b"")
    while pos < len(view):
        key, pos = _varint(view, pos)
        if key & 7 == 0:
            value, pos = _varint(view, pos)
            total = value if key >> 3 == 1 else total
        else:  # length-delimited: data (3) or sha256 (4)
            n, pos = _varint(view, pos)
            if key >> 3 == 3:
                data = view[pos : pos + n]
            pos += n
    return total, data


class HeaderReader:
    """Fields 1-5 of a serialized ``Envelope`` (kind, run_id, round, task_id, client) read
    from its pieces as they arrive, wherever they are (the server writes them first today; a
    server that reuses the model's bytes would write them last): arrays (6) and scalars (7)
    are skipped without being copied."""

    def __init__(self) -> None:
        self.fields: dict[int, Any] = {}
        self._skip = 0
        self._carry = b""

    def feed(self, piece: memoryview) -> None:
        if self._skip >= len(piece):
            self._skip -= len(piece)
            return
        buf: bytes | memoryview = piece
        pos = self._skip
        if self._carry:  # a small field was cut by the chunk boundary (rare)
            buf, pos = self._carry + bytes(piece), 0
        self._skip, self._carry = 0, b""
        while pos < len(buf):
            start = pos
            try:
                key, pos = _varint(buf, pos)
                number, kind = key >> 3, key & 7
                if kind == 0:
                    value, pos = _varint(buf, pos)
                    self.fields[number] = value
                    continue
                n, pos = _varint(buf, pos)
            except IndexError:
                self._carry = bytes(buf[start:])
                return
            if number >= 6:  # arrays, scalars: skip
                self._skip = max(pos + n - len(buf), 0)
                pos += n
            elif pos + n <= len(buf):
                self.fields[number] = bytes(buf[pos : pos + n])
                pos += n
            else:
                self._carry = bytes(buf[start:])
                return


@dataclass
class TaskLog:
    """One task as a light client saw it (``time.time()`` stamps)."""

    round: int
    polled: float  # poll request sent
    first: float  # first chunk of the task received
    last: float  # whole task received
    acked: float = 0.0  # the server acknowledged the update
    task_bytes: int = 0
    update_bytes: int = 0
    reply: str = ""
    task_id: bytes = b""


@dataclass
class LightClient:
    """Join, poll, answer every train task with the encoder's reply; until the server says
    done."""

    name: str
    channel: Any
    pb: Any
    encoder: UpdateEncoder
    poll_timeout_s: float
    tasks: list[TaskLog] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    polls: int = 0

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # recorded: the driver reports it, the server's round times out
            self.errors.append(f"stopped: {type(exc).__name__}: {exc}")

    def _run(self) -> None:
        call = self.channel.stream_stream(CALL)  # raw bytes in and out: no (de)serializers
        join = self._request(self.pb.Envelope(kind="join", client=self.name))
        run_id = self._retry(lambda: self._small(call, join)).run_id
        poll = self._request(self.pb.Envelope(kind="poll", run_id=run_id, client=self.name))
        while True:
            log = self._retry(lambda: self._poll(call, poll))
            if log is None:
                return  # done
            if log.round < 0:
                continue  # wait (or an error, recorded)
            chunks = self.encoder.chunks(run_id, log.round, log.task_id, self.name)
            log.update_bytes = sum(map(len, chunks))
            ack = self._retry(functools.partial(self._small, call, chunks))
            log.acked, log.reply = time.time(), ack.kind
            self.tasks.append(log)

    def _poll(self, call: Any, poll: list[bytes]) -> TaskLog | None:
        """One long poll: a task (its log), None when done, round -1 for anything else."""
        polled = time.time()
        responses = call(iter(poll), timeout=self.poll_timeout_s + 120)
        reader, received, first_at, small = HeaderReader(), 0, 0.0, b""
        for raw in responses:
            first_at = first_at or time.time()
            total, data = chunk_fields(raw)
            reader.feed(data)
            received += len(raw)
            if total <= len(data):
                small = bytes(data)  # a one-chunk reply: wait, done, refused (with a reason)
        self.polls += 1
        kind = reader.fields.get(1, b"").decode()
        if kind == "done":
            return None
        if kind != "task":
            if kind != "wait":
                reason = self.pb.Envelope.FromString(small).scalars if small else kind
                self.errors.append(f"poll: {kind} {reason}")
                time.sleep(0.5)
            return TaskLog(-1, polled, first_at, first_at)
        log = TaskLog(reader.fields.get(3, 0), polled, first_at, time.time())
        log.task_bytes, log.task_id = received, reader.fields[4]
        return log

    def _request(self, env: Any) -> list[bytes]:
        data = env.SerializeToString()
        digest = hashlib.sha256(data).digest()
        return [
            self.pb.Chunk(total=len(data), offset=0, data=data, sha256=digest).SerializeToString()
        ]

    def _receive(self, responses: Iterator[bytes]) -> bytes:
        return b"".join(self.pb.Chunk.FromString(m).data for m in responses)

    def _small(self, call: Any, request: list[bytes]) -> Any:
        """Send ``request`` (serialized chunks); the reply envelope (a small one)."""
        return self.pb.Envelope.FromString(self._receive(call(iter(request), timeout=300)))

    def _retry(self, fn: Callable[[], Any], attempts: int = 20) -> Any:
        import grpc

        for i in range(attempts):
            try:
                return fn()
            except grpc.RpcError as exc:
                self.errors.append(f"{exc.code()}: {exc.details()}")
                if i == attempts - 1:
                    raise
                time.sleep(0.5)
        raise AssertionError("unreachable")


def light_client_main(spec_path: str) -> None:
    """A light client process: ``spec`` names the server, the clients and the output file."""
    import resource

    import grpc

    spec = json.loads(Path(spec_path).read_text())
    pb = _pb()
    encoder = UpdateEncoder(pb, Path(spec["update"]).read_bytes())
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", 4 * CHUNK),
        ("grpc.max_send_message_length", 4 * CHUNK),
        ("grpc.use_local_subchannel_pool", 1),  # one connection per client, never shared
    ]
    clients = []
    for name in spec["names"]:
        if spec["pki"] is None:
            channel = grpc.insecure_channel(spec["server"], options=options)
        else:
            pki = Path(spec["pki"])
            creds = grpc.ssl_channel_credentials(
                root_certificates=(pki / "ca.pem").read_bytes(),
                private_key=(pki / f"client-{name}.key").read_bytes(),
                certificate_chain=(pki / f"client-{name}.pem").read_bytes(),
            )
            channel = grpc.secure_channel(spec["server"], creds, options=options)
        clients.append(LightClient(name, channel, pb, encoder, spec["poll_timeout_s"]))
    threads = [threading.Thread(target=c.run, name=c.name, daemon=True) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out = {
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "maxrss_mib": usage.ru_maxrss / 1024,
        "clients": [
            {
                "name": c.name,
                "polls": c.polls,
                "errors": c.errors[:5],
                "error_count": len(c.errors),
                "tasks": [{k: v for k, v in vars(t).items() if k != "task_id"} for t in c.tasks],
            }
            for c in clients
        ],
    }
    Path(spec["out"]).write_text(json.dumps(out))


# ---- process monitoring (driver) ----------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def proc_sample(pid: int) -> dict[str, float] | None:
    """CPU seconds, minor page faults, RSS/HWM (MiB) and threads of ``pid``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # fields[0] is field 3 (state) of proc(5)
    out = {"cpu_s": (int(fields[11]) + int(fields[12])) / _TICK, "minflt": int(fields[7])}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
        elif key == "Threads":
            out[key] = int(value)
    return out if "VmRSS" in out else None  # None for a zombie: it has no memory left


def connections_to(port: int) -> int:
    """Established TCP connections (IPv4 and IPv6) whose remote end is ``port``."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def loopback_bytes() -> int:
    """Bytes sent over the loopback interface so far (whole machine; IP packets)."""
    return int(Path("/sys/class/net/lo/statistics/tx_bytes").read_text())


class Monitor(threading.Thread):
    """Samples the server, the client processes and the machine every ``every`` seconds."""

    def __init__(self, server: int, clients: Sequence[int], port: int, every: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.server, self.clients, self.port, self.every = server, list(clients), port, every
        self.connections = 0  # the most client connections seen at once
        self.samples: list[dict[str, Any]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            server = proc_sample(self.server)
            clients = [proc_sample(p) for p in self.clients]
            sample = {"t": time.time(), "server": server, "machine": cpu_times()}
            sample["lo_bytes"] = loopback_bytes()
            if len(self.samples) % 10 == 0:
                self.connections = max(self.connections, connections_to(self.port))
            sample["clients_cpu_s"] = sum(c["cpu_s"] for c in clients if c)
            self.samples.append(sample)
            self._stop_event.wait(self.every)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def at(self, t: float, key: Callable[[dict[str, Any]], float | None]) -> float | None:
        """``key`` of the sample nearest to time ``t`` (None if out of range or missing)."""
        good = [s for s in self.samples if key(s) is not None]
        if not good or t < good[0]["t"] - self.every or t > good[-1]["t"] + self.every:
            return None
        return key(min(good, key=lambda s: abs(s["t"] - t)))

    def window_max(self, t0: float, t1: float, key: Callable[[dict[str, Any]], float]) -> float:
        inside = [key(s) for s in self.samples if t0 <= s["t"] <= t1 and s["server"]]
        return max(inside) if inside else float("nan")


# ---- one deployment -----------------------------------------------------------------------


UPLINK: dict[str, list[dict[str, Any]]] = {  # --compression: the [[transforms]] of each
    "none": [],
    "qsgd8": [{"name": "qsgd", "bits": 8}],
    "qsgd4": [{"name": "qsgd", "bits": 4}],
    "top_k1": [{"name": "top_k", "fraction": 0.01}],  # with error feedback (the default)
    "top_k1_no_ef": [{"name": "top_k", "fraction": 0.01, "error_feedback": False}],
    "sign_ef": [{"name": "sign_ef"}],
    "powersgd4": [{"name": "powersgd", "rank": 4}],  # error feedback and warm start
}
DOWNLINK: dict[str, list[dict[str, Any]]] = {"q8": [{"name": "quantize", "bits": 8}]}


def chains(setting: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The ``[[transforms]]`` and ``[[downlink]]`` of a compression setting, ``UP[+DOWN]``.

    Example:
        >>> chains("qsgd8+q8")
        ([{'name': 'qsgd', 'bits': 8}], [{'name': 'quantize', 'bits': 8}])
    """
    up, _, down = setting.partition("+")
    if up not in UPLINK or (down and down not in DOWNLINK):
        raise ValueError(
            f"compression {setting!r}: UP[+DOWN] with UP one of {', '.join(UPLINK)} and "
            f"DOWN one of {', '.join(DOWNLINK)}"
        )
    return [dict(t) for t in UPLINK[up]], [dict(t) for t in DOWNLINK.get(down, [])]


@dataclass
class Setup:
    clients: int
    procs: int
    rounds: int
    model: str
    model_size: int
    work: Path
    perf: bool = False
    poll_timeout_s: float = 20.0
    compression: str = "none"  # a key of ``chains``
    updates: tuple[Path, ...] = ()  # the light clients' reply bodies (``reply_body``)

    @property
    def names(self) -> list[str]:
        return [f"c{i:03d}" for i in range(self.clients)]


def make_pki(directory: Path, names: Sequence[str]) -> float:
    """A federation CA, a server certificate and one EC certificate per client; seconds."""
    from potluck.deploy import certs

    t0 = time.perf_counter()
    certs.init_ca(directory)
    certs.issue(directory, "server", "hub", hosts=["localhost", "127.0.0.1"])
    for name in names:
        certs.issue(directory, "client", name)
    return time.perf_counter() - t0


def experiment_config(setup: Setup, store: Path, reuse_memory: bool = True) -> Any:
    """The server's ``ExperimentConfig``, with the compression's sections."""
    from potluck.config import ExperimentConfig

    transforms, downlink = chains(setup.compression)
    sections = {"transforms": transforms} if transforms else {}
    sections |= {"downlink": downlink} if downlink else {}
    return ExperimentConfig.from_dict(
        {
            "rounds": setup.rounds,
            "data": {
                "dataset": "fashion_mnist",
                "num_clients": setup.clients,
                "partition": {"kind": "iid"},
            },
            "model": {"name": setup.model},
            "sampler": {"clients_per_round": setup.clients},
            **sections,
            "evaluation": {"centralized": False, "federated_clients": 0},
            "run": {"threads": 1, "store": str(store), "name": "deploy-loopback"},
            "deploy": {
                "listen": "127.0.0.1:0",
                "min_clients": setup.clients,
                "round_timeout_s": 300,
                "join_timeout_s": 600,
                "poll_timeout_s": setup.poll_timeout_s,
                "admit": setup.names,
                "reuse_memory": reuse_memory,
            },
        }
    )


def experiment_toml(setup: Setup, store: Path, reuse_memory: bool = True) -> str:
    return str(experiment_config(setup, store, reuse_memory).to_toml())


def reply_body(setup: Setup, path: Path, client: int = 0) -> dict[str, Any]:
    """Write to ``path`` the body of a real client's reply to round 1 of ``setup``'s
    experiment (its envelope without the routing fields, as ``wire.encode`` writes it) and
    describe it: ``client`` trained by the program a site runs (``site_program``) from the
    initial weights as the server broadcasts them (encoded by the downlink, decoded by the
    client), its upload encoded by the transforms, packed with the new client state a site
    sends (none of a ``site_state`` or ``secret_state`` part's, which a site keeps).

    Also checks that the light clients' chunks of it reassemble into that reply and are as
    long as the envelope ``wire.encode`` makes of it (``check_reply``)."""
    import numpy as np

    from potluck.core import records
    from potluck.core.message import Message
    from potluck.deploy import wire
    from potluck.deployment import site_program

    program = site_program(experiment_config(setup, setup.work / "no-store"), client)
    shared = Message({"w": program.initial_weights()})
    for down in program.algorithm.downlink:
        shared = down.encode(shared)
    job = records.StageJob(
        "train", 1, shared, np.array([client]), (Message(scalars={"work": 1.0}),), ({},)
    )
    reply = program.run_stage(job)[0]
    if reply is None:
        raise RuntimeError(f"{setup.compression}: client {client} dropped out of round 1")
    kept = {
        ns
        for ns, part in program.parts.items()
        if getattr(part, "site_state", False) or getattr(part, "secret_state", False)
    }
    sent = records.Reply(reply.message, {ns: s for ns, s in reply.state.items() if ns not in kept})
    message = records.reply_to_message(sent)
    body = wire.encode(wire.Envelope("reply", arrays=message.arrays, scalars=message.scalars))
    path.write_bytes(body)
    envelope_bytes = check_reply(body, message)
    state = [t for s in sent.state.values() for t in s.values()]
    on_site = [t for ns, s in reply.state.items() if ns in kept for t in s.values()]
    return {
        "arrays": {
            name: {"dtype": str(a.dtype).removeprefix("torch."), "shape": list(a.shape)}
            for name, a in message.arrays.items()
        },
        "scalars": dict(message.scalars),
        "upload_wire_bytes": reply.message.wire_bytes,  # what the run store's bytes_up counts
        "client_state_bytes": sum(t.numel() * t.element_size() for t in state),
        "state_kept_on_site_bytes": sum(t.numel() * t.element_size() for t in on_site),
        "envelope_bytes": envelope_bytes,
        "broadcast_wire_bytes": shared.wire_bytes,  # the run store's bytes_down per client
    }


def check_reply(body: bytes, message: Any) -> int:
    """That ``UpdateEncoder``'s chunks of ``body`` are the reply ``message`` as a site sends
    it: ``wire.receive`` gives back its arrays and scalars and the routing fields, the server
    unpacks it (``records.reply_from_message``), and it is as long as ``wire.encode``'s
    envelope of the same reply; that length (RuntimeError otherwise)."""
    import torch

    from potluck.core import records
    from potluck.deploy import codec, wire

    run, task_id, rnd = "0123456789abcdef", os.urandom(16), 2
    chunks = UpdateEncoder(_pb(), body).chunks(run, rnd, task_id, "c000")
    got = wire.receive(chunks)
    real = wire.Envelope("reply", run, rnd, task_id, "c000", message.arrays, message.scalars)
    size = len(wire.encode(real))
    problems = [
        what
        for what, bad in [
            ("routing fields", (got.kind, got.run_id, got.round, got.task_id, got.client)
             != ("reply", run, rnd, task_id, "c000")),
            ("scalars", dict(got.scalars) != dict(message.scalars)),
            ("array names", set(got.arrays) != set(message.arrays)),
            ("array values", any(
                not torch.equal(got.arrays[k], v) for k, v in message.arrays.items()
                if k in got.arrays
            )),
            ("length", len(wire.from_chunks([codec.parse_chunk(c) for c in chunks])) != size),
        ]
        if bad
    ]  # fmt: skip
    records.reply_from_message(got.message())
    if problems:
        raise RuntimeError(f"the light clients' reply differs from a site's: {problems}")
    return size


def _wait_for_port(log: Path, proc: subprocess.Popen[bytes], timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"listening on \S+ \(port (\d+)\)", log.read_text(errors="replace"))
        if found:
            return int(found.group(1))
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    raise TimeoutError(f"the server did not listen within {timeout} s")


def _wait4(pid: int, timeout: float) -> tuple[int, Any]:
    """``os.wait4`` with a deadline: (exit status, rusage)."""
    deadline = time.monotonic() + timeout
    while True:
        got, status, usage = os.wait4(pid, os.WNOHANG)
        if got == pid:
            return status, usage
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} still running after {timeout} s")
        time.sleep(0.05)


def server_command(setup: Setup, mode: str, pki: Path, run_dir: Path) -> list[str]:
    """The server process of ``mode``: ``potluck server`` ("tls", "insecure", "tls+glibc") or
    the bare grpcio floor ("floor-tls", "floor-insecure"; ``grpc_floor.py``)."""
    tls = "tls" in mode
    if mode.startswith("floor-"):
        spec = {
            "clients": setup.clients,
            "rounds": setup.rounds,
            "model_size": setup.model_size,
            "pki": str(pki) if tls else None,
            "poll_timeout_s": setup.poll_timeout_s,
            "out": str(run_dir / "floor-rounds.json"),
        }
        (run_dir / "floor.spec.json").write_text(json.dumps(spec))
        return [
            sys.executable,
            str(Path(__file__).with_name("grpc_floor.py")),
            str(run_dir / "floor.spec.json"),
        ]
    store, exp = run_dir / "store", run_dir / "exp.toml"
    exp.write_text(experiment_toml(setup, store, reuse_memory="+glibc" not in mode))
    if tls:
        tls_args = ["--cert", str(pki / "server-hub.pem"), "--key", str(pki / "server-hub.key")]
        tls_args += ["--client-ca", str(pki / "ca.pem")]
    else:
        tls_args = ["--insecure"]
    return [str(VENV_BIN / "potluck"), "server", str(exp), "--store", str(store), *tls_args]


@dataclass(frozen=True)
class FloorRound:
    """A round of the floor server, shaped like the run store's rounds for ``analyse``."""

    round: int
    committed_at: str
    metrics: dict[str, Any]


def rounds_of(mode: str, run_dir: Path) -> tuple[list[Any], list[dict[str, Any]]]:
    """The rounds and client health the server of ``mode`` recorded."""
    if mode.startswith("floor-"):
        log = json.loads((run_dir / "floor-rounds.json").read_text())
        rounds: list[Any] = [
            FloorRound(
                r["round"],
                datetime.fromtimestamp(r["started_at"] + r["round_seconds"]).isoformat(),
                {**r, "updates": None, "failed": None, "refused": None},
            )
            for r in log
        ]
        return rounds, []
    from potluck.store.sqlite import RunStore

    with RunStore(run_dir / "store") as st:
        run = st.list_runs()[0]
        return list(st.rounds(run.run_id)), list(st.health(run.run_id))


def deploy(setup: Setup, mode: str, pki: Path) -> dict[str, Any]:
    """One deployment run; everything it measured. ``mode``: "tls" or "insecure", with
    "+glibc" for a server that leaves glibc's malloc as it is (``deploy.reuse_memory``), or
    "floor-tls" / "floor-insecure" for the bare grpcio server (``grpc_floor.py``). The
    light clients of process ``i`` answer with ``setup.updates[i]`` (or the last one)."""
    run_dir = setup.work / f"{mode}-{setup.compression}"
    logs = run_dir / "logs"
    logs.mkdir(parents=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    server_log = logs / "server.log"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        t_start = time.time()
        with server_log.open("wb") as out:
            server = subprocess.Popen(
                server_command(setup, mode, pki, run_dir),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        procs.append(server)
        port = _wait_for_port(server_log, server)
        t_listening = time.time()
        perf_data = run_dir / "perf.data"
        if setup.perf:  # CPU samples of the server, by symbol (flat: no call graphs)
            perf_cmd = ["perf", "record", "-q", "-e", "cpu-clock", "-F", str(PERF_HZ)]
            perf_cmd += ["-k", "CLOCK_MONOTONIC", "-p", str(server.pid), "-o", str(perf_data)]
            procs.append(subprocess.Popen(perf_cmd, stdout=subprocess.DEVNULL))
        names, per = setup.names, -(-setup.clients // setup.procs)
        outs = []
        for i in range(setup.procs):
            out_path = logs / f"clients-{i}.json"
            spec = {
                "server": f"127.0.0.1:{port}",
                "names": names[i * per : (i + 1) * per],
                "pki": str(pki) if "tls" in mode else None,
                "update": str(setup.updates[min(i, len(setup.updates) - 1)]),
                "poll_timeout_s": setup.poll_timeout_s,
                "out": str(out_path),
            }
            spec_path = logs / f"clients-{i}.spec.json"
            spec_path.write_text(json.dumps(spec))
            outs.append(out_path)
            with (logs / f"clients-{i}.log").open("wb") as out:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, __file__, "--light-client", str(spec_path)],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env=env,
                    )
                )
        monitor = Monitor(server.pid, [p.pid for p in procs[1 + setup.perf :]], port)
        monitor.start()
        try:
            status, usage = _wait4(server.pid, timeout=3600)
            server.returncode = os.waitstatus_to_exitcode(status)
        finally:
            monitor.stop()
        t_end = time.time()
        if server.returncode != 0:
            raise RuntimeError(
                f"server failed ({server.returncode}):\n{server_log.read_text()[-3000:]}"
            )
        for p in procs[1:]:
            p.wait(timeout=120)  # perf ends with the server, the clients when told "done"
        client_outs = [json.loads(p.read_text()) for p in outs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    rounds, health = rounds_of(mode, run_dir)
    result = analyse(
        setup,
        mode,
        monitor,
        rounds,
        health,
        client_outs,
        usage,
        {"start": t_start, "listening": t_listening, "end": t_end},
        server_log.read_text(errors="replace"),
    )
    if setup.perf:
        mono = time.time() - time.monotonic()
        window = result["server"]["rounds_window"]
        result["server_profile"] = perf_profile(perf_data, [(window[0] - mono, window[1] - mono)])
        result["server_profile_by_phase"] = phase_profiles(perf_data, result["rounds"])
    return result


_KERNEL = {  # rough buckets for kernel symbols, by substring, first match wins
    "kernel: page faults, page allocation and freeing": (
        "fault", "page", "folio", "memcg", "pte", "pmd", "p4d", "lruvec", "rmap", "vma",
        "mas_", "tlb", "unmap", "zap", "freelist", "rmqueue", "swap", "lru", "charge",
        "mmap", "brk", "madvise", "mm_",
    ),
    "kernel: socket copies and TCP/IP": (
        "copy_from_iter", "copy_to_iter", "copy_folio", "tcp", "skb", "ip_", "sock",
        "recvmsg", "sendmsg", "net_", "loopback", "bbr", "softirq", "_bh",
    ),
    "kernel: scheduling, wake-ups, locks": (
        "task_switch", "spin", "schedule", "futex", "wake", "timer", "rcu", "irq",
        "resched", "syscall", "epoll", "poll",
    ),
}  # fmt: skip


def _bucket(obj: str, sym: str) -> str:
    if obj == "[kernel.kallsyms]":
        for bucket, keys in _KERNEL.items():
            if any(k in sym for k in keys):
                return bucket
        return "kernel: other"
    if obj.startswith("libc.so"):
        if "memmove" in sym or "memcpy" in sym:
            return "libc: memcpy/memmove"
        return "libc: memset" if "memset" in sym else "libc: malloc, other"
    if obj.startswith("libcrypto"):
        return "SHA-256 (hashlib: OpenSSL libcrypto)"
    if obj.startswith("cygrpc"):
        aead = any(k in sym.lower() for k in ("aes", "gcm", "ghash", "gfmul"))
        return "TLS AES-GCM (BoringSSL in cygrpc)" if aead else "gRPC core, HTTP/2, BoringSSL"
    if obj.startswith(("libtorch", "libc10", "libgomp", "libmkl")):
        return "torch (validation, aggregation)"
    if obj.startswith("_message"):
        return "protobuf (upb)"
    if obj.startswith("libpython"):
        return "Python interpreter"
    return "other"


def perf_profile(
    data: Path, windows: Sequence[tuple[float, float]], top: int = 30
) -> dict[str, Any]:
    """The server's CPU samples within ``windows`` (monotonic seconds; ``perf report``): CPU
    seconds, shares by bucket (``_bucket``) and the top symbols."""
    counts: dict[tuple[str, str], int] = {}
    for t0, t1 in windows:
        cmd = ["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", "dso,sym"]
        cmd += ["--time", f"{t0:.6f},{t1:.6f}", "-t", "|", "--percent-limit", "0", "-n"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            _, count, obj, sym = (x.strip() for x in line.split("|", 3))
            key = (obj, sym.removeprefix("[.] ").removeprefix("[k] "))
            counts[key] = counts.get(key, 0) + int(count)
    samples = sum(counts.values()) or 1
    buckets: dict[str, float] = {}
    for (obj, sym), n in counts.items():
        buckets[_bucket(obj, sym)] = buckets.get(_bucket(obj, sym), 0.0) + n / samples
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
    return {
        "hz": PERF_HZ,
        "wall_s": sum(t1 - t0 for t0, t1 in windows),
        "samples": sum(counts.values()),
        "cpu_s": sum(counts.values()) / PERF_HZ,
        "by_bucket": dict(sorted(buckets.items(), key=lambda kv: -kv[1])),
        "top_symbols": [
            {"share": n / samples, "object": obj, "symbol": sym[:160], "bucket": _bucket(obj, sym)}
            for (obj, sym), n in ranked
        ],
    }


def phase_profiles(data: Path, rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``perf_profile`` of three phases of the rounds after the first (all rounds if only
    one): until every task was received, until every update was acknowledged, and after the
    last acknowledgement (validation, aggregation, bookkeeping)."""
    mono = time.time() - time.monotonic()
    steady = [r for r in rounds[1:] or rounds if "all_updates_acked_after_s" in r]
    phases: dict[str, list[tuple[float, float]]] = {"tasks out": [], "updates in": []}
    phases["after the last update"] = []
    for r in steady:
        start = r["started_at"] - mono
        tasks, acks = r["all_tasks_received_after_s"], r["all_updates_acked_after_s"]
        phases["tasks out"].append((start, start + tasks))
        phases["updates in"].append((start + tasks, start + acks))
        end = max(start + r["round_seconds"], start + acks)  # a floor round ends before its acks
        phases["after the last update"].append((start + acks, end))
    return {phase: perf_profile(data, windows, top=10) for phase, windows in phases.items()}


def analyse(
    setup: Setup,
    mode: str,
    mon: Monitor,
    rounds: Sequence[Any],
    health: Sequence[dict[str, Any]],
    client_outs: Sequence[dict[str, Any]],
    usage: Any,
    times: dict[str, float],
    server_log: str,
) -> dict[str, Any]:
    """Per-round and whole-run numbers of one deployment."""
    tasks = [t for out in client_outs for c in out["clients"] for t in c["tasks"]]
    errors = sum(c["error_count"] for out in client_outs for c in out["clients"])
    error_samples = [e for out in client_outs for c in out["clients"] for e in c["errors"]]
    per_round = []
    for r in rounds:
        m = r.metrics
        end = datetime.fromisoformat(r.committed_at).timestamp()
        start = end - m["round_seconds"]
        ts = [t for t in tasks if t["round"] == r.round]

        def delta(key: Callable[[dict[str, Any]], float | None], t0: float, t1: float) -> float:
            a, b = mon.at(t0, key), mon.at(t1, key)
            return float("nan") if a is None or b is None else b - a

        def srv(k: str) -> Callable[[dict[str, Any]], float | None]:
            return lambda s: s["server"][k] if s["server"] else None

        row = {
            "round": r.round,
            "started_at": start,
            "round_seconds": m["round_seconds"],
            "updates": m.get("updates"),
            "failed": m.get("failed"),
            "refused": m.get("refused"),
            "bytes_down_nominal": m["bytes_down"],
            "bytes_up_nominal": m["bytes_up"],
            "task_bytes_received": sum(t["task_bytes"] for t in ts),
            "update_bytes_sent": sum(t["update_bytes"] for t in ts),
            "loopback_bytes": delta(lambda s: s["lo_bytes"], start, end),
            "server_minor_faults": delta(srv("minflt"), start, end),
            "server_cpu_s": delta(srv("cpu_s"), start, end),
            "clients_cpu_s": delta(lambda s: s["clients_cpu_s"], start, end),
            "machine_busy_s": delta(lambda s: s["machine"].get("busy_s"), start, end),
            "server_rss_max_mib": mon.window_max(start, end, lambda s: s["server"]["VmRSS"]),
        }
        if ts:
            row.update(
                first_task_byte_after_s=min(t["first"] for t in ts) - start,
                all_tasks_received_after_s=max(t["last"] for t in ts) - start,
                task_download_s=summary([t["last"] - t["first"] for t in ts]),
                update_upload_s=summary([t["acked"] - t["last"] for t in ts]),
                all_updates_acked_after_s=max(t["acked"] for t in ts) - start,
            )
        per_round.append(row)
    first_start = min(
        (datetime.fromisoformat(r.committed_at).timestamp() - r.metrics["round_seconds"])
        for r in rounds
    )
    before = mon.at(first_start, lambda s: s["server"]["VmRSS"] if s["server"] else None)
    last_end = max(datetime.fromisoformat(r.committed_at).timestamp() for r in rounds)
    return {
        "mode": mode,
        "rounds": per_round,
        "server": {
            "peak_rss_mib": usage.ru_maxrss / 1024,
            "rss_before_round_1_mib": before,
            "cpu_s_total": usage.ru_utime + usage.ru_stime,
            "user_s": usage.ru_utime,
            "system_s": usage.ru_stime,
            "listening_after_s": times["listening"] - times["start"],
            "round_1_started_after_s": first_start - times["start"],
            "exit_after_s": times["end"] - times["start"],
            "rounds_window": [first_start, last_end],
            "warnings_in_log": server_log.count(" WARNING "),
        },
        "clients": {
            "processes": len(client_outs),
            "cpu_s": [o["cpu_s"] for o in client_outs],
            "maxrss_mib": [o["maxrss_mib"] for o in client_outs],
            "tasks_answered": len(tasks),
            "acks": sum(t["reply"] == "ack" for t in tasks),
            "rpc_errors": errors,
            "error_samples": error_samples[:5],
            "tcp_connections_max": mon.connections,
        },
        "health": {
            "clients": len(health),
            "failures": sum(h["failures"] for h in health),
            "rounds_completed": sum(h["rounds_completed"] for h in health),
        },
    }


# ---- raw transfer baselines ---------------------------------------------------------------


def loopback_seconds(total: int, streams: int, tls: Path | None = None) -> tuple[float, str]:
    """Seconds to move ``total`` bytes over 127.0.0.1 in ``streams`` parallel TCP connections
    (1 MiB writes, connections set up before the clock starts); with ``tls`` (the PKI
    directory), over TLS with the federation's server certificate. Also the cipher."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server_ctx = client_ctx = None
    if tls is not None:
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(tls / "server-hub.pem", tls / "server-hub.key")
        client_ctx = ssl.create_default_context(cafile=tls / "ca.pem")
    share = total // streams
    payload = memoryview(os.urandom(CHUNK))
    ready, done = threading.Barrier(2 * streams + 1), []
    cipher = ["tcp"]

    def receive(conn: socket.socket, received: threading.Event) -> None:
        buf = memoryview(bytearray(CHUNK))
        ready.wait()
        got = 0
        while got < share:
            n = conn.recv_into(buf)
            if not n:
                break
            got += n
        done.append(got)
        received.set()

    def send(received: threading.Event) -> None:
        raw = socket.create_connection(("127.0.0.1", port))
        conn = client_ctx.wrap_socket(raw, server_hostname="localhost") if client_ctx else raw
        if isinstance(conn, ssl.SSLSocket):
            cipher[0] = f"{conn.version()} {conn.cipher()[0]}"  # type: ignore[index]
        ready.wait()
        left = share
        while left > 0:
            n = min(left, CHUNK)
            conn.sendall(payload[:n])
            left -= n
        received.wait()  # closing earlier could reset the connection under unread data
        conn.close()

    threads, conns = [], []
    for _ in range(streams):
        received = threading.Event()
        threads.append(threading.Thread(target=send, args=(received,)))
        threads[-1].start()
        conn, _ = listener.accept()
        if server_ctx is not None:
            conn = server_ctx.wrap_socket(conn, server_side=True)
        conns.append(conn)
        threads.append(threading.Thread(target=receive, args=(conn, received)))
        threads[-1].start()
    ready.wait()
    t0 = time.perf_counter()
    for t in threads[1::2]:  # the receivers
        t.join()
    seconds = time.perf_counter() - t0
    for t in threads[::2]:
        t.join()
    for conn in conns:
        conn.close()
    listener.close()
    if sum(done) != share * streams:
        raise RuntimeError(f"loopback moved {sum(done)} of {share * streams} bytes")
    return seconds, cipher[0]


def aes_gcm_seconds(total: int, key_bits: int) -> float:
    """Seconds to encrypt ``total`` bytes with AES-GCM in 16 KiB records (TLS's size), 1 core."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead, record = AESGCM(os.urandom(key_bits // 8)), os.urandom(16 << 10)
    nonce, n = os.urandom(12), -(-total // len(record))
    t0 = time.perf_counter()
    for _ in range(n):
        aead.encrypt(nonce, record, None)
    return time.perf_counter() - t0


def raw_transfer(total: int, pki: Path, repeats: int) -> dict[str, Any]:
    streams = len(os.sched_getaffinity(0))
    tcp = [loopback_seconds(total, streams)[0] for _ in range(repeats)]
    tls_runs = [loopback_seconds(total, streams, pki) for _ in range(repeats)]
    return {
        "bytes": total,
        "streams": streams,
        "write_bytes": CHUNK,
        "tcp_s": summary(tcp),
        "tcp_gib_per_s": total / statistics.median(tcp) / 2**30,
        "tls_s": summary([s for s, _ in tls_runs]),
        "tls_gib_per_s": total / statistics.median([s for s, _ in tls_runs]) / 2**30,
        "tls_cipher": tls_runs[0][1],
        "aes_128_gcm_1core_s": aes_gcm_seconds(total, 128),
        "aes_256_gcm_1core_s": aes_gcm_seconds(total, 256),
    }


# ---- per-stage profile of the server path -------------------------------------------------


def _timed(fn: Callable[[], object], repeats: int = 9) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up call."""
    return statistics.median(call_seconds(fn, repeats))


def stage_profile(size: int, clients: int, body: bytes) -> dict[str, Any]:
    """Seconds per envelope of each step of the server path for a model of ``size`` floats
    and the light clients' uncompressed reply ``body`` (median of 9), the whole path per
    envelope and per round (x ``clients``), checksums and the aggregation. Run in a fresh
    process, with malloc tuned as the server tunes it."""
    import zlib

    import torch

    from potluck.aggregate.mean import WeightedMean
    from potluck.aggregate.stack import StackBuffer
    from potluck.core import records
    from potluck.core.parts import part_context
    from potluck.deploy import codec, wire
    from potluck.deploy.memory import reuse_freed_memory

    reuse_freed_memory()
    torch.set_num_threads(1)
    w = torch.randn(size)
    own = wire.Envelope(
        "task", "0123456789abcdef", round=1, task_id=os.urandom(16), client="c000",
        scalars={"op": "train", "work": 1.0},
    )  # fmt: skip
    task = wire.Envelope(**{**own.__dict__, "arrays": {"w": w}})
    raw_update = UpdateEncoder(_pb(), body).chunks("0123456789abcdef", 1, os.urandom(16), "c000")
    update = wire.receive(raw_update)
    assert update.arrays["0/m/delta"].shape == (size,)
    examples = float(update.scalars["num_examples"])
    data = wire.encode(task)
    chunks = list(wire.to_chunks(data))
    up_chunks = [codec.parse_chunk(m) for m in raw_update]
    up_data = wire.from_chunks(up_chunks)
    prefix = wire.Prefix(wire.Envelope("task", arrays={"w": w}))

    def validate(env: Any) -> None:
        records.reply_from_message(env.message()).message.validate({"delta": size})

    def down() -> list[bytes]:  # what a gRPC thread does for one task (weights encoded once)
        return list(wire.send_encoded(prefix.extend(own)))

    def up() -> None:  # and for one update
        validate(wire.receive(raw_update))

    stages = {
        "down: wire.encode (codec, tensor bytes referenced)": lambda: wire.encode(task),
        "down: wire.Prefix (a round's weights, once per round)": lambda: wire.Prefix(task),
        "down: chunk frames (one copy)": lambda: [wire.frame(c) for c in chunks],
        "up: codec.parse_chunk (gRPC hands bytes)": lambda: [
            codec.parse_chunk(m) for m in raw_update
        ],
        "up: wire.from_chunks (SHA-256, one join)": lambda: wire.from_chunks(up_chunks),
        "up: wire.decode (codec, tensor copy)": lambda: wire.decode(up_data),
        "up: Message.validate (dtype, shape, finite)": lambda: validate(update),
    }
    per = {k: _timed(fn) for k, fn in stages.items()}
    whole = {"down: one task, whole path": _timed(down), "up: one update, whole path": _timed(up)}
    deltas = [torch.zeros(size) for _ in range(clients)]
    weights = torch.full((clients,), examples, dtype=torch.float64)
    ctx = part_context(0, 1, "aggregator")
    aggregate = _timed(lambda: WeightedMean().aggregate(torch.stack(deltas), weights, {}, ctx), 3)
    kept = StackBuffer()
    reused = _timed(lambda: WeightedMean().aggregate(kept.stack(deltas), weights, {}, ctx), 3)
    running = torch.zeros(size)

    def running_sum() -> torch.Tensor:  # as the updates arrive: no (K, d) stack at all
        running.zero_()
        total = float(weights.sum())
        for delta_k, weight in zip(deltas, weights.tolist(), strict=True):
            running.add_(delta_k, alpha=weight / total)
        return running

    streamed = _timed(running_sum, 3)
    first_touch = _timed(lambda: torch.empty(clients, size).fill_(0.0), 3)
    deltas.clear()
    delta = update.arrays["0/m/delta"]
    reference = {
        "sha256": _timed(lambda: hashlib.sha256(data).digest()),
        "zlib.crc32": _timed(lambda: zlib.crc32(data)),
        "copy into a new bytearray": _timed(lambda: bytearray(data)),
        "torch.isfinite(delta).all()": _timed(lambda: bool(torch.isfinite(delta).all())),
        "torch.isfinite(delta.sum())": _timed(lambda: bool(torch.isfinite(delta.sum()))),
    }
    return {
        "envelope_bytes": {"task": len(data), "update": len(up_data)},
        "per_envelope_s": {**per, **whole},
        "per_round_s": {
            **{k: v * clients for k, v in whole.items()},
            "aggregate: torch.stack + WeightedMean": aggregate,
            "aggregate: StackBuffer (reused) + WeightedMean": reused,
            "aggregate: running weighted sum, no stack": streamed,
            "reference: first touch of a fresh (K, d) buffer": first_touch,
            "hub: hand out tasks, collect answers (no payload)": hub_round_seconds(clients),
        },
        "reference_per_envelope_s": reference,
    }


def hub_round_seconds(clients: int, rounds: int = 3) -> float:
    """Median seconds of ``Hub.run`` for ``clients`` tasks without payload, answered by as many
    long-polling threads (the coordination alone: locks, wake-ups, the GIL)."""
    import secrets

    from potluck.deploy import wire
    from potluck.deploy.server import Hub, Task

    names = [f"c{i:03d}" for i in range(clients)]
    hub = Hub("run", clients, admit=names)

    def client(name: str) -> None:
        hub.join(name)
        while not hub.finished:
            task = hub.next_task(name, 5.0)
            if task is not None:
                answer = wire.Envelope("reply", "run", round=task.round, task_id=task.task_id)
                hub.answer(name, answer)

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in names]
    for t in threads:
        t.start()
    hub.wait_for_clients(clients, 60)
    times = []
    for rnd in range(1, rounds + 1):
        tasks = []
        for cid in range(clients):
            task_id = secrets.token_bytes(16)
            env = wire.Envelope("task", "run", round=rnd, task_id=task_id)
            tasks.append(Task(task_id, cid, "train", rnd, wire.Encoded((wire.encode(env),), b"")))
        t0 = time.perf_counter()
        hub.run(tasks, 60)
        times.append(time.perf_counter() - t0)
    hub.finish()
    for t in threads:
        t.join()
    return statistics.median(times)


# ---- driver -------------------------------------------------------------------------------


def model_size(name: str) -> int:
    from potluck.models import build_model

    model = build_model(name, input_shape=(1, 28, 28), num_classes=10)
    return sum(p.numel() for p in model.parameters())


SUMMARY_KEYS = (  # per round, as ``analyse`` names them
    "round_seconds",
    "bytes_up_nominal",  # the run store's bytes_up
    "bytes_down_nominal",
    "update_bytes_sent",  # gRPC messages, as the clients sent and received them
    "task_bytes_received",
    "loopback_bytes",
    "server_cpu_s",
)


def run_summary(run: dict[str, Any], clients: int) -> dict[str, Any]:
    """Round 1 and the median of the later rounds (all, if there is one) of ``SUMMARY_KEYS``,
    and whether the server accepted every update (None for the floor, which checks nothing).
    """
    rounds = run["rounds"]
    later = rounds[1:] or rounds
    floor = run["mode"].startswith("floor-")
    return {
        "round_1": {k: rounds[0][k] for k in SUMMARY_KEYS},
        "later_rounds_median": {k: statistics.median(r[k] for r in later) for k in SUMMARY_KEYS},
        "all_updates_accepted": None
        if floor
        else all(r["updates"] == clients and not r["failed"] and not r["refused"] for r in rounds),
    }


def compare(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each setting's summary and its ratios to ``none`` (same mode, same run), per mode;
    ``runs`` is keyed ``"<mode>/<setting>"``."""
    out: dict[str, Any] = {}
    for key, run in runs.items():
        mode, setting = key.split("/", 1)
        base = runs.get(f"{mode}/none")
        row = dict(run["summary"])
        if base is not None:
            for part in ("round_1", "later_rounds_median"):
                ours, theirs = row[part], base["summary"][part]
                row[f"{part}_vs_none"] = {
                    k: ours[k] / theirs[k] if theirs[k] else float("nan") for k in SUMMARY_KEYS
                }
        out.setdefault(mode, {})[setting] = row
    return out


def _cell(row: dict[str, Any], key: str, scale: float = 1.0, fmt: str = ",.1f") -> str:
    """A later-rounds median of ``row`` and its ratio to ``none`` in brackets."""
    ratio = row.get("later_rounds_median_vs_none", {}).get(key)
    value = f"{row['later_rounds_median'][key] / scale:{fmt}}"
    return value + (f" ({ratio:.3f})" if ratio is not None else "")


def print_comparison(table: dict[str, Any]) -> None:
    mib = 2**20
    for mode, rows in table.items():
        print(f"[{mode}] rounds after the first (median), ratio to none in brackets")
        for setting, row in rows.items():
            print(
                f"  {setting:>14}: round 1 {row['round_1']['round_seconds']:.2f} s, later "
                f"{_cell(row, 'round_seconds', fmt='.2f')} s; store up "
                f"{_cell(row, 'bytes_up_nominal', mib)} down "
                f"{_cell(row, 'bytes_down_nominal', mib)} MiB; gRPC up "
                f"{_cell(row, 'update_bytes_sent', mib)} down "
                f"{_cell(row, 'task_bytes_received', mib)} MiB; lo "
                f"{_cell(row, 'loopback_bytes', mib)} MiB; server CPU "
                f"{_cell(row, 'server_cpu_s', fmt='.2f')} s; all accepted: "
                f"{row['all_updates_accepted']}",
                flush=True,
            )


def measure(setup: Setup, mode: str, pki: Path, raw_repeats: int) -> dict[str, Any]:
    """``deploy`` and the raw transfer of the bytes it moved; printed as it goes."""
    run = deploy(setup, mode, pki)
    moved = int(
        statistics.median(r["task_bytes_received"] + r["update_bytes_sent"] for r in run["rounds"])
    )
    run["raw"] = raw_transfer(moved, pki, raw_repeats)
    tcp, tls = run["raw"]["tcp_s"]["median"], run["raw"]["tls_s"]["median"]
    for r in run["rounds"]:
        r["overhead_vs_tcp"] = r["round_seconds"] / tcp
        r["overhead_vs_tls"] = r["round_seconds"] / tls
        r["server_cpu_vs_tcp"] = r["server_cpu_s"] / tcp
        print(
            f"  round {r['round']}: {r['round_seconds']:.2f} s, "
            f"{(r['task_bytes_received'] + r['update_bytes_sent']) / 2**20:,.0f} MiB of "
            f"messages ({r['loopback_bytes'] / 2**20:,.0f} MiB on lo), server CPU "
            f"{r['server_cpu_s']:.2f} s ({r['server_minor_faults']:,.0f} page faults), "
            f"clients CPU {r['clients_cpu_s']:.2f} s, overhead "
            f"{r['overhead_vs_tcp']:.1f}x TCP / {r['overhead_vs_tls']:.1f}x TLS; updates "
            f"{r['updates']}, failed {r['failed']}, refused {r['refused']}",
            flush=True,
        )
    print(
        f"  raw: TCP {tcp:.3f} s, TLS {tls:.3f} s for {moved / 2**20:,.0f} MiB; server "
        f"peak RSS {run['server']['peak_rss_mib']:,.0f} MiB",
        flush=True,
    )
    run["summary"] = run_summary(run, setup.clients)
    return run


def run_stage_profile(size: int, clients: int, body: Path) -> dict[str, Any]:
    """``stage_profile`` in a fresh process (one torch thread)."""
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    cmd = [sys.executable, __file__, "--stage-profile", str(size), str(clients), str(body)]
    subprocess.run([*cmd, str(out)], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    profile: dict[str, Any] = json.loads(out.read_text())
    out.unlink()
    for k, v in profile["per_round_s"].items():
        print(f"  {k}: {v:.3f} s per round")
    return profile


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--light-client"]:
        light_client_main(argv[1])
        return
    if argv[:1] == ["--stage-profile"]:
        result = stage_profile(int(argv[1]), int(argv[2]), Path(argv[3]).read_bytes())
        Path(argv[4]).write_text(json.dumps(result, indent=1))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--procs", type=int, default=4, help="light client processes")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default="cnn")
    parser.add_argument(
        "--modes",
        help="tls, insecure, tls+glibc (potluck server); floor-tls, floor-insecure (bare "
        "grpcio); default tls,insecure,floor-tls,floor-insecure, with --compression tls",
    )
    parser.add_argument(
        "--compression",
        help="settings UP[+DOWN], comma-separated: UP one of "
        f"{', '.join(UPLINK)}; DOWN one of {', '.join(DOWNLINK)} (the broadcast)",
    )
    parser.add_argument("--raw-repeats", type=int, default=3)
    parser.add_argument(
        "--name", help="results file name (deploy_loopback, with --compression _compression)"
    )
    parser.add_argument(
        "--perf",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"profile the server with perf record at {PERF_HZ} Hz (if perf is installed)",
    )
    parser.add_argument(
        "--stages",
        action=argparse.BooleanOptionalAction,
        help="the stage profile (default: only without --compression)",
    )
    parser.add_argument(
        "--stages-only", action="store_true", help="only the stage profiles (no deployment)"
    )
    parser.add_argument("--keep", type=Path, help="keep the work directory (logs, store) here")
    parser.add_argument(
        "--distinct-updates",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="each light-client process sends its own client's reply (--no-distinct-updates: "
        "all send client 0's)",
    )
    args = parser.parse_args(argv)
    distinct = args.procs if args.distinct_updates else 1
    settings = args.compression.split(",") if args.compression else ["none"]
    default_modes = "tls" if args.compression else "tls,insecure,floor-tls,floor-insecure"
    modes = [] if args.stages_only else (args.modes or default_modes).split(",")
    for setting in settings:
        try:
            chains(setting)
        except ValueError as exc:
            parser.error(str(exc))
    if args.compression and any(m.startswith("floor-") for m in modes):
        parser.error("the floor modes serve the uncompressed model only: not with --compression")
    stages = args.stages_only or (not args.compression if args.stages is None else args.stages)
    name = args.name or ("deploy_loopback_compression" if args.compression else "deploy_loopback")

    payload = header("deploy_loopback")
    size = model_size(args.model)
    results: dict[str, Any] = {}
    replies: dict[str, Any] = {}
    profile = None
    with tempfile.TemporaryDirectory(prefix="potluck-deploy-bench-") as tmp:
        work = args.keep or Path(tmp)
        perf = args.perf and shutil.which("perf") is not None
        base = Setup(args.clients, args.procs, args.rounds, args.model, size, work, perf)
        pki = base.work / "pki"
        pki_s = make_pki(pki, base.names)
        print(f"PKI: {args.clients} client certificates in {pki_s:.1f} s", flush=True)
        what = f"{args.clients} clients, {args.model} ({size:,} parameters)"
        for setting in settings if modes else []:
            bodies = tuple(work / f"reply-{setting}-{i}.bin" for i in range(distinct))
            setup = replace(base, compression=setting, updates=bodies)
            described = [reply_body(setup, body, i) for i, body in enumerate(bodies)]
            replies[setting] = {**described[0], "distinct_updates": distinct}
            print(
                f"{setting}: the reply is {replies[setting]['envelope_bytes']:,} bytes "
                f"(upload {replies[setting]['upload_wire_bytes']:,}, client state "
                f"{replies[setting]['client_state_bytes']:,})",
                flush=True,
            )
            for mode in modes:
                print(f"[{mode} {setting}] {what}", flush=True)
                run = measure(setup, mode, pki, args.raw_repeats)
                results[f"{mode}/{setting}" if args.compression else mode] = run
        if stages:
            print("stage profile ...", flush=True)
            dense = work / "reply-none.bin"
            if not dense.exists():
                reply_body(base, dense)
            profile = run_stage_profile(size, args.clients, dense)
    comparison = compare(results) if args.compression else None
    if comparison is not None:
        print_comparison(comparison)
    import potluck

    payload.update(
        potluck_imported_from=str(Path(potluck.__file__).resolve().parent),  # a snapshot?
        setup={
            "clients": args.clients,
            "client_processes": args.procs,
            "rounds": args.rounds,
            "model": args.model,
            "parameters": size,
            "model_bytes": 4 * size,
            "pki_seconds": pki_s,
            "perf": perf,
            "compression": {
                s: dict(zip(("transforms", "downlink"), chains(s), strict=True)) for s in settings
            },
        },
        replies=replies,
        deployments=results,
        comparison=comparison,
        stage_profile=profile,
    )
    print(write_result(name, payload))
    refused = [k for k, run in results.items() if run["summary"]["all_updates_accepted"] is False]
    if refused:
        raise SystemExit(f"the server did not accept every update in: {', '.join(refused)}")


if __name__ == "__main__":
    main()
