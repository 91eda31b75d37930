"""300 stalled streams against ``potluck server`` over mutual TLS (issue 13, finding 3).

The server is ``potluck server`` in its own process (digits, MLP, 5 admitted sites, 4 per
round, 800 rounds); four honest sites run as threads of this process (``Site``, real mTLS
clients). Before they join, an attacker (``tests/deploy/stalls.py``, in a process of its
own) holds 300 stalled streams open: 100 with a certificate the CA signed but that is not on
the admission list, 100 with a revoked one, 100 with the certificate of the fifth, rogue
member (50 send nothing, 50 the first 1 MiB chunk of a 200 MiB message); a refused stream is
opened again after 1 s, a cut one at once. The attack is held for ``--attack-s`` seconds
after the members start, then stopped, and the run goes on to its end. Measured: the
server's resident memory (``/proc/PID/status``, every 0.1 s) before the attack, at its peak,
and after the burst; how long a member's ``join`` takes while the attack is held (5 probes,
10 s timeout each);
the seconds per round under attack and after it (from 5 s after the attack stopped), and
their ratio; the rounds committed; how the attacker's streams ended, and its CPU seconds.

``--ref COMMIT`` also runs the same attack against the server of an earlier commit (its
source checked out in a temporary worktree, run with ``PYTHONPATH``), side by side; its
config leaves out the fields it does not know.

Run from the repository root (about 3 minutes with ``--ref``):
    .venv/bin/python benchmarks/abuse.py --ref 967fd76
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import header, write_result
from deploy_loopback import _wait_for_port as wait_for_port

ROOT = Path(__file__).resolve().parents[1]
from potluck.config import ExperimentConfig  # noqa: E402
from potluck.deploy import certs, wire  # noqa: E402
from potluck.deploy.client import ClientTLS, Site  # noqa: E402
from potluck.deployment import site_program  # noqa: E402
from potluck.store.sqlite import RunStore  # noqa: E402

SITES = [f"site-{i}" for i in range(5)]
ROGUE = "site-4"
VENV_BIN = Path(sys.executable).parent
NEW_FIELDS = {
    "reply_factor",
    "receive_timeout_s",
    "max_streams_per_client",
    "max_streams",
    "max_norm_ratio",
    "max_weight_ratio",
}


def make_pki(directory: Path) -> None:
    certs.init_ca(directory)
    certs.issue(directory, "server", "hub", hosts=["localhost", "127.0.0.1"])
    for name in [*SITES, "intruder", "revoked-site"]:
        certs.issue(directory, "client", name)
    certs.revoke(directory, "revoked-site")


def experiment(store: Path, rounds: int, guarded: bool) -> ExperimentConfig:
    deploy: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "min_clients": 4,
        "round_timeout_s": 60,
        "join_timeout_s": 300,
        "poll_timeout_s": 2,
        "admit": SITES,
    }
    if guarded:
        deploy["receive_timeout_s"] = 10
    return ExperimentConfig.from_dict(
        {
            "rounds": rounds,
            "data": {"dataset": "digits", "num_clients": 5, "partition": {"kind": "iid"}},
            "model": {"name": "mlp"},
            "sampler": {"clients_per_round": 4},
            "client": {"epochs": 1, "batch_size": 16, "lr": 0.1},
            "evaluation": {"federated_clients": 0},
            "run": {"threads": 1, "store": str(store), "name": "abuse"},
            "deploy": deploy,
        }
    )


def rss_mb(pid: int) -> float | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(found.group(1)) / 1024 if found else None


class Sampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.samples = pid, []  # type: ignore[var-annotated]
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.wait(0.1):
            mb = rss_mb(self.pid)
            if mb is not None:
                self.samples.append((time.monotonic(), mb))

    def stop(self) -> None:
        self._stop.set()

    def window(self, t0: float, t1: float) -> list[float]:
        return [mb for t, mb in self.samples if t0 <= t <= t1]


def committed(store: Path, attempts: int = 50) -> list[float]:
    """Seconds of each committed round so far (empty before the run is stored); the store
    is read again while the server holds it."""
    for _ in range(attempts):
        if not (store / "potluck.db").exists():
            return []
        try:
            with RunStore(store) as st:
                runs = st.list_runs()
                rounds = st.rounds(runs[0].run_id) if runs else []
                return [float(r.metrics.get("round_seconds", 0.0)) for r in rounds]
        except Exception:  # busy: try again
            time.sleep(0.1)
    raise RuntimeError(f"could not read {store}")


def probe_join(port: int, tls: ClientTLS) -> float | None:
    """Seconds a member's join takes (None: no answer within 10 s)."""
    import grpc

    options = [("grpc.ssl_target_name_override", "localhost")]
    channel = grpc.secure_channel(f"127.0.0.1:{port}", tls.credentials(), options=options)
    t0 = time.monotonic()
    try:
        reply = wire.receive(wire.caller(channel)(wire.send(wire.Envelope("join")), timeout=10))
    except grpc.RpcError:
        return None
    finally:
        channel.close()
    return time.monotonic() - t0 if reply.kind == "welcome" else None


class Attacker:
    """The attacker (``tests/deploy/stalls.py``) in a process of its own."""

    def __init__(self, port: int, pki: Path, n: int) -> None:
        script = ROOT / "tests" / "deploy" / "stalls.py"
        command = [sys.executable, str(script), f"127.0.0.1:{port}", str(pki), "--streams", str(n)]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError("the attacker did not start")

    def stop(self) -> dict[str, Any]:
        """How its streams ended, and its CPU seconds."""
        out, _ = self.process.communicate(timeout=120)
        return json.loads(out.splitlines()[-1])


def scenario(label: str, work: Path, pki: Path, args: argparse.Namespace, src: Path) -> dict:
    store, exp = work / "store", work / "exp.toml"
    work.mkdir(parents=True)
    guarded = label == "this commit"
    cfg = experiment(store, args.rounds, guarded)
    lines = cfg.to_toml().splitlines()
    if not guarded:  # an earlier server refuses the fields it does not know
        lines = [x for x in lines if x.split(" = ")[0].strip() not in NEW_FIELDS]
    exp.write_text("\n".join(lines) + "\n")
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [str(VENV_BIN / "potluck"), "server", str(exp), "--store", str(store)]
    command += ["--cert", str(pki / "server-hub.pem"), "--key", str(pki / "server-hub.key")]
    command += ["--client-ca", str(pki / "ca.pem"), "--revoked", str(pki / "revoked.txt")]
    log = work / "server.log"
    sites: list[Site] = []
    with log.open("wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    rss = Sampler(server.pid)
    rss.start()
    try:
        port = wait_for_port(log, server)
        time.sleep(2)
        t_base = time.monotonic()
        attacker = Attacker(port, pki, args.streams // 3)
        time.sleep(5)  # the attack is in place before the members come
        t_held = time.monotonic()
        member = ClientTLS(pki / "client-site-0.pem", pki / "client-site-0.key", pki / "ca.pem")
        probes = [probe_join(port, member) for _ in range(5)]
        sites = start_sites(port, pki, cfg)
        time.sleep(args.attack_s)
        rounds_under_attack = len(committed(store))
        t_stop = time.monotonic()
        seen = attacker.stop()
        time.sleep(5)  # the members' rounds settle
        t_after = time.monotonic()
        rounds_settled = len(committed(store))
        try:
            finished = server.wait(timeout=args.finish_s) == 0
        except subprocess.TimeoutExpired:
            finished = False
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        rss.stop()
        for site in sites:
            site.max_failures = 1
    secs = committed(store)
    under, after = secs[1:rounds_under_attack], secs[rounds_settled + 1 :]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {
        "server": label,
        "rss_mb": {
            "before_attack": max(rss.window(0, t_base)),
            "peak_during_attack": max(rss.window(t_base, t_stop)),
            "5_s_after_attack": (rss.window(t_stop, t_after) or [None])[-1],
            "peak_overall": max(mb for _, mb in rss.samples),
        },
        "member_join_seconds_during_attack": probes,
        "rounds_committed_under_attack": rounds_under_attack,
        "rounds_committed": len(secs),
        "run_finished": finished,
        "round_seconds_under_attack_mean": mean(under),
        "round_seconds_after_attack_mean": mean(after),
        "rounds_while_settling": rounds_settled - rounds_under_attack,
        "slowdown_under_attack": (mean(under) / mean(after)) if under and after else None,
        "round_seconds": [round(x, 4) for x in secs],
        "attack_held_before_members_s": t_held - t_base,
        "attacker_streams": seen["outcomes"],
        "attacker_cpu_s": seen["cpu_s"],
    }


def start_sites(port: int, pki: Path, cfg: ExperimentConfig) -> list[Site]:
    sites = []
    for name in SITES[:4]:
        tls = ClientTLS(pki / f"client-{name}.pem", pki / f"client-{name}.key", pki / "ca.pem")
        site = Site(
            f"127.0.0.1:{port}",
            name=name,
            tls=tls,
            program_for=lambda c, cid: site_program(c, cid),
            server_name="localhost",
            backoff=(0.2, 2.0),
        )
        threading.Thread(target=site.run, name=name, daemon=True).start()
        sites.append(site)
    return sites


def worktree(commit: str, into: Path) -> Path:
    subprocess.run(["git", "worktree", "add", "--detach", str(into), commit], check=True, cwd=ROOT)
    return into / "src"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=800)
    parser.add_argument("--attack-s", type=float, default=30.0, help="after the members start")
    parser.add_argument("--finish-s", type=float, default=180.0, help="then wait for the end")
    parser.add_argument("--ref", help="also attack the server of this commit")
    parser.add_argument("--streams", type=int, default=300, help="stalled streams (0: none)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    result = header("abuse")
    with tempfile.TemporaryDirectory(prefix="potluck-abuse-") as tmp:
        pki = Path(tmp) / "pki"
        make_pki(pki)
        runs = [scenario("this commit", Path(tmp) / "new", pki, args, ROOT / "src")]
        if args.ref:
            ref = Path(tmp) / "ref-src"
            try:
                src = worktree(args.ref, ref)
                runs.append(scenario(f"commit {args.ref}", Path(tmp) / "ref", pki, args, src))
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(ref)], cwd=ROOT)
    result["settings"] = vars(args)
    result["runs"] = runs
    print(write_result("abuse", result))
    for run in runs:
        print(run["server"], run["rss_mb"], run["member_join_seconds_during_attack"])
        print(
            "  rounds under attack",
            run["rounds_committed_under_attack"],
            run["slowdown_under_attack"],
        )


if __name__ == "__main__":
    main()
