"""The command-line options every serving command shares (``potluck server``, ``potluck
models serve``): the server's certificate, key and client CA, the revocation list, and an
explicit ``--insecure``; ``server_tls`` turns them into ``ServerTLS`` or refuses.

Example:
    >>> server_tls(None, None, None, insecure=True) is None
    True
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

if TYPE_CHECKING:  # deployment imports torch: only when a server starts
    from potluck.deployment import ServerTLS

CertOpt = Annotated[Path | None, typer.Option(help="server certificate (PEM)")]
KeyOpt = Annotated[Path | None, typer.Option(help="server private key (PEM)")]
ClientCaOpt = Annotated[Path | None, typer.Option(help="CA that signs client certificates")]
RevokedOpt = Annotated[
    Path | None, typer.Option(help="revoked client names (the CA directory's revoked.txt)")
]
InsecureOpt = Annotated[bool, typer.Option(help="no TLS, no client authentication")]
ListenOpt = Annotated[str | None, typer.Option(help="HOST:PORT (default: deploy.listen)")]


def server_tls(
    cert: Path | None, key: Path | None, client_ca: Path | None, insecure: bool
) -> ServerTLS | None:
    """The server's TLS files, or None with a loud warning for ``--insecure``; exits (2)
    naming what is missing otherwise."""
    from potluck.deployment import ServerTLS

    err = Console(stderr=True)
    if insecure:
        err.print("[bold red]WARNING: --insecure: no TLS; anyone can join and read the model[/]")
        return None
    if cert is None or key is None or client_ca is None:
        err.print("[bold red]error:[/] the server needs --cert, --key and --client-ca "
                  "(or an explicit --insecure)")  # fmt: skip
        raise typer.Exit(2)
    return ServerTLS(cert, key, client_ca)
