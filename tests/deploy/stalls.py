"""An attacker that holds stalled streams open against a potluck server (issue 13, finding 3).

Each stream sends nothing, or the first chunk of a message it never finishes, and waits; a
stream the server cuts or refuses is opened again at once, until ``stop``. Used by the abuse
test (``test_abuse.py``) and, as a process of its own (so that its threads do not compete
with the members' for one interpreter), by its benchmark (``benchmarks/abuse.py``)::

    python tests/deploy/stalls.py 127.0.0.1:50051 PKI_DIR --streams 100

prints ``ready`` once its streams are open and, when its standard input closes, how they
ended (JSON: per group, a count per kind or refusal reason) and its CPU seconds.

Example:
    >>> Outcome("refused", "client 'x' is revoked", 0.01, 12.5).kind
    'refused'
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from potluck.deploy import codec, wire
from potluck.deploy.client import ClientTLS

STREAMS_PER_CHANNEL = 50  # below HTTP/2's usual limit of concurrent streams per connection


@dataclass(frozen=True)
class Outcome:
    """How one stalled stream ended: ``refused`` (with the server's reason), ``cut`` (the
    server cancelled it), or ``other``; after how many seconds, and when (monotonic)."""

    kind: str
    reason: str
    seconds: float
    ended: float = 0.0


@dataclass
class Staller:
    """``streams`` stalled streams to ``target`` with ``tls``'s certificate."""

    target: str
    tls: ClientTLS | None
    streams: int
    partial: bool = False  # send the first chunk of a large message, then stall
    retry_s: float = 1.0  # before opening a refused stream again (a cut one: at once)
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> Staller:
        channels = [self._channel() for _ in range(-(-self.streams // STREAMS_PER_CHANNEL))]
        for i in range(self.streams):
            call = wire.caller(channels[i // STREAMS_PER_CHANNEL])
            t = threading.Thread(target=self._hold, args=(call,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        return self.outcomes

    def _hold(self, call: object) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                reply = wire.receive(call(self._frames(), timeout=600))  # type: ignore[operator]
                outcome = Outcome(reply.kind, str(reply.scalars.get("reason", "")), 0.0)
            except grpc.RpcError as exc:
                kind = "cut" if exc.code() == grpc.StatusCode.CANCELLED else "other"
                outcome = Outcome(kind, str(exc.code()), 0.0)
            now = time.monotonic()
            outcome = Outcome(outcome.kind, outcome.reason, now - t0, now)
            with self._lock:
                self.outcomes.append(outcome)
            if outcome.kind != "cut":
                self._stop.wait(self.retry_s)

    def _frames(self) -> Iterator[bytes]:
        if self.partial:
            data = bytes(wire.DEFAULT_CHUNK_BYTES)
            yield codec.chunk_frame(200 << 20, 0, [data], b"")  # of 200 MiB announced
        self._stop.wait()

    def _channel(self) -> grpc.Channel:
        if self.tls is None:
            return grpc.insecure_channel(self.target)
        options = [("grpc.ssl_target_name_override", "localhost")]
        return grpc.secure_channel(self.target, self.tls.credentials(), options=options)


GROUPS = ["not admitted", "revoked", "rogue member, silent", "rogue member, partial"]


def attack(target: str, pki: Path, n: int, rogue: str = "site-4") -> dict[str, Staller]:
    """``n`` stalled streams with a certificate not on the admission list (``intruder``),
    ``n`` with a revoked one (``revoked-site``), ``n`` with the member ``rogue``'s (half of
    them silent, half partial); certificates as ``potluck certs`` writes them in ``pki``."""

    def tls(name: str) -> ClientTLS:
        return ClientTLS(pki / f"client-{name}.pem", pki / f"client-{name}.key", pki / "ca.pem")

    return dict(zip(GROUPS, [
        Staller(target, tls("intruder"), n).start(),
        Staller(target, tls("revoked-site"), n).start(),
        Staller(target, tls(rogue), n // 2).start(),
        Staller(target, tls(rogue), n - n // 2, partial=True).start(),
    ], strict=True))  # fmt: skip


def tally(outcomes: list[Outcome]) -> dict[str, int]:
    counts = Counter(o.kind if o.kind != "refused" else o.reason[:60] for o in outcomes)
    return dict(counts.most_common())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="hold stalled streams against a server")
    parser.add_argument("target", help="HOST:PORT")
    parser.add_argument("pki", type=Path, help="directory of the certificates")
    parser.add_argument("--streams", type=int, default=100, help="per group")
    args = parser.parse_args(argv)
    stallers = attack(args.target, args.pki, args.streams)
    print("ready", flush=True)
    sys.stdin.read()  # until the caller closes it
    seen = {name: tally(s.stop()) for name, s in stallers.items()}
    print(json.dumps({"outcomes": seen, "cpu_s": time.process_time()}), flush=True)


if __name__ == "__main__":
    main()
