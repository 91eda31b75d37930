"""``potluck dashboard``: a local web app over a run store (Starlette, served by uvicorn).

Pages: ``/`` (the runs: algorithm, data, model, status, rounds, best accuracy),
``/runs/<id>`` (a run's curves, monitoring charts, per-client table, health, config; live
while it runs), ``/compare?runs=<id>,<id>`` (one metric of several runs overlaid). The pages
draw their charts with uPlot (vendored in ``static/``, MIT: no CDN, nothing fetched from
the internet) from the JSON API:

- ``/api/runs``; ``/api/runs/<id>``; ``/api/runs/<id>/rounds?after=N`` (only the rounds
  after ``N``, read by the store's primary key); ``/api/runs/<id>/clients?offset=&limit=``
  (one summary per client, aggregated by SQLite: a page of ``CLIENTS_PAGE`` by default,
  with the number of clients and every client's latest accuracy for the histogram);
- ``/api/runs/<id>/events``: server-sent events, one ``round`` event per committed round
  with the round as its event id, so a browser that reconnects (sending ``Last-Event-ID``)
  gets only the rounds after the last one it saw; an ``end`` event once the run is no
  longer executing and every round was sent.

Each request opens the store read-only in its worker thread (SQLite connections belong to
one thread); no request reads more than the run it names.

Example:
    >>> import tempfile
    >>> from starlette.testclient import TestClient
    >>> client = TestClient(create_app(tempfile.mkdtemp()))
    >>> client.get("/api/runs").json()
    []
"""

from __future__ import annotations

import asyncio
import html
import json
import math
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from potluck.rollout.registry import ModelRegistry, ModelVersion
from potluck.store.sqlite import RunInfo, RunStore, StoreError, UnknownRunError

STATIC = Path(__file__).with_name("static")
POLL_S = 0.5  # how often a live run's event stream looks for new rounds
FINAL = ("finished", "failed", "interrupted")
CLIENTS_PAGE = 500  # clients per page of a run's client table


def create_app(store_root: str | Path) -> Starlette:
    """The dashboard over the run store at ``store_root``."""
    root = Path(store_root)

    @contextmanager
    def opened() -> Iterator[RunStore]:
        store = RunStore(root)
        try:
            yield store
        finally:
            store.close()

    def run_json(info: RunInfo) -> dict[str, Any]:
        return {
            "run": info.run_id,
            "name": info.name,
            "status": info.status,
            "created_at": info.created_at,
            "rounds": info.last_round,
            "what": what_ran(info.config),
            "summary": _finite(info.summary),
            "config": info.config,
        }

    async def runs(request: Request) -> Response:
        def read() -> list[dict[str, Any]]:
            with opened() as store:
                return [
                    {k: v for k, v in run_json(info).items() if k != "config"}
                    for info in store.list_runs()
                ]

        return JSONResponse(await _threaded(read))

    async def run(request: Request) -> Response:
        run_id = request.path_params["run_id"]

        def read() -> dict[str, Any]:
            with opened() as store:
                out = run_json(store.get_run(run_id))
                out["health"] = store.health(run_id)
                models = ModelRegistry(store)
                out["versions"] = [
                    {"name": v.name, "version": v.version, "round": v.round, "stage": v.stage,
                     "created_at": v.created_at, "last_change": _last_change(models, v)}
                    for v in models.from_run(run_id)
                ]  # fmt: skip
                return out

        return await _answer(read)

    async def rounds(request: Request) -> Response:
        run_id, after = request.path_params["run_id"], _int(request.query_params.get("after"))

        def read() -> list[dict[str, Any]]:
            with opened() as store:
                return [_round(r) for r in store.rounds(run_id, after)]

        return await _answer(read)

    async def clients(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        offset = _int(request.query_params.get("offset"))
        limit = _int(request.query_params.get("limit")) or CLIENTS_PAGE

        def read() -> dict[str, Any]:
            with opened() as store:
                summaries = store.client_summary(run_id)
            accuracy = [c.last.get("eval_global_accuracy") for c in summaries]
            return {
                "total": len(summaries),
                "offset": offset,
                "accuracy": [a for a in accuracy if a is not None and math.isfinite(a)],
                "clients": [
                    {
                        "client": c.client,
                        "rounds": c.rounds,
                        "last_round": c.last_round,
                        "last": _finite(c.last),
                        "mean": _finite({k: c.mean(k) for k in c.count}),
                    }
                    for c in summaries[offset : offset + limit]
                ],
            }

        return await _answer(read)

    async def events(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        start = _int(request.headers.get("last-event-id") or request.query_params.get("after"))

        def status() -> str:
            with opened() as store:
                return store.get_run(run_id).status

        try:
            await _threaded(status)
        except UnknownRunError as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)

        async def stream() -> AsyncIterator[str]:
            sent = start
            yield "retry: 1000\n\n"
            while True:

                def poll(after: int = sent) -> tuple[str, list[dict[str, Any]]]:
                    with opened() as store:  # status first: a final run's rounds are all in
                        state = store.get_run(run_id).status
                        return state, [_round(r) for r in store.rounds(run_id, after)]

                state, new = await _threaded(poll)
                for r in new:
                    yield f"id: {r['round']}\nevent: round\ndata: {json.dumps(r)}\n\n"
                    sent = r["round"]
                if state in FINAL:
                    yield f"event: end\ndata: {json.dumps({'status': state})}\n\n"
                    return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(POLL_S)

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def index(request: Request) -> Response:
        return HTMLResponse(_page("potluck runs", "runs"))

    async def run_page(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        return HTMLResponse(_page(f"run {run_id}", "run", run=run_id))

    async def compare_page(request: Request) -> Response:
        ids = [r for r in request.query_params.get("runs", "").split(",") if r]
        metric = request.query_params.get("metric", "test_accuracy")
        return HTMLResponse(_page("compare runs", "compare", runs=ids, metric=metric))

    return Starlette(
        routes=[
            Route("/", index),
            Route("/runs/{run_id}", run_page),
            Route("/compare", compare_page),
            Route("/api/runs", runs),
            Route("/api/runs/{run_id}", run),
            Route("/api/runs/{run_id}/rounds", rounds),
            Route("/api/runs/{run_id}/clients", clients),
            Route("/api/runs/{run_id}/events", events),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ]
    )


def what_ran(config: dict[str, Any]) -> str:
    """``algorithm / data / model`` of a stored config.

    Example:
        >>> what_ran({"algorithm": {"name": "fedavg"}, "data": {"dataset": "digits"},
        ...           "model": {"name": "mlp"}})
        'fedavg / digits / mlp'
    """

    def name(section: str, key: str) -> str:
        value = config.get(section)
        return str(value.get(key) or "") if isinstance(value, dict) else ""

    parts = [name("algorithm", "name"), name("data", "dataset") or name("data", "federation"),
             name("model", "name") or name("task", "model")]  # fmt: skip
    return " / ".join(p for p in parts if p)


async def _threaded(fn: Any) -> Any:
    return await asyncio.to_thread(fn)


async def _answer(fn: Any) -> Response:
    try:
        return JSONResponse(await _threaded(fn))
    except UnknownRunError as exc:
        return JSONResponse({"error": str(exc)}, status_code=404)
    except StoreError as exc:
        return JSONResponse({"error": str(exc)}, status_code=503)


def _int(raw: str | None) -> int:
    try:
        return max(int(raw or 0), 0)
    except ValueError:
        return 0


def _round(r: Any) -> dict[str, Any]:
    return {"round": r.round, "at": r.committed_at, "metrics": _finite(r.metrics)}


def _finite(values: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN or infinity: such values become ``None``."""
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()
    }


def _page(title: str, view: str, **data: Any) -> str:
    """One page: the vendored uPlot, the dashboard's script, and what it should show."""
    boot = html.escape(json.dumps({"view": view, **data}), quote=True)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title>"
        '<link rel="stylesheet" href="/static/uPlot.min.css">'
        '<link rel="stylesheet" href="/static/dashboard.css">'
        '<script src="/static/uPlot.iife.min.js"></script>'
        '<script src="/static/dashboard.js" defer></script>'
        f'</head><body data-boot="{boot}"><header><a href="/">potluck</a>'
        f'<h1>{html.escape(title)}</h1></header><main id="main"></main></body></html>\n'
    )


def _last_change(models: ModelRegistry, v: ModelVersion) -> str:
    """The version's newest audit entry, as ``"<action> <time>"`` (a serve with its sites).

    Example:
        >>> import tempfile, torch
        >>> from potluck.store.checkpoint import Checkpoint
        >>> store = RunStore(tempfile.mkdtemp())
        >>> run = store.create_run({})
        >>> store.commit_round(run, 1, {}, checkpoint=Checkpoint({"global": torch.zeros(2)}, {}))
        >>> reg = ModelRegistry(store)
        >>> v = reg.register("m", run)
        >>> reg.record("serve", v, {"sites": 3, "failed": []})
        >>> _last_change(reg, v).split(" ")[:3]
        ['serve', 'on', '3']
    """
    entries = [e for e in models.audit(v.name) if e.version == v.version]
    if not entries:
        return ""
    last = entries[-1]
    sites = f" on {last.detail['sites']} sites" if last.action == "serve" else ""
    return f"{last.action}{sites} {last.at}"
