"""A private PKI for a first deployment: one CA, a server certificate, one certificate per client.

Layout of ``out_dir`` (keys are written 0600)::

    ca.pem ca.key                 the federation's CA (keep ca.key offline once certificates are issued)
    server.pem server.key         SANs: 127.0.0.1, localhost and every --hosts entry
    clients/<name>.pem .key       CN=<name>: the client's identity; the server never trusts a name in a message
    revoked.txt                   the revocation list (deployment.revocation_list): one CN or serial:<hex> a line

Keys are ECDSA P-256: small, fast to generate, and supported by gRPC's TLS stack.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune.errors import FedtuneError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
REVOKED = "revoked.txt"


class CertError(FedtuneError):
    """Certificates cannot be created, read, or revoked (bad name, missing CA, unreadable file)."""


@dataclass(frozen=True)
class Issued:
    ca: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]]  # name -> (cert, key)
    revocation_list: Path


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise CertError(f"client name {name!r} must be 1-64 letters, digits, '_', '.' or '-' (not leading)")
    return name


def _write(path: Path, data: bytes, *, secret: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _builder(subject: str, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew between machines
        .not_valid_after(now + dt.timedelta(days=days))
    )


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(["127.0.0.1", "localhost", *hosts]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def create_ca(out_dir: Path, *, days: int = 3650) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtune federation CA")])
    cert = (
        _builder("fedtune federation CA", name, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    _write(out_dir / "ca.pem", cert.public_bytes(serialization.Encoding.PEM), secret=False)
    _write(out_dir / "ca.key", _key_pem(key), secret=True)
    return out_dir / "ca.pem", out_dir / "ca.key"


def _load_ca(out_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((out_dir / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((out_dir / "ca.key").read_bytes(), password=None)
    except (OSError, ValueError) as err:
        raise CertError(f"cannot read the CA in {out_dir} (ca.pem, ca.key): {err}") from None
    return cert, key  # type: ignore[return-value]


def issue(out_dir: Path, name: str, *, server_hosts: Sequence[str] | None = None, days: int = 825) -> tuple[Path, Path]:
    """Issue a certificate signed by the CA in ``out_dir``: the server's (with SANs) or client ``name``'s."""
    ca_cert, ca_key = _load_ca(out_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _builder(check_name(name), ca_cert.subject, key.public_key(), days).add_extension(
        x509.BasicConstraints(ca=False, path_length=None), critical=True
    )
    if server_hosts is not None:
        builder = builder.add_extension(_san(server_hosts), critical=False).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        cert_path, key_path = out_dir / "server.pem", out_dir / "server.key"
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        cert_path, key_path = out_dir / "clients" / f"{name}.pem", out_dir / "clients" / f"{name}.key"
    cert = builder.sign(ca_key, hashes.SHA256())
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), secret=False)
    _write(key_path, _key_pem(key), secret=True)
    return cert_path, key_path


def create_pki(out_dir: Path, clients: Sequence[str], *, hosts: Sequence[str] = ()) -> Issued:
    """A new CA (unless ``out_dir`` has one), the server certificate, and one certificate per client."""
    out_dir = Path(out_dir)
    names = [check_name(c) for c in clients]
    if len(set(names)) != len(names):
        raise CertError(f"client names must be unique, got {names}")
    if not (out_dir / "ca.pem").exists():
        create_ca(out_dir)
    server = issue(out_dir, "fedtune-server", server_hosts=list(hosts))
    issued = {name: issue(out_dir, name) for name in names}
    revoked = out_dir / REVOKED
    if not revoked.exists():
        _write(revoked, b"# revoked clients: one certificate CN, or serial:<hex>, per line\n", secret=False)
    return Issued(out_dir / "ca.pem", *server, issued, revoked)


def revoke(out_dir: Path, name: str) -> Path:
    """Add client ``name`` to ``out_dir``'s revocation list (every certificate with that CN is refused)."""
    path = Path(out_dir) / REVOKED
    with open(path, "a") as fh:
        fh.write(check_name(name) + "\n")
    return path
