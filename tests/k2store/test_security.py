"""A secured cluster in one process: every refusal path, and the legitimate workload unaffected.

Nodes run on loopback with mutual TLS against a CA made by k2store/certs.py; clients carry bearer
tokens. Each refusal is checked for its status code and typed error, and for changing nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from k2store import cluster as cluster_mod
from k2store.certs import (
    CERTS_DIR,
    Issued,
    channel_credentials,
    issue,
    issue_client,
    make_ca,
    node_uri,
    secure_cluster,
)
from k2store.client import AsyncClient, RetryPolicy
from k2store.cluster import ClusterConfig, local_cluster
from k2store.errors import (
    ClusterFileError,
    PermissionDenied,
    RateLimited,
    Unauthenticated,
    Unavailable,
)
from k2store.launcher import free_ports
from k2store.node import Node
from k2store.proto import k2_pb2 as pb
from k2store.security import (
    Guard,
    NodeIdentity,
    Principal,
    SecuritySettings,
    bearer_metadata,
    new_token,
    prefix_end,
    token_digest,
)
from truetime import ManualClock, SystemClock

REGIONS = ["us-east", "eu-west"]
NOW_NS = SystemClock().now_ns()
RETRY = RetryPolicy(max_attempts=1)


def secured(tmp_path: Path, tenants: tuple[str, ...] = ("acme", "globex")) -> ClusterConfig:
    cfg = local_cluster(REGIONS, free_ports(len(REGIONS)), root=tmp_path).write(
        tmp_path / "cluster.toml"
    )
    secure_cluster(cfg, now_ns=NOW_NS, tenants=tenants)
    return cluster_mod.load(tmp_path / "cluster.toml")  # what a node process would read


def token(cfg: ClusterConfig, principal: str) -> str:
    assert cfg.path is not None
    return (cfg.path.parent / CERTS_DIR / "tokens" / f"{principal}.token").read_text().strip()


@asynccontextmanager
async def running(cfg: ClusterConfig) -> AsyncIterator[dict[str, Node]]:
    clock = ManualClock()
    nodes = {n.name: Node(cfg, n.name, clock=clock) for n in cfg.nodes}
    for node in nodes.values():
        await node.start()
    try:
        yield nodes
    finally:
        for node in nodes.values():
            await node.stop(grace_s=0)


def run(cfg: ClusterConfig, body: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        async with running(cfg):
            await body()

    asyncio.run(main())


def client(cfg: ClusterConfig, principal: str | None, region: str = "us-east") -> AsyncClient:
    tok = token(cfg, principal) if principal else "-"  # "-": not a token (no env fallback)
    return AsyncClient(cfg, timeout_s=5, retry=RETRY, region=region, token=tok)


async def raw(
    address: str,
    path: str,
    request: bytes,
    creds: grpc.ChannelCredentials,
    metadata: tuple[tuple[str, str], ...] = (),
) -> grpc.StatusCode:
    """One RPC with chosen credentials; the status code it ended with."""
    async with grpc.aio.secure_channel(address, creds) as ch:
        stub: Any = ch.unary_unary(path, request_serializer=None, response_deserializer=None)
        try:
            await stub(request, timeout=5, metadata=metadata or None)
        except grpc.aio.AioRpcError as e:
            return e.code()
        return grpc.StatusCode.OK


def foreign_creds(cfg: ClusterConfig, leaf: Issued) -> grpc.ChannelCredentials:
    sec = cfg.settings.security
    assert sec.ca_file is not None
    return grpc.ssl_channel_credentials(sec.ca_file.read_bytes(), leaf.key_pem, leaf.cert_pem)


# -- in-process secured cluster -----------------------------------------------------------------


def test_legitimate_tenant_workload_is_unaffected(tmp_path: Path) -> None:
    cfg = secured(tmp_path)

    async def body() -> None:
        acme = client(cfg, "acme")
        try:
            for region in REGIONS:
                k = f"{region}/t/acme/user/1"
                assert (await acme.put(k, b"alice")).commit_ts > 0
                assert await acme.get(k) == b"alice"
                await acme.put(f"{region}/t/acme/user/2", b"bob")
                rows = await acme.scan(
                    f"{region}/t/acme/", prefix_end(f"{region}/t/acme/".encode())
                )
                assert [v for _, v in rows] == [b"alice", b"bob"]
                assert (await acme.delete(f"{region}/t/acme/user/2")).existed

            async def txn(tx: object) -> None:
                from k2store.client import AsyncTransaction

                assert isinstance(tx, AsyncTransaction)
                a = await tx.get("us-east/t/acme/user/1")
                await tx.put("eu-west/t/acme/copy", a or b"")

            await acme.run(txn)
            assert await acme.get("eu-west/t/acme/copy") == b"alice"
            # Replica reads of its own keys are allowed (whether the manual clock has made the
            # write visible yet does not matter here).
            snap = acme.replica_snapshot()
            try:
                assert await snap.get("us-east/t/acme/user/1") in (None, b"alice")
            except Unavailable as e:  # authorized, but nothing is visible yet: clock stands still
                assert "visible" in str(e)
            # The operator (admin role) reaches every key and the admin RPCs.
            op = client(cfg, "operator")
            await op.put("us-east/anything", b"x")
            assert await op.get("us-east/t/acme/user/1") == b"alice"
            await op.close()
        finally:
            await acme.close()

    run(cfg, body)


def test_requests_without_valid_credentials_are_unauthenticated(tmp_path: Path) -> None:
    cfg = secured(tmp_path)

    async def body() -> None:
        anon = client(cfg, None)
        forged = AsyncClient(cfg, timeout_s=5, retry=RETRY, token=new_token())
        for c in (anon, forged):
            with pytest.raises(Unauthenticated):
                await c.put("us-east/t/acme/k", b"v")
            with pytest.raises(Unauthenticated):
                await c.get("us-east/t/acme/k")
            await c.close()
        # Malformed bytes from an unauthenticated caller are never even decoded.
        creds = channel_credentials(cfg.settings.security, None)
        addr = cfg.node("us-east-1").address
        code = await raw(addr, "/k2.v1.K2/Put", b"\xff\xff\xff", creds)
        assert code == grpc.StatusCode.UNAUTHENTICATED
        op = client(cfg, "operator")
        assert await op.get("us-east/t/acme/k") is None  # nothing was written
        await op.close()

    run(cfg, body)


def test_wrong_tenant_is_refused_and_a_miss_looks_the_same(tmp_path: Path) -> None:
    cfg = secured(tmp_path)

    async def body() -> None:
        acme, globex = client(cfg, "acme"), client(cfg, "globex")
        await globex.put("us-east/t/globex/secret", b"s")
        errors = []
        for key in ("us-east/t/globex/secret", "us-east/t/globex/missing", "us-east/other"):
            with pytest.raises(PermissionDenied) as e:
                await acme.get(key)
            errors.append(str(e.value))
            with pytest.raises(PermissionDenied):
                await acme.put(key, b"overwrite")
        assert len(set(errors)) == 1  # an existing key of another tenant reads like a miss
        assert "globex" not in errors[0]
        with pytest.raises(PermissionDenied):  # a scan reaching past its prefix
            await acme.scan("us-east/t/acme/", "us-east/t/acmf/")
        with pytest.raises(PermissionDenied):
            await acme.replica_snapshot().get("us-east/t/globex/secret")

        async def steal(tx: object) -> None:
            from k2store.client import AsyncTransaction

            assert isinstance(tx, AsyncTransaction)
            await tx.put("us-east/t/globex/secret", b"stolen")

        with pytest.raises(PermissionDenied):
            await acme.run(steal)
        # Another tenant's open transaction cannot be driven by its id.
        tx = await globex.begin()
        await tx.put("us-east/t/globex/late", b"1")
        stolen = pb.CommitTxnRequest(txn_id=tx.txn_id)
        with pytest.raises(PermissionDenied):
            await acme._call(tx.coordinator, "CommitTxn", stolen, pb.CommitTxnResponse)
        await tx.commit()
        # Nor one begun inline with its first operation (its owner is known from the reply),
        # and an inline begin is checked against the keys it declares.
        tx = await globex.begin(inline=True)
        await tx.put("us-east/t/globex/late", b"2")
        stolen = pb.CommitTxnRequest(txn_id=tx.txn_id)
        with pytest.raises(PermissionDenied):
            await acme._call(tx.coordinator, "CommitTxn", stolen, pb.CommitTxnResponse)
        await tx.commit()
        sneaky = pb.TxnOpsRequest(
            begin=pb.BeginTxnRequest(keys=[b"us-east/t/globex/secret"]),
            ops=[pb.TxnOp(kind=pb.OP_GET, key=b"us-east/t/acme/x")],
        )
        with pytest.raises(PermissionDenied):
            await acme._call(tx.coordinator, "TxnOps", sneaky, pb.TxnOpsResponse)
        assert await globex.get("us-east/t/globex/secret") == b"s"
        # Admin RPCs need the admin role.
        with pytest.raises(PermissionDenied):
            await acme._call("us-east-1", "Status", pb.StatusRequest(), pb.StatusResponse, "Admin")
        await acme.close()
        await globex.close()

    run(cfg, body)


def test_internal_rpcs_accept_only_node_certificates(tmp_path: Path) -> None:
    cfg = secured(tmp_path)
    sec = cfg.settings.security
    addr = cfg.node("us-east-1").address
    internal = [
        ("/k2.v1.Oracle/GetTimestampBatch", pb.TimestampBatchRequest(coordinator="x", count=1)),
        ("/k2.v1.Participant/Resolve", pb.ResolveRequest()),
        ("/k2.v1.Replication/Pull", pb.PullRequest()),
        ("/k2.v1.Replication/Push", pb.PushRequest()),
    ]

    async def body() -> None:
        stolen_client_cert = channel_credentials(sec, None)  # valid, from the cluster CA
        admin = bearer_metadata(token(cfg, "operator"))
        for path, req in internal:
            data = req.SerializeToString()
            # A client certificate of this cluster, even with the admin's token: refused.
            code = await raw(addr, path, data, stolen_client_cert, admin)
            assert code == grpc.StatusCode.PERMISSION_DENIED, path
            code = await raw(addr, path, data, stolen_client_cert)
            assert code == grpc.StatusCode.UNAUTHENTICATED, path
        # A node's own certificate is accepted (the oracle hands out a batch).
        node_creds = channel_credentials(sec, "eu-west-1")
        batch = pb.TimestampBatchRequest(coordinator="eu-west-1/x", count=1).SerializeToString()
        assert await raw(addr, internal[0][0], batch, node_creds) == grpc.StatusCode.OK
        # A certificate claiming to be a node, signed by another CA: no TLS connection at all.
        other = make_ca("not the cluster CA", now_ns=NOW_NS)
        fake_node = issue(
            other, "us-east-1", uri=node_uri("us-east-1", "us-east"), server=True, now_ns=NOW_NS
        )
        for leaf in (fake_node, issue_client(other, now_ns=NOW_NS)):
            code = await raw(addr, internal[0][0], batch, foreign_creds(cfg, leaf))
            assert code == grpc.StatusCode.UNAVAILABLE
        # No client certificate at all: the handshake fails too.
        assert sec.ca_file is not None
        bare = grpc.ssl_channel_credentials(sec.ca_file.read_bytes())
        code = await raw(addr, "/k2.v1.K2/Get", pb.GetRequest(key=b"k").SerializeToString(), bare)
        assert code == grpc.StatusCode.UNAVAILABLE
        # The typed client sees Unavailable for a foreign-CA client certificate.
        leaf = issue_client(other, now_ns=NOW_NS)
        (tmp_path / "f.pem").write_bytes(leaf.cert_pem)
        (tmp_path / "f.key").write_bytes(leaf.key_pem)
        foreign = replace(sec, client_cert=tmp_path / "f.pem", client_key=tmp_path / "f.key")
        c = AsyncClient(
            replace(cfg, settings=replace(cfg.settings, security=foreign)),
            timeout_s=2,
            retry=RETRY,
            token=token(cfg, "operator"),
        )
        with pytest.raises(Unavailable):
            await c.get("us-east/t/acme/k")
        await c.close()

    run(cfg, body)


def test_insecure_client_cannot_reach_a_secured_node(tmp_path: Path) -> None:
    cfg = secured(tmp_path)

    async def body() -> None:
        plain = replace(cfg, settings=replace(cfg.settings, security=SecuritySettings()))
        c = AsyncClient(plain, timeout_s=2, retry=RETRY)
        with pytest.raises(Unavailable):
            await c.get("us-east/t/acme/k")
        await c.close()

    run(cfg, body)


# -- certificates and files ---------------------------------------------------------------------


def test_certs_init_names_node_and_region_and_files_are_private(tmp_path: Path) -> None:
    from cryptography import x509

    cfg = secured(tmp_path)
    certs = tmp_path / CERTS_DIR
    assert stat.S_IMODE(os.stat(certs).st_mode) == 0o700
    for p in [*certs.iterdir(), *(certs / "tokens").iterdir()]:
        if p.is_file():
            assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p
    for n in cfg.nodes:
        cert = x509.load_pem_x509_certificate((certs / f"{n.name}.pem").read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        assert uris == [f"k2://node/{n.name}?region={n.region}"]
    text = (tmp_path / "cluster.toml").read_text()
    assert token(cfg, "acme") not in text  # only digests in the cluster file
    assert token_digest(token(cfg, "acme")) in text
    with pytest.raises(ClusterFileError, match="CA exists"):
        secure_cluster(cfg, now_ns=NOW_NS)


# -- the guard on its own -----------------------------------------------------------------------


def guard(rps: float = 0.0, burst: int = 0, clock: list[int] | None = None) -> Guard:
    t = clock if clock is not None else [0]
    principals = (
        Principal("acme", "acme", token_digest("tok-acme")),
        Principal("ops", "", token_digest("tok-ops"), ("admin",)),
        Principal("narrow", "", token_digest("tok-narrow"), (), (b"shared/x/",)),
    )
    st = SecuritySettings(principals=principals, rate_limit_rps=rps, rate_limit_burst=burst)
    return Guard(st, regions=REGIONS, nodes={"us-east-1": "us-east"}, monotonic_ns=lambda: t[0])


def test_guard_tokens_prefixes_and_roles() -> None:
    g = guard()
    acme = g.authenticate(bearer_metadata("tok-acme"), {})
    assert isinstance(acme, Principal) and acme.name == "acme"
    for md in ((), (("authorization", "Basic tok-acme"),), bearer_metadata("tok-acm")):
        with pytest.raises(Unauthenticated):
            g.authenticate(md, {})
    get = "/k2.v1.K2/Get"
    g.authorize(acme, get, pb.GetRequest(key=b"eu-west/t/acme/k"))
    for key in (b"eu-west/t/acmex/k", b"eu-west/t/acme", b"x/t/acme/k", b""):
        with pytest.raises(PermissionDenied):
            g.authorize(acme, get, pb.GetRequest(key=key))
    scan = "/k2.v1.K2/Scan"
    g.authorize(
        acme, scan, pb.ScanRequest(start=b"us-east/t/acme/", end=b"us-east/t/acme0", has_end=True)
    )
    with pytest.raises(PermissionDenied):  # unbounded
        g.authorize(acme, scan, pb.ScanRequest(start=b"us-east/t/acme/"))
    begin = "/k2.v1.K2/BeginTxn"  # a one-shot read-only transaction's keys are reads
    g.authorize(acme, begin, pb.BeginTxnRequest(read_only=True, read_keys=[b"us-east/t/acme/k"]))
    with pytest.raises(PermissionDenied):
        g.authorize(
            acme,
            begin,
            pb.BeginTxnRequest(read_only=True, read_keys=[b"us-east/t/acme/k", b"us-east/t/x/k"]),
        )
    # Who owns a transaction: its begin (inline too) records it, its commit (in the last
    # operations' call too) forgets it.
    txn_ops = "/k2.v1.K2/TxnOps"
    op = pb.TxnOp(kind=pb.OP_PUT, key=b"us-east/t/acme/k", value=b"v")
    inline = pb.TxnOpsRequest(begin=pb.BeginTxnRequest(), ops=[op])
    g.authorize(acme, txn_ops, inline)
    g.observe(acme, txn_ops, inline, pb.TxnOpsResponse(txn_id=b"t1"))
    last = pb.TxnOpsRequest(txn_id=b"t1", ops=[op], commit=True)
    g.authorize(acme, txn_ops, last)
    g.observe(acme, txn_ops, last, pb.TxnOpsResponse(commit_ts=5))
    with pytest.raises(PermissionDenied, match="no such transaction"):
        g.authorize(acme, txn_ops, pb.TxnOpsRequest(txn_id=b"t1", ops=[op]))
    one_call = pb.TxnOpsRequest(begin=pb.BeginTxnRequest(), ops=[op], commit=True)
    g.observe(acme, txn_ops, one_call, pb.TxnOpsResponse(txn_id=b"t2", commit_ts=6))
    with pytest.raises(PermissionDenied, match="no such transaction"):
        g.authorize(acme, txn_ops, pb.TxnOpsRequest(txn_id=b"t2", ops=[op]))
    narrow = g.authenticate(bearer_metadata("tok-narrow"), {})
    g.authorize(narrow, get, pb.GetRequest(key=b"shared/x/1"))
    with pytest.raises(PermissionDenied):
        g.authorize(narrow, get, pb.GetRequest(key=b"us-east/t/narrow/1"))
    ops = g.authenticate(bearer_metadata("tok-ops"), {})
    g.authorize(ops, "/k2.v1.Admin/Status", pb.StatusRequest())
    g.authorize(ops, get, pb.GetRequest(key=b"anything"))
    with pytest.raises(PermissionDenied):
        g.authorize(acme, "/k2.v1.Admin/Status", pb.StatusRequest())
    for ident in (acme, ops):  # internal RPCs (and any RPC not listed) are for nodes only
        for path in ("/k2.v1.Participant/Prepare", "/k2.v1.Replication/Pull", "/k2.v1.X/New"):
            with pytest.raises(PermissionDenied):
                g.authorize(ident, path, pb.PrepareRequest())
    g.authorize(
        NodeIdentity("us-east-1", "us-east"), "/k2.v1.Participant/Prepare", pb.PrepareRequest()
    )
    with pytest.raises(PermissionDenied, match="test setting"):
        g.check_test_settings(ops, "commit-wait off")


def test_guard_rate_limit_is_per_principal_token_bucket() -> None:
    clock = [0]
    g = guard(rps=10, burst=3, clock=clock)
    acme = g.authenticate(bearer_metadata("tok-acme"), {})
    ops = g.authenticate(bearer_metadata("tok-ops"), {})
    for _ in range(3):
        g.admit(acme)
    with pytest.raises(RateLimited) as e:
        g.admit(acme)
    assert e.value.retryable
    g.admit(ops)  # another principal has its own bucket
    g.admit(NodeIdentity("us-east-1", "us-east"))  # nodes are never limited
    clock[0] += 100_000_000  # 0.1 s: one token back
    g.admit(acme)
    with pytest.raises(RateLimited):
        g.admit(acme)


# -- the [security] table -----------------------------------------------------------------------


def test_security_table_round_trips_and_errors_name_the_field(tmp_path: Path) -> None:
    cfg = secured(tmp_path)
    again = cluster_mod.parse(
        __import__("tomllib").loads(cfg.to_toml()), path=tmp_path / "cluster.toml"
    )
    assert again.settings.security == cfg.settings.security
    base = __import__("tomllib").loads(
        local_cluster(REGIONS, [7001, 7002], root=tmp_path).to_toml()
    )
    digest = token_digest("t")
    bad = [
        ({"tls": "yes"}, "security.tls"),
        ({"tls": True}, "security.ca_file"),
        ({"nope": 1}, "security.nope"),
        ({"rate_limit_rps": -1}, "security.rate_limit_rps"),
        ({"max_concurrent_streams": 0}, "security.max_concurrent_streams"),
        (
            {"principals": [{"name": "a", "tenant": "a", "token_sha256": digest}]},
            "security.principals",
        ),
        ({"principals": "x"}, "security.principals"),
        ({"principals": [{"name": "a", "tenant": "a", "token_sha256": "zz"}]}, "token_sha256"),
        ({"principals": [{"name": "a", "token_sha256": digest}]}, "principals[0].tenant"),
        ({"principals": [{"name": "a", "token_sha256": digest, "roles": ["root"]}]}, "roles"),
        ({"ca_file": 3}, "security.ca_file"),
    ]
    for table, field_name in bad:
        with pytest.raises(
            ClusterFileError, match=field_name.replace("[", r"\[").replace("]", r"\]")
        ):
            cluster_mod.parse({**base, "security": table}, path=tmp_path / "c.toml")
    assert cluster_mod.parse(base).settings.security == SecuritySettings()  # off by default


def test_no_secrets_in_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = secured(tmp_path)
    secret = token(cfg, "acme")
    caplog.set_level(logging.DEBUG)

    async def body() -> None:
        acme = client(cfg, "acme")
        await acme.put("us-east/t/acme/k", b"v")
        with pytest.raises(PermissionDenied):
            await acme.get("us-east/t/globex/k")
        await acme.close()
        forged = AsyncClient(cfg, timeout_s=5, retry=RETRY, token=secret + "x")
        with pytest.raises(Unauthenticated):
            await forged.get("us-east/t/acme/k")
        await forged.close()

    run(cfg, body)
    assert caplog.records  # the nodes did log (start, stop)
    assert secret not in caplog.text
    assert cfg.path is not None
    key = (cfg.path.parent / CERTS_DIR / "us-east-1.key").read_text()
    assert key.splitlines()[1] not in caplog.text


def test_rate_limit_is_enforced_over_the_wire(tmp_path: Path) -> None:
    cfg = secured(tmp_path)
    sec = replace(cfg.settings.security, rate_limit_rps=0.001, rate_limit_burst=2)
    cfg = replace(cfg, settings=replace(cfg.settings, security=sec))

    async def body() -> None:
        acme, globex = client(cfg, "acme"), client(cfg, "globex")
        for _ in range(2):
            await acme.get("us-east/t/acme/k", via="us-east-1")
        with pytest.raises(RateLimited):
            await acme.get("us-east/t/acme/k", via="us-east-1")
        await globex.get("us-east/t/globex/k", via="us-east-1")  # its own bucket
        await acme.close()
        await globex.close()

    run(cfg, body)
