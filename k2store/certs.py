"""Certificates and credentials of a secured cluster: `k2 certs init`, and gRPC credentials.

`init_cluster` makes, in one directory (mode 0700, every file 0600):

- ``ca.pem`` / ``ca.key``: a local CA (ECDSA P-256) that signs everything below. Keep ca.key
  away from the nodes in production; it is only needed to issue more certificates.
- ``<node>.pem`` / ``<node>.key`` per node: serverAuth and clientAuth (nodes call each other),
  SANs: the node's host (IP or DNS, for hostname checks), ``localhost``, and the URI
  ``k2://node/<name>?region=<region>`` that `Guard` reads to recognise a node on internal RPCs.
- ``blockstore-<region>.pem`` / ``.key`` per region: the KV-cache block store node of that
  region (kvtier/blocknode.py), a node certificate like the others (URI
  ``k2://node/blockstore-<region>?region=<region>``, loopback hosts). Only block store nodes
  trust it as a node: to a store node it is just a client certificate without a token.
- ``broker.pem`` / ``broker.key``: the MQTT broker's server certificate (kvtier/broker.py), for
  ``localhost`` and ``127.0.0.1``; MQTT clients log in with a principal's name and token.
- ``client.pem`` / ``client.key``: the certificate clients present (clientAuth only, URI
  ``k2://client/clients``). It gets a client through the TLS handshake and nothing more: data
  access comes from a bearer token, internal RPCs refuse it.
- ``tokens/<principal>.token``: the bearer tokens of the principals it creates (an ``operator``
  with the admin role, and any tenants asked for); only their SHA-256 goes into the cluster file.

Validity runs from an hour before "now" (clock skew between machines) for `valid_days`; "now" is
passed in, read from `truetime.SystemClock` by the caller, never from the OS clock here.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from k2store.errors import ClusterFileError
from k2store.security import (
    ADMIN_ROLE,
    CLIENT_URI_PREFIX,
    NODE_URI_PREFIX,
    Principal,
    SecuritySettings,
    new_token,
    token_digest,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

    from k2store.cluster import ClusterConfig

CERTS_DIR = "certs"
OPERATOR = "operator"
BROKER = "broker"
BROKER_URI = "k2://broker/mqtt"


def blockstore_name(region: str) -> str:
    """The certificate name (and node identity) of a region's block store node."""
    return f"blockstore-{region}"


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate and its private key, PEM-encoded."""

    cert_pem: bytes
    key_pem: bytes


def _now(now_ns: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(now_ns / 1e9, tz=datetime.UTC)


def _key() -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(common_name: str, *, now_ns: int, valid_days: int = 365) -> Issued:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now(now_ns)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue(
    ca: Issued,
    common_name: str,
    *,
    uri: str,
    hosts: Sequence[str] = (),
    server: bool,
    now_ns: int,
    valid_days: int = 365,
) -> Issued:
    """A leaf certificate signed by `ca`: clientAuth always, serverAuth when `server`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = load_pem_private_key(ca.key_pem, password=None)
    key = _key()
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    now = _now(now_ns)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def node_uri(name: str, region: str) -> str:
    return f"{NODE_URI_PREFIX}{name}?region={region}"


def issue_node(ca: Issued, name: str, region: str, address: str, *, now_ns: int) -> Issued:
    host = address.rpartition(":")[0].strip("[]")
    hosts = list(dict.fromkeys([host, "localhost", "127.0.0.1"]))
    return issue(ca, name, uri=node_uri(name, region), hosts=hosts, server=True, now_ns=now_ns)


def issue_client(ca: Issued, name: str = "clients", *, now_ns: int) -> Issued:
    return issue(ca, name, uri=f"{CLIENT_URI_PREFIX}{name}", server=False, now_ns=now_ns)


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path`, readable by its owner only (0600 from creation: no window)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)


def init_cluster(
    cluster: ClusterConfig,
    certs_dir: Path,
    *,
    now_ns: int,
    tenants: Sequence[str] = (),
    rate_limit_rps: float = 0.0,
) -> tuple[SecuritySettings, dict[str, str]]:
    """Create a CA, node and client certificates and tokens for `cluster` in `certs_dir`.

    Returns the `[security]` settings that point at them (tls on; an ``operator`` admin and one
    principal per tenant, named after it) and principal -> token file. Refuses to overwrite an
    existing CA: re-issuing would lock out every running node and client."""
    certs_dir = certs_dir.resolve()
    if (certs_dir / "ca.pem").exists():
        raise ClusterFileError(f"{certs_dir}: a CA exists already; remove the directory first")
    certs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(certs_dir, 0o700)
    ca = make_ca(f"k2 CA for cluster {cluster.settings.name}", now_ns=now_ns)
    write_private(certs_dir / "ca.pem", ca.cert_pem)
    write_private(certs_dir / "ca.key", ca.key_pem)
    for n in cluster.nodes:
        leaf = issue_node(ca, n.name, n.region, n.address, now_ns=now_ns)
        write_private(certs_dir / f"{n.name}.pem", leaf.cert_pem)
        write_private(certs_dir / f"{n.name}.key", leaf.key_pem)
    for region in cluster.region_names():
        name = blockstore_name(region)
        leaf = issue_node(ca, name, region, "127.0.0.1:0", now_ns=now_ns)
        write_private(certs_dir / f"{name}.pem", leaf.cert_pem)
        write_private(certs_dir / f"{name}.key", leaf.key_pem)
    broker = issue(
        ca, BROKER, uri=BROKER_URI, hosts=["localhost", "127.0.0.1"], server=True, now_ns=now_ns
    )
    write_private(certs_dir / f"{BROKER}.pem", broker.cert_pem)
    write_private(certs_dir / f"{BROKER}.key", broker.key_pem)
    client = issue_client(ca, now_ns=now_ns)
    write_private(certs_dir / "client.pem", client.cert_pem)
    write_private(certs_dir / "client.key", client.key_pem)
    tokens_dir = certs_dir / "tokens"
    tokens_dir.mkdir(exist_ok=True, mode=0o700)
    principals: list[Principal] = []
    files: dict[str, str] = {}
    for name, tenant, roles in [(OPERATOR, "", (ADMIN_ROLE,))] + [(t, t, ()) for t in tenants]:
        token = new_token()
        path = tokens_dir / f"{name}.token"
        write_private(path, token.encode() + b"\n")
        principals.append(Principal(name, tenant, token_digest(token), roles))
        files[name] = str(path)
    settings = SecuritySettings(
        tls=True,
        ca_file=certs_dir / "ca.pem",
        certs_dir=certs_dir,
        client_cert=certs_dir / "client.pem",
        client_key=certs_dir / "client.key",
        client_token_file=tokens_dir / f"{OPERATOR}.token",
        principals=tuple(principals),
        rate_limit_rps=rate_limit_rps,
    )
    return settings, files


def secure_cluster(
    cluster: ClusterConfig, *, now_ns: int, tenants: Sequence[str] = ()
) -> ClusterConfig:
    """`cluster` with `init_cluster`'s credentials in ``certs/`` beside its file, written back."""
    if cluster.path is None:
        raise ClusterFileError("the cluster has no file to keep certificates beside")
    sec, _ = init_cluster(cluster, cluster.path.parent / CERTS_DIR, now_ns=now_ns, tenants=tenants)
    cfg = replace(cluster, settings=replace(cluster.settings, security=sec))
    return cfg.write(cluster.path)


# -- gRPC credentials ---------------------------------------------------------------------------


def _read(path: Path | None, what: str) -> bytes:
    if path is None:
        raise ClusterFileError(f"security.{what}: not set")
    try:
        return path.read_bytes()
    except OSError as e:
        raise ClusterFileError(f"security.{what}: cannot read {path}: {e.strerror}") from None


def server_credentials(sec: SecuritySettings, node: str) -> grpc.ServerCredentials:
    """Mutual TLS: a peer without a certificate of the cluster CA does not get a connection."""
    cert, key = sec.node_cert(node)
    return grpc.ssl_server_credentials(
        [(_read(key, "certs_dir"), _read(cert, "certs_dir"))],
        root_certificates=_read(sec.ca_file, "ca_file"),
        require_client_auth=True,
    )


def channel_credentials(sec: SecuritySettings, node: str | None) -> grpc.ChannelCredentials:
    """What a node (`node`) or a client (None) presents when it dials a node."""
    if node is not None:
        cert, key = sec.node_cert(node)
        cert_pem, key_pem = _read(cert, "certs_dir"), _read(key, "certs_dir")
    else:
        cert_pem, key_pem = (
            _read(sec.client_cert, "client_cert"),
            _read(sec.client_key, "client_key"),
        )
    return grpc.ssl_channel_credentials(
        root_certificates=_read(sec.ca_file, "ca_file"),
        private_key=key_pem,
        certificate_chain=cert_pem,
    )


def client_security(certs_dir: Path, *, token_file: Path | None = None) -> SecuritySettings:
    """Client-side settings for a cluster secured by `init_cluster` in `certs_dir`, when all a
    caller has is an address and the certificates (no cluster file): `fetch_cluster_info`,
    ``AsyncClient.connect("host:port", security=...)``. The token comes from `token_file`
    (default: the operator's), or K2_TOKEN / K2_TOKEN_FILE, which take precedence."""
    d = certs_dir.resolve()
    return SecuritySettings(
        tls=True,
        ca_file=d / "ca.pem",
        certs_dir=d,
        client_cert=d / "client.pem",
        client_key=d / "client.key",
        client_token_file=token_file or d / "tokens" / f"{OPERATOR}.token",
    )


def open_channel(cluster: ClusterConfig, address: str) -> grpc.Channel:
    """A blocking channel to a node of `cluster` as a client (TLS when the cluster is secured),
    for tools such as the launcher's health checks and `k2 cluster status`."""
    sec = cluster.settings.security
    if not sec.tls:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, channel_credentials(sec, None))
