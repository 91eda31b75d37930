"""The dashboard: its JSON API and event stream (no replay after a reconnect), and its pages
in a real headless Chromium (Debian's, driven by Playwright): the charts hold the stored
points, and a live run's new round appears within seconds. Screenshots are kept under
``.artifacts/dashboard`` (ignored by git)."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from potluck.config import ExperimentConfig
from potluck.dashboard.app import create_app
from potluck.orchestrator import run_experiment
from potluck.rollout.registry import ModelRegistry
from potluck.store.sqlite import RunStore

CFG: dict[str, Any] = {
    "rounds": 4,
    "data": {"dataset": "digits", "num_clients": 10},
    "model": {"name": "mlp"},
    "sampler": {"clients_per_round": 4},
    "evaluation": {"federated_clients": -1},
    "run": {"threads": 1, "name": "stored"},
}
ARTIFACTS = Path(__file__).resolve().parents[2] / ".artifacts" / "dashboard"
CHROMIUM = shutil.which("chromium")


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("store")
    result = run_experiment(ExperimentConfig.from_dict(CFG).build(), RunStore(root))
    assert result.run_id is not None
    return root, result.run_id


def test_the_api(stored: tuple[Path, str]) -> None:
    root, run = stored
    client = TestClient(create_app(root))
    (listed,) = client.get("/api/runs").json()
    assert listed["run"] == run and listed["name"] == "stored" and listed["status"] == "finished"
    assert listed["what"] == "fedavg / digits / mlp" and listed["rounds"] == 4
    rounds = client.get(f"/api/runs/{run}/rounds").json()
    stored_rounds = RunStore(root).rounds(run)
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert rounds[2]["metrics"]["test_accuracy"] == stored_rounds[2].metrics["test_accuracy"]
    assert [r["round"] for r in client.get(f"/api/runs/{run}/rounds?after=2").json()] == [3, 4]
    answer = client.get(f"/api/runs/{run}/clients").json()
    clients = answer["clients"]
    assert len(clients) == answer["total"] == len(answer["accuracy"]) == 10
    assert all(c["rounds"] >= 4 for c in clients)  # evaluated each round
    page2 = client.get(f"/api/runs/{run}/clients?offset=6&limit=3").json()
    assert [c["client"] for c in page2["clients"]] == [c["client"] for c in clients[6:9]]
    assert client.get("/api/runs/nope").status_code == 404
    assert client.get(f"/api/runs/{run}").json()["versions"] == []
    assert client.get("/api/runs/nope/rounds").status_code == 404
    page = client.get(f"/runs/{run}").text
    assert "/static/uPlot.iife.min.js" in page and "cdn" not in page.lower()
    assert client.get("/static/uPlot.iife.min.js").status_code == 200


def _events(text: str) -> list[tuple[str, str]]:
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            out.append((fields["event"], fields.get("id", "")))
    return out


def test_the_event_stream_resumes_after_the_last_event_id(stored: tuple[Path, str]) -> None:
    root, run = stored
    client = TestClient(create_app(root))
    everything = _events(client.get(f"/api/runs/{run}/events").text)
    assert everything == [
        ("round", "1"),
        ("round", "2"),
        ("round", "3"),
        ("round", "4"),
        ("end", ""),
    ]
    again = client.get(f"/api/runs/{run}/events", headers={"Last-Event-ID": "2"}).text
    assert _events(again) == [("round", "3"), ("round", "4"), ("end", "")]  # no replay
    assert client.get("/api/runs/nope/events").status_code == 404


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path / "store"
    RunStore(root).close()
    server = uvicorn.Server(uvicorn.Config(create_app(root), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the dashboard did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", root
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def page(served: tuple[str, Path]) -> Iterator[Any]:
    if CHROMIUM is None:
        pytest.skip("needs Debian's chromium (scripts/setup.sh --dev installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser.new_page(viewport={"width": 1200, "height": 900})
        browser.close()


def _shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_the_pages_in_chromium_and_a_live_round_appears(
    served: tuple[str, Path], page: Any
) -> None:
    url, root = served
    done = run_experiment(ExperimentConfig.from_dict({**CFG, "rounds": 3}).build(), RunStore(root))
    page.goto(f"{url}/runs/{done.run_id}")
    page.wait_for_function("window.potluck && window.potluck.ready", timeout=20_000)
    charts = page.evaluate(
        "Object.fromEntries(Object.entries(window.potluck.charts)"
        ".map(([k, c]) => [k, c.plot.data[0].length]))"
    )
    assert charts["accuracy"] == 3 and charts["loss"] == 3  # the stored points
    assert "accuracy over the clients" in charts
    accs = page.evaluate("window.potluck.charts['accuracy'].plot.data[1]")
    assert accs == [r.metrics["test_accuracy"] for r in RunStore(root).rounds(done.run_id or "")]
    assert sum(page.evaluate("window.potluck.histogram")) == 10  # every client's accuracy
    with RunStore(root) as store:
        reg = ModelRegistry(store)
        reg.record("serve", reg.register("digits", done.run_id or ""), {"sites": 7})
    page.reload()
    page.wait_for_function("window.potluck && window.potluck.ready", timeout=20_000)
    assert "model versions from this run" in page.content() and "registered" in page.content()
    assert "serve on 7 sites" in page.content()
    _shot(page, "run")

    # a live run: the page opens after round 1; round 2 appears through the event stream
    gate, opened = threading.Event(), threading.Event()

    def hold(rnd: int, _metrics: object) -> None:
        if rnd == 1:
            opened.set()
            assert gate.wait(60)

    live_cfg = ExperimentConfig.from_dict(
        {**CFG, "rounds": 2, "run": {"threads": 1, "name": "live"}}
    )
    worker = threading.Thread(  # its store is opened in its own thread (SQLite's rule)
        target=lambda: run_experiment(live_cfg.build(), RunStore(root), on_round=hold)
    )
    worker.start()
    assert opened.wait(60)
    live_id = RunStore(root).resolve("live")
    page.goto(f"{url}/runs/{live_id}")
    page.wait_for_function("window.potluck.ready && window.potluck.rounds === 1", timeout=20_000)
    assert page.text_content("#status") == "running"
    released = time.monotonic()
    gate.set()
    page.wait_for_function("window.potluck.rounds === 2", timeout=10_000)
    assert time.monotonic() - released < 10
    page.wait_for_function("document.querySelector('#status').textContent === 'finished'")
    _shot(page, "live")
    worker.join(30)

    page.goto(url)
    page.wait_for_function("window.potluck.ready", timeout=20_000)
    assert page.evaluate("window.potluck.runs") == 2
    _shot(page, "runs")
    page.goto(f"{url}/compare?runs={done.run_id},{live_id}")
    page.wait_for_function("window.potluck.ready", timeout=20_000)
    lengths = page.evaluate("window.potluck.charts['test_accuracy'].plot.data.map(s => s.length)")
    assert lengths == [3, 3, 3]  # rounds 1-3; the live run's third is empty
    _shot(page, "compare")
