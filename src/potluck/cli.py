"""The ``potluck`` command: run, resume, list and show runs; describe federations.

Example (shell):
    potluck run                                 # the default experiment
    potluck run exp.toml --set client.lr=0.1    # a TOML experiment with an override
    potluck runs; potluck show RUN; potluck resume RUN
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich import box
from rich.console import Console
from rich.table import Column, Table

from potluck.attacks.cli import attack_app
from potluck.config import ConfigError, ExperimentConfig, default_store
from potluck.deploy.certs_cli import certs_app
from potluck.report.progress import RoundProgress
from potluck.report.progress import fmt as _fmt
from potluck.rollout.cli import models_app
from potluck.server_options import (
    CertOpt,
    ClientCaOpt,
    InsecureOpt,
    KeyOpt,
    ListenOpt,
    RevokedOpt,
    server_tls,
)

if TYPE_CHECKING:
    from potluck.orchestrator import Experiment, RunResult
    from potluck.store.sqlite import ClientSummary, ResumePoint, RunStore

app = typer.Typer(
    name="potluck",
    help="Federated learning: simulate, deploy and inspect federated runs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Inspect datasets and federations.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(certs_app, name="certs")
app.add_typer(attack_app, name="attack")
app.add_typer(models_app, name="models")
console = Console()
err = Console(stderr=True)

ExpArg = Annotated[
    Path | None, typer.Argument(help="experiment TOML file (default: the built-in experiment)")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="override a field, e.g. --set client.lr=0.1 (repeatable)"),
]
StoreOpt = Annotated[
    Path | None, typer.Option("--store", help="run store directory (default: run.store)")
]


def _fail(message: str) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


def _load_config(exp: Path | None, overrides: list[str] | None) -> ExperimentConfig:
    try:
        if exp is None:
            return ExperimentConfig.from_dict({}, overrides or [])
        return ExperimentConfig.from_toml(exp, overrides or [])
    except ConfigError as exc:
        _fail(str(exc))


def _build(cfg: ExperimentConfig) -> Experiment:
    """The runnable experiment, with ``engine = "auto"`` resolved (and the choice printed)."""
    from potluck.orchestrator import resolve_engine

    try:
        experiment, why = resolve_engine(cfg.build())
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    if cfg.run.engine == "auto":
        console.print(f"engine [bold]{experiment.engine}[/] ({why})", highlight=False)
    return experiment


def _store(path: Path | str) -> RunStore:
    from potluck.store.sqlite import RunStore

    return RunStore(path)


EngineOpt = Annotated[
    str | None,
    typer.Option("--engine", help="auto, inline, vectorized, pool or ray (default: run.engine)"),
]
RayOpt = Annotated[
    str | None, typer.Option("--ray-address", help="Ray cluster address for --engine ray")
]
WorkersOpt = Annotated[
    int | None, typer.Option("--workers", help="pool or Ray workers (default: one per core)")
]


@app.command()
def run(
    exp: ExpArg = None,
    set_: SetOpt = None,
    store: StoreOpt = None,
    engine: EngineOpt = None,
    ray_address: RayOpt = None,
    workers: WorkersOpt = None,
) -> None:
    """Run an experiment (the default one when no file is given) and store it."""
    flags = {"engine": engine, "ray_address": ray_address, "workers": workers}
    overrides = [f"run.{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    cfg = _load_config(exp, [*(set_ or []), *overrides])
    if store is not None:
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"store": str(store)})})
    experiment = _build(cfg)
    from potluck.orchestrator import run_experiment

    _describe_start(cfg, experiment)
    with _refused(), _damage_reported(), _progress(experiment.rounds) as on_round:
        result = run_experiment(
            experiment, _store(cfg.run.store), on_round=on_round, progress=False
        )
    _describe_end(result)


@app.command()
def resume(
    run_ref: Annotated[str, typer.Argument(help="run id, id prefix or name")],
    store: StoreOpt = None,
    fallback: Annotated[
        bool,
        typer.Option(
            "--fallback",
            help="if the newest checkpoint is damaged, resume after the newest one that "
            "verifies (the rounds after it are recomputed)",
        ),
    ] = False,
) -> None:
    """Continue a stopped or killed run from its last committed checkpoint (verified)."""
    from potluck.orchestrator import resume_experiment

    with _damage_reported():
        st = _store(store or default_store())
        run_id, info = _lookup(st, run_ref)
        if info.status == "finished":
            console.print(f"run {run_id} already finished ({info.last_round} rounds)")
            return
        why = info.config.get("not_resumable") if info.config else "it has no stored config"
        if why:
            _fail(
                f"run {run_id} cannot be rebuilt from its stored config: {why}. Resume it from "
                "Python with potluck.resume_experiment(experiment, store, run_id)"
            )
        cfg = _load_config_dict(info.config)
        experiment = _build(cfg)

        progress = _progress(experiment.rounds, info.last_round)

        def started(point: ResumePoint) -> None:
            for skipped in point.skipped:
                err.print(f"[bold yellow]warning:[/] {skipped.problem}", highlight=False)
            if point.checkpoint is not None and not point.checksum:
                err.print(
                    f"[bold yellow]note:[/] checkpoint {point.path} has no recorded checksum "
                    "(committed before schema 5): verified by its safetensors structure and "
                    "round only",
                    highlight=False,
                )
            line = f"resuming run [bold]{run_id}[/] after round {point.round}"
            if point.skipped:
                kept = "the newest checkpoint that verifies" if point.round else "none verifies"
                first, last = point.round + 1, info.last_round
                redo = f"round {first}" if first >= last else f"rounds {first}-{last}"
                line += f" (--fallback: {kept}; recomputing {redo})"
            console.print(line, highlight=False)
            progress.bar.update(progress.task, completed=point.round)

        with _refused(), _damage_reported(), progress as on_round:
            result = resume_experiment(
                experiment,
                st,
                run_id,
                on_round=on_round,
                fallback=fallback,
                on_resume=started,
                progress=False,
            )
    _describe_end(result)


@app.command()
def runs(store: StoreOpt = None) -> None:
    """List stored runs, newest first (the run id starts with its UTC start time)."""
    with _damage_reported():
        listed = _store(store or default_store()).list_runs()
    named = any(info.name != info.run_id for info in listed)
    table = Table(
        Column("run", no_wrap=True),
        *([Column("name", overflow="fold")] if named else []),
        Column("algorithm / data / model", overflow="fold"),  # what ran, folded to fit 80
        Column("status", no_wrap=True),
        Column("rounds", justify="right", no_wrap=True),
        Column("test acc", justify="right", no_wrap=True),
        box=box.SIMPLE_HEAD,
        padding=(0, 1, 0, 0),
    )
    for info in listed:
        acc = info.summary.get("test_accuracy")
        table.add_row(
            info.run_id,
            *([info.name if info.name != info.run_id else ""] if named else []),
            " / ".join(part for part in _what_ran(info.config) if part),
            info.status,
            str(info.last_round),
            _fmt(acc) if acc is not None else "",
        )
    console.print(table)
    stopped = [info.run_id for info in listed if info.status == "interrupted"]
    if stopped:
        console.print(
            f"interrupted: the process of {len(stopped)} run(s) ended before the run did;"
            f" continue one with: potluck resume {stopped[0]}"
        )


def _what_ran(config: dict[str, Any]) -> tuple[str, str, str]:
    """A stored config's algorithm, dataset (or federation) and model (or task), short.

    Example:
        >>> _what_ran({"algorithm": {"name": "fedprox"}, "data": {"dataset": "digits"},
        ...            "model": {"name": "mlp"}})
        ('fedprox', 'digits', 'mlp')
        >>> _what_ran({"data": {"federation": "my_lab.data:build"}, "task": {"model": "a.b:Net"}})
        ('', 'build', 'Net')
    """

    def section(name: str) -> dict[str, Any]:
        value = config.get(name)
        return value if isinstance(value, dict) else {}

    def short(ref: Any) -> str:
        return str(ref).rsplit(":", 1)[-1].rsplit(".", 1)[-1] if ref else ""

    data, task = section("data"), section("task")
    return (
        str(section("algorithm").get("name") or ""),
        str(data.get("dataset") or short(data.get("federation"))),
        str(section("model").get("name") or short(task.get("model") or task.get("name"))),
    )


@app.command()
def show(
    run_ref: Annotated[str, typer.Argument(help="run id, id prefix or name")],
    store: StoreOpt = None,
    clients: Annotated[bool, typer.Option(help="also print a summary per client")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Print a run's per-round metrics."""
    with _damage_reported():
        st = _store(store or default_store())
        run_id, info = _lookup(st, run_ref)
        rounds = st.rounds(run_id)
        health = st.health(run_id)
        per_client = st.client_summary(run_id) if clients else []
    if as_json:
        payload = {
            "run": run_id,
            "status": info.status,
            "summary": info.summary,
            "rounds": [{"round": r.round, **r.metrics} for r in rounds],
            "client_health": health,
        }
        if clients:
            payload["clients"] = [
                {"client": c.client, **dict(zip(*_client_row(c, _CLIENT_COLUMNS), strict=True))}
                for c in per_client
            ]
        print(json.dumps(payload, indent=2, default=str))
        return
    present = {k for r in rounds for k in r.metrics}
    keys = [k for k in _SHOW_ORDER if k in present] + sorted(present - set(_SHOW_ORDER))
    cells = [[_fmt_metric(k, r.metrics.get(k)) for k in keys] for r in rounds]
    console.print(f"run {run_id} ({info.status})")
    _tables("round", [str(r.round) for r in rounds], keys, cells)
    if info.status == "interrupted":
        console.print(
            f"interrupted after round {info.last_round}: its process ended before the run "
            f"did; continue it with: potluck resume {run_id}"
        )
    if per_client:
        _show_clients(per_client)
    _show_health(health)
    console.print(f"run directory: {info.run_dir}")


@app.command()
def compare(
    run_refs: Annotated[list[str], typer.Argument(help="two or more run ids, prefixes or names")],
    store: StoreOpt = None,
    metric: Annotated[str, typer.Option(help="the metric compared and plotted")] = (
        "test_accuracy"
    ),
    plot: Annotated[Path, typer.Option(help="where the overlay plot (SVG) goes")] = Path(
        "compare.svg"
    ),
) -> None:
    """Runs side by side: the metric's last and best values, bytes moved, fairness, privacy
    and anomaly figures per run, and the metric's curves overlaid in one SVG."""
    from potluck.report.compare import columns, compare_rows, overlay_svg

    if len(run_refs) < 2:
        _fail("compare needs at least two runs")
    with _damage_reported():
        st = _store(store or default_store())
        ids = [_lookup(st, ref)[0] for ref in run_refs]
        rows = compare_rows(st, ids, metric)
    if not any("last" in r.values for r in rows):
        _fail(f"none of these runs has the metric {metric!r}")
    keys = columns(rows)
    cells = [[_fmt(r.values[k]) if k in r.values else "" for k in keys] for r in rows]
    console.print(f"{metric}: last and best (its round) per run")
    _tables("run", [r.label for r in rows], keys, cells)
    try:
        plot.write_text(overlay_svg(rows, metric), encoding="utf-8")
    except OSError as exc:
        _fail(f"cannot write the plot to {plot}: {exc.strerror or exc}")
    console.print(f"overlay plot: {plot}")


@app.command("export")
def export_cmd(
    run_ref: Annotated[str, typer.Argument(help="run id, id prefix or name")],
    fmt: Annotated[str, typer.Option("--format", help="csv, json, mlflow or tensorboard")] = "csv",
    out: Annotated[
        Path | None, typer.Option(help="output directory (default: the run's, export/<format>)")
    ] = None,
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking URI (default: a file store in --out)")
    ] = None,
    store: StoreOpt = None,
) -> None:
    """Export a run's metrics: CSV, JSON, an MLflow run or TensorBoard event files."""
    from potluck.report.export import FORMATS, export_run

    if fmt not in FORMATS:
        _fail(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    with _damage_reported():
        st = _store(store or default_store())
        run_id, info = _lookup(st, run_ref)
        target = out or info.run_dir / "export" / fmt
        try:
            done = export_run(st, run_id, fmt, target, tracking_uri=tracking_uri)
        except (RuntimeError, OSError) as exc:
            _fail(str(exc))
    where = done.target or ", ".join(str(p) for p in done.paths)
    left = f" ({done.skipped} non-finite left out)" if done.skipped else ""
    console.print(f"exported {done.values} values of run {run_id} to {where}{left}")


@app.command()
def dashboard(
    store: StoreOpt = None,
    port: Annotated[int, typer.Option(help="port to listen on")] = 8050,
    host: Annotated[str, typer.Option(help="address to listen on (local only by default)")] = (
        "127.0.0.1"
    ),
) -> None:
    """Serve the dashboard over a run store: runs, a run's curves, clients, health and
    config (live while it runs), and comparisons. Needs the dashboard extra."""
    try:
        import uvicorn

        from potluck.dashboard.app import create_app
    except ImportError:
        _fail("potluck dashboard needs Starlette and uvicorn: pip install 'potluck[dashboard]'")
    root = store or Path(default_store())
    console.print(f"dashboard of {root} at http://{host}:{port}/ (Ctrl-C stops it)")
    uvicorn.run(create_app(root), host=host, port=port, log_level="warning")


@app.command("privacy")
def privacy_cmd(
    run_ref: Annotated[str, typer.Argument(help="run id, id prefix or name")],
    store: StoreOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Print a run's privacy statement: epsilon after each round, delta, the mechanism, its
    sampling and the unit of privacy, computed afresh by the accountant from the ledger
    stored with the run's latest checkpoint (user-level) and from the clients' stored DP-SGD
    step counts (example-level)."""
    from potluck.privacy.ledger import SLOT, PrivacyBudget, stored_ledger

    with _damage_reported():
        st = _store(store or default_store())
        run_id, info = _lookup(st, run_ref)
        point = st.latest_checkpoint(run_id)
        cfg = _load_config_dict(info.config)
        examples = _example_statements(st, run_id, cfg)
    state = {} if point is None else _slot(point[1].tensors, SLOT)
    if not state and not examples:
        _fail(f"run {run_id} has no privacy ledger: it did not run a private mechanism")
    budget = PrivacyBudget(**cfg.privacy.model_dump()) if cfg.privacy else PrivacyBudget()
    payload: dict[str, Any] = {"run": run_id}
    if state:
        with _refused():
            ledger = stored_ledger(state, budget)
            statement, per_round = ledger.statement(state), ledger.per_round(state)
        payload.update(statement=statement, delta=budget.delta, accountant=budget.accountant,
                       epsilon=per_round)  # fmt: skip
    if examples:
        payload["example_level"] = examples
    if as_json:
        print(json.dumps(payload, indent=2))
        return
    if state:
        console.print(f"run {run_id}: {payload['statement']}")
        table = Table("round", "epsilon", title=f"epsilon at delta {budget.delta:g}")
        for rnd, eps in enumerate(payload["epsilon"], start=1):
            table.add_row(str(rnd), _fmt(eps))
        console.print(table)
    for ns, item in examples.items():
        console.print(f"run {run_id}, {ns}: {item['statement']}")


def _example_statements(st: RunStore, run_id: str, cfg: ExperimentConfig) -> dict[str, Any]:
    """Each DP-SGD term's example-level statement and epsilon, from the clients' stored
    step counts."""
    from potluck.privacy.dp_sgd import example_mechanisms
    from potluck.privacy.example import client_counts, example_statement

    terms = example_mechanisms(cfg.algorithm_parts())
    if not terms:
        return {}
    states = st.client_states(run_id, st.clients_with_state(run_id))
    out = {}
    for ns, term in terms:
        counts = client_counts(states, ns)
        text, eps = example_statement(counts, term.noise_multiplier, term.clip, term.delta)
        out[ns] = {"statement": text, "epsilon": eps, "delta": term.delta}
    return out


def _slot(tensors: dict[str, Any], slot: str) -> dict[str, Any]:
    prefix = f"{slot}/"
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


# per-client summary columns: (header, metric, how: "count" (rounds with it), "last",
# "mean", "sum", "MB" (a sum in megabytes))
_CLIENT_COLUMNS = (
    ("trained", "num_examples", "count"),
    ("evaluated", "eval_global_accuracy", "count"),
    ("examples", "num_examples", "last"),
    ("train loss", "train_loss", "mean"),
    ("acc", "eval_global_accuracy", "last"),
    ("personal acc", "eval_personal_accuracy", "last"),
    ("norm", "update_norm", "mean"),
    ("drift", "client_drift", "mean"),
    ("label shift", "label_shift", "last"),
    ("feature shift", "feature_shift", "last"),
    ("norm score", "score_norm", "mean"),
    ("cosine score", "score_cosine", "mean"),
    ("krum score", "score_krum", "mean"),
    ("trust score", "score_trust", "mean"),
    ("flagged", "flagged", "sum"),
    ("malicious", "malicious", "last"),
    ("MB up", "bytes_up", "MB"),
    ("MB down", "bytes_down", "MB"),
)


def _client_row(
    c: ClientSummary, columns: Sequence[tuple[str, str, str]]
) -> tuple[list[str], list[float]]:
    """A client's summary values under ``columns`` that it has (headers, values), after
    the last round it took part in.

    Example:
        >>> from potluck.store import ClientSummary
        >>> s = ClientSummary(4, 2, 1, 3, {"train_loss": 2}, {"train_loss": 1.5}, {})
        >>> _client_row(s, _CLIENT_COLUMNS)
        (['last round', 'train loss'], [3.0, 0.75])
    """
    heads, values = ["last round"], [float(c.last_round)]
    for head, name, how in columns:
        if not c.count.get(name):
            continue
        heads.append(head)
        if how == "count":
            values.append(float(c.count[name]))
        elif how == "last":
            values.append(c.last[name])
        elif how == "mean":
            values.append(c.mean(name))
        else:
            values.append(c.sum[name] / (1e6 if how == "MB" else 1.0))
    return heads, values


def _show_clients(summaries: Sequence[ClientSummary]) -> None:
    """One row per client: its rounds and its metrics' latest value, mean or total."""
    rows = [dict(zip(*_client_row(c, _CLIENT_COLUMNS), strict=True)) for c in summaries]
    keys = ["last round"]
    keys += [h for h, _, _ in _CLIENT_COLUMNS if any(h in r for r in rows)]
    cells = [[_fmt(r[k]) if k in r else "" for k in keys] for r in rows]
    console.print(f"per-client metrics ({len(rows)} clients; anomaly scores are means)")
    _tables("client", [str(c.client) for c in summaries], keys, cells)


def _tables(lead: str, leads: Sequence[str], keys: list[str], cells: list[list[str]]) -> None:
    """``cells`` (one row per ``leads`` entry) in tables as wide as the terminal, each
    with the ``lead`` column first."""
    lead_width = max([len(lead), *(len(x) for x in leads)])
    for part in _fitting(keys, cells, console.width - max(lead_width - len("round"), 0)):
        table = Table(
            Column(lead, justify="right"),
            *(Column(_header(keys[i]), justify="right") for i in part),
            box=box.SIMPLE_HEAD,
            padding=(0, 1, 0, 0),
        )
        for first, row in zip(leads, cells, strict=True):
            table.add_row(first, *(row[i] for i in part))
        console.print(table)


def _show_health(rows: list[dict[str, Any]]) -> None:
    """Deployed clients' health (nothing for simulations)."""
    if not rows:
        return
    table = Table(
        "client", "name", "last seen (UTC)", "rounds", "failures", "latency s", "MB sent",
        "MB received", "last error", title="clients (deployment)",
    )  # fmt: skip
    for h in rows:
        seen = _utc(h["last_seen"]) if h["last_seen"] else ""
        table.add_row(
            str(h["client"]), h["name"], seen, str(h["rounds_completed"]), str(h["failures"]),
            _fmt(h["latency_s"]), f"{h['bytes_sent'] / 1e6:.3g}",
            f"{h['bytes_received'] / 1e6:.3g}", h["last_error"] or "",
        )  # fmt: skip
    console.print(table)


def _utc(unix: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M:%S")


@app.command("config")
def config_cmd(exp: ExpArg = None, set_: SetOpt = None) -> None:
    """Print the resolved experiment configuration as TOML (a template to start from)."""
    print(_load_config(exp, set_).to_toml(), end="")


@data_app.command("describe")
def data_describe(
    exp: ExpArg = None,
    set_: SetOpt = None,
    rows: Annotated[int, typer.Option(help="clients to list")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Per-client sizes and label statistics of an experiment's federation."""
    from potluck.data.describe import describe

    cfg = _load_config(exp, set_)
    try:
        federation = cfg.build_federation()
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    stats = describe(federation, max_rows=rows)
    if as_json:
        print(json.dumps(stats, indent=2, default=float))
        return
    d = cfg.data
    console.print(
        f"[bold]{d.dataset}[/], {stats['num_clients']} clients, partition "
        f"{d.partition.kind} {d.partition.options()}, {stats['total_train']} train examples"
    )
    summary = Table("statistic", "min", "mean", "max")
    for key in ("sizes", "label_entropy", "labels_per_client"):
        s = stats[key]
        summary.add_row(key, _fmt(s["min"]), _fmt(s["mean"]), _fmt(s["max"]))
    console.print(summary)
    table = Table("client", "train", "test", "labels", "entropy (bits)", "top labels")
    for c in stats["clients"]:
        table.add_row(
            str(c["client"]),
            str(c["train"]),
            str(c["test"]),
            str(c["labels"]),
            _fmt(c["entropy"]),
            str(c["top_labels"]),
        )
    console.print(table)


@contextmanager
def _refused() -> Iterator[None]:
    """Report input that potluck refuses (bad data, shapes, updates) without a traceback."""
    try:
        yield
    except (ValueError, TypeError, FileNotFoundError) as exc:
        _fail(f"{type(exc).__name__}: {exc}")


@contextmanager
def _damage_reported() -> Iterator[None]:
    """Report a damaged or unreadable run store or checkpoint, or a run executing in
    another process, without a traceback."""
    from potluck.store.checkpoint import DamagedCheckpointError
    from potluck.store.sqlite import RunBusyError, StoreError

    try:
        yield
    except (StoreError, DamagedCheckpointError, RunBusyError) as exc:
        _fail(str(exc))


def _load_config_dict(data: dict[str, Any]) -> ExperimentConfig:
    try:
        return ExperimentConfig.from_dict(data)
    except ConfigError as exc:
        _fail(f"stored config no longer valid: {exc}")


def _lookup(st: RunStore, ref: str) -> tuple[str, Any]:
    try:
        run_id = st.resolve(ref)
    except (KeyError, ValueError) as exc:
        _fail(str(exc.args[0]) if exc.args else str(exc))
    return run_id, st.get_run(run_id)


_SHOW_ORDER = (
    "train_loss",
    "test_loss",
    "test_accuracy",
    "fed_loss",
    "fed_accuracy",
    "personal_accuracy",
    "finetuned_accuracy",
    "cohort_size",
    "updates",
    "bytes_up",
    "bytes_down",
    "round_seconds",
)


def _fitting(keys: list[str], cells: list[list[str]], width: int) -> list[list[int]]:
    """Column positions split into groups that each fit ``width`` beside the round column
    (a metric column is as wide as its header or its widest cell, plus its padding and the
    space between columns).

    Example:
        >>> _fitting(["a", "b", "c"], [["12345", "1", "123456"]], 20)
        [[0, 1], [2]]
    """
    room = max(width - len("round") - 4, 1)  # the lead column, its gap, the two edges
    groups: list[list[int]] = [[]]
    used = 0
    for i, key in enumerate(keys):
        need = max([len(_header(key))] + [len(row[i]) for row in cells]) + 2  # and its gap
        if groups[-1] and used + need > room:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += need
    return groups if groups[0] else []


def _header(key: str) -> str:
    """A short column header: ``test_accuracy`` -> ``test acc``, ``bytes_up`` -> ``MB up``."""
    for long, short in (("_accuracy", " acc"), ("_seconds", " s"), ("bytes_", "MB "), ("_", " ")):
        key = key.replace(long, short)
    return key


def _fmt_metric(key: str, value: Any) -> str:
    if key.startswith("bytes") and isinstance(value, float):
        return f"{value / 1e6:.3g}"
    return _fmt(value)


def _describe_start(cfg: ExperimentConfig, exp: Experiment) -> None:
    from potluck.privacy.dp_sgd import example_mechanisms
    from potluck.privacy.ledger import private_mechanism

    fed, sampler = exp.federation, exp.algorithm.sampler
    rate = getattr(sampler, "rate", None)
    cohort = f"{sampler.cohort_size(fed.num_clients)} clients/round"
    if rate is not None:
        cohort = f"Poisson sampling q={rate:g} (about {cohort})"
    console.print(
        f"[bold]potluck[/] {exp.algorithm.name} on {cfg.data.dataset} "
        f"({fed.num_clients} clients, {cfg.data.partition.kind} partition), model "
        f"{cfg.model.name}, {cohort}, {exp.rounds} rounds, engine {exp.engine}, seed {exp.seed}"
    )
    for ns, term in example_mechanisms(exp.algorithm):
        console.print(
            f"example-level DP-SGD ({ns}): clip {term.clip:g}, noise multiplier "
            f"{term.noise_multiplier:.4g}, epsilon of the most exposed client at delta "
            f"{term.delta:g} (rdp), metric {ns}/epsilon"
        )
    found = private_mechanism(exp.algorithm)
    if exp.privacy is not None and found is not None:
        part, budget = found[1], exp.privacy
        cap = f", max_epsilon {budget.max_epsilon:g}" if budget.max_epsilon else ""
        console.print(
            f"{part.label}: clip {part.clip:g}, noise multiplier {part.noise_multiplier:.4g}, "
            f"epsilon at delta {budget.delta:g} ({budget.accountant}){cap}"
        )


def _describe_end(result: RunResult) -> None:
    final = result.final
    parts = [
        f"{k}={_fmt(final[k])}"
        for k in ("test_accuracy", "test_loss", "fed_accuracy", "train_loss")
        if k in final
    ]
    if result.stopped:
        console.print(
            f"[bold yellow]stopped[/] after round {len(result.history)}: {result.stopped}"
        )
    if "epsilon" in final:
        parts.append(f"epsilon={_fmt(final['epsilon'])}")
    parts += [f"{k}={_fmt(v)}" for k, v in final.items() if k.endswith("dp_sgd/epsilon")]
    console.print(f"[bold green]done[/] run [bold]{result.run_id}[/]: " + ", ".join(parts))
    if result.run_dir is not None:
        console.print(f"stored in {result.run_dir} (report: {result.run_dir / 'report.html'})")
        console.print(f"see per-round metrics with: potluck show {result.run_id}")


@app.command()
def server(
    exp: ExpArg = None,
    set_: SetOpt = None,
    store: StoreOpt = None,
    listen: ListenOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    client_ca: ClientCaOpt = None,
    revoked: RevokedOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Coordinate an experiment with real clients over gRPC (mutual TLS unless --insecure)."""
    from potluck.deployment import rounds_done, run_server

    _log_to_stderr()
    overrides = [*(set_ or []), *([f"deploy.listen={json.dumps(listen)}"] if listen else [])]
    cfg = _load_config(exp, overrides)
    if store is not None:
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"store": str(store)})})
    tls = server_tls(cert, key, client_ca, insecure)
    with _refused(), _damage_reported(), _progress(cfg.rounds, rounds_done(cfg)) as on_round:
        result = run_server(cfg, tls=tls, revoked=revoked, on_round=on_round)
    _describe_end(result)


@app.command()
def client(
    server_addr: Annotated[str, typer.Option("--server", help="the server's HOST:PORT")],
    data: Annotated[
        str, typer.Option(help="local data: an .npz with x and y, or 'federation' (simulated)")
    ] = "federation",
    task: Annotated[str | None, typer.Option(help="my_pkg.module:task (default: config)")] = None,
    name: Annotated[str | None, typer.Option(help="client name (default: from --cert)")] = None,
    cert: Annotated[Path | None, typer.Option(help="client certificate (PEM)")] = None,
    key: Annotated[Path | None, typer.Option(help="client private key (PEM)")] = None,
    ca: Annotated[Path | None, typer.Option(help="federation CA certificate (PEM)")] = None,
    server_name: Annotated[str | None, typer.Option(help="expected server name")] = None,
    insecure: Annotated[bool, typer.Option(help="no TLS (the server must be --insecure)")] = False,
    max_failures: Annotated[
        int | None, typer.Option(help="give up after this many failed connections in a row")
    ] = None,
    backoff_max: Annotated[
        float, typer.Option(help="longest wait between reconnection attempts (s)")
    ] = 30.0,
    attack: Annotated[
        str | None,
        typer.Option(help="run as a MALICIOUS client: a poisoning attack's name (for testing)"),
    ] = None,
    attack_param: Annotated[
        list[str] | None,
        typer.Option("--attack-param", help="the attack's parameter, key=value (repeatable)"),
    ] = None,
    model_out: Annotated[
        Path | None,
        typer.Option(help="where to keep the model a model server serves (potluck models serve)"),
    ] = None,
    device: Annotated[
        str, typer.Option(help='where this site trains and evaluates: "cpu", "cuda[:N]", "mps"')
    ] = "cpu",
) -> None:
    """Join a potluck server and train on local data; reconnects until the run is done.

    With ``--attack`` the client is malicious, to test a federation's defences: it poisons
    its data or crafts its updates as the attack's attackers do in simulation."""
    from potluck.client.program import ClientProgram
    from potluck.core.device import resolve_device
    from potluck.deploy.client import ClientTLS, Site
    from potluck.deployment import load_site_data, load_task, site_program

    _log_to_stderr()
    tls = None
    if insecure:
        err.print("[bold red]WARNING: --insecure: no TLS; the server is not authenticated[/]")
    elif cert is None or key is None or ca is None:
        _fail("the client needs --cert, --key and --ca (or an explicit --insecure)")
    else:
        tls = ClientTLS(cert, key, ca)
    with _refused():
        who = name or (tls.name() if tls else None)
        if not who:
            _fail("--insecure clients need --name")
        user_task = load_task(task) if task else None
        arrays = None if data == "federation" else load_site_data(Path(data))
        poison = _attack(attack, attack_param or [])
        if poison is not None:
            err.print(f"[bold red]WARNING: a malicious client: attack {attack}[/]")
        placed = resolve_device(device)

        def program_for(cfg: dict[str, Any], cid: int) -> ClientProgram:
            program = site_program(cfg, cid, task=user_task, data=arrays, attack=poison)
            program.place(placed)
            return program

        site = Site(
            server_addr,
            name=who,
            tls=tls,
            program_for=program_for,
            server_name=server_name,
            backoff=(min(0.5, backoff_max), backoff_max),
            max_failures=max_failures,
            model_out=model_out,
        )
        code = site.run()
    raise typer.Exit(code)


def _attack(name: str | None, params: list[str]) -> Any:
    """The poisoning attack of ``--attack NAME --attack-param key=value ...`` (None if no
    name); one that needs other clients' updates is refused."""
    from potluck.attacks.poisoning import check_attack
    from potluck.config import _parse_value
    from potluck.core.registry import build_part
    from potluck.deployment import check_site_attack

    if name is None:
        if params:
            _fail("--attack-param needs --attack NAME")
        return None
    section: dict[str, Any] = {"name": name}
    for item in params:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            _fail(f"--attack-param {item!r}: expected key=value")
        section[key.strip()] = _parse_value(raw)
    attack = check_attack(build_part("attack", section, "attack"))
    check_site_attack(attack)
    return attack


def _progress(rounds: int, done: int = 0) -> RoundProgress:
    """The run's progress bar on this console; a line a round where it is no terminal."""
    return RoundProgress(rounds, done, console, lines=True)


def _log_to_stderr() -> None:
    import logging

    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main() -> None:
    """Console-script entry point. A command that returned ends the process without the
    interpreter's teardown of every module (about 0.8 s with torch loaded, as long as the
    rounds of a small experiment): exit handlers run, streams are flushed, and where a
    thread is still running the normal exit waits for it instead."""
    try:
        app()
    except SystemExit as done:
        code = done.code
    else:
        code = 0
    _exit_fast(code if isinstance(code, int) else (0 if code is None else 1))


def _exit_fast(code: int) -> None:
    import atexit
    import contextlib
    import os
    import threading

    busy = [t for t in threading.enumerate() if t.is_alive() and not t.daemon]
    if busy != [threading.main_thread()]:
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
