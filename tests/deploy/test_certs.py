"""The federation PKI: CA, issued certificates, refusals, revocation, the CLI, and gRPC mTLS."""

from __future__ import annotations

import doctest
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import self_signed
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from potluck.cli import app
from potluck.deploy import certs
from potluck.deploy.certs import CertificateError, check_certificate

PAST = datetime(2020, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA with a server ``hub`` and a client ``site-a`` (shared: tests must not modify it)."""
    d = tmp_path_factory.mktemp("pki")
    certs.init_ca(d)
    certs.issue(d, "server", "hub")
    certs.issue(d, "client", "site-a")
    return d


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another CA with the same (default) name, and a client ``site-a`` it issued."""
    d = tmp_path_factory.mktemp("other")
    certs.init_ca(d)
    certs.issue(d, "client", "site-a")
    return d


def read(d: Path, name: str) -> bytes:
    return (d / name).read_bytes()


# -- the CA and issued certificates ----------------------------------------------------------------


def test_keys_are_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        certs.init_ca(tmp_path)
        certs.issue(tmp_path, "server", "hub")
        certs.issue(tmp_path, "client", "site-a")
    finally:
        os.umask(old)
    for key in ("ca.key", "server-hub.key", "client-site-a.key"):
        assert (tmp_path / key).stat().st_mode & 0o777 == 0o600, key
    assert (tmp_path / "ca.pem").stat().st_mode & 0o777 == 0o644
    assert not list(tmp_path.glob(".*.tmp"))


def test_ca_refuses_overwrite_unless_forced(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    old_ca = read(tmp_path, "ca.pem")
    cert, _ = certs.issue(tmp_path, "client", "site-a")
    with pytest.raises(CertificateError, match=r"already exists.*force"):
        certs.init_ca(tmp_path)
    assert read(tmp_path, "ca.pem") == old_ca
    certs.init_ca(tmp_path, force=True)
    with pytest.raises(CertificateError, match="signature does not verify"):
        check_certificate(cert.read_bytes(), read(tmp_path, "ca.pem"))


def test_ca_certificate(pki: Path) -> None:
    ca = x509.load_pem_x509_certificate(read(pki, "ca.pem"))
    assert ca.subject.rfc4514_string() == "CN=potluck federation CA"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.not_valid_after_utc - ca.not_valid_before_utc > timedelta(days=3649)


def test_server_certificate_verifies_with_server_eku_and_hosts(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    pem, _ = certs.issue(tmp_path, "server", "hub", hosts=["FL.example.org", "10.0.0.5", "::1"])
    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    assert check_certificate(cert, read(tmp_path, "ca.pem"), role="server") == "hub"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5", "::1"]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(days=397) <= lifetime < timedelta(days=398)


def test_client_certificate_carries_its_name(pki: Path) -> None:
    pem = read(pki, "client-site-a.pem")
    cert = x509.load_pem_x509_certificate(pem)
    assert check_certificate(pem, read(pki, "ca.pem")) == "site-a"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["potluck:client:site-a"]
    der = cert.public_bytes(serialization.Encoding.DER)
    assert certs.peer_identity(pem) == certs.peer_identity(der) == "site-a"


def test_default_server_hosts(pki: Path) -> None:
    cert = x509.load_pem_x509_certificate(read(pki, "server-hub.pem"))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_peer_identity_falls_back_to_the_common_name_and_refuses_disagreement() -> None:
    pem, _ = self_signed("legacy", san=False)
    assert certs.peer_identity(pem) == "legacy"
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    odd = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alice")]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alice")]))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("potluck:client:bob")]),
            False,
        )
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(CertificateError, match=r"common name 'alice' differs.*'bob'"):
        certs.peer_identity(odd)
    with pytest.raises(CertificateError, match="not a PEM or DER"):
        certs.peer_identity(b"garbage")


# -- refusals --------------------------------------------------------------------------------------


def test_expired_and_not_yet_valid_certificates_are_refused(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    ca = read(tmp_path, "ca.pem")
    old, _ = certs.issue(tmp_path, "client", "old", days=1, now=PAST)
    with pytest.raises(CertificateError, match=r"certificate 'old' expired on 2020-01-02"):
        check_certificate(old.read_bytes(), ca)
    past_ca = tmp_path / "past"
    certs.init_ca(past_ca, now=PAST)
    early, _ = certs.issue(past_ca, "client", "early", now=PAST + timedelta(days=2))
    with pytest.raises(CertificateError, match="'early' is not yet valid"):
        check_certificate(early.read_bytes(), read(past_ca, "ca.pem"), now=PAST + timedelta(1))
    with pytest.raises(CertificateError, match=r"federation CA .* is not valid now"):
        check_certificate(early.read_bytes(), read(past_ca, "ca.pem"), now=PAST - timedelta(1))


def test_self_signed_certificate_is_refused(pki: Path) -> None:
    pem, _ = self_signed("site-a")
    with pytest.raises(CertificateError, match=r"not issued by the federation CA.*\(self-signed\)"):
        check_certificate(pem, read(pki, "ca.pem"))


def test_certificate_from_another_ca_is_refused(pki: Path, other_ca: Path, tmp_path: Path) -> None:
    foreign = read(other_ca, "client-site-a.pem")
    with pytest.raises(CertificateError, match="signature does not verify against the federati"):
        check_certificate(foreign, read(pki, "ca.pem"))
    certs.init_ca(tmp_path, "Acme CA")
    pem, _ = certs.issue(tmp_path, "client", "site-a")
    with pytest.raises(CertificateError, match=r"not issued by the federation CA.*CN=Acme CA"):
        check_certificate(pem.read_bytes(), read(pki, "ca.pem"))


def test_wrong_role_and_ca_as_leaf_are_refused(pki: Path) -> None:
    ca = read(pki, "ca.pem")
    with pytest.raises(CertificateError, match=r"'hub' is not a client certificate \(extended"):
        check_certificate(read(pki, "server-hub.pem"), ca, role="client")
    with pytest.raises(CertificateError, match="'site-a' is not a server certificate"):
        check_certificate(read(pki, "client-site-a.pem"), ca, role="server")
    with pytest.raises(CertificateError, match="is a CA certificate, not a client certificate"):
        check_certificate(ca, ca)


def test_revoked_client_is_refused(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    pem_a, _ = certs.issue(tmp_path, "client", "site-a")
    pem_b, _ = certs.issue(tmp_path, "client", "site-b")
    assert certs.load_revoked(tmp_path) == frozenset()
    assert certs.revoke(tmp_path, "site-a") == tmp_path / "revoked.txt"
    certs.revoke(tmp_path, "site-b")
    certs.revoke(tmp_path, "site-b")  # idempotent
    revoked = certs.load_revoked(tmp_path)
    assert revoked == {"site-a", "site-b"}
    assert certs.is_revoked(pem_a.read_bytes(), revoked)
    ca = read(tmp_path, "ca.pem")
    with pytest.raises(CertificateError, match="client 'site-a' is revoked"):
        check_certificate(pem_a.read_bytes(), ca, revoked=revoked)
    assert check_certificate(pem_a.read_bytes(), ca, revoked={"site-b"}) == "site-a"
    # the CRL: signed by the CA, listing both serials, numbered
    crl = x509.load_pem_x509_crl(read(tmp_path, "crl.pem"))
    ca_cert = x509.load_pem_x509_certificate(ca)
    public = ca_cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey) and crl.is_signature_valid(public)
    serials = {r.serial_number for r in crl}
    for pem in (pem_a, pem_b):
        assert x509.load_pem_x509_certificate(pem.read_bytes()).serial_number in serials
    assert len(serials) == 2
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 3
    with pytest.raises(CertificateError, match=r"'site-a' is revoked.*choose a new name"):
        certs.issue(tmp_path, "client", "site-a", force=True)
    with pytest.raises(CertificateError, match="no client certificate named 'nobody'"):
        certs.revoke(tmp_path, "nobody")


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("", "it is empty"),
        ("a/b", "no path separators"),
        ("..\\x", "no path separators"),
        ("..", "letters, digits"),
        ("-rf", "starting with a letter or digit"),
        ("site a", "letters, digits"),
        ("x" * 65, "1 to 64"),
        ("sité", "letters, digits"),
    ],
)
def test_bad_names_are_refused(pki: Path, name: str, match: str) -> None:
    with pytest.raises(CertificateError, match=f"invalid client name.*{match}"):
        certs.issue(pki, "client", name)


def test_bad_issue_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match=r"no federation CA in .*certs init"):
        certs.issue(tmp_path, "client", "site-a")
    certs.init_ca(tmp_path, days=30)
    with pytest.raises(CertificateError, match="invalid certificate kind 'admin'"):
        certs.issue(tmp_path, "admin", "x")  # type: ignore[arg-type]
    with pytest.raises(CertificateError, match="hosts apply to server certificates only"):
        certs.issue(tmp_path, "client", "x", hosts=["h"])
    with pytest.raises(CertificateError, match="invalid server host 'bad_host!'"):
        certs.issue(tmp_path, "server", "hub", hosts=["bad_host!"])
    with pytest.raises(CertificateError, match="days must be a positive integer"):
        certs.issue(tmp_path, "client", "x", days=0)
    with pytest.raises(CertificateError, match="would outlive the federation CA"):
        certs.issue(tmp_path, "client", "x")  # 397 days > the CA's 30
    certs.issue(tmp_path, "client", "x", days=10)
    with pytest.raises(CertificateError, match=r"already exists.*force"):
        certs.issue(tmp_path, "client", "x", days=10)
    certs.issue(tmp_path, "client", "x", days=10, force=True)


def test_list_certificates(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    certs.issue(tmp_path, "server", "hub")
    certs.issue(tmp_path, "client", "old", days=1, now=PAST)
    certs.issue(tmp_path, "client", "site-a")
    certs.revoke(tmp_path, "site-a")
    rows = {(i.kind, i.name): i for i in certs.list_certificates(tmp_path)}
    assert list(rows) == [("server", "hub"), ("client", "old"), ("client", "site-a")]
    assert rows["server", "hub"].problem is None
    assert "expired" in (rows["client", "old"].problem or "")
    assert rows["client", "site-a"].revoked and "revoked" in (
        rows["client", "site-a"].problem or ""
    )


def test_docstring_examples_run() -> None:
    result = doctest.testmod(certs)
    assert result.attempted >= 10 and result.failed == 0


# -- the CLI ---------------------------------------------------------------------------------------


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["certs", *args])
    return result.exit_code, result.output


def test_cli_end_to_end(tmp_path: Path) -> None:
    d = str(tmp_path / "pki")
    code, out = invoke("init", "--dir", d, "--days", "100")
    assert code == 0 and "created the federation CA" in out, out
    code, out = invoke("init", "--dir", d)
    assert code == 2 and "error:" in out and "already exists" in out
    code, out = invoke(
        "issue", "server", "hub", "--dir", d, "--host", "fl.test", "--host", "::1", "--days", "50"
    )
    assert code == 0 and "server-hub.pem" in out, out
    code, out = invoke("issue", "client", "site-a", "--dir", d, "--days", "30")
    assert code == 0 and "client-site-a.pem" in out, out
    code, out = invoke("issue", "client", "site-b", "--dir", d)
    assert code == 2 and "outlive" in out
    code, out = invoke("issue", "client", "a/b", "--dir", d)
    assert code == 2 and "error:" in out and "no path separators" in out
    code, out = invoke("issue", "client", "x", "--dir", d, "--days", "0")
    assert code == 2 and "positive integer" in out
    code, out = invoke("issue", "robot", "x", "--dir", d)
    assert code == 2
    code, out = invoke("revoke", "site-a", "--dir", d)
    assert code == 0 and "revoked client 'site-a'" in out, out
    code, out = invoke("list", "--dir", d)
    assert code == 0, out
    lines = {line.split()[1]: line for line in out.splitlines() if line.count("│") >= 5}
    assert "server" in lines["hub"] and " no " in lines["hub"] and " ok " in lines["hub"]
    assert "client" in lines["site-a"] and "yes" in lines["site-a"]
    cert = x509.load_pem_x509_certificate(Path(d, "server-hub.pem").read_bytes())
    assert f"{cert.not_valid_after_utc:%Y-%m-%d}" in lines["hub"]
    assert certs.load_revoked(d) == {"site-a"}
    code, out = invoke("list", "--dir", str(tmp_path / "none"))
    assert code == 2 and "no federation CA" in out


# -- gRPC accepts the material ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def echo_server(pki: Path) -> Iterator[int]:
    """A mutual-TLS gRPC echo server on loopback with the PKI's server certificate."""
    grpc = pytest.importorskip("grpc")
    from concurrent import futures

    def echo(request: bytes, context: object) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "potluck.test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    credentials = grpc.ssl_server_credentials(
        [(read(pki, "server-hub.key"), read(pki, "server-hub.pem"))],
        root_certificates=read(pki, "ca.pem"),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    yield port
    server.stop(None)


def call(port: int, ca: bytes, key: bytes | None = None, cert: bytes | None = None) -> bytes:
    import grpc

    credentials = grpc.ssl_channel_credentials(ca, key, cert)
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        result: bytes = channel.unary_unary("/potluck.test.Echo/Echo")(b"ping", timeout=10)
        return result


def test_grpc_accepts_a_ca_issued_client(pki: Path, echo_server: int) -> None:
    key, cert = read(pki, "client-site-a.key"), read(pki, "client-site-a.pem")
    assert call(echo_server, read(pki, "ca.pem"), key, cert) == b"ping"


def test_grpc_refuses_clients_without_a_federation_certificate(
    pki: Path, other_ca: Path, echo_server: int
) -> None:
    import grpc

    ca = read(pki, "ca.pem")
    cert, key = self_signed("site-a")
    foreign = (read(other_ca, "client-site-a.key"), read(other_ca, "client-site-a.pem"))
    for credentials in [(None, None), (key, cert), foreign]:
        with pytest.raises(grpc.RpcError) as info:
            call(echo_server, ca, *credentials)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
