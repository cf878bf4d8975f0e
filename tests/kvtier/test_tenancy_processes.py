"""Tenancy of the KV tier on a secured cluster of real processes (`k2 cluster up --secure
--blockstores`): a serving node of tenant acme runs on acme's own token, not an admin's. It
finds the block stores, publishes and reloads blocks and keeps a session; tenant globex, with
its token, can neither read nor write any of it (acme's blocks are misses to it), and acme
cannot write the operator's rows. Marked slow: it starts node and block store processes.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from engine_env import ByteCodec, tiny_model

from k2store.client import AsyncClient
from k2store.cluster import ClusterConfig
from k2store.errors import PermissionDenied
from kvtier import metadata as md
from kvtier.blocknode import BlockStoreClient, block_namespace
from kvtier.blocks import Namespace
from kvtier.connector import AsyncKVConnector, ConnectorConfig
from kvtier.engine import EngineConfig
from kvtier.metadata import BlockMetadata
from kvtier.serve import ServingNode, serve_http
from kvtier.sessions import SessionStore, session_keys
from tests.secure_env import secured_cluster_up, token
from truetime import SystemClock

pytestmark = pytest.mark.slow

SYSTEM = "You are a terse assistant. " * 3
ENGINE = EngineConfig(block_tokens=4, kv_dtype="float32")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterConfig]:
    with secured_cluster_up(
        tmp_path_factory.mktemp("tenancy"),
        "--regions",
        "us-east,eu-west",
        "--tenant",
        "acme",
        "--tenant",
        "globex",
        "--blockstores",
        "--no-wan",
    ) as cfg:
        yield cfg


def _chat(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200
        out: dict[str, Any] = json.loads(r.read())
        return out


async def _open(cluster: ClusterConfig, tenant: str, token: str) -> ServingNode:
    return await ServingNode.open(
        cluster,
        "us-east",
        model=tiny_model(),
        tokenizer=ByteCodec(),
        revision="tiny-llama@0",
        tenant=tenant,
        engine_config=ENGINE,
        token=token,
    )


async def _refused(what: str, call: Any) -> None:
    try:
        await call
    except PermissionDenied:
        return
    raise AssertionError(f"{what} was not refused")


def test_a_tenant_serves_on_its_own_token_and_sees_nothing_of_another(
    cluster: ClusterConfig,
) -> None:
    acme_tok, globex_tok = token(cluster, "acme"), token(cluster, "globex")

    async def main() -> None:
        # A tenant nobody registered: its own token may not register it, and the error says so.
        with pytest.raises(PermissionDenied, match="register"):
            await _open(cluster, "globex", globex_tok)
        for t in ("acme", "globex"):  # the operator's command, on the cluster file's token
            r = await asyncio.to_thread(
                subprocess.run,
                [*(sys.executable, "-m", "k2store", "tenant", "--cluster", str(cluster.path)),
                 *("register", t, "--quota-bytes", str(1 << 30))],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert r.returncode == 0, r.stderr
            assert f"{t}\tus-east\tquota {1 << 30}\tused 0" in r.stdout

        node = await _open(cluster, "acme", acme_tok)
        stop = asyncio.Event()
        port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve_http(node, port=0, started=port.set_result, stop=stop))
        try:
            url = f"http://127.0.0.1:{await port}"
            first = {"role": "system", "content": SYSTEM}
            r1 = await asyncio.to_thread(_chat, url, {
                "messages": [first, {"role": "user", "content": "one"}],
                "max_tokens": 4, "session_id": "alice",
            })  # fmt: skip
            assert r1["session_id"] == "us-east:alice"
            await node.flush()
            assert node.engine.connector is not None
            conn = node.engine.connector
            # Stored through the block store and the metadata on acme's token, nothing refused.
            assert conn.stats.blocks_stored > 0 and conn.stats.unavailable == 0, conn.stats
            r2 = await asyncio.to_thread(_chat, url, {
                "messages": [{"role": "user", "content": "two"}],
                "max_tokens": 4, "session_id": "us-east:alice",
            })  # fmt: skip
            # The first turn's prompt came back from the block store, on acme's token.
            assert r2["k2"]["reused_tokens"] >= 40, r2["k2"]
            assert conn.stats.failed_loads == 0 and conn.stats.bytes_fetched_local > 0
            await node.flush()
            assert node.sessions is not None
            s = await node.sessions.get("acme", "us-east:alice")
            assert [t.role for t in s.turns] == ["system", "user", "assistant", "user", "assistant"]
            ns = conn.ns
        finally:
            stop.set()
            await task
            await node.close()
        await _tenant_b_sees_nothing(cluster, ns, acme_tok, globex_tok)

    asyncio.run(main())


async def _tenant_b_sees_nothing(
    cluster: ClusterConfig, ns: Namespace, acme_tok: str, globex_tok: str
) -> None:
    async with (
        AsyncClient(cluster, region="us-east", token=acme_tok) as acme,
        AsyncClient(cluster, region="us-east", token=globex_tok) as globex,
    ):
        blk = md.blocks_prefix("us-east", "acme")
        rows = await acme.scan(blk, blk[:-1] + "0")
        assert rows, "acme's serving node published no block rows"
        block_row = rows[0][0].decode()
        block_hash = bytes.fromhex(block_row.rsplit("/", 1)[1])
        sess = session_keys("acme", "us-east:alice", "us-east")
        acme_rows = [
            block_row,
            md.namespace_key("us-east", "acme", ns.id),
            md.namespace_key("eu-west", "acme", ns.id),
            md.usage_key("us-east", "acme"),
            md.tenant_key("us-east", "acme"),
            sess.record.decode(),
            sess.turn(0).decode(),
        ]
        for k in acme_rows:
            assert await acme.get(k) is not None, k  # acme reads its own rows
            await _refused(f"globex reading {k}", globex.get(k))
            await _refused(f"globex writing {k}", globex.put(k, b"{}"))
        await _refused("globex scanning acme's rows", globex.scan(blk, blk[:-1] + "0"))
        await _refused("globex listing tenants", globex.scan("us-east/kv/tenant/", "us-east/kv/u"))
        await _refused("globex opening acme's namespace", AsyncKVConnector.open(
            globex, ns, config=ConnectorConfig("us-east"),
        ))  # fmt: skip
        await _refused(
            "globex reading acme's session",
            SessionStore(globex, SystemClock()).get("acme", "us-east:alice"),
        )
        # The operator's rows: acme reads them, writes none of them.
        gmd = BlockMetadata(acme)
        region = await gmd.region("us-east")
        assert region is not None and region.stores
        assert (await gmd.tenant("acme")).used_bytes > 0
        await _refused("acme raising its quota", gmd.register_tenant("acme", quota_bytes=1 << 40))
        await _refused("acme rewriting a region row", acme.put(md.region_key("us-east"), b"{}"))
        await _refused("acme listing tenants", gmd.tenants())

        # Acme's bytes at the block store: a miss to globex, whatever namespace it names.
        sec = cluster.settings.security
        frame: bytes | None = None
        for name, tok, space in (
            ("acme", acme_tok, block_namespace(ns)),
            ("globex", globex_tok, block_namespace(ns)),
            ("globex", globex_tok, ""),
        ):
            bs = BlockStoreClient(
                region.stores[0], timeout_s=10, security=sec, token=tok, namespace=space
            )
            try:
                got = await bs.get(block_hash)
                assert (got is not None) == (name == "acme"), (name, space)
                frame = frame or got
                if name == "globex" and space:
                    assert frame is not None
                    await _refused("globex overwriting acme's block", bs.put(block_hash, frame))
            finally:
                await bs.close()
