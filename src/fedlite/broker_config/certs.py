"""Test certificate authority, broker server certificate and client certificates, made with `cryptography`."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlite.fsutil import write_private
from fedlite.protocol.topics import check_id

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
DEFAULT_DAYS = 825


@dataclass(frozen=True)
class CertPair:
    """A certificate and its private key on disk."""

    cert: Path
    key: Path


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedlite"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private(path, data)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.chmod(0o644)


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
    )


def make_ca(directory: str | os.PathLike, common_name: str = "fedlite test CA", days: int = 3650) -> CertPair:
    """Write a self-signed CA (ca.crt, ca.key 0600) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = _new_key()
    name = _name(common_name)
    cert = (
        _builder(name, name, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    pair = CertPair(directory / CA_CERT, directory / CA_KEY)
    _write_key(pair.key, key)
    _write_cert(pair.cert, cert)
    return pair


def _load_ca(ca: CertPair) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    return cert, key


def _issue(
    ca: CertPair, out: CertPair, common_name: str, usage, san: list[x509.GeneralName] | None, days: int
) -> CertPair:
    ca_cert, ca_key = _load_ca(ca)
    key = _new_key()
    builder = (
        _builder(_name(common_name), ca_cert.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False
        )
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    out.cert.parent.mkdir(parents=True, exist_ok=True)
    _write_key(out.key, key)
    _write_cert(out.cert, cert)
    return out


def make_server_cert(
    directory: str | os.PathLike,
    ca: CertPair,
    hostnames: Iterable[str] = ("localhost",),
    ips: Iterable[str] = ("127.0.0.1", "::1"),
    days: int = DEFAULT_DAYS,
) -> CertPair:
    """Write server.crt / server.key (0600) signed by `ca`, valid for `hostnames` and `ips`."""
    hostnames, ips = list(hostnames), list(ips)
    san: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    san += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    directory = Path(directory)
    out = CertPair(directory / SERVER_CERT, directory / SERVER_KEY)
    cn = hostnames[0] if hostnames else ips[0]
    return _issue(ca, out, cn, ExtendedKeyUsageOID.SERVER_AUTH, san, days)


def make_client_cert(
    directory: str | os.PathLike, ca: CertPair, client_id: str, days: int = DEFAULT_DAYS
) -> CertPair:
    """Write <client_id>.crt / <client_id>.key (0600) signed by `ca`, with CN = client id."""
    check_id(client_id, "client id")
    directory = Path(directory)
    out = CertPair(directory / f"{client_id}.crt", directory / f"{client_id}.key")
    return _issue(ca, out, client_id, ExtendedKeyUsageOID.CLIENT_AUTH, None, days)


def ensure_test_pki(
    directory: str | os.PathLike,
    hostnames: Iterable[str] = ("localhost",),
    ips: Iterable[str] = ("127.0.0.1", "::1"),
) -> tuple[CertPair, CertPair]:
    """Return (ca, server), creating a test CA and server certificate in `directory` if either is missing."""
    directory = Path(directory)
    ca = CertPair(directory / CA_CERT, directory / CA_KEY)
    server = CertPair(directory / SERVER_CERT, directory / SERVER_KEY)
    if not (ca.cert.exists() and ca.key.exists()):
        ca = make_ca(directory)
        server.cert.unlink(missing_ok=True)
    if not (server.cert.exists() and server.key.exists()):
        server = make_server_cert(directory, ca, hostnames, ips)
    return ca, server
