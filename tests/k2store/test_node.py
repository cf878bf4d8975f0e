"""Nodes in one process on loopback, on a manual clock: routing, forwarding, errors, restart."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from k2store.client import AsyncClient, RetryPolicy
from k2store.cluster import ClusterConfig, local_cluster
from k2store.errors import (
    ClockUncertain,
    DataDirLockedError,
    InvalidArgument,
    KeyTooLarge,
    Unavailable,
    UnknownNode,
    ValueTooLarge,
)
from k2store.launcher import free_ports
from k2store.node import Node
from truetime import ManualClock

REGIONS = ["us-east", "eu-west", "ap-southeast"]


def make_cluster(tmp_path: Path, **kw: int) -> ClusterConfig:
    npr = kw.get("nodes_per_region", 1)
    return local_cluster(REGIONS, free_ports(3 * npr), root=tmp_path, **kw).write(
        tmp_path / "cluster.toml"
    )


@asynccontextmanager
async def running(cfg: ClusterConfig, clock: ManualClock) -> AsyncIterator[dict[str, Node]]:
    nodes = {n.name: Node(cfg, n.name, clock=clock) for n in cfg.nodes}
    for node in nodes.values():
        await node.start()
    try:
        yield nodes
    finally:
        for node in nodes.values():
            await node.stop(grace_s=0)


def run(
    tmp_path: Path,
    body: Callable[[ClusterConfig, ManualClock, AsyncClient], Awaitable[None]],
    **kw: int,
) -> None:
    cfg = make_cluster(tmp_path, **kw)
    clock = ManualClock()

    async def main() -> None:
        async with running(cfg, clock):
            client = AsyncClient(
                cfg, timeout_s=5, retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.001)
            )
            try:
                await body(cfg, clock, client)
            finally:
                await client.close()

    asyncio.run(main())


def test_put_through_one_region_read_from_every_region(tmp_path: Path) -> None:
    async def body(cfg: ClusterConfig, clock: ManualClock, c: AsyncClient) -> None:
        w = await c.put("eu-west/user/1", b"alice", via="ap-southeast-1")
        assert w.served_by == "eu-west-1"  # forwarded to the leader of the key's shard
        for n in cfg.nodes:
            r = await c.get_versioned("eu-west/user/1", via=n.name)
            assert r.value == b"alice"
            assert r.version_ts == w.commit_ts
            assert r.read_ts > w.commit_ts
            assert r.served_by == "eu-west-1"
        # Commit-wait: the write was acknowledged only after its timestamp had certainly passed.
        assert clock.now_ns() - 400_000 > w.commit_ts

    run(tmp_path, body)


def test_timestamps_order_writes_and_reads_at_a_timestamp_see_the_past(tmp_path: Path) -> None:
    async def body(cfg: ClusterConfig, clock: ManualClock, c: AsyncClient) -> None:
        w1 = await c.put("us-east/k", b"v1")
        w2 = await c.put("us-east/k", b"v2", via="eu-west-1")
        assert w2.commit_ts > w1.commit_ts
        assert await c.get("us-east/k", at_ts=w1.commit_ts) == b"v1"
        assert await c.get("us-east/k", at_ts=w2.commit_ts - 1) == b"v1"
        assert await c.get("us-east/k") == b"v2"
        d = await c.delete("us-east/k")
        assert d.existed and d.commit_ts > w2.commit_ts
        assert await c.get("us-east/k") is None
        assert (await c.delete("us-east/k")).existed is False
        assert await c.get("us-east/k", at_ts=w2.commit_ts) == b"v2"

    run(tmp_path, body)


def test_scan_spans_shards_at_one_snapshot_with_pagination(tmp_path: Path) -> None:
    async def body(cfg: ClusterConfig, clock: ManualClock, c: AsyncClient) -> None:
        expected = {}
        for r in REGIONS:
            for i in range(7):
                k = f"{r}/item/{i:02d}".encode()
                expected[k] = f"{r}-{i}".encode()
                await c.put(k, expected[k])
        await c.put(b"zzz-outside", b"gap shard")
        expected[b"zzz-outside"] = b"gap shard"
        rows = await c.scan()
        assert rows == sorted(expected.items())
        vrows = await c.scan_versioned()
        assert len({ts for _, _, ts in vrows}) == len(vrows)
        page = await c.scan("eu-west/", "eu-west0", limit=3)
        assert page == sorted((k, v) for k, v in expected.items() if k.startswith(b"eu-west/"))[:3]
        assert len(await c.scan("eu-west/", limit=10)) == 10  # crosses into the next shards
        old_ts = vrows[-1][2]
        # The scans read later shards at the first shard's timestamp (another region's oracle);
        # with the manual clock standing still, move it on so the write is stamped above them.
        clock.advance(50_000_000)
        await c.put(b"ap-southeast/item/00", b"changed")
        snapshot = dict(await c.scan(at_ts=old_ts))
        assert snapshot[b"ap-southeast/item/00"] == b"ap-southeast-0"

    # small pages force several round trips per shard
    run(tmp_path, body, shards_per_region=2)


def test_bad_input_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    async def body(cfg: ClusterConfig, clock: ManualClock, c: AsyncClient) -> None:
        with pytest.raises(KeyTooLarge, match="4096"):
            await c.put(b"us-east/" + b"k" * 4096, b"v", via="eu-west-1")
        with pytest.raises(ValueTooLarge):
            await c.put(b"us-east/big", b"v" * (64 * 1024 * 1024 + 1))
        with pytest.raises(UnknownNode):
            await c.get(b"us-east/big", via="mars-1")
        with pytest.raises(InvalidArgument, match="future"):
            await c.get(b"us-east/big", at_ts=clock.now_ns() + 10**12)
        with pytest.raises(TypeError):
            await c.put(b"us-east/big", "not bytes")  # type: ignore[arg-type]
        assert await c.scan() == []

    run(tmp_path, body)


def test_a_node_whose_clock_is_too_uncertain_refuses(tmp_path: Path) -> None:
    async def body(cfg: ClusterConfig, clock: ManualClock, c: AsyncClient) -> None:
        await c.put("us-east/a", b"1")
        clock.set_error_bound_ns(50_000_000)  # 50 ms > the 5 ms bound
        with pytest.raises(ClockUncertain, match="uncertainty"):
            await c.put("us-east/a", b"2")
        clock.set_error_bound_ns(None)
        assert await c.get("us-east/a") == b"1"
        assert c.retries >= 1

    run(tmp_path, body)


def test_restart_recovers_data_and_refuses_writes_below_earlier_reads(tmp_path: Path) -> None:
    cfg = make_cluster(tmp_path)
    clock = ManualClock()

    oracle = cfg.region("ap-southeast").oracle

    async def main() -> None:
        async with running(cfg, clock) as nodes:
            c = AsyncClient(cfg, timeout_s=5)
            w = await c.put("ap-southeast/s", b"kept")
            r0 = await c.get_versioned("ap-southeast/s")
            await c.close()
            service = nodes[oracle].service
            assert service is not None and service.oracle is not None
            service._issue("us-east-1/future", 1)  # a coordinator of another node registers
            slots = service.oracle.slots
            assert len(slots) == 2
        # The restarted oracle must not repeat or undercut what it issued, even if the clock now
        # reads earlier (stepped back 10 ms): it resumes above its persisted ceiling.
        clock.set(clock.now_ns() - 10_000_000)
        async with running(cfg, clock) as nodes:
            c = AsyncClient(cfg, timeout_s=5)
            r = await c.get_versioned("ap-southeast/s", via="us-east-1")
            assert (r.value, r.version_ts) == (b"kept", w.commit_ts)
            # Read marks were lost with the old process: the floor stands in for them.
            leader = nodes["ap-southeast-1"].leaders[cfg.shard_for_key(b"ap-southeast/s").id]
            assert leader.store.read_marks.floor >= r0.read_ts
            w2 = await c.put("ap-southeast/t", b"later")
            assert w2.commit_ts > w.commit_ts
            await c.close()
            # Every coordinator keeps its slot (its own future, client and restamp timestamps
            # lie above its batches' bases, beyond the ceiling); a newcomer gets a free one.
            service = nodes[oracle].service
            assert service is not None and service.oracle is not None
            assert slots.items() <= service.oracle.slots.items()
            assert service._issue("newcomer", 1).slot not in slots.values()

    asyncio.run(main())


def test_port_in_use_and_locked_data_dir_are_clear_errors(tmp_path: Path) -> None:
    cfg = make_cluster(tmp_path)
    clock = ManualClock()

    async def main() -> None:
        async with running(cfg, clock):
            twin = Node(cfg, "us-east-1", clock=clock)
            with pytest.raises(DataDirLockedError, match="locked by another process"):
                await twin.start()
        # Same address, other data dir: the port is taken by a foreign listener.
        import socket

        sock = socket.socket()
        # The stopped node's replication connections may linger in TIME_WAIT on this port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        host, port = cfg.node("eu-west-1").address.split(":")
        sock.bind((host, int(port)))
        sock.listen()
        try:
            node = Node(cfg, "eu-west-1", clock=clock)
            with pytest.raises(Unavailable, match="port is in use"):
                await node.start()
            # Nothing held after the failed start: the data dir can be taken again.
            sock.close()
            node2 = Node(cfg, "eu-west-1", clock=clock)
            await node2.start()
            await node2.stop(grace_s=0)
        finally:
            sock.close()

    asyncio.run(main())


def test_client_discovers_the_cluster_from_one_address(tmp_path: Path) -> None:
    async def body(cfg: ClusterConfig, clock: ManualClock, c: AsyncClient) -> None:
        await c.put("eu-west/x", b"1")
        c2 = await AsyncClient.connect(cfg.node("us-east-1").address)
        try:
            assert c2.cluster.shards == cfg.shards
            assert await c2.get("eu-west/x") == b"1"
        finally:
            await c2.close()

    run(tmp_path, body)
