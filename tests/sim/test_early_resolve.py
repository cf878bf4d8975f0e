"""`[txn] early_resolve` in the simulator: a committed transaction's versions show as soon as
its record is durable, not after its commit-wait, so a reader of a hot key stops waiting a
commit-wait earlier; and real-time order still holds, because what the reader returns it
returns only once the version's timestamp has certainly passed.

The clock error is set to 20 ms so that the commit-wait is long next to a local round trip."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from k2store.client import AsyncTransaction, RetryPolicy
from k2store.cluster import DEFAULT_REGIONS, ClusterSettings, TxnSettings, local_cluster
from k2store.sim import SimCluster, run_simulation

KEY = "eu-west/hot"
EPSILON_US = 20_000
ONCE = RetryPolicy(max_attempts=1)


def writer_then_reader(early_resolve: bool, *, record_with_writes: bool) -> dict[str, Any]:
    """A local writer commits KEY; 5 ms into its commit a local read-only transaction reads
    KEY. Returns when each step ended (virtual seconds) and the writer's commit timestamp."""
    base = ClusterSettings()
    settings = replace(
        base,
        epsilon_us=EPSILON_US,
        max_uncertainty_us=2 * EPSILON_US,
        txn=TxnSettings(early_resolve=early_resolve, commit_with_writes=record_with_writes),
        network=replace(base.network, enabled=True),
    )
    cfg = local_cluster(
        DEFAULT_REGIONS, [1, 2, 3], root=Path("/nonexistent-sim"), settings=settings
    )
    out: dict[str, Any] = {}

    async def main() -> None:
        cluster = SimCluster(cfg, seed=5)
        writer = cluster.txn_client("eu-west", retry=ONCE)
        reader = cluster.txn_client("eu-west", retry=ONCE)

        async def setup(tx: AsyncTransaction) -> None:
            await tx.put(KEY, b"0")

        await writer.run(setup)
        await asyncio.sleep(1.0)

        async def write() -> None:
            tx = await writer.begin(keys=[KEY])
            await tx.put(KEY, b"1")
            out["commit_started_s"] = cluster.now_s
            out["commit_ts"] = await tx.commit()
            out["writer_acked_s"] = cluster.now_s

        async def read() -> None:
            while "commit_started_s" not in out:
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.005)
            tx = await reader.begin(read_only=True)
            out["read"] = await tx.get(KEY)
            out["read_returned_s"] = cluster.now_s
            await tx.commit()
            out["reader_done_s"] = cluster.now_s
            out["reader_done_true_ns"] = cluster.true_time_ns()

        assert await cluster.run([write, read], 30.0)

    run_simulation(main, seed=5)
    return out


@pytest.mark.parametrize("record_with_writes", [True, False], ids=["commit-with-writes", "end-txn"])
def test_a_reader_of_a_committed_key_does_not_wait_out_the_writer_s_commit_wait(
    record_with_writes: bool,
) -> None:
    early = writer_then_reader(True, record_with_writes=record_with_writes)
    late = writer_then_reader(False, record_with_writes=record_with_writes)
    for run in (early, late):
        assert run["read"] == b"1"  # it read above the writer's commit either way
        # The commit-wait is what it is made to be: the writer's ack comes ~epsilon after.
        assert run["writer_acked_s"] - run["commit_started_s"] > EPSILON_US * 1e-6
    # With early_resolve the read returns before the writer is acknowledged; without, after.
    assert early["read_returned_s"] < early["writer_acked_s"] - 0.01
    assert late["read_returned_s"] >= late["writer_acked_s"] - 0.001


def test_a_reader_that_saw_an_early_version_returns_only_after_its_timestamp() -> None:
    """Real-time order: the read-only transaction that read the version before the writer's
    commit-wait ended does not finish until the version's timestamp has certainly passed, so
    any transaction that begins after it gets a larger timestamp and sees the write too."""
    run = writer_then_reader(True, record_with_writes=True)
    assert run["read_returned_s"] < run["writer_acked_s"]
    assert run["reader_done_true_ns"] > run["commit_ts"]
    assert run["reader_done_s"] > run["read_returned_s"] + 0.005  # it had to wait for that
