"""Replication on real node processes with DESIGN's wide-area latencies (`k2 cluster up`):

- a replica node killed with SIGKILL during writes restarts and catches up with nothing missing;
- a read-only snapshot in eu-west completes in about local latency, and sees every committed
  multi-shard transaction whole;
- `k2 cluster status` reports the replicas and visibility delays.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from k2store import launcher
from k2store.client import AsyncClient, AsyncTransaction, RetryPolicy
from k2store.cluster import ClusterConfig
from tests.secure_env import cluster_up
from truetime import SystemClock

pytestmark = pytest.mark.slow

RETRY = RetryPolicy(max_attempts=20, initial_backoff_s=0.01, max_backoff_s=0.3)


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterConfig]:
    with cluster_up(tmp_path_factory.mktemp("repl")) as cfg:
        yield cfg
    assert launcher.running_nodes(cfg) == {}


def test_killed_replica_catches_up_and_snapshots_are_local_and_whole(
    cluster: ClusterConfig,
) -> None:
    clock = SystemClock()

    async def main() -> None:
        writer = AsyncClient(cluster, region="us-east", retry=RETRY)
        reader = AsyncClient(cluster, region="eu-west", retry=RETRY)
        keys = ["us-east/k", "ap-southeast/k"]

        async def write(i: int) -> None:
            async def body(tx: AsyncTransaction) -> None:
                await tx.put_many({k: str(i).encode() for k in keys})

            await writer.run(body, keys=keys)

        await write(0)
        victim = "eu-west-1"  # holds eu-west's replicas of the us-east and ap-southeast shards
        pid = launcher.running_nodes(cluster)[victim]
        for i in range(1, 16):
            if i == 5:
                os.kill(pid, signal.SIGKILL)
            await write(i)
        while launcher._alive(pid):
            launcher._reap()
            await asyncio.sleep(0.05)
        proc = launcher.start_node(cluster, cluster.node(victim))
        launcher.wait_healthy(cluster, {victim: proc}, 60, progress=False)
        # Fresh: at now(), once visible in eu-west, i.e. once the replicas caught up.
        snap = reader.replica_snapshot(fresh=True)
        assert await snap.get_many(keys) == [b"15", b"15"]
        # At the visible timestamp: about local latency (1 ms RTT), never a wide-area trip
        # (us-east is 75 ms away, ap-southeast 160 ms).
        best = float("inf")
        for _ in range(5):
            t0 = clock.monotonic_ns()
            vals = await reader.replica_snapshot().get_many(keys)
            best = min(best, (clock.monotonic_ns() - t0) / 1e6)
            assert vals[0] == vals[1]  # one transaction wrote both: never half of it
        assert best < 40, f"a replica read took {best:.1f} ms"
        for c in (writer, reader):
            await c.close()

    asyncio.run(main())
    status = subprocess.run(
        [sys.executable, "-m", "k2store", "cluster", "status", "--cluster", str(cluster.path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    assert "replication (vcr)" in status.stdout
    assert "visibility delay" in status.stdout
