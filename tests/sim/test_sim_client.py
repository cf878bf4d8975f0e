"""The simulated client: delete and cross-shard scans through real NodeServices."""

from __future__ import annotations

from k2store.cluster import ClusterConfig
from k2store.sim import SimCluster, run_simulation


def test_scan_and_delete_across_shards(cfg2: ClusterConfig) -> None:
    async def main() -> None:
        cluster = SimCluster(cfg2)
        client = cluster.client("eu-west")
        keys = [b"eu-west/a", b"eu-west/\x90", b"us-east/b", b"us-east/\x90", b"zzz"]
        for i, k in enumerate(keys):
            await client.put(k, b"v%d" % i)
        d = await client.delete(b"us-east/b")
        assert d.existed
        assert not (await client.delete(b"us-east/nothing")).existed
        rows = await client.scan(b"eu-west/", None)
        assert rows == [
            (b"eu-west/a", b"v0"),
            (b"eu-west/\x90", b"v1"),
            (b"us-east/\x90", b"v3"),
            (b"zzz", b"v4"),
        ]
        assert await client.scan(b"eu-west/", None, limit=2) == rows[:2]
        assert await client.get(b"us-east/b") is None
        assert not cluster.network.internal_errors

    run_simulation(main, seed=0)
