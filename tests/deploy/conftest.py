"""Shared pieces of the deployment tests: a federation PKI, and a server plus sites run in
this process (threads) on loopback."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from potluck.config import ExperimentConfig
from potluck.deploy import certs
from potluck.deploy.client import ClientTLS, Site
from potluck.deployment import ServerTLS, run_server, site_program
from potluck.orchestrator import RunResult

SITES = [f"site-{i}" for i in range(5)]


def self_signed(name: str, *, san: bool = True) -> tuple[bytes, bytes]:
    """A self-signed client certificate (PEM) and its key, as an outsider could make."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
    )
    if san:
        uri = x509.UniformResourceIdentifier(certs.URI_PREFIX + name)
        builder = builder.add_extension(x509.SubjectAlternativeName([uri]), False)
    cert = builder.sign(key, hashes.SHA256())
    pem = cert.public_bytes(serialization.Encoding.PEM)
    return pem, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass(frozen=True)
class PKI:
    """A federation CA with a server and five clients, plus material that must be refused."""

    ca_dir: Path
    other_dir: Path  # another CA

    def server(self) -> ServerTLS:
        return ServerTLS(
            self.ca_dir / "server-hub.pem", self.ca_dir / "server-hub.key", self.ca_dir / "ca.pem"
        )

    def client(self, name: str, ca_dir: Path | None = None) -> ClientTLS:
        d = ca_dir or self.ca_dir
        return ClientTLS(d / f"client-{name}.pem", d / f"client-{name}.key", self.ca_dir / "ca.pem")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    root = tmp_path_factory.mktemp("pki")
    ca, other = root / "ca", root / "other"
    certs.init_ca(ca)
    certs.issue(ca, "server", "hub", hosts=["localhost", "127.0.0.1"])
    for name in [*SITES, "revoked-site", "intruder"]:
        certs.issue(ca, "client", name)
    certs.issue(ca, "client", "expired", days=1, now=datetime.now(UTC) - timedelta(days=30))
    certs.revoke(ca, "revoked-site")
    certs.init_ca(other)
    certs.issue(other, "client", "site-0")  # same name, wrong CA
    return PKI(ca, other)


def config(store: Path, **deploy: Any) -> ExperimentConfig:
    """A small SCAFFOLD experiment (client state travels too) on digits, 5 sites."""
    return ExperimentConfig.from_dict(
        {
            "rounds": 3,
            "data": {"dataset": "digits", "num_clients": 5, "partition": {"kind": "dirichlet"}},
            "model": {"name": "mlp"},
            "sampler": {"clients_per_round": 4},
            "client": {"epochs": 1, "batch_size": 16, "lr": 0.1},
            "algorithm": {"name": "scaffold"},
            "evaluation": {"federated_clients": 4},
            "run": {"threads": 1, "store": str(store), "name": "deployed"},
            "deploy": {
                "listen": "127.0.0.1:0",
                "min_clients": 5,
                "round_timeout_s": 20,
                "poll_timeout_s": 1,
                "admit": SITES,
                **deploy,
            },
        }
    )


@dataclass
class Deployment:
    """A server thread and site threads in this process."""

    cfg: ExperimentConfig
    tls: ServerTLS | None
    revoked: Path | None = None
    port: int = 0
    result: RunResult | None = None
    error: BaseException | None = None
    threads: list[threading.Thread] = field(default_factory=list)
    codes: dict[str, int] = field(default_factory=dict)  # what each site's run() returned
    sites: list[Site] = field(default_factory=list)

    def start(self) -> Deployment:
        listening = threading.Event()

        def serve() -> None:
            try:
                self.result = run_server(
                    self.cfg,
                    tls=self.tls,
                    revoked=self.revoked,
                    on_listening=lambda p: (setattr(self, "port", p), listening.set()),
                )
            except BaseException as exc:  # reported by finish()
                self.error = exc
                listening.set()

        self._spawn(serve, "server")
        assert listening.wait(60), "the server did not start"
        return self

    def site(
        self,
        name: str,
        tls: ClientTLS | None,
        *,
        kind: type[Site] = Site,
        program_for: Any = site_program,
        **kw: Any,
    ) -> Site:
        site = kind(
            f"127.0.0.1:{self.port}",
            name=name,
            tls=tls,
            program_for=program_for,
            server_name="localhost" if tls else None,
            backoff=(0.1, 0.5),
            **kw,
        )
        self._spawn(lambda: self.codes.__setitem__(name, site.run()), name)
        self.sites.append(site)
        return site

    def finish(self, timeout: float = 120) -> RunResult:
        self.threads[0].join(timeout)
        if self.error is not None:  # its sites were told it stopped: they keep reconnecting
            raise self.error
        for t in self.threads[1:]:
            t.join(10)
        assert self.result is not None, "the server did not finish"
        return self.result

    def close(self, timeout: float = 10) -> None:
        """Let the sites end at their next failure: a site of a server that stopped keeps
        reconnecting (it was not told the run is done), and would outlive the test."""
        for site in self.sites:
            site.max_failures = 1
        deadline = time.monotonic() + timeout
        for t in self.threads[1:]:
            t.join(max(0.0, deadline - time.monotonic()))

    def _spawn(self, target: Callable[[], Any], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self.threads.append(t)


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Callable[..., Deployment]]:
    """``make(tls, revoked, **deploy)``: a started deployment of ``config`` (or of ``cfg=``);
    its sites are told to end at teardown."""
    made: list[Deployment] = []

    def make(
        tls: ServerTLS | None,
        revoked: Path | None = None,
        cfg: ExperimentConfig | None = None,
        **deploy: Any,
    ) -> Deployment:
        dep = Deployment(cfg or config(tmp_path / "runs", **deploy), tls, revoked)
        made.append(dep)
        return dep.start()

    yield make
    for dep in made:
        dep.close()
