"""d2PL-TTC commit timestamps: a transaction that overwrites a version must commit above it.

Holding the lock normally guarantees that (the previous holder released it only after its
commit-wait, so now().latest is already past its commit timestamp). But a waiter that pushes a
prepared lock holder whose record is already COMMITTED releases its lock before that
commit-wait ends; when the holder's commit timestamp lies ahead of now() (a read mark set by a
read at a future timestamp on another of its keys), the waiter could choose a commit timestamp
below the version it read and overwrote, and its own write was then hidden under it (lost).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from k2store.client import AsyncTransaction, RetryPolicy
from k2store.cluster import (
    DEFAULT_REGIONS,
    ClusterConfig,
    ClusterSettings,
    ReplicationSettings,
    TxnSettings,
    local_cluster,
)
from k2store.sim import SimCluster, run_simulation

ONCE = RetryPolicy(max_attempts=1)
A, B = "eu-west/a", "eu-west/b"
"""Both led by eu-west-1."""


def _config() -> ClusterConfig:
    settings = replace(
        ClusterSettings(),
        replication=ReplicationSettings(enabled=False),
        txn=TxnSettings(protocol="d2pl-ttc"),
    )
    return local_cluster(
        DEFAULT_REGIONS, ports=[1, 2, 3], root=Path("/nonexistent-sim"), settings=settings
    )


def test_waiter_released_early_commits_above_the_version_it_overwrote() -> None:
    async def main() -> tuple[int, int, int]:
        cluster = SimCluster(_config(), seed=5)
        us = cluster.txn_client("us-east", retry=ONCE)
        eu = cluster.txn_client("eu-west", retry=ONCE)

        async def fund(tx: AsyncTransaction) -> None:
            await tx.put_many({A: b"100", B: b"100"})

        await us.run(fund)
        # A snapshot read 0.8 s ahead on B: whoever writes B next commits above that.
        await cluster.client("eu-west").get(B, at_ts=cluster.true_time_ns() + 800_000_000)

        t = await us.begin()
        await t.put_many({A: b"200", B: b"200"})
        t_commit = asyncio.ensure_future(t.commit())  # commit_ts ~0.8 s ahead: a long wait

        u = await eu.begin()  # younger than T: waits for T's lock on A
        seen = await u.get(A)  # released once a push finds T's record COMMITTED
        assert seen == b"200"
        await u.put(A, str(int(seen) + 50).encode())
        u_ts = await u.commit()
        t_ts = await t_commit

        async def final(tx: AsyncTransaction) -> int:
            value = await tx.get(A)
            assert value is not None
            return int(value)

        balance = await us.run(final, read_only=True)
        await us.close()
        await eu.close()
        return t_ts, u_ts, balance

    t_ts, u_ts, balance = run_simulation(main, seed=5)
    assert u_ts > t_ts, "U read T's version of A, so it must commit above it"
    assert balance == 250, "U's update of A was hidden under T's version"
