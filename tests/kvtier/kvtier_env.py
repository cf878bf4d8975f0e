"""Fixtures of the KV-tier tests: an in-process K2 cluster on loopback with one in-process block
store node per region, tiny block specs, and a manual clock for leases."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from k2store.client import AsyncClient, RetryPolicy
from k2store.cluster import ClusterConfig, ClusterSettings, TxnSettings, local_cluster
from k2store.launcher import free_ports
from k2store.node import Node
from kvtier.blocknode import BlockNode
from kvtier.blocks import BlockSpec, Layout, Namespace
from kvtier.blockstore import BlockStore, BlockStoreConfig, MemoryBlobStore
from kvtier.connector import AsyncKVConnector, ConnectorConfig
from kvtier.metadata import BlockMetadata
from truetime import ManualClock

REGIONS = ["us-east", "eu-west", "ap-southeast"]
FAST = TxnSettings(push_after_s=0.02, expiry_s=0.3, heartbeat_s=0.05, client_timeout_s=5.0)
SPEC = BlockSpec(block_tokens=4, num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16")
QUOTA = 1 << 30


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())


def make_kv(spec: BlockSpec, num_tokens: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(spec.shape(num_tokens), generator=g).to(spec.torch_dtype)


def namespace(
    tenant: str = "acme", *, spec: BlockSpec = SPEC, shared: bool = False, salt: bytes = b"s"
) -> Namespace:
    return Namespace("smollm2-135m@r1", "smollm2-tok", spec, tenant, salt, shared)


@dataclass
class Env:
    cfg: ClusterConfig
    client: AsyncClient
    metadata: BlockMetadata
    clock: ManualClock
    blocknodes: dict[str, BlockNode]
    disks: dict[str, MemoryBlobStore]
    nodes: dict[str, Node] = field(default_factory=dict)
    clients: list[AsyncClient] = field(default_factory=list)

    def addresses(self) -> dict[str, list[str]]:
        return {r: [n.address] for r, n in self.blocknodes.items()}

    async def connector(self, ns: Namespace, region: str, **config: object) -> AsyncKVConnector:
        """A connector in region. Other regions' block rows are read at their leaders unless
        `remote_metadata="replica"` is passed: most tests store in one region and look up in
        another at once, before replicas could have seen the rows."""
        config.setdefault("remote_metadata", "leader")
        client = AsyncClient(self.cfg, timeout_s=5, region=region, retry=self.client.retry)
        self.clients.append(client)
        return await AsyncKVConnector.open(
            client,
            ns,
            config=ConnectorConfig(**{"region": region, "timeout_s": 2.0, **config}),  # type: ignore[arg-type]
            stores=self.addresses(),
            clock=self.clock,
        )


class PartLog:
    """Wraps a connector's block store clients' `get_range` to record (region, start) in the
    order the ranges were asked for, and to damage in transit (the last 256 bytes: the last
    layer's values, set to large numbers, so a pass that used them would show it) what
    `damage` names: (region, block hash)."""

    def __init__(self, conn: AsyncKVConnector, damage: Collection[tuple[str, bytes]] = ()) -> None:
        self.asked: list[tuple[str, int]] = []
        self.damage = damage
        for region, clients in conn.stores.items():
            for c in clients:
                c.get_range = self._wrap(region, c.get_range)  # type: ignore[method-assign]

    def _wrap(
        self, region: str, real: Callable[[bytes, int, int], Awaitable[tuple[object, int]]]
    ) -> Callable[[bytes, int, int], Awaitable[tuple[object, int]]]:
        async def get_range(key: bytes, start: int, length: int) -> tuple[object, int]:
            self.asked.append((region, start))
            part, moved = await real(key, start, length)
            if (region, key) in self.damage and isinstance(part, bytes | bytearray):
                raw = bytearray(part)
                raw[-256:] = b"\x7b" * 256
                part = raw
            return part, moved

        return get_range


@asynccontextmanager
async def kv_env(
    tmp_path: Path,
    *,
    store_config: BlockStoreConfig | None = None,
    tenants: tuple[str, ...] = ("acme",),
) -> AsyncIterator[Env]:
    settings = replace(ClusterSettings(), txn=FAST)
    cfg = local_cluster(REGIONS, free_ports(3), root=tmp_path, settings=settings)
    cfg = cfg.write(tmp_path / "cluster.toml")
    nodes = [Node(cfg, n.name) for n in cfg.nodes]
    for node in nodes:
        await node.start()
    retry = RetryPolicy(max_attempts=30, initial_backoff_s=0.001, max_backoff_s=0.01)
    client = AsyncClient(cfg, timeout_s=5, retry=retry)
    clock = ManualClock(1_700_000_000 * 10**9)
    disks = {r: MemoryBlobStore() for r in REGIONS}
    blocknodes = {
        r: BlockNode(BlockStore(disks[r], store_config or BlockStoreConfig()), r, "127.0.0.1:0")
        for r in REGIONS
    }
    for bn in blocknodes.values():
        await bn.start()
    env = Env(cfg, client, BlockMetadata(client, clock=clock), clock, blocknodes, disks)
    env.nodes = {n.me.name: n for n in nodes}
    for t in tenants:
        await env.metadata.register_tenant(t, quota_bytes=QUOTA)
    try:
        yield env
    finally:
        for c in env.clients:
            await c.close()
        await client.close()
        for bn in blocknodes.values():
            await bn.stop(0)
        for node in nodes:
            await node.stop(grace_s=0)


__all__ = [
    "FAST",
    "QUOTA",
    "REGIONS",
    "SPEC",
    "Env",
    "Layout",
    "PartLog",
    "kv_env",
    "make_kv",
    "namespace",
    "run",
]
