"""The KV tier of a secured local cluster of real processes: `k2 cluster up --secure
--blockstores`. Block stores serve mutual TLS and check tokens and namespaces; a client without
credentials, a tenant reading or writing another tenant's namespace, and a stolen store node
certificate are each refused (a foreign read as a miss), while a tenant's own blocks, a copy
between block stores under a block store's certificate, discovery from an address and block
events over a secured broker all work. Marked slow: it starts node and block store processes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from kvtier_env import make_kv

from k2store import launcher
from k2store.certs import CERTS_DIR, blockstore_name, client_security
from k2store.client import AsyncClient, fetch_cluster_info
from k2store.cluster import ClusterConfig
from k2store.errors import PermissionDenied, Unauthenticated
from kvtier.blocknode import BlockStoreClient, block_namespace
from kvtier.blocks import BlockSpec, Namespace, block_hashes, encode_block
from kvtier.broker import BrokerSecurity, EmbeddedBroker, MqttCredentials
from kvtier.errors import BlockStoreUnavailable
from kvtier.events import BlockEvent, EventKind, EventPublisher, EventSubscriber
from kvtier.metadata import BlockMetadata
from tests.secure_env import secured_cluster_up, token
from truetime import ManualClock

pytestmark = pytest.mark.slow

SPEC = BlockSpec(4, 2, 2, 8, "float16")
ACME = Namespace("rev-1", "tok-1", SPEC, "acme", b"acme-salt")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterConfig]:
    with secured_cluster_up(
        tmp_path_factory.mktemp("secure-kv"),
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


def test_secured_block_stores_refuse_and_serve(cluster: ClusterConfig) -> None:
    assert cluster.path is not None
    sec = cluster.settings.security
    stores = json.loads((cluster.path.parent / launcher.BLOCKSTORES_FILE).read_text())
    east, west = stores["us-east"]["address"], stores["eu-west"]["address"]
    (h,) = block_hashes(ACME, [1, 2, 3, 4])
    frame = encode_block(SPEC, make_kv(SPEC, 4, seed=1), h)
    acme_ns = block_namespace(ACME)

    async def main() -> None:
        def client(
            address: str, principal: str | None, ns: str, node: str | None = None
        ) -> BlockStoreClient:
            tok = "-" if principal is None else token(cluster, principal)
            return BlockStoreClient(
                address, timeout_s=10, security=sec, token=tok, node=node, namespace=ns
            )

        # Each block store registered its address in the metadata, over TLS.
        async with AsyncClient(cluster) as operator:
            md = BlockMetadata(operator)
            for region in ("us-east", "eu-west"):
                rec = await md.region(region)
                assert rec is not None and rec.stores == (stores[region]["address"],)

        acme = client(east, "acme", acme_ns)
        globex = client(east, "globex", acme_ns)
        globex_own = client(east, "globex", "globex/x")
        anonymous = client(east, None, acme_ns)
        stolen = client(east, None, acme_ns, node=cluster.nodes[0].name)
        plaintext = BlockStoreClient(east, timeout_s=2)
        copier = client(east, None, acme_ns, node=blockstore_name("eu-west"))
        west_copy = client(west, None, acme_ns, node=blockstore_name("eu-west"))
        acme_west = client(west, "acme", acme_ns)
        try:
            # The legitimate workload.
            assert await acme.put(h, frame) is True
            assert await acme.get(h) == frame
            # A copy from us-east to eu-west under the eu-west block store's certificate.
            got = await copier.get(h)
            assert got == frame
            assert await west_copy.put(h, got) is True
            assert await acme_west.get(h) == frame
            # Refusals.
            with pytest.raises(BlockStoreUnavailable):
                await plaintext.get(h)
            with pytest.raises(Unauthenticated):
                await anonymous.get(h)
            with pytest.raises(Unauthenticated):
                await stolen.get(h)
            assert await globex_own.get(h) is None  # another tenant's block: a miss
            assert await globex_own.has([h]) == [False]
            with pytest.raises(PermissionDenied):
                await globex.put(h, frame)
            with pytest.raises(PermissionDenied):
                await globex.delete([h])
            assert await acme.get(h) == frame  # unaffected
        finally:
            for c in (acme, globex, globex_own, anonymous, stolen, plaintext, copier):
                await c.close()
            for c in (west_copy, acme_west):
                await c.close()

        # Discovery from an address, with the certificates directory and a tenant's token.
        found = await fetch_cluster_info(
            cluster.nodes[0].address,
            security=client_security(cluster.path.parent / CERTS_DIR),
            token=token(cluster, "acme"),
        )
        assert found.region_names() == cluster.region_names()

        # Block events over the secured broker.
        got_events: list[BlockEvent] = []

        async def resync(_: object) -> None:
            pass

        broker_sec = BrokerSecurity.for_cluster(sec)
        assert broker_sec is not None
        async with (
            EmbeddedBroker(security=broker_sec) as broker,
            EventSubscriber(
                broker.url,
                handler=got_events.append,
                resync=resync,
                credentials=MqttCredentials.for_cluster(sec, "acme", token(cluster, "acme")),
            ) as sub,
        ):
            await sub.wait_subscribed(10)
            async with EventPublisher(
                broker.url,
                region="us-east",
                node=blockstore_name("us-east"),
                clock=ManualClock(),
                heartbeat_s=None,
                credentials=MqttCredentials.for_cluster(
                    sec, "operator", token(cluster, "operator")
                ),
            ) as pub:
                await pub.wait_connected(10)
                pub.publish(EventKind.STORED, [h.hex()], tenant="acme")
                assert await pub.flush()
                for _ in range(1000):
                    if got_events:
                        break
                    await asyncio.sleep(0.01)
        assert [e.blocks for e in got_events] == [(h.hex(),)]

    asyncio.run(main())


def test_block_store_logs_hold_no_tokens(cluster: ClusterConfig) -> None:
    assert cluster.path is not None
    root = cluster.path.parent
    tokens = [p.read_text().strip() for p in (root / CERTS_DIR / "tokens").glob("*.token")]
    logs = list(root.glob("blockstore-*/blockstore.log")) + [
        n.data_dir / "node.log" for n in cluster.nodes
    ]
    assert tokens and logs
    for log in logs:
        text = Path(log).read_text(errors="replace")
        assert not any(t in text for t in tokens), log
