"""d2PL-TTC across a participant restart: locks live in memory and die with the process, so a
transaction that read under a lock before the restart must not go on to write after it.

The interleaving (found by the bank-with-kill-9 process test, where it created money): T reads an
account at eu-west-1 under a shared lock; eu-west-1 is killed and restarted, and its lock table is
empty; U reads the same account, writes it and commits, since nothing stops it; then T writes the
account from its stale read. Its Exec found no state for T at the new process and started T
afresh there (new lock, new lock state), so T's Prepare succeeded and U's update was lost.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from k2store.client import AsyncTransaction, RetryPolicy
from k2store.cluster import (
    DEFAULT_REGIONS,
    ClusterConfig,
    ClusterSettings,
    ReplicationSettings,
    TxnSettings,
    local_cluster,
)
from k2store.errors import TxnAborted
from k2store.sim import SimCluster, run_simulation

ONCE = RetryPolicy(max_attempts=1)
ACCOUNT = "eu-west/acct/0"
"""Led by eu-west-1, the node that restarts; the transactions are coordinated elsewhere."""


def _config() -> ClusterConfig:
    settings = replace(
        ClusterSettings(),
        replication=ReplicationSettings(enabled=False),
        txn=TxnSettings(protocol="d2pl-ttc"),
    )
    return local_cluster(
        DEFAULT_REGIONS, ports=[1, 2, 3], root=Path("/nonexistent-sim"), settings=settings
    )


async def _read(tx: AsyncTransaction, how: str) -> int:
    if how == "get":
        value = await tx.get(ACCOUNT)
    else:
        ((_, value),) = await tx.scan("eu-west/acct/", "eu-west/acct0")
    assert value is not None
    return int(value)


@pytest.mark.parametrize("how", ["get", "scan"])
def test_write_after_participant_restart_does_not_lose_an_update(how: str) -> None:
    async def main() -> tuple[str, int]:
        cluster = SimCluster(_config(), seed=3)
        us = cluster.txn_client("us-east", retry=ONCE)
        ap = cluster.txn_client("ap-southeast", retry=ONCE)

        async def fund(tx: AsyncTransaction) -> None:
            await tx.put(ACCOUNT, b"100")

        await us.run(fund)

        t = await us.begin()
        seen = await _read(t, how)  # a shared lock at eu-west-1
        cluster.crash("eu-west-1")
        await cluster.restart("eu-west-1")

        async def deposit(tx: AsyncTransaction) -> None:
            await tx.put(ACCOUNT, str(await _read(tx, how) + 50).encode())

        await ap.run(deposit)  # the lock T held is gone: U commits 150

        try:
            await t.put(ACCOUNT, str(seen - 10).encode())  # 90, from T's read before the restart
            await t.commit()
            outcome = "committed"
        except TxnAborted as e:
            outcome = e.rule

        async def final(tx: AsyncTransaction) -> int:
            return await _read(tx, "get")

        balance = await us.run(final, read_only=True)
        await us.close()
        await ap.close()
        return outcome, balance

    outcome, balance = run_simulation(main, seed=3)
    # T's read is stale: committing its write would lose the deposit (the balance would be 90).
    assert (outcome, balance) == ("locks-lost", 150)
