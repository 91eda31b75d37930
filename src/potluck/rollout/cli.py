"""``potluck models``: the model registry (``potluck.rollout.registry``) from the shell.

Example (shell):
    potluck models register RUN --name digits          # the run's newest checkpoint, v1
    potluck models promote digits 1 --reason "beats v0 on the holdout"
    potluck models list
    potluck models rollback digits --reason "accuracy regressed"
    potluck models log digits
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from potluck.server_options import (
    CertOpt,
    ClientCaOpt,
    InsecureOpt,
    KeyOpt,
    ListenOpt,
    RevokedOpt,
    server_tls,
)

if TYPE_CHECKING:  # the registry imports torch: only when a command runs
    from potluck.rollout.registry import ModelRegistry, ModelVersion

models_app = typer.Typer(
    help="Versioned models from runs' checkpoints: register, promote, roll back, audit log.",
    no_args_is_help=True,
)
console = Console(width=None)
StoreOpt = Annotated[
    Path | None, typer.Option("--store", help="run store directory (default: run.store)")
]


@contextmanager
def _registry(store: Path | None) -> Iterator[ModelRegistry]:
    from potluck.config import default_store
    from potluck.rollout.registry import ModelRegistry
    from potluck.store.sqlite import RunStore, StoreError, UnknownRunError

    try:
        with RunStore(store or default_store()) as st:
            yield ModelRegistry(st)
    except (ValueError, UnknownRunError, StoreError, KeyError) as exc:  # RegistryError too
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None


def _line(v: ModelVersion) -> str:
    acc = v.metrics.get("test_accuracy")
    shown = f", test_accuracy {acc:.4g}" if isinstance(acc, float) else ""
    return f"{v.name} v{v.version} ({v.stage}): run {v.run_id} round {v.round}{shown}"


@models_app.command()
def register(
    run_ref: Annotated[str, typer.Argument(help="run id, id prefix or name")],
    name: Annotated[str, typer.Option(help="the model's name")],
    round: Annotated[int | None, typer.Option(help="the checkpoint's round (newest)")] = None,
    note: Annotated[str, typer.Option(help="recorded in the audit log")] = "",
    store: StoreOpt = None,
) -> None:
    """Register a run's checkpoint as the next version of a model."""
    with _registry(store) as reg:
        console.print(f"registered {_line(reg.register(name, run_ref, round, note))}")


@models_app.command()
def promote(
    name: str,
    version: int,
    reason: Annotated[str, typer.Option(help="recorded in the audit log")] = "",
    store: StoreOpt = None,
) -> None:
    """Make a version the model's production version (the one before it is archived)."""
    with _registry(store) as reg:
        console.print(f"promoted {_line(reg.promote(name, version, reason))}")


@models_app.command()
def rollback(
    name: str,
    reason: Annotated[str, typer.Option(help="recorded in the audit log")] = "",
    store: StoreOpt = None,
) -> None:
    """Restore the production version before the current one."""
    with _registry(store) as reg:
        console.print(f"rolled back to {_line(reg.rollback(name, reason))}")


@models_app.command("list")
def list_cmd(name: Annotated[str | None, typer.Argument()] = None, store: StoreOpt = None) -> None:
    """Every registered version (of NAME), with its stage, source and metrics."""
    with _registry(store) as reg:
        table = Table("model", "v", "stage", "run", "round", "accuracy", "parent", "registered",
                      box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0))  # fmt: skip
        for v in reg.versions(name):
            acc = v.metrics.get("test_accuracy")
            table.add_row(v.name, str(v.version), v.stage, v.run_id, str(v.round),
                          "" if acc is None else f"{acc:.4g}",
                          "" if v.parent is None else str(v.parent), v.created_at[:10])  # fmt: skip
        console.print(table)


@models_app.command()
def log(name: Annotated[str | None, typer.Argument()] = None, store: StoreOpt = None) -> None:
    """The audit log: every registration, promotion and rollback, oldest first."""
    with _registry(store) as reg:
        table = Table("at (UTC)", "model", "v", "action", "detail", box=box.SIMPLE_HEAD)
        for e in reg.audit(name):
            detail = ", ".join(f"{k}={v}" for k, v in e.detail.items() if v not in ("", None))
            table.add_row(e.at, e.name, str(e.version), e.action, detail)
        console.print(table)


@models_app.command()
def ab(
    name: str,
    version_a: int,
    version_b: Annotated[int | None, typer.Argument(help="omit with --personal")] = None,
    personal: Annotated[
        bool, typer.Option(help="A's global model against the personal models of A's run")
    ] = False,
    alpha: Annotated[float, typer.Option(help="significance level")] = 0.05,
    store: StoreOpt = None,
) -> None:
    """A/B evaluation on every client's local test data with a Wilcoxon signed-rank test of
    the per-client differences: two versions (on the federation of B's run), or with
    --personal a version's global model against its run's clients' personalised models
    (FedPer, Ditto; the clients' newest stored states)."""
    from potluck.config import ExperimentConfig
    from potluck.core.records import by_namespace
    from potluck.monitor.ab import ab_personal, ab_test

    if personal == (version_b is not None):
        Console(stderr=True).print("[bold red]error:[/] give VERSION_B or --personal")
        raise typer.Exit(2)
    with _registry(store) as reg:
        a = reg.get(name, version_a)
        b = a if version_b is None else reg.get(name, version_b)
        experiment = ExperimentConfig.from_dict(reg.store.get_run(b.run_id).config).build()
        w, against = a.load().tensors["global"], "personal" if version_b is None else version_a
        if version_b is None:
            ids = reg.store.clients_with_state(a.run_id)
            states = map(by_namespace, reg.store.client_states(a.run_id, ids))
            result = ab_personal(experiment, w, dict(zip(ids, states, strict=True)), alpha)
            labels = ("global", "personal")
        else:
            result = ab_test(experiment, w, b.load().tensors["global"], alpha=alpha)
            labels = (f"v{version_a}", f"v{version_b}")
        reg.record("ab", b, {"against": against, "p_value": result.p_value, "winner": result.winner,
                             "difference": result.mean_difference})  # fmt: skip
        console.print(f"{name}: " + result.summary(*labels))


@models_app.command()
def canary(
    name: str,
    version: int,
    fraction: Annotated[float, typer.Option(help="share of the clients that try it")] = 0.1,
    threshold: Annotated[
        float, typer.Option(help="the accuracy drop against production that rolls it back")
    ] = 0.01,
    seed: Annotated[int, typer.Option(help="draws the canary's clients")] = 0,
    store: StoreOpt = None,
) -> None:
    """Try a registered version on a fraction of the clients (of its run's federation) next
    to production: promoted if it holds up, rolled back automatically if it regresses."""
    from potluck.config import ExperimentConfig

    with _registry(store) as reg:
        candidate = reg.get(name, version)
        experiment = ExperimentConfig.from_dict(reg.store.get_run(candidate.run_id).config)
        out = reg.canary(name, version, experiment.build(), fraction, threshold, seed)
        console.print(out.comparison.summary("production", "canary"))
        verdict = "promoted to production" if out.promoted else "rolled back (archived)"
        console.print(f"{name} v{version}: {verdict}")


@models_app.command()
def serve(
    name: str,
    canary: Annotated[
        int | None, typer.Option(help="a registered version to try on some sites first")
    ] = None,
    fraction: Annotated[float, typer.Option(help="share of the sites the canary runs on")] = 0.1,
    threshold: Annotated[
        float, typer.Option(help="the accuracy drop against production that rolls it back")
    ] = 0.01,
    seed: Annotated[int, typer.Option(help="draws the canary's sites")] = 0,
    ab: Annotated[
        str | None,
        typer.Option(
            help="first an A/B test against production: a VERSION, or 'personal' "
            "(the sites' personalised models)"
        ),
    ] = None,
    follow: Annotated[
        bool, typer.Option(help="keep serving (later sites, later promotions) until Ctrl-C")
    ] = False,
    listen: ListenOpt = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="override a field, e.g. --set deploy.min_clients=5"),
    ] = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    client_ca: ClientCaOpt = None,
    revoked: RevokedOpt = None,
    insecure: InsecureOpt = False,
    store: StoreOpt = None,
) -> None:
    """Serve a model's production version to deployed sites (``potluck client --model-out``)
    over gRPC: with --canary, a version tried on a fraction of them first, promoted or rolled
    back automatically on their local test data."""
    import logging
    import threading

    from potluck.rollout.serving import CanaryPlan, serve_models

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")  # fmt: skip
    errors = Console(stderr=True)
    tls = server_tls(cert, key, client_ca, insecure)
    overrides = [*(set_ or []), *([f'deploy.listen="{listen}"'] if listen else [])]
    plan = None if canary is None else CanaryPlan(canary, fraction, threshold, seed)
    if ab is not None and ab != "personal" and not ab.isdigit():
        errors.print(f"[bold red]error:[/] --ab takes a version or 'personal', not {ab!r}")
        raise typer.Exit(2)
    against: int | Literal["personal"] | None = None
    if ab is not None:
        against = "personal" if ab == "personal" else int(ab)
    stop = threading.Event() if follow else None
    with _registry(store) as reg:
        try:
            result = serve_models(reg, name, tls=tls, overrides=overrides, revoked=revoked,
                                  canary=plan, ab=against, follow=stop)  # fmt: skip
        except TimeoutError as exc:
            errors.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            console.print("stopped serving; the sites keep their models and reconnect")
            raise typer.Exit(130) from None
    if result.ab is not None:
        label = "personal" if against == "personal" else f"v{against}"
        console.print(f"{name} A/B: " + result.ab.summary("production", label))
    if result.canary is not None:
        out = result.canary
        console.print(out.comparison.summary("production", "canary"))
        verdict = "promoted to production" if out.promoted else "rolled back (archived)"
        console.print(f"{name} v{out.version.version}: {verdict}")
    by_version: dict[int, int] = {}
    for v in result.installed.values():
        by_version[v] = by_version.get(v, 0) + 1
    served = ", ".join(f"v{v} on {n} sites" for v, n in sorted(by_version.items()))
    console.print(f"{name}: {served or 'installed on no site'}")
    for site, why in sorted(result.failed.items()):
        console.print(f"  {site}: {why}")
