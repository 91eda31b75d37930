"""Denial of service by stalled streams (issue 13, finding 3), over mutual TLS on loopback.

300 streams are held open against the server while four members train: 100 with a
certificate not on the admission list, 100 with a revoked one, and 100 with the certificate
of a member gone rogue (half send nothing, half the first chunk of a 200 MiB message). The
first two are refused before anything is read; the rogue member gets no more than its
streams per client, each cut at the receive deadline, and a message larger than what it
can need without a task is refused at its first chunk. The members' rounds complete, equal
to the simulation in which the rogue member sent nothing.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import PKI, SITES, Deployment
from stalls import Outcome, Staller
from test_deploy import learning, simulate

Make = Callable[..., Deployment]
ROGUE = "site-4"


def reasons(outcomes: list[Outcome]) -> Counter[str]:
    return Counter(o.kind if o.kind != "refused" else f"refused: {o.reason}" for o in outcomes)


def wait_for(condition: Callable[[], bool], failure: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.1)


def test_300_stalled_streams_do_not_stop_the_members_rounds(
    deployment: Make, pki: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="potluck")
    limits = {"min_clients": 4, "receive_timeout_s": 1.5, "max_streams_per_client": 4}
    dep = deployment(pki.server(), pki.ca_dir / "revoked.txt", **limits)
    target = f"127.0.0.1:{dep.port}"
    too_large = "refused: malformed message: envelope of 209715200 bytes exceeds the limit of"
    # The partial streams first: a cut stream is opened again at once, so once the other
    # rogue streams hold the client's slots, a partial one may never get in on a slow host.
    attackers = {"rogue, partial": Staller(target, pki.client(ROGUE), 50, partial=True).start()}
    wait_for(
        lambda: any(r.startswith(too_large) for r in reasons(attackers["rogue, partial"].outcomes)),
        "no oversized message was refused",
    )
    attackers |= {
        "intruder": Staller(target, pki.client("intruder"), 100).start(),
        "revoked": Staller(target, pki.client("revoked-site"), 100).start(),
        "rogue": Staller(target, pki.client(ROGUE), 50).start(),
    }
    wait_for(
        lambda: any(o.kind == "cut" for o in attackers["rogue"].outcomes),
        "no stalled stream was cut",
    )
    for name in SITES:
        if name != ROGUE:
            dep.site(name, pki.client(name))
    for t in dep.threads[1:]:  # the members end when told the run is done,
        t.join(120)
    done = time.monotonic()  # before the server stops (and ends every stream)
    result = dep.finish()
    seen = {what: reasons([o for o in a.stop() if o.ended < done]) for what, a in attackers.items()}

    assert learning(result) == learning(simulate(tmp_path / "sim", missing={4}, **limits))
    assert all(m["updates"] == 3 or m["updates"] == 4 for m in result.history)
    turned_away = {"other", "cut"}  # by gRPC itself, when every thread is busy (a loaded host)
    assert "refused: client 'intruder' is not on the admission list" in seen["intruder"]
    assert set(seen["intruder"]) - turned_away == {
        "refused: client 'intruder' is not on the admission list"
    }
    assert set(seen["revoked"]) - turned_away == {"refused: client 'revoked-site' is revoked"}
    busy = f"refused: client '{ROGUE}' already has 4 open streams (deploy.max_streams_per_client)"
    assert seen["rogue"]["cut"] >= 1 and seen["rogue"][busy] >= 46
    assert set(seen["rogue"]) - {"other"} == {"cut", busy}  # "other": as above, a loaded host
    partial = seen["rogue, partial"]
    assert any(r.startswith(too_large) for r in partial), partial
    # on a loaded host a partial stream may also outlast the receive deadline and be cut, or
    # be turned away by gRPC itself, as the others' streams may
    assert all(r.startswith(too_large) or r in (busy, *turned_away) for r in partial), partial
    assert f"cut stream from {ROGUE}" in caplog.text
    assert "receiving the message took longer than 1.5 s" in caplog.text
