"""Who may call what: the `[security]` table, peer and token authentication, authorization.

Off by default (`tls = false`): nodes serve plaintext and check nothing, exactly as before. With
``tls = true`` every connection to a node is mutual TLS against the cluster CA (`k2 certs init`,
k2store/certs.py makes one), and every RPC passes `Guard` before its request is even decoded::

    TLS handshake (cluster CA, client certificate required)       wrong CA: no connection at all
        │
        ▼
    Guard.authenticate(method, metadata, peer certificate)        UNAUTHENTICATED
        │   node certificate (URI SAN k2://node/<name>?region=<r>) ──▶ NodeIdentity: everything
        │   otherwise `authorization: Bearer <token>` ──▶ Principal (its tenant, its roles)
        ▼
    Guard.admit(principal)             per-principal token bucket    RESOURCE_EXHAUSTED
        ▼
    decode the request                                              INVALID_ARGUMENT, nothing run
        ▼
    Guard.authorize(identity, method, request)                      PERMISSION_DENIED
        ▼
    NodeService handler

Why one check in the node's generic handler wrapper (k2store/node.py `_adapt`) rather than a
`grpc.aio.ServerInterceptor`: authorization needs the decoded request (its keys) and the `Method`
entry, which only the wrapper has; the wrapper is also where K2Errors become statuses with the
``k2-error`` trailer, so a refusal reaches the client as a typed `Unauthenticated` or
`PermissionDenied`. Authentication still runs before the request bytes are decoded, so an
unauthenticated caller never gets its input parsed, let alone near the data.

Method classes (default-deny: an RPC added to service.METHODS later is internal until it is listed
here): `CLIENT_DATA` (keys checked against the principal's prefixes), `CLIENT_META` (any
authenticated principal), `ADMIN` (admin role), everything else internal: node certificates only.
Forwarded requests (K2/Put to the shard leader, Participant/* from a coordinator) travel between
nodes under the sending node's certificate; the first node has already authorized the client.

Tenant key convention: a principal of tenant T may read and write exactly the keys under
``<region>/t/<T>/`` for each region of the cluster (so its data is homed where it is born, like any
key under ``<region>/``), plus its KV-cache tier rows (below); when the principal lists
``prefixes``, exactly those and nothing else. Admins may touch every key. A refused key gets the
same answer whether or not it exists, and messages never echo another tenant's name or the key.

KV-cache tier rows (kvtier/metadata.py, kvtier/sessions.py build their keys from the roots
here), for every region R::

    key or prefix              tenant T's principal          why
    R/t/T/                     read, write                   the tenant's own data
    R/kv/t/T/                  read, write                   T's namespaces, blocks, leases, pins,
                                                             usage
    R/kvs/T/                   read, write                   T's chat sessions
    R/kv/shared/               read, write if share_blocks   namespaces shared between tenants
    R/kv/tenant/T (exact)      read                          T's quota and sharing opt-in
    R/kv/region/               read                          every region's block store addresses
    anything else              nothing                       (admins and nodes: everything)

A read grant covers Get, Scan, the reads of a transaction and replica reads, and the keys a
BeginTxn declares, or a TxnOps that begins its transaction inline (a placement hint: the
transaction's writes are checked one by one in TxnOps).
Quota rows and region rows are the operator's: only an admin token writes them
(`register_tenant`; a block store registers its address with its cluster file's token, the
operator's). Known limit: a tenant's usage rows sit in its
read-write space, because its own publish transaction charges them together with the quota
check, so a malicious tenant can rewrite its usage and get past its quota; the block stores'
capacity (LRU eviction per region) still bounds what it can hold, and other tenants' rows and
blocks stay out of its reach. Likewise its pins and leases (which the placement sweeper honours)
are its own to write. ``R/kv/shared/`` is one space for every tenant that opted in: they can
rewrite or drop each other's shared rows (not each other's usage rows), as they can each other's
shared blocks at the block stores, so opting in means trusting the other opted-in tenants with
the shared namespaces.

KV-cache block store nodes (kvtier/blocknode.py) run the same authentication and rate limit,
then `Guard.block_namespace`: block store namespaces are strings ``<tenant>/<label>`` (the
connector's label is its `kvtier.blocks.Namespace` id), so the tenant a namespace belongs to is
the part before the first ``/``, read off the name and never trusted from anywhere else. A
principal of tenant T may use namespaces ``T/...`` (its default, when a request names none, is
``T/``); admins and block store node certificates may use any. A namespace shared between
tenants (``/<label>``, empty tenant) is open to the principals of tenants that opted in
(``share_blocks = true``), and to admins and nodes. Reads outside the caller's namespaces
answer as misses; writes are refused with PERMISSION_DENIED.

Tokens are 256-bit random strings (`new_token`); the cluster file holds only their SHA-256, which
is compared with `hmac.compare_digest` against every principal (no early exit). Nothing here logs
a token or a certificate.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from google.protobuf.message import Message

from k2store.errors import InvalidArgument, PermissionDenied, RateLimited, Unauthenticated
from k2store.proto import k2_pb2 as pb

if TYPE_CHECKING:
    from k2store.cluster import ClusterConfig

ADMIN_ROLE = "admin"
ROLES = (ADMIN_ROLE,)
AUTHORIZATION_KEY = "authorization"
NODE_URI_PREFIX = "k2://node/"
CLIENT_URI_PREFIX = "k2://client/"

CLIENT_DATA = frozenset(
    {
        "/k2.v1.K2/Get",
        "/k2.v1.K2/Put",
        "/k2.v1.K2/Delete",
        "/k2.v1.K2/Scan",
        "/k2.v1.K2/BeginTxn",
        "/k2.v1.K2/TxnOps",
        "/k2.v1.K2/CommitTxn",
        "/k2.v1.K2/AbortTxn",
        "/k2.v1.Replication/ReplicaRead",
    }
)
"""Client RPCs that touch data: each key and range is checked against the caller's prefixes."""
CLIENT_META = frozenset({"/k2.v1.K2/ClusterInfo"})
"""Client RPCs any authenticated principal may call (the shard map: no tenant data)."""
ADMIN = frozenset({"/k2.v1.Admin/Status"})
"""RPCs that need the admin role (or a node certificate)."""

BLOCK_NAMESPACE_MAX = 256
"""Longest block store namespace name accepted."""


# -- settings -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Principal:
    """A client identity a bearer token maps to."""

    name: str
    tenant: str = ""
    """Keys under ``<region>/t/<tenant>/`` (every region) are this principal's; "" for an admin
    without a tenant."""
    token_sha256: str = ""
    """Hex SHA-256 of the principal's token (never the token itself)."""
    roles: tuple[str, ...] = ()
    prefixes: tuple[bytes, ...] = ()
    """Explicit key prefixes; when given they replace the tenant convention."""
    share_blocks: bool = False
    """The tenant opted in to KV-cache block namespaces shared between tenants (``/<label>`` at
    the block stores); off: its principal can neither read nor write them."""

    @property
    def is_admin(self) -> bool:
        return ADMIN_ROLE in self.roles


@dataclass(frozen=True, slots=True)
class SecuritySettings:
    """The `[security]` table of a cluster file. Paths are absolute once parsed (relative ones
    are resolved against the cluster file's directory)."""

    tls: bool = False
    """Mutual TLS on every node connection, and token authentication of clients. Off: plaintext
    and no checks (a laptop's default)."""
    ca_file: Path | None = None
    """The cluster CA certificate (PEM) that every peer certificate must chain to."""
    certs_dir: Path | None = None
    """Node certificates by convention: ``<certs_dir>/<node>.pem`` and ``<node>.key``."""
    client_cert: Path | None = None
    client_key: Path | None = None
    """The client certificate and key that clients of this cluster file present."""
    client_token_file: Path | None = None
    """Token that tools started from this cluster file (the k2 CLI, block stores) use when
    neither K2_TOKEN nor K2_TOKEN_FILE is set (`k2 certs init` points it at the operator's)."""
    principals: tuple[Principal, ...] = ()
    rate_limit_rps: float = 0.0
    """Requests per second each principal may make to each node (a token bucket per node: no
    coordination between nodes); 0: unlimited. Nodes are never limited."""
    rate_limit_burst: int = 0
    """Bucket size; 0: one second's worth (at least 1)."""
    max_concurrent_streams: int = 1024
    """Concurrent RPCs per connection a secured node accepts (gRPC's max_concurrent_streams;
    gRPC's default when tls is off)."""
    allow_test_settings: bool = False
    """Admin RPCs and settings that break guarantees on purpose (fault injection, a disabled
    commit-wait) are refused unless this is true: a node is started for testing explicitly."""

    def node_cert(self, node: str) -> tuple[Path, Path]:
        assert self.certs_dir is not None
        return self.certs_dir / f"{node}.pem", self.certs_dir / f"{node}.key"

    def burst(self) -> float:
        return float(self.rate_limit_burst or max(1.0, self.rate_limit_rps))


_FIELDS = (
    "tls",
    "ca_file",
    "certs_dir",
    "client_cert",
    "client_key",
    "client_token_file",
    "principals",
    "rate_limit_rps",
    "rate_limit_burst",
    "max_concurrent_streams",
    "allow_test_settings",
)
_PATH_FIELDS = ("ca_file", "certs_dir", "client_cert", "client_key", "client_token_file")
_PRINCIPAL_FIELDS = (
    "name",
    "tenant",
    "token_sha256",
    "roles",
    "prefixes",
    "prefixes_hex",
    "share_blocks",
)


def parse_security(t: Any, base: Path, fail: Callable[[str, str], Exception]) -> SecuritySettings:
    """The `[security]` table; `fail(field, message)` builds the ClusterFileError to raise."""
    if not isinstance(t, Mapping):
        raise fail("security", "must be a table")
    for k in t:
        if k not in _FIELDS:
            raise fail(f"security.{k}", f"unknown field; expected one of {sorted(_FIELDS)}")
    values: dict[str, Any] = {}
    for k in ("tls", "allow_test_settings"):
        if k in t:
            if not isinstance(t[k], bool):
                raise fail(f"security.{k}", f"expected true or false, got {t[k]!r}")
            values[k] = t[k]
    for k in _PATH_FIELDS:
        if k in t:
            v = t[k]
            if not isinstance(v, str) or not v or "\x00" in v:
                raise fail(f"security.{k}", f"expected a non-empty path, got {v!r}")
            p = Path(v)
            values[k] = p if p.is_absolute() else (base / p).resolve()
    if "rate_limit_rps" in t:
        v = t["rate_limit_rps"]
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < float("inf"):
            raise fail("security.rate_limit_rps", f"expected a number >= 0, got {v!r}")
        values["rate_limit_rps"] = float(v)
    for k in ("rate_limit_burst", "max_concurrent_streams"):
        if k in t:
            v = t[k]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v >= 2**31:
                raise fail(f"security.{k}", f"expected an integer in [0, 2^31), got {v!r}")
            if k == "max_concurrent_streams" and v == 0:
                raise fail(f"security.{k}", "must be positive")
            values[k] = v
    values["principals"] = _parse_principals(t.get("principals", []), fail)
    s = SecuritySettings(**values)
    if s.tls:
        for k in ("ca_file", "certs_dir", "client_cert", "client_key"):
            if getattr(s, k) is None:
                raise fail(f"security.{k}", "required when tls = true (see `k2 certs init`)")
    elif s.principals:
        raise fail(
            "security.principals", "need tls = true (tokens must not cross the network in clear)"
        )
    return s


def _parse_principals(v: Any, fail: Callable[[str, str], Exception]) -> tuple[Principal, ...]:
    if not isinstance(v, list) or not all(isinstance(x, Mapping) for x in v):
        raise fail("security.principals", "must be an array of tables ([[security.principals]])")
    out: list[Principal] = []
    for i, t in enumerate(v):
        where = f"security.principals[{i}]"
        for k in t:
            if k not in _PRINCIPAL_FIELDS:
                raise fail(
                    f"{where}.{k}", f"unknown field; expected one of {list(_PRINCIPAL_FIELDS)}"
                )
        strs: dict[str, str] = {}
        for k in ("name", "tenant", "token_sha256"):
            x = t.get(k, "")
            if not isinstance(x, str):
                raise fail(f"{where}.{k}", f"expected a string, got {x!r}")
            strs[k] = x
        if not strs["name"]:
            raise fail(f"{where}.name", "missing")
        digest = strs["token_sha256"]
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise fail(f"{where}.token_sha256", "expected 64 lowercase hex digits (SHA-256)")
        tenant = strs["tenant"]
        if tenant and (not tenant.isprintable() or "/" in tenant):
            raise fail(f"{where}.tenant", "must be printable and contain no '/'")
        roles = t.get("roles", [])
        if not isinstance(roles, list) or not all(isinstance(r, str) and r in ROLES for r in roles):
            raise fail(f"{where}.roles", f"expected a list of roles from {list(ROLES)}")
        prefixes: list[bytes] = []
        for k, decode in (("prefixes", str.encode), ("prefixes_hex", bytes.fromhex)):
            p = t.get(k, [])
            if not isinstance(p, list) or not all(isinstance(x, str) and x for x in p):
                raise fail(f"{where}.{k}", "expected a list of non-empty strings")
            try:
                prefixes += [decode(x) for x in p]
            except ValueError:
                raise fail(f"{where}.{k}", "not hex") from None
        if not tenant and not prefixes and ADMIN_ROLE not in roles:
            raise fail(f"{where}.tenant", "a principal needs a tenant, prefixes or the admin role")
        share = t.get("share_blocks", False)
        if not isinstance(share, bool):
            raise fail(f"{where}.share_blocks", f"expected true or false, got {share!r}")
        if share and not tenant:
            raise fail(f"{where}.share_blocks", "only a tenant's principal can opt in to sharing")
        out.append(Principal(strs["name"], tenant, digest, tuple(roles), tuple(prefixes), share))
    seen: set[str] = set()
    for i, pr in enumerate(out):
        if pr.name in seen:
            raise fail(f"security.principals[{i}].name", f"duplicate name {pr.name!r}")
        seen.add(pr.name)
    return tuple(out)


def security_to_toml(s: SecuritySettings, base: Path | None) -> list[str]:
    """Lines of the `[security]` table (nothing when it is all defaults)."""
    if s == SecuritySettings():
        return []

    def path(p: Path) -> str:
        if base is not None and p.is_relative_to(base):
            p = p.relative_to(base)
        return _q(str(p))

    out = ["[security]", f"tls = {'true' if s.tls else 'false'}"]
    out += [f"{k} = {path(getattr(s, k))}" for k in _PATH_FIELDS if getattr(s, k) is not None]
    out += [
        f"rate_limit_rps = {s.rate_limit_rps!r}",
        f"rate_limit_burst = {s.rate_limit_burst}",
        f"max_concurrent_streams = {s.max_concurrent_streams}",
        f"allow_test_settings = {'true' if s.allow_test_settings else 'false'}",
    ]
    for p in s.principals:
        out += ["", "[[security.principals]]", f"name = {_q(p.name)}"]
        if p.tenant:
            out.append(f"tenant = {_q(p.tenant)}")
        out.append(f"token_sha256 = {_q(p.token_sha256)}")
        if p.roles:
            out.append(f"roles = [{', '.join(map(_q, p.roles))}]")
        if p.prefixes:
            out.append(f"prefixes_hex = [{', '.join(_q(x.hex()) for x in p.prefixes)}]")
        if p.share_blocks:
            out.append("share_blocks = true")
    return out


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- tokens -------------------------------------------------------------------------------------


def new_token() -> str:
    """A fresh bearer token: 256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """What the cluster file stores. Tokens are random, not passwords: a fast hash suffices."""
    return hashlib.sha256(token.encode()).hexdigest()


def client_token(sec: SecuritySettings, token: str | None = None) -> str | None:
    """The token a client of a secured cluster sends: `token` if given, else the K2_TOKEN
    environment variable, else the file K2_TOKEN_FILE or `sec.client_token_file` names (None
    when none is readable: the node then answers UNAUTHENTICATED)."""
    if token:
        return token
    if os.environ.get("K2_TOKEN"):
        return os.environ["K2_TOKEN"].strip()
    path = os.environ.get("K2_TOKEN_FILE") or sec.client_token_file
    if not path:
        return None
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def find_principal(
    principals: Sequence[Principal], token: str, digests: Sequence[bytes] | None = None
) -> Principal | None:
    """The principal whose token this is, or None. Timing-safe: the token's SHA-256 is compared
    with `hmac.compare_digest` against every principal's, with no early exit. `digests`: the
    principals' digests as bytes, when the caller keeps them decoded."""
    digest = hashlib.sha256(token.encode()).digest()
    if digests is None:
        digests = [bytes.fromhex(p.token_sha256) for p in principals]
    found: Principal | None = None
    for p, d in zip(principals, digests, strict=True):
        if hmac.compare_digest(digest, d):
            found = found or p
    return found


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return ((AUTHORIZATION_KEY, f"Bearer {token}"),)


# -- identities ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """A peer that presented a node certificate of this cluster: trusted with every RPC."""

    name: str
    region: str


Identity = NodeIdentity | Principal


def parse_peer_uri(uri: str) -> tuple[str, str, str] | None:
    """("node" | "client", name, region) from a K2 certificate URI SAN, or None."""
    for kind, prefix in (("node", NODE_URI_PREFIX), ("client", CLIENT_URI_PREFIX)):
        if uri.startswith(prefix):
            parts = urlsplit(uri)
            name = parts.path.lstrip("/")
            region = parse_qs(parts.query).get("region", [""])[0]
            return (kind, name, region) if name else None
    return None


@functools.lru_cache(maxsize=1024)
def _cert_uris(pem: bytes) -> tuple[str, ...]:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(pem)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return ()
    return tuple(san.get_values_for_type(x509.UniformResourceIdentifier))


def peer_uris(auth_context: Mapping[str, Iterable[bytes]]) -> tuple[str, ...]:
    """URI SANs of the verified peer certificate gRPC reports in `auth_context`."""
    pems = list(auth_context.get("x509_pem_cert", ()))
    return _cert_uris(bytes(pems[0])) if pems else ()


# -- rate limits --------------------------------------------------------------------------------


class TokenBucket:
    """`rate` tokens a second up to `burst`; time in ns from the injected monotonic clock."""

    def __init__(self, rate: float, burst: float, now_ns: int) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last_ns = now_ns

    def take(self, now_ns: int) -> bool:
        elapsed = max(0, now_ns - self.last_ns) / 1e9
        self.last_ns = max(self.last_ns, now_ns)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


# -- the guard ----------------------------------------------------------------------------------


def prefix_end(prefix: bytes) -> bytes | None:
    """The first key after every key that starts with `prefix` (None: no such key)."""
    p = prefix.rstrip(b"\xff")
    return p[:-1] + bytes([p[-1] + 1]) if p else None


def tenant_prefixes(tenant: str, regions: Sequence[str]) -> tuple[bytes, ...]:
    return tuple(f"{r}/t/{tenant}/".encode() for r in regions)


# Roots of the KV-cache tier's rows in region R (the module doc's table); kvtier/metadata.py and
# kvtier/sessions.py build their keys from these, so the grants and the layout cannot drift.
KV_TENANT_ROOT = "kv/t/"
"""``R/kv/t/<T>/``: tenant T's namespaces, blocks, leases, pins and usage."""
KV_SHARED_ROOT = "kv/shared/"
"""``R/kv/shared/``: namespaces shared between the tenants that opted in."""
KV_SESSION_ROOT = "kvs/"
"""``R/kvs/<T>/``: tenant T's chat sessions."""
KV_TENANT_CONFIG_ROOT = "kv/tenant/"
"""``R/kv/tenant/<T>``: T's quota and sharing opt-in (the operator's; T reads its own)."""
KV_REGION_ROOT = "kv/region/"
"""``R/kv/region/<R>``: R's block store addresses (the operator's; every tenant reads them)."""


@dataclass(frozen=True, slots=True)
class Grants:
    """Where one principal may go: `write` prefixes may be read and written, `read` prefixes and
    `read_keys` (exact keys) only read."""

    write: tuple[bytes, ...] = ()
    read: tuple[bytes, ...] = ()
    read_keys: frozenset[bytes] = frozenset()


def principal_grants(p: Principal, regions: Sequence[str]) -> Grants:
    """The key space of a non-admin principal (see the module doc's table)."""
    if p.prefixes:
        return Grants(write=p.prefixes)
    t = p.tenant
    write = [
        f"{r}/{root}{t}/".encode()
        for r in regions
        for root in ("t/", KV_TENANT_ROOT, KV_SESSION_ROOT)
    ]
    if p.share_blocks:
        write += [f"{r}/{KV_SHARED_ROOT}".encode() for r in regions]
    return Grants(
        write=tuple(write),
        read=tuple(f"{r}/{KV_REGION_ROOT}".encode() for r in regions),
        read_keys=frozenset(f"{r}/{KV_TENANT_CONFIG_ROOT}{t}".encode() for r in regions),
    )


@dataclass(slots=True)
class _Owners:
    """Which principal began each open transaction on this node (bounded; oldest forgotten)."""

    limit: int = 100_000
    by_txn: OrderedDict[bytes, str] = field(default_factory=OrderedDict)

    def add(self, txn_id: bytes, principal: str) -> None:
        self.by_txn[txn_id] = principal
        while len(self.by_txn) > self.limit:
            self.by_txn.popitem(last=False)


_NO_ACCESS = "the request is outside the principal's key space"


class Guard:
    """Authentication, rate limits and authorization of one node's RPCs (see the module doc).

    Each check raises a typed K2Error (Unauthenticated, RateLimited, PermissionDenied) and
    changes nothing; `observe` records what a successful call created (transaction owners)."""

    def __init__(
        self,
        settings: SecuritySettings,
        *,
        regions: Sequence[str],
        nodes: Mapping[str, str],
        monotonic_ns: Callable[[], int],
    ) -> None:
        """`nodes`: node name -> region, the peers whose certificates are trusted."""
        self.settings = settings
        self._nodes = dict(nodes)
        self._regions = tuple(regions)
        self._now = monotonic_ns
        self._principals = settings.principals
        self._digests = [bytes.fromhex(p.token_sha256) for p in self._principals]
        self._grants = {p.name: principal_grants(p, self._regions) for p in self._principals}
        self._buckets: dict[str, TokenBucket] = {}
        self._owners = _Owners()
        self._lock = threading.Lock()

    @classmethod
    def for_cluster(cls, cluster: ClusterConfig, monotonic_ns: Callable[[], int]) -> Guard | None:
        """The guard of `cluster`'s nodes, or None when security is off."""
        st = cluster.settings.security
        if not st.tls:
            return None
        return cls(
            st,
            regions=cluster.region_names(),
            nodes={n.name: n.region for n in cluster.nodes},
            monotonic_ns=monotonic_ns,
        )

    # -- authentication ----------------------------------------------------------------------

    def authenticate(
        self,
        metadata: Iterable[tuple[str, str | bytes]],
        auth_context: Mapping[str, Iterable[bytes]],
    ) -> Identity:
        for uri in peer_uris(auth_context):
            parsed = parse_peer_uri(uri)
            if parsed is not None and parsed[0] == "node":
                _, name, region = parsed
                if self._nodes.get(name) == region:
                    return NodeIdentity(name, region)
        token = _bearer(metadata)
        if token is None:
            raise Unauthenticated("no credentials: send `authorization: Bearer <token>`")
        found = find_principal(self._principals, token, self._digests)
        if found is None:
            raise Unauthenticated("invalid credentials")
        return found

    def admit(self, ident: Identity) -> None:
        """Take one request from the principal's bucket, or raise RateLimited."""
        rate = self.settings.rate_limit_rps
        if isinstance(ident, NodeIdentity) or rate <= 0:
            return
        now = self._now()
        with self._lock:
            b = self._buckets.get(ident.name)
            if b is None:
                b = self._buckets[ident.name] = TokenBucket(rate, self.settings.burst(), now)
            ok = b.take(now)
        if not ok:
            raise RateLimited(f"principal {ident.name!r} exceeds {rate:g} requests per second")

    # -- authorization -----------------------------------------------------------------------

    def authorize(self, ident: Identity, path: str, request: Message) -> None:
        if isinstance(ident, NodeIdentity):
            return
        if path in CLIENT_META:
            return
        if path in ADMIN:
            if not ident.is_admin:
                raise PermissionDenied(f"{path} needs the {ADMIN_ROLE} role")
            return
        if path not in CLIENT_DATA:
            raise PermissionDenied(f"{path} is internal: only cluster nodes may call it")
        if ident.is_admin:
            return
        grants = self._grants[ident.name]
        for start, end, point, write in _keys_of(path, request):
            if not _allowed(grants, start, end, point, write):
                raise PermissionDenied(_NO_ACCESS)
        txn_id = getattr(request, "txn_id", None)
        if isinstance(request, pb.TxnOpsRequest) and request.HasField("begin"):
            return  # it begins its transaction (inline begin): nobody owns it yet
        if isinstance(txn_id, bytes) and path != "/k2.v1.K2/BeginTxn":
            with self._lock:
                owner = self._owners.by_txn.get(txn_id)
            if owner != ident.name:
                raise PermissionDenied("no such transaction for this principal")

    def observe(self, ident: Identity, path: str, request: Message, response: Message) -> None:
        """Record what a successful call created or ended (transaction ownership)."""
        if isinstance(ident, NodeIdentity) or ident.is_admin:
            return
        with self._lock:
            if isinstance(request, pb.TxnOpsRequest) and request.commit:
                # It committed in this call (begun here or earlier): nothing left to own.
                assert isinstance(response, pb.TxnOpsResponse)
                self._owners.by_txn.pop(response.txn_id or request.txn_id, None)
            elif isinstance(response, pb.BeginTxnResponse) or (
                isinstance(response, pb.TxnOpsResponse) and response.txn_id
            ):
                self._owners.add(response.txn_id, ident.name)
            elif isinstance(request, pb.CommitTxnRequest | pb.AbortTxnRequest):
                self._owners.by_txn.pop(request.txn_id, None)

    def check_test_settings(self, ident: Identity, what: str) -> None:
        """For admin RPCs that break guarantees on purpose: refused unless the node was started
        with `allow_test_settings` and the caller is a node or an admin."""
        if not self.settings.allow_test_settings:
            raise PermissionDenied(f"{what} is a test setting; this node does not allow them")
        if isinstance(ident, Principal) and not ident.is_admin:
            raise PermissionDenied(f"{what} needs the {ADMIN_ROLE} role")

    # -- block store namespaces (kvtier) ------------------------------------------------------

    def block_namespace(self, ident: Identity, namespace: str) -> tuple[str, bool]:
        """(the namespace a block store request works in, whether `ident` may use it).

        `namespace` "" is the caller's default: ``<tenant>/`` for a tenant's principal, "" (the
        namespace of unscoped tools such as the block benchmark) for admins and nodes. The
        caller turns "not allowed" into a miss for reads and PermissionDenied for writes, so
        nothing here says whether another tenant's namespace or block exists. InvalidArgument
        for a malformed name."""
        tenant = parse_block_namespace(namespace)
        privileged = isinstance(ident, NodeIdentity) or ident.is_admin
        if not namespace:
            if isinstance(ident, Principal) and ident.tenant:
                return f"{ident.tenant}/", True
            return "", privileged
        if privileged:
            return namespace, True
        assert isinstance(ident, Principal)
        if not tenant:  # shared between tenants: for those that opted in
            return namespace, ident.share_blocks
        return namespace, bool(ident.tenant) and tenant == ident.tenant

    def require_admin(self, ident: Identity, what: str) -> None:
        """PermissionDenied unless `ident` is a node or has the admin role."""
        if isinstance(ident, Principal) and not ident.is_admin:
            raise PermissionDenied(f"{what} needs the {ADMIN_ROLE} role")


def parse_block_namespace(namespace: str) -> str:
    """The tenant of a block store namespace ``<tenant>/<label>`` ("" for a shared one, and for
    the empty name, which means the caller's default). InvalidArgument when malformed."""
    if not namespace:
        return ""
    tenant, sep, label = namespace.partition("/")
    if (
        not sep
        or len(namespace) > BLOCK_NAMESPACE_MAX
        or not namespace.isprintable()
        or "/" in label
    ):
        raise InvalidArgument(
            f"block namespace must be '<tenant>/<label>' (printable, one '/', at most "
            f"{BLOCK_NAMESPACE_MAX} characters)"
        )
    return tenant


def _allowed(g: Grants, start: bytes, end: bytes | None, point: bool, write: bool) -> bool:
    if point and not write and start in g.read_keys:
        return True
    for prefix in g.write if write else g.write + g.read:
        if not start.startswith(prefix):
            continue
        if point:
            return True
        limit = prefix_end(prefix)
        if end is not None and (limit is None or end <= limit):
            return True
    return False


def _bearer(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    for k, v in metadata:
        if k == AUTHORIZATION_KEY and isinstance(v, str):
            scheme, _, token = v.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


_Access = tuple[bytes, bytes | None, bool, bool]
"""(start, end, is_point, is_write) of one key or range a request touches."""


def _keys_of(path: str, r: Message) -> list[_Access]:
    """Every key or range `r` reads or writes."""
    if isinstance(r, pb.GetRequest):
        return [(r.key, None, True, False)]
    if isinstance(r, pb.PutRequest | pb.DeleteRequest):
        return [(r.key, None, True, True)]
    if isinstance(r, pb.ScanRequest):
        return [(r.start, r.end if r.has_end else None, False, False)]
    if isinstance(r, pb.BeginTxnRequest):
        # Declared keys only place the record and pick the timestamp; TxnOps checks each write.
        # read_keys are read (a one-shot read-only transaction).
        return [(k, None, True, False) for k in (*r.keys, *r.read_keys)]
    if isinstance(r, pb.TxnOpsRequest):
        return [
            (op.key, op.end if op.has_end else None, False, False)
            if op.kind == pb.OP_SCAN
            else (op.key, None, True, op.kind in (pb.OP_PUT, pb.OP_DELETE))
            for op in r.ops
        ] + (_keys_of(path, r.begin) if r.HasField("begin") else [])
    if isinstance(r, pb.ReplicaReadRequest):
        out: list[_Access] = [(k, None, True, False) for k in r.keys]
        if r.has_scan:
            out.append((r.scan_start, r.scan_end if r.scan_has_end else None, False, False))
        return out
    if isinstance(r, pb.CommitTxnRequest | pb.AbortTxnRequest):
        return []
    raise PermissionDenied(f"{path}: no key rule for {type(r).__name__}")
