"""``potluck certs``: create the federation CA, issue, revoke and list certificates.

Example (shell):
    potluck certs init                                  # ./potluck-certs/ca.pem, ca.key
    potluck certs issue server hub --host fl.example.org --host 10.0.0.5
    potluck certs issue client site-a                   # client-site-a.pem, .key
    potluck certs revoke site-a; potluck certs list
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

certs_app = typer.Typer(
    help="Federation PKI for mutual TLS: a CA, server and client certificates, revocation.",
    no_args_is_help=True,
)
console = Console()
err = Console(stderr=True)

DirOpt = Annotated[Path, typer.Option("--dir", help="CA directory (holds ca.key: keep it private)")]
DaysOpt = Annotated[int | None, typer.Option("--days", help="validity in days")]
DEFAULT_DIR = Path("potluck-certs")


class KindArg(StrEnum):
    server = "server"
    client = "client"


def _fail(message: str) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


@contextmanager
def _refused() -> Iterator[None]:
    """Report a refused name, CA or certificate (or an unwritable directory) without a trace."""
    try:
        yield
    except (ValueError, OSError) as exc:
        _fail(str(exc))


@certs_app.command("init")
def init(
    directory: DirOpt = DEFAULT_DIR,
    days: DaysOpt = None,
    name: Annotated[str, typer.Option(help="the CA's common name")] = "potluck federation CA",
    force: Annotated[bool, typer.Option(help="replace an existing CA")] = False,
) -> None:
    """Create the federation certificate authority (ca.pem, ca.key)."""
    from potluck.deploy import certs

    with _refused():
        path = certs.init_ca(directory, name, certs.CA_DAYS if days is None else days, force=force)
    console.print(f"created the federation CA {name!r}: {path} (key {path.with_name('ca.key')})")
    console.print("give ca.pem to the server and every client; keep ca.key here")


@certs_app.command("issue")
def issue(
    kind: Annotated[KindArg, typer.Argument(help="server or client")],
    name: Annotated[str, typer.Argument(help="the server's or client's name")],
    directory: DirOpt = DEFAULT_DIR,
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="DNS name or IP address clients dial (servers; repeatable)"),
    ] = None,
    days: DaysOpt = None,
    force: Annotated[bool, typer.Option(help="replace an existing certificate")] = False,
) -> None:
    """Issue a server or client certificate signed by the federation CA."""
    from potluck.deploy import certs

    with _refused():
        cert, key = certs.issue(
            directory,
            kind.value,
            name,
            certs.LEAF_DAYS if days is None else days,
            host,
            force=force,
        )
    console.print(f"issued {kind.value} certificate {cert} (key {key})", highlight=False)
    console.print(f"give {cert.name}, {key.name} and {certs.CA_CERT} to {name}", highlight=False)


@certs_app.command("revoke")
def revoke(
    name: Annotated[str, typer.Argument(help="the client's name")],
    directory: DirOpt = DEFAULT_DIR,
) -> None:
    """Revoke a client: the server refuses its certificate (pass --revoked revoked.txt)."""
    from potluck.deploy import certs

    with _refused():
        path = certs.revoke(directory, name)
    console.print(f"revoked client {name!r}: {path} and {path.with_name(certs.CRL)} updated")


@certs_app.command("list")
def list_(directory: DirOpt = DEFAULT_DIR) -> None:
    """List issued certificates: name, kind, expiry, revoked, and any problem."""
    from potluck.deploy import certs

    with _refused():
        ca = certs.load_ca_certificate(directory)
        infos = certs.list_certificates(directory)
    console.print(f"CA {ca.subject.rfc4514_string()}, expires {ca.not_valid_after_utc:%Y-%m-%d}")
    table = Table("name", "kind", "expires", "revoked", "status")
    for i in infos:
        status = i.problem or "[green]ok[/]"
        revoked = "[red]yes[/]" if i.revoked else "no"
        table.add_row(i.name, i.kind, f"{i.not_after:%Y-%m-%d}", revoked, status)
    console.print(table)
