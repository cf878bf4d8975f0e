"""hypothesis: random concurrent transactions (reads, scans, writes, deletes) from every region, under every protocol, in the
simulator (production coordinator, participants and client over wide-area latency), equal a
serial execution in commit-timestamp order.

For every committed transaction we record what each of its reads returned and what it wrote. A
serial replay in commit-timestamp order (for the MVTO protocols the commit timestamp is the start
timestamp; for d2PL-TTC the timestamp chosen at commit) must give every read the same value. A
deleted key reads as None. Aborted attempts leave no trace, so only the committed attempt of each
transaction counts.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass, replace
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from k2store.client import AsyncTransaction, RetryPolicy
from k2store.cluster import (
    DEFAULT_REGIONS,
    ClusterSettings,
    ReplicationSettings,
    TxnSettings,
    local_cluster,
)
from k2store.errors import TxnAborted
from k2store.sim import SimCluster, run_simulation

REPLICATION = True
KEYS = [f"{r}/k{i}" for r in DEFAULT_REGIONS for i in range(3)]


@dataclass(frozen=True)
class Op:
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    deletes: tuple[str, ...]
    scan: str | None = None
    """A region whose whole key range the transaction scans (range locks under d2PL)."""


@dataclass(frozen=True)
class ClientPlan:
    region: int
    start_ms: int
    txns: tuple[Op, ...]


keys_st = st.lists(st.sampled_from(KEYS), max_size=3, unique=True).map(tuple)
op_st = st.builds(
    Op,
    keys_st,
    keys_st,
    st.lists(st.sampled_from(KEYS), max_size=1).map(tuple),
    st.none() | st.sampled_from(DEFAULT_REGIONS),
)
plan_st = st.builds(
    ClientPlan,
    st.integers(0, len(DEFAULT_REGIONS) - 1),
    st.integers(0, 200),
    st.lists(op_st, min_size=1, max_size=4).map(tuple),
)

Committed = tuple[int, dict[str, bytes | None], dict[str, bytes | None]]


def run_plans(protocol: str, plans: list[ClientPlan], seed: int) -> list[Committed]:
    settings = replace(
        ClusterSettings(),
        txn=TxnSettings(protocol=protocol),
        replication=ReplicationSettings(enabled=REPLICATION),
    )
    cfg = local_cluster(
        DEFAULT_REGIONS, [1, 2, 3], root=Path("/nonexistent-sim"), settings=settings
    )
    committed: list[Committed] = []

    async def main() -> None:
        cluster = SimCluster(cfg, seed=seed)
        retry = RetryPolicy(max_attempts=40, initial_backoff_s=0.005, max_backoff_s=0.2)
        clients = [cluster.txn_client(DEFAULT_REGIONS[p.region], retry=retry) for p in plans]

        async def client_run(c: int) -> None:
            plan = plans[c]
            await asyncio.sleep(plan.start_ms / 1000)
            for j, op in enumerate(plan.txns):
                value = f"c{c}-t{j}".encode()
                seen: dict[str, bytes | None] = {}
                holder: list[AsyncTransaction] = []

                async def body(tx: AsyncTransaction, op: Op = op, value: bytes = value) -> None:
                    holder.append(tx)
                    seen.clear()
                    if op.reads:
                        vals = await tx.get_many(list(op.reads))
                        seen.update(zip(op.reads, vals, strict=True))
                    if op.scan is not None:
                        rows = dict(await tx.scan(f"{op.scan}/", f"{op.scan}0"))
                        seen.update(
                            {k: rows.get(k.encode()) for k in KEYS if k.startswith(op.scan + "/")}
                        )
                    if op.writes:
                        await tx.put_many({k: value for k in op.writes})
                    for k in op.deletes:
                        if k not in op.writes:
                            await tx.delete(k)

                writes: dict[str, bytes | None] = {k: None for k in op.deletes}
                writes.update({k: value for k in op.writes})
                try:
                    await clients[c].run(body, read_only=not writes, keys=[*op.reads, *writes])
                except TxnAborted:
                    continue  # gave up after max_attempts: nothing of it may be visible
                ts = holder[-1].commit_ts
                assert ts is not None
                committed.append((ts, dict(seen), writes))

        finished = await cluster.run(
            [functools.partial(client_run, c) for c in range(len(plans))], 300
        )
        assert finished, "workload did not finish in 300 virtual seconds"
        # A final read-only snapshot of every key joins the history as one more reader.
        reader = cluster.txn_client(DEFAULT_REGIONS[0], retry=retry)
        holder: list[AsyncTransaction] = []

        async def final(tx: AsyncTransaction) -> list[bytes | None]:
            holder.append(tx)
            return await tx.get_many(list(KEYS))

        vals = await reader.run(final, read_only=True)
        ts = holder[-1].commit_ts
        assert ts is not None
        committed.append((ts, dict(zip(KEYS, vals, strict=True)), {}))
        for cl in [*clients, reader]:
            await cl.close()

    run_simulation(main, seed=seed)
    return committed


def check_serial_replay(committed: list[Committed]) -> None:
    stamps = [ts for ts, _, writes in committed if writes]
    assert len(stamps) == len(set(stamps)), "two writing transactions share a commit timestamp"
    state: dict[str, bytes | None] = {}
    for ts, reads, writes in sorted(committed, key=lambda t: t[0]):
        for k, v in reads.items():
            assert state.get(k) == v, f"txn at {ts} read {k}={v!r}; replay in ts order gives " + (
                f"{state.get(k)!r}"
            )
        state.update(writes)


@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    protocol=st.sampled_from(["k2-mvto", "d2pl-ttc", "mvto-hlc"]),
    plans=st.lists(plan_st, min_size=2, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_random_concurrent_transactions_equal_a_serial_replay(
    protocol: str, plans: list[ClientPlan], seed: int
) -> None:
    check_serial_replay(run_plans(protocol, plans, seed))


def test_the_replay_check_catches_a_stale_read() -> None:
    """The checker itself: a history in which a later transaction misses an earlier write."""
    good: list[Committed] = [(10, {}, {"a": b"1"}), (20, {"a": b"1"}, {})]
    check_serial_replay(good)
    stale: list[Committed] = [(10, {}, {"a": b"1"}), (20, {"a": None}, {})]
    try:
        check_serial_replay(stale)
    except AssertionError as e:
        assert "read a=None" in str(e)
    else:
        raise AssertionError("a stale read passed the replay check")
