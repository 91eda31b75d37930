"""The Ray engine against a real Ray head, in a fresh network namespace with only loopback up
(so Ray binds 127.0.0.1 and nothing leaves the machine): the Python API and the CLI with
``--ray-address`` give the inline engine's results, and a failing client is reported."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).parent
EXAMPLES = HERE.parents[1] / "examples"  # the user's parts, importable on every actor
BIN = Path(sys.executable).parent
PORT = 6390

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None or shutil.which("unshare") is None,
    reason='needs the ray package (pip install "potluck[ray]") and unshare',
)


def in_namespace(script: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run a shell ``script`` in a new network namespace with only ``lo`` up, with its own
    ``RAY_TMPDIR`` (so it cannot join another Ray cluster through Ray's default files)."""
    body = f"set -e; ip link set lo up; {script}"
    tmp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray puts sockets there
    try:
        return subprocess.run(
            ["unshare", "-n", "sh", "-c", body],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={
                "PATH": f"{BIN}:/usr/sbin:/usr/bin:/sbin:/bin",
                "RAY_USAGE_STATS_ENABLED": "0",
                "PYTHONPATH": str(EXAMPLES),
                "RAY_TMPDIR": tmp_dir,
            },
        )
    except PermissionError:
        pytest.skip("unshare -n needs root (CAP_SYS_ADMIN)")
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def test_ray_matches_inline_through_api_and_cli(tmp_path: Path) -> None:
    address = f"127.0.0.1:{PORT}"
    store = tmp_path / "runs"
    cli = (
        f"potluck run --set 'data.dataset=\"digits\"' --set data.num_clients=10 "
        f"--set 'model.name=\"mlp\"' --set sampler.clients_per_round=4 --set rounds=2 "
        f"--set run.threads=1 --engine ray --ray-address {address} --store {store}"
    )
    proc = in_namespace(
        f"ray start --head --port {PORT} --num-cpus 2 --include-dashboard false "
        f"--disable-usage-stats >/dev/null; trap 'ray stop --force >/dev/null' EXIT; "
        f"python {HERE / 'ray_checks.py'} {address}; {cli}"
    )
    if proc.returncode != 0 and "Operation not permitted" in proc.stderr:
        pytest.skip(f"no network namespace here: {proc.stderr.strip()[-200:]}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line.removeprefix("RESULT "))
    assert out["ray"]["history"] == out["inline"]["history"]  # one torch thread: bitwise
    assert out["ray"]["weights"] == out["inline"]["weights"]
    assert out["user_ray"] == out["user_inline"]  # user parts with state and stages too
    assert "a Ray actor failed while handling clients" in out["failure"]
    assert "client data is corrupt" in out["failure"]
    assert "engine ray" in proc.stdout and "done" in proc.stdout
