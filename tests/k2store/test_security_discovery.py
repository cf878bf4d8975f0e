"""Discovering a secured cluster from one node's address: `fetch_cluster_info` with TLS and a
token, and the clients built from what it returns."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from test_security import REGIONS, RETRY, running, secured, token

from k2store.certs import CERTS_DIR, client_security
from k2store.client import AsyncClient, Client, fetch_cluster_info
from k2store.errors import PermissionDenied, Unauthenticated, Unavailable


def test_a_secured_node_refuses_discovery_without_credentials(tmp_path: Path) -> None:
    cfg = secured(tmp_path)
    address = cfg.nodes[0].address
    sec = client_security(tmp_path / CERTS_DIR)

    async def main() -> None:
        async with running(cfg):
            with pytest.raises(Unavailable):  # plaintext: no TLS connection at all
                await fetch_cluster_info(address, timeout_s=2)
            with pytest.raises(Unauthenticated):  # TLS, but not a token anyone has
                await fetch_cluster_info(address, security=sec, token="-")

    asyncio.run(main())


def test_discovery_with_credentials_gives_a_secured_client(tmp_path: Path) -> None:
    cfg = secured(tmp_path)
    address = cfg.nodes[0].address
    sec = client_security(tmp_path / CERTS_DIR)
    acme = token(cfg, "acme")

    async def main() -> None:
        async with running(cfg):
            found = await fetch_cluster_info(address, security=sec, token=acme)
            assert found.region_names() == REGIONS
            assert {n.name for n in found.nodes} == {n.name for n in cfg.nodes}
            assert found.settings.security.tls
            async with await AsyncClient.connect(
                address, security=sec, token=acme, retry=RETRY, timeout_s=5
            ) as c:
                await c.put("us-east/t/acme/k", b"v")
                assert await c.get("us-east/t/acme/k") == b"v"
                with pytest.raises(PermissionDenied):  # still only acme's keys
                    await c.get("us-east/t/globex/k")

            # The sync client too, in a thread: it runs its own event loop.
            def sync() -> bytes | None:
                with Client.connect(address, security=sec, token=acme, retry=RETRY) as s:
                    return s.get("us-east/t/acme/k")

            assert await asyncio.to_thread(sync) == b"v"

    asyncio.run(main())


def test_discovery_of_an_unsecured_cluster_needs_nothing(tmp_path: Path) -> None:
    from k2store.cluster import local_cluster
    from k2store.launcher import free_ports
    from k2store.security import SecuritySettings

    cfg = local_cluster(REGIONS, free_ports(len(REGIONS)), root=tmp_path)

    async def main() -> None:
        async with running(cfg):
            found = await fetch_cluster_info(cfg.nodes[1].address)
            assert found.region_names() == REGIONS
            assert found.settings.security == SecuritySettings()
            async with await AsyncClient.connect(cfg.nodes[0].address, retry=RETRY) as c:
                await c.put("us-east/k", b"v")
                assert await c.get("us-east/k") == b"v"

    asyncio.run(main())
