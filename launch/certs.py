"""Self-signed credentials for a local cluster (`splitserve up --tls self-signed`).

`write_self_signed(directory, hosts)` creates, in `directory`:

    ca.pem                      the cluster CA (its key is not kept: nothing more is signed)
    server.pem, server-key.pem  for the router's HTTPS and every node's gRPC server; also
                                a client certificate (a decode node calls prefill nodes)
    client.pem, client-key.pem  a client certificate for the router's gRPC calls and tools
    cluster-token               a random cluster token

Every certificate names `hosts` (IP addresses or DNS names) as subject alternative names,
so clients verify it for any of them. Keys and the token are written owner-only (0600).
Needs the `cryptography` package (the `cluster` extra).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
VALIDITY_DAYS = 365


@dataclass(frozen=True)
class ClusterCredentials:
    """Paths of what `write_self_signed` wrote."""

    directory: Path

    @property
    def ca_certs(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server-key.pem"

    @property
    def client_cert(self) -> Path:
        return self.directory / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.directory / "client-key.pem"

    @property
    def token_file(self) -> Path:
        return self.directory / "cluster-token"


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "splitserve local cluster"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey):
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALIDITY_DAYS))
    )


def _leaf(
    common_name: str,
    usages: Sequence[x509.ObjectIdentifier],
    hosts: Sequence[str],
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(_name(common_name), ca.subject, key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        .add_extension(_san(hosts), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _write(path: Path, data: bytes, is_secret: bool) -> None:
    if is_secret:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_self_signed(directory: Path, hosts: Sequence[str] = DEFAULT_HOSTS) -> ClusterCredentials:
    """A fresh CA, server and client certificates and a cluster token in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    out = ClusterCredentials(directory)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("splitserve local CA")
    ca = (
        _builder(ca_name, ca_name, ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    both = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
    server, server_key = _leaf("splitserve server", both, hosts, ca, ca_key)
    client_usage = (ExtendedKeyUsageOID.CLIENT_AUTH,)
    client, client_key = _leaf("splitserve client", client_usage, hosts, ca, ca_key)
    pem = serialization.Encoding.PEM
    _write(out.ca_certs, ca.public_bytes(pem), is_secret=False)
    _write(out.server_cert, server.public_bytes(pem), is_secret=False)
    _write(out.server_key, _pem_key(server_key), is_secret=True)
    _write(out.client_cert, client.public_bytes(pem), is_secret=False)
    _write(out.client_key, _pem_key(client_key), is_secret=True)
    _write(out.token_file, secrets.token_urlsafe(32).encode(), is_secret=True)
    return out
