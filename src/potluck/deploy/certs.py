"""The federation's PKI: a certificate authority, server and client certificates, revocation.

A deployment has one federation CA. It signs one certificate for the server (extended key
usage serverAuth, the server's host names and addresses as SANs) and one per client site
(clientAuth; the client name as common name and as the URI SAN ``potluck:client:<name>``).
Server and clients trust only that CA, so mutual TLS authenticates both ends and the server
reads each client's name from its certificate. Keys are EC P-256 and certificates are signed
with ECDSA-SHA256, which gRPC's TLS (BoringSSL) accepts for both roles.

Files in the CA directory: ``ca.pem``/``ca.key`` (the CA; keep ``ca.key`` on the
administrator's machine), ``<kind>-<name>.pem``/``.key`` (give a site its pair and
``ca.pem``), ``revoked.txt`` (revoked client names, one per line: the server's
``--revoked`` list) and ``crl.pem`` (the same revocations as a CA-signed CRL of serial
numbers, for standard TLS tools). Private keys are created with mode 0600.

Example:
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> _ = init_ca(d)
    >>> cert_path, key_path = issue(d, "client", "site-a")
    >>> check_certificate(cert_path.read_bytes(), Path(d, "ca.pem").read_bytes())
    'site-a'
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from potluck.core.files import atomic_write

Kind = Literal["server", "client"]
KINDS: tuple[Kind, ...] = ("server", "client")
CA_CERT, CA_KEY, CRL, REVOKED = "ca.pem", "ca.key", "crl.pem", "revoked.txt"
CA_DAYS, LEAF_DAYS = 3650, 397
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
URI_PREFIX = "potluck:client:"
_SKEW = timedelta(minutes=5)  # not_before is backdated this much, for clocks slightly behind
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*")
_EKU = {"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH}
_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
}
E = TypeVar("E", bound=x509.ExtensionType)


class CertificateError(ValueError):
    """A certificate, name or CA directory that potluck refuses; the message says why."""


@dataclass(frozen=True)
class CertInfo:
    """One issued certificate in a CA directory, as ``potluck certs list`` shows it."""

    kind: Kind
    name: str
    path: Path
    serial: int
    not_after: datetime
    revoked: bool
    problem: str | None  # why check_certificate refuses it now, None if it is accepted


def init_ca(
    directory: str | Path,
    name: str = "potluck federation CA",
    days: int = CA_DAYS,
    *,
    force: bool = False,
    now: datetime | None = None,
) -> Path:
    """Create the federation CA in ``directory``; returns the path of ``ca.pem``.

    Refuses to replace an existing CA unless ``force`` (a new CA invalidates every
    certificate the old one issued; its CRL is removed, ``revoked.txt`` is kept).

    Example:
        >>> import tempfile
        >>> init_ca(tempfile.mkdtemp(), days=30).name
        'ca.pem'
    """
    d = Path(directory)
    if not name.strip() or len(name) > 64:
        raise CertificateError(f"invalid CA name {name!r}: use 1 to 64 characters")
    _check_days(days)
    existing = [p for p in (d / CA_CERT, d / CA_KEY) if p.exists()]
    if existing and not force:
        raise CertificateError(
            f"a federation CA already exists in {d} ({existing[0].name}); replacing it "
            "invalidates every certificate it issued: pass force=True (--force) to do so"
        )
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    start = _utc(now)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - _SKEW)
        .not_valid_after(start + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    atomic_write(d / CA_KEY, _key_pem(key), mode=0o600)
    atomic_write(d / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    (d / CRL).unlink(missing_ok=True)
    return d / CA_CERT


def issue(
    directory: str | Path,
    kind: Kind,
    name: str,
    days: int = LEAF_DAYS,
    hosts: Sequence[str] | None = None,
    *,
    force: bool = False,
    now: datetime | None = None,
) -> tuple[Path, Path]:
    """Issue a ``kind`` ("server" or "client") certificate for ``name``, signed by the CA in
    ``directory``; returns the paths of ``<kind>-<name>.pem`` and ``<kind>-<name>.key``.

    ``hosts`` (servers only; default ``localhost`` and ``127.0.0.1``) are the DNS names and
    IP addresses clients will dial. An existing pair is replaced only with ``force``; a
    revoked client name cannot be issued again. ``now`` sets the start of the validity.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp(); _ = init_ca(d)
        >>> [p.name for p in issue(d, "server", "hub", hosts=["fl.example.org", "10.0.0.5"])]
        ['server-hub.pem', 'server-hub.key']
    """
    d = Path(directory)
    if kind not in KINDS:
        raise CertificateError(f"invalid certificate kind {kind!r}: use 'server' or 'client'")
    check_name(name, kind)
    _check_days(days)
    if kind == "client" and hosts:
        raise CertificateError("hosts apply to server certificates only")
    san = _server_san(hosts or DEFAULT_HOSTS) if kind == "server" else None
    ca, ca_key = _load_ca(d)
    if kind == "client" and name in load_revoked(d):
        raise CertificateError(f"client {name!r} is revoked (in {d / REVOKED}); choose a new name")
    cert_path, key_path = d / f"{kind}-{name}.pem", d / f"{kind}-{name}.key"
    if (cert_path.exists() or key_path.exists()) and not force:
        raise CertificateError(
            f"{cert_path} already exists: pass force=True (--force) to issue a new one"
        )
    start = _utc(now)
    end = start + timedelta(days=days)
    if end > ca.not_valid_after_utc:
        left = (ca.not_valid_after_utc - start).days
        raise CertificateError(
            f"a certificate valid for {days} days would outlive the federation CA (it expires "
            f"on {ca.not_valid_after_utc:%Y-%m-%d}): issue for at most {left} days or renew the CA"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - _SKEW)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([_EKU[kind]]), critical=False)
        .add_extension(san or _client_san(name), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(_authority_key_id(ca), critical=False)
    )
    cert = builder.sign(ca_key, hashes.SHA256())
    atomic_write(key_path, _key_pem(key), mode=0o600)
    atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return cert_path, key_path


def revoke(directory: str | Path, name: str, *, now: datetime | None = None) -> Path:
    """Revoke client ``name``: add it to ``revoked.txt`` and its certificate's serial number
    to the CA-signed ``crl.pem`` (rewritten); returns the path of ``revoked.txt``.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp(); _ = init_ca(d); _ = issue(d, "client", "site-b")
        >>> _ = revoke(d, "site-b"); sorted(load_revoked(d))
        ['site-b']
    """
    d = Path(directory)
    check_name(name, "client")
    ca, ca_key = _load_ca(d)
    cert_path = d / f"client-{name}.pem"
    if not cert_path.exists():
        raise CertificateError(f"no client certificate named {name!r} in {d} ({cert_path.name})")
    when = _utc(now)
    names = load_revoked(d) | {name}
    old = _load_crl(d, ca)
    serials = {r.serial_number: r.revocation_date_utc for r in old} if old else {}
    serials.setdefault(_load_cert(cert_path).serial_number, when)
    number = old.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number if old else 0
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(when)
        .next_update(max(ca.not_valid_after_utc, when + timedelta(days=1)))
        .add_extension(x509.CRLNumber(number + 1), critical=False)
        .add_extension(_authority_key_id(ca), critical=False)
    )
    for serial, date in sorted(serials.items()):
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(date)
        builder = builder.add_revoked_certificate(entry.build())
    crl = builder.sign(ca_key, hashes.SHA256())
    atomic_write(d / CRL, crl.public_bytes(serialization.Encoding.PEM), mode=0o644)
    text = "# revoked potluck client names, one per line\n" + "".join(
        f"{n}\n" for n in sorted(names)
    )
    atomic_write(d / REVOKED, text.encode(), mode=0o644)
    return d / REVOKED


def load_revoked(directory: str | Path) -> frozenset[str]:
    """The revoked client names in ``directory/revoked.txt`` (empty if there is none).

    Example:
        >>> import tempfile
        >>> load_revoked(tempfile.mkdtemp())
        frozenset()
    """
    path = Path(directory) / REVOKED
    if not path.exists():
        return frozenset()
    lines = (line.strip() for line in path.read_text().splitlines())
    return frozenset(line for line in lines if line and not line.startswith("#"))


def is_revoked(cert: x509.Certificate | bytes, revoked: Collection[str]) -> bool:
    """Whether the client named in ``cert`` is in ``revoked`` (a set lookup).

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp(); _ = init_ca(d); pem, _ = issue(d, "client", "c1")
        >>> is_revoked(pem.read_bytes(), {"c1"})
        True
    """
    return peer_identity(cert) in revoked


def peer_identity(cert: x509.Certificate | bytes) -> str:
    """The client name a certificate (PEM or DER bytes) carries: its ``potluck:client:`` URI
    SAN, else its common name; the two must agree when both are present.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp(); _ = init_ca(d); pem, _ = issue(d, "client", "site-c")
        >>> peer_identity(pem.read_bytes())
        'site-c'
    """
    c = _as_cert(cert)
    cns = [str(a.value) for a in c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    try:
        uris = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = {
            u[len(URI_PREFIX) :]
            for u in uris.get_values_for_type(x509.UniformResourceIdentifier)
            if u.startswith(URI_PREFIX)
        }
    except x509.ExtensionNotFound:
        names = set()
    if len(names) > 1:
        raise CertificateError(f"certificate names several clients: {sorted(names)}")
    if names:
        (name,) = names
        if cns and cns[0] != name:
            raise CertificateError(
                f"certificate's common name {cns[0]!r} differs from its client name {name!r}"
            )
        return name
    if cns:
        return cns[0]
    raise CertificateError("certificate names no client (no potluck:client: URI SAN, no CN)")


def check_certificate(
    cert: x509.Certificate | bytes,
    ca: x509.Certificate | bytes,
    *,
    role: Kind = "client",
    revoked: Collection[str] = (),
    now: datetime | None = None,
) -> str:
    """Verify ``cert`` for ``role`` against the federation ``ca`` and return its name.

    Checks, in order: the CA is a valid CA certificate; ``cert`` is signed by it; ``cert`` is
    valid at ``now`` (default: the current time); it is not a CA; its key usage allows
    digital signatures and its extended key usage includes the role's (serverAuth or
    clientAuth); a client's name is not in ``revoked``. The first failure raises
    ``CertificateError`` naming the certificate and the problem.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp(); _ = init_ca(d); pem, _ = issue(d, "server", "hub")
        >>> ca = Path(d, "ca.pem").read_bytes()
        >>> check_certificate(pem.read_bytes(), ca, role="server")
        'hub'
        >>> check_certificate(pem.read_bytes(), ca, role="client")
        Traceback (most recent call last):
        ...
        potluck.deploy.certs.CertificateError: certificate 'hub' is not a client certificate \
(extended key usage: serverAuth)
    """
    c, authority, at = _as_cert(cert), _as_cert(ca), _utc(now)
    who = f"certificate {_common_name(c)!r}"
    _check_ca(authority, at)
    if c.issuer != authority.subject:
        self_signed = " (self-signed)" if c.issuer == c.subject else ""
        raise CertificateError(
            f"{who} is not issued by the federation CA {_common_name(authority)!r}: its issuer "
            f"is {c.issuer.rfc4514_string()!r}{self_signed}"
        )
    try:
        c.verify_directly_issued_by(authority)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise CertificateError(
            f"{who}: signature does not verify against the federation CA "
            f"{_common_name(authority)!r} (issued by another CA with the same name?): {exc}"
        ) from None
    if at < c.not_valid_before_utc:
        raise CertificateError(f"{who} is not yet valid (valid from {c.not_valid_before_utc})")
    if at > c.not_valid_after_utc:
        raise CertificateError(f"{who} expired on {c.not_valid_after_utc}")
    if _extension(c, x509.BasicConstraints, "basic constraints").ca:
        raise CertificateError(f"{who} is a CA certificate, not a {role} certificate")
    if not _extension(c, x509.KeyUsage, "key usage").digital_signature:
        raise CertificateError(f"{who}: its key usage does not allow digital signatures")
    usages = _extension(c, x509.ExtendedKeyUsage, "extended key usage")
    if _EKU[role] not in usages:
        have = ", ".join(_EKU_NAMES.get(u, u.dotted_string) for u in usages) or "none"
        raise CertificateError(f"{who} is not a {role} certificate (extended key usage: {have})")
    name = peer_identity(c) if role == "client" else _common_name(c)
    if role == "client" and name in revoked:
        raise CertificateError(f"{who}: client {name!r} is revoked")
    return name


def check_name(name: str, kind: str = "client") -> str:
    """``name`` if it is a valid certificate name, else a ``CertificateError`` saying why.

    Example:
        >>> check_name("site/a")
        Traceback (most recent call last):
        ...
        potluck.deploy.certs.CertificateError: invalid client name 'site/a': no path separators
    """
    if not name:
        raise CertificateError(f"invalid {kind} name: it is empty")
    if "/" in name or "\\" in name or os.sep in name:
        raise CertificateError(f"invalid {kind} name {name!r}: no path separators")
    if not _NAME.fullmatch(name):
        raise CertificateError(
            f"invalid {kind} name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def load_ca_certificate(directory: str | Path) -> x509.Certificate:
    """The federation CA's certificate, ``directory/ca.pem``.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp(); _ = init_ca(d, "demo CA")
        >>> load_ca_certificate(d).subject.rfc4514_string()
        'CN=demo CA'
    """
    path = Path(directory) / CA_CERT
    if not path.exists():
        raise CertificateError(
            f"no federation CA in {path.parent} (no {CA_CERT}): create one with "
            "`potluck certs init`"
        )
    return _load_cert(path)


def list_certificates(directory: str | Path, *, now: datetime | None = None) -> list[CertInfo]:
    """The server and client certificates in ``directory``, each checked against its CA.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp(); _ = init_ca(d); _ = issue(d, "client", "c2")
        >>> [(i.kind, i.name, i.problem) for i in list_certificates(d)]
        [('client', 'c2', None)]
    """
    d = Path(directory)
    ca = load_ca_certificate(d)
    revoked = load_revoked(d)
    infos = []
    for kind in KINDS:
        for path in sorted(d.glob(f"{kind}-*.pem")):
            name = path.name[len(kind) + 1 : -len(".pem")]
            cert = _load_cert(path)
            try:
                check_certificate(cert, ca, role=kind, revoked=revoked, now=now)
                problem = None
            except CertificateError as exc:
                problem = str(exc)
            infos.append(
                CertInfo(
                    kind,
                    name,
                    path,
                    cert.serial_number,
                    cert.not_valid_after_utc,
                    kind == "client" and name in revoked,
                    problem,
                )
            )
    return infos


# -- helpers ------------------------------------------------------------------------------------


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)


def _check_days(days: int) -> None:
    if not isinstance(days, int) or days < 1:
        raise CertificateError(f"invalid validity {days!r}: days must be a positive integer")


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _server_san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not _HOST.fullmatch(host):
                raise CertificateError(
                    f"invalid server host {host!r}: give a DNS name or an IP address"
                ) from None
            names.append(x509.DNSName(host.lower()))
    return x509.SubjectAlternativeName(names)


def _client_san(name: str) -> x509.SubjectAlternativeName:
    return x509.SubjectAlternativeName([x509.UniformResourceIdentifier(URI_PREFIX + name)])


def _authority_key_id(ca: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_ca(d: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca = load_ca_certificate(d)
    if not (d / CA_KEY).exists():
        raise CertificateError(f"no CA key {d / CA_KEY}: issue and revoke where the CA was made")
    key = serialization.load_pem_private_key((d / CA_KEY).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{d / CA_KEY} is not an EC private key")
    if ca.public_key() != key.public_key():
        raise CertificateError(f"{d / CA_KEY} is not the key of {d / CA_CERT}")
    return ca, key


def _load_crl(d: Path, ca: x509.Certificate) -> x509.CertificateRevocationList | None:
    path = d / CRL
    if not path.exists():
        return None
    crl = x509.load_pem_x509_crl(path.read_bytes())
    public = ca.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or not crl.is_signature_valid(public):
        raise CertificateError(f"{path} is not signed by the federation CA in {d / CA_CERT}")
    return crl


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return _as_cert(path.read_bytes())
    except CertificateError as exc:
        raise CertificateError(f"{path}: {exc}") from None


def _as_cert(cert: x509.Certificate | bytes) -> x509.Certificate:
    if isinstance(cert, x509.Certificate):
        return cert
    try:
        if cert.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(cert)
        return x509.load_der_x509_certificate(cert)
    except ValueError as exc:
        raise CertificateError(f"not a PEM or DER X.509 certificate: {exc}") from None


def _check_ca(ca: x509.Certificate, at: datetime) -> None:
    who = f"federation CA {_common_name(ca)!r}"
    try:
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise CertificateError(f"{who} is not a CA certificate")
    if not ca.not_valid_before_utc <= at <= ca.not_valid_after_utc:
        raise CertificateError(
            f"{who} is not valid now (valid {ca.not_valid_before_utc} to {ca.not_valid_after_utc})"
        )


def _extension(c: x509.Certificate, kind: type[E], label: str) -> E:
    try:
        return c.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        raise CertificateError(
            f"certificate {_common_name(c)!r} has no {label} extension"
        ) from None


def _common_name(c: x509.Certificate) -> str:
    cns = c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else c.subject.rfc4514_string()
