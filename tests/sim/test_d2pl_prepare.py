"""d2PL-TTC two-phase commit when a participant cannot be reached at Prepare.

No commit decision was made then, so the coordinator aborts: the client hears a retryable
TxnAborted (not an unknown outcome), and the participants that did prepare release their locks
at once instead of holding them, unwoundable, until the silent-client reaper ran.
"""

from __future__ import annotations

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
from k2store.errors import K2Error, TxnAborted
from k2store.sim import SimCluster, run_simulation

ONCE = RetryPolicy(max_attempts=1)
X, Y = "ap-southeast/x", "eu-west/y"
"""Led by ap-southeast-1 and eu-west-1; the transaction is coordinated by us-east-1."""


def _config() -> ClusterConfig:
    settings = replace(
        ClusterSettings(),
        replication=ReplicationSettings(enabled=False),
        txn=TxnSettings(protocol="d2pl-ttc"),
    )
    return local_cluster(
        DEFAULT_REGIONS, ports=[1, 2, 3], root=Path("/nonexistent-sim"), settings=settings
    )


def test_unreachable_participant_at_prepare_aborts_and_frees_the_others() -> None:
    async def main() -> tuple[str, float, bytes | None]:
        cluster = SimCluster(_config(), seed=11)
        us = cluster.txn_client("us-east", retry=ONCE)
        ap = cluster.txn_client("ap-southeast", retry=ONCE)

        t = await us.begin()
        await t.put_many({X: b"t", Y: b"t"})
        cluster.crash("eu-west-1")
        try:
            await t.commit()
            outcome = "committed"
        except K2Error as e:  # without the abort: CommitOutcomeUnknown
            outcome = e.rule if isinstance(e, TxnAborted) else type(e).__name__

        async def write_x(tx: AsyncTransaction) -> None:
            await tx.put(X, b"u")

        started = cluster.now_s
        await ap.run(write_x)  # needs the lock T took (and prepared) at ap-southeast-1
        took_s = cluster.now_s - started
        value = await ap.run(lambda tx: tx.get(X), read_only=True)
        await us.close()
        await ap.close()
        return outcome, took_s, value

    outcome, took_s, value = run_simulation(main, seed=11)
    assert outcome == "prepare-failed"
    assert value == b"u"
    assert took_s < 1.0, f"the write of {X} waited {took_s:.1f} s for T's prepared lock"
