"""K2-MVTO transactions end to end: in-process nodes on loopback, a manual clock.

Each rule of txn/mvto.py is exercised through the client API, plus the waits, the record, the
retry loop, abandoned transactions, and a serializability check against a replay in timestamp
order.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from k2store.client import AsyncClient, AsyncTransaction, Client, RetryPolicy, Transaction
from k2store.cluster import ClusterConfig, ClusterSettings, TxnSettings, local_cluster
from k2store.coordinator import Coordinator
from k2store.errors import (
    CommitOutcomeUnknown,
    DeadlineExceeded,
    InvalidArgument,
    TransactionRetry,
    TxnAborted,
    Unavailable,
)
from k2store.launcher import free_ports
from k2store.node import Node
from k2store.proto import k2_pb2 as pb
from truetime import ManualClock, timestamp_origin
from txn.records import TxnRecord, TxnStatus

REGIONS = ["us-east", "eu-west", "ap-southeast"]
# The rule tests interleave transactions by when they begin: stamping at begin keeps that order;
# and they meet each other's intents as soon as a put returns, so writes are not held for the
# commit (late stamping and commit_with_writes are tested on their own below, and are on in the
# simulator's property tests).
FAST = TxnSettings(
    push_after_s=0.02,
    expiry_s=0.3,
    heartbeat_s=0.05,
    client_timeout_s=5.0,
    late_stamping=False,
    commit_with_writes=False,
)


def make_cluster(tmp_path: Path, txn: TxnSettings = FAST) -> ClusterConfig:
    settings = replace(ClusterSettings(), txn=txn)
    cfg = local_cluster(REGIONS, free_ports(3), root=tmp_path, settings=settings)
    return cfg.write(tmp_path / "cluster.toml")


@asynccontextmanager
async def cluster(
    tmp_path: Path, txn: TxnSettings = FAST
) -> AsyncIterator[tuple[ClusterConfig, dict[str, Node], AsyncClient]]:
    cfg = make_cluster(tmp_path, txn)
    clock = ManualClock()
    nodes = {n.name: Node(cfg, n.name, clock=clock) for n in cfg.nodes}
    for node in nodes.values():
        await node.start()
    client = AsyncClient(
        cfg,
        timeout_s=5,
        retry=RetryPolicy(max_attempts=30, initial_backoff_s=0.001, max_backoff_s=0.01),
    )
    try:
        yield cfg, nodes, client
    finally:
        await client.close()
        for node in nodes.values():
            await node.stop(grace_s=0)


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())


def test_commit_spans_regions_and_is_atomic(tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster(tmp_path) as (cfg, nodes, c):
            tx = await c.begin()
            await tx.put_many({"us-east/a": b"1", "eu-west/b": b"2", "ap-southeast/c": b"3"})
            assert await tx.get("eu-west/b") == b"2"  # reads its own writes
            # Nobody else sees them: a read below tx.ts ignores the intent; one above would wait
            # for tx's outcome (see test_reader_waits_for_a_lower_intent_then_sees_its_outcome).
            assert await c.get("eu-west/b", at_ts=tx.ts - 1) is None
            ts = await tx.commit()
            assert ts == tx.ts
            for k, v in [("us-east/a", b"1"), ("eu-west/b", b"2"), ("ap-southeast/c", b"3")]:
                r = await c.get_versioned(k, via="ap-southeast-1")
                assert (r.value, r.version_ts) == (v, ts)

    run(body)


def test_abort_leaves_nothing(tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster(tmp_path) as (cfg, nodes, c):
            await c.put("us-east/a", b"old")
            tx = await c.begin()
            await tx.put("us-east/a", b"new")
            await tx.put("eu-west/b", b"new")
            await tx.abort()
            assert await c.get("us-east/a") == b"old"
            assert await c.get("eu-west/b") is None
            for _ in range(100):  # resolution is asynchronous
                if not any(
                    ld.store.scan_intents(b"", None)
                    for n in nodes.values()
                    for ld in n.leaders.values()
                ):
                    break
                await asyncio.sleep(0.01)
            assert not any(
                ld.store.scan_intents(b"", None)
                for n in nodes.values()
                for ld in n.leaders.values()
            )

    run(body)


def test_write_under_a_later_read_aborts_by_read_mark(tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster(tmp_path) as (cfg, nodes, c):
            t1 = await c.begin()
            t2 = await c.begin()
            assert t1.ts < t2.ts
            # t1 has run a request already: it can no longer be restamped (TxnSettings.restamp).
            assert await t1.get("us-east/other") is None
            assert await t2.get("us-east/k") is None
            with pytest.raises(TxnAborted) as e:
                await t1.put("us-east/k", b"late")
            assert e.value.rule == "read-mark" and "us-east/k" in str(e.value)
            await t2.commit()

    run(body)


def test_a_first_request_under_a_later_read_is_restamped_by_its_leader(tmp_path: Path) -> None:
    """The same conflict on t1's first request: its leader runs it again above t2's read
    instead of aborting it, and t1 commits at the new timestamp, after t2 in the serial order
    (t2 read nothing, and a read at t2's timestamp still reads nothing)."""

    async def body() -> None:
        async with cluster(tmp_path) as (cfg, nodes, c):
            t1 = await c.begin()
            t2 = await c.begin()
            old = t1.ts
            assert old < t2.ts
            assert await t2.get("us-east/k") is None
            await t1.put("us-east/k", b"late")
            assert t1.ts > t2.ts
            assert await t1.commit() == t1.ts
            await t2.commit()
            assert await c.get("us-east/k", at_ts=t2.ts) is None
            r = await c.get_versioned("us-east/k")
            assert (r.value, r.version_ts) == (b"late", t1.ts)
            leader = nodes["us-east-1"].leaders[cfg.shard_for_key(b"us-east/k").id]
            assert (leader.counters.restamps, leader.counters.aborts) == (1, 0)

    run(body)


def test_a_restamp_lands_just_above_the_conflict_not_behind_later_transactions(
    tmp_path: Path,
) -> None:
    """K2-MVTO restamps from a slot of their own just above the conflict: t1, doomed by t2's
    read, lands between t2 and t3 (begun after t2), not above t3 as the node's next timestamp
    would put it; so t3, next in the key's line, still writes above t1. A second restamp at
    the same conflict gets a larger timestamp (the slot's timestamps never repeat)."""

    async def body() -> None:
        async with cluster(tmp_path) as (cfg, nodes, c):
            # The first restamp after a start is above the restamp slot's first batch, which
            # leads the clock: make it, then let the (manual) clock pass that batch.
            w1, w2 = await c.begin(), await c.begin()
            assert await w2.get("us-east/w") is None
            await w1.put("us-east/w", b"w")
            await w1.commit()
            await w2.commit()
            clock = nodes["us-east-1"].clock
            clock.advance(10_000_000)  # type: ignore[attr-defined]
            t1 = await c.begin()
            t0 = await c.begin()
            t2 = await c.begin()
            clock.advance(1_000_000)  # type: ignore[attr-defined]  # (timestamps 4 us apart)
            t3 = await c.begin()
            assert t1.ts < t0.ts < t2.ts < t3.ts
            assert await t2.get_many(["us-east/k", "us-east/j"]) == [None, None]
            await t1.put("us-east/k", b"t1")
            assert t2.ts < t1.ts < t3.ts
            oracle = nodes["us-east-1"].service.oracle  # type: ignore[union-attr]
            restamp_slot = (oracle.oracle_id, oracle.register("us-east-1/restamp"))
            assert timestamp_origin(t1.ts) == restamp_slot != timestamp_origin(t3.ts)
            await t0.put("us-east/j", b"t0")  # the same floor (t2's reads): above t1 all the same
            assert t1.ts < t0.ts < t3.ts and timestamp_origin(t0.ts) == restamp_slot
            await t1.commit()
            await t0.commit()
            await t2.commit()
            await t3.put_many({"us-east/k": b"t3", "us-east/j": b"t3"})
            assert await t3.commit() == t3.ts
            at_t0 = [await c.get(k, at_ts=t0.ts) for k in ("us-east/k", "us-east/j")]
            assert at_t0 == [b"t1", b"t0"]
            assert await c.read_many(["us-east/k", "us-east/j"]) == [b"t3", b"t3"]
            leader = nodes["us-east-1"].leaders[cfg.shard_for_key(b"us-east/k").id]
            assert (leader.counters.restamps, leader.counters.aborts) == (3, 0)

    run(body)


def test_late_stamping_orders_a_transaction_by_its_first_operation(tmp_path: Path) -> None:
    """The read-mark case above, with late stamping on: t1 is stamped when its write is
    dispatched, after t2's read, so the write lands above the read mark."""

    async def body() -> None:
        async with cluster(tmp_path, replace(FAST, late_stamping=True)) as (cfg, nodes, c):
            t1 = await c.begin()
            t2 = await c.begin()
            assert await t2.get("us-east/k") is None
            await t1.put("us-east/k", b"late")
            assert t1.ts > t2.ts
            await t1.commit()
            await t2.commit()
            assert await c.get("us-east/k") == b"late"

    run(body)


def test_write_under_a_newer_committed_version_aborts(tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster(tmp_path) as (cfg, nodes, c):
            t1 = await c.begin()
            t2 = await c.begin()
            assert await t1.get("eu-west/other") is None  # not its first request: no restamp
            await t2.put("eu-west/k", b"t2")
            await t2.commit()
            with pytest.raises(TxnAborted) as e:
                await t1.put("eu-west/k", b"t1")
            assert e.value.rule == "newer-version"

    run(body)


def test_write_meeting_a_higher_intent_aborts(tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster(tmp_path) as (cfg, nodes, c):
            t1 = await c.begin()
            t2 = await c.begin()
            await t2.put("eu-west/k", b"t2")
            with pytest.raises(TxnAborted) as e:
                await t1.put("eu-west/k", b"t1")
            assert e.value.rule == "intent-higher"
            await t2.commit()
            assert await c.get("eu-west/k") == b"t2"

    run(body)


@pytest.mark.parametrize("outcome", ["commit", "abort"])
def test_reader_waits_for_a_lower_intent_then_sees_its_outcome(
    tmp_path: Path, outcome: str
) -> None:
    async def body() -> None:
        async with cluster(tmp_path) as (cfg, nodes, c):
            await c.put("us-east/k", b"before")
            t1 = await c.begin()
            t2 = await c.begin()
            await t1.put("us-east/k", b"t1")
            read = asyncio.ensure_future(t2.get("us-east/k"))
            await asyncio.sleep(0.01)
            assert not read.done()  # waiting on t1's intent (lower timestamp), not aborted
            if outcome == "commit":
                await t1.commit()
            else:
                await t1.abort()
            assert await read == (b"t1" if outcome == "commit" else b"before")
            await t2.commit()

    run(body)


def test_without_the_wait_rule_any_intent_aborts(tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster(tmp_path, replace(FAST, wait_for_lower=False)) as (cfg, nodes, c):
            t1 = await c.begin()
            t2 = await c.begin()
            await t1.put("us-east/k", b"t1")
            with pytest.raises(TxnAborted) as e:
                await t2.get("us-east/k")
            assert e.value.rule == "intent"

    run(body)


def test_an_abandoned_transaction_is_aborted_after_its_heartbeat_expires(tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster(tmp_path) as (cfg, nodes, c):
            await c.put("eu-west/k", b"before")
            t1 = await c.begin()
            await t1.put("eu-west/k", b"orphan")
            # The coordinator "dies": it forgets the transaction and stops heartbeating it.
            coord = nodes[t1.coordinator].service.coordinator  # type: ignore[union-attr]
            state = coord.txns.pop(t1.txn_id)
            assert state.heartbeat is not None
            state.heartbeat.cancel()
            t2 = await c.begin()
            assert await t2.get("eu-west/k") == b"before"  # waited, pushed, aborted the orphan
            await t2.commit()
            with pytest.raises(TxnAborted):
                await t1.commit()

    run(body)


def test_bare_with_block_says_how_to_retry(tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster(tmp_path) as (cfg, nodes, c):
            with pytest.raises(TransactionRetry, match=r"client\.run") as e:
                async with c.transaction() as t1:
                    assert await t1.get("us-east/other") is None  # no restamp from here on
                    t3 = await c.begin()  # newer than t1
                    await t3.put("us-east/k", b"t3")
                    await t3.commit()
                    await t1.put("us-east/k", b"t1")  # under a newer committed version
            assert e.value.rule == "newer-version" and e.value.retryable
            assert await c.get("us-east/k") == b"t3"

    run(body)


def test_read_only_transactions_refuse_writes(tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster(tmp_path) as (cfg, nodes, c):
            tx = await c.begin(read_only=True)
            with pytest.raises(InvalidArgument, match="read-only"):
                await tx.put("us-east/k", b"v")
            await tx.abort()

    run(body)


PROTOCOLS = ["k2-mvto", "d2pl-ttc", "mvto-hlc"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_concurrent_increments_are_serializable(tmp_path: Path, protocol: str) -> None:
    async def body() -> None:
        async with cluster(tmp_path, replace(FAST, protocol=protocol)) as (cfg, nodes, c):
            clients = [AsyncClient(cfg, region=r, timeout_s=5, retry=c.retry) for r in REGIONS]

            async def incr(tx: AsyncTransaction) -> None:
                v = await tx.get("eu-west/counter")
                await tx.put("eu-west/counter", str(int(v or b"0") + 1).encode())

            await asyncio.gather(*(clients[i % 3].run(incr, max_attempts=100) for i in range(24)))
            assert await c.get("eu-west/counter") == b"24"
            for cl in clients:
                await cl.close()

    run(body)


@pytest.mark.parametrize(
    ("protocol", "seed"), [(p, s) for p in PROTOCOLS for s in (1, 2)] + [("k2-mvto", 3)]
)
def test_random_transactions_equal_a_replay_in_timestamp_order(
    tmp_path: Path, protocol: str, seed: int
) -> None:
    """Every committed transaction's reads equal what a serial replay in commit-timestamp order
    gives (for the MVTO protocols the commit timestamp is the start timestamp)."""
    rng = random.Random(seed)
    keys = [f"{r}/k{i}" for r in REGIONS for i in range(3)]
    committed: list[tuple[int, dict[str, bytes | None], dict[str, bytes]]] = []

    async def body() -> None:
        async with cluster(tmp_path, replace(FAST, protocol=protocol)) as (cfg, nodes, c):
            clients = [AsyncClient(cfg, region=r, timeout_s=5, retry=c.retry) for r in REGIONS]

            async def worker(w: int) -> None:
                for j in range(6):
                    reads_keys = rng.sample(keys, 2)
                    write_keys = rng.sample(keys, rng.randint(0, 2))
                    value = f"w{w}-{j}".encode()
                    seen: dict[str, bytes | None] = {}

                    async def fn(tx: AsyncTransaction) -> None:
                        seen.clear()
                        vals = await tx.get_many(list(reads_keys))
                        seen.update(zip(reads_keys, vals, strict=True))
                        if write_keys:
                            await tx.put_many({k: value for k in write_keys})

                    tx_holder: list[AsyncTransaction] = []

                    async def tracked(tx: AsyncTransaction) -> None:
                        tx_holder.append(tx)
                        await fn(tx)

                    try:
                        await clients[w % 3].run(tracked, read_only=not write_keys, max_attempts=50)
                    except TxnAborted:
                        continue
                    commit_ts = tx_holder[-1].commit_ts
                    assert commit_ts is not None
                    committed.append((commit_ts, dict(seen), {k: value for k in write_keys}))

            await asyncio.gather(*(worker(w) for w in range(6)))
            for cl in clients:
                await cl.close()

    run(body)
    assert len(committed) >= 30
    state: dict[str, bytes | None] = {}
    for ts, reads, writes in sorted(committed, key=lambda t: t[0]):
        for k, v in reads.items():
            assert state.get(k) == v, f"txn at {ts} read {k}={v!r}, replay says {state.get(k)!r}"
        state.update(writes)


@pytest.mark.parametrize("restamp", [True, False])
def test_mvto_hlc_restarts_reads_within_the_uncertainty_window(
    tmp_path: Path, restamp: bool
) -> None:
    """us-east's clock runs 300 us ahead, eu-west's 300 us behind (each within the 400 us bound):
    a read that begins at eu-west after a write at us-east finished gets a LOWER HLC timestamp.
    Without the uncertainty restart it would return the old value. The restart is made by the
    leader (a restamp) when the read is the transaction's first request, else by the client."""
    from truetime import SkewedClock

    cfg = make_cluster(tmp_path, replace(FAST, protocol="mvto-hlc", restamp=restamp))
    base = ManualClock()
    skew = {"us-east-1": 300_000, "eu-west-1": -300_000, "ap-southeast-1": 0}

    async def body() -> None:
        nodes = {
            n.name: Node(cfg, n.name, clock=SkewedClock(base, skew[n.name])) for n in cfg.nodes
        }
        for node in nodes.values():
            await node.start()
        c = AsyncClient(
            cfg, timeout_s=5, retry=RetryPolicy(max_attempts=5, initial_backoff_s=0.001)
        )
        try:
            base.advance(5_000_000)  # past the read floor every node set when it started
            await c.put("us-east/k", b"old", via="us-east-1")
            base.advance(5_000_000)
            w = await c.put("us-east/k", b"new", via="us-east-1")
            r = await c.get_versioned("us-east/k", via="eu-west-1")
            assert r.value == b"new" and r.version_ts == w.commit_ts
            participant = nodes["us-east-1"].service.participant  # type: ignore[union-attr]
            restarts = {
                k: participant.counters.get(f"{k}:uncertainty", 0) for k in ("abort", "restamp")
            }
            if restamp:
                assert restarts["restamp"] >= 1 and restarts["abort"] == 0
            else:
                assert restarts["abort"] >= 1 and restarts["restamp"] == 0
        finally:
            await c.close()
            for node in nodes.values():
                await node.stop(grace_s=0)

    run(body)


def test_future_timestamp_for_transactions_that_reach_a_far_region(tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster(tmp_path) as (cfg, nodes, c):
            coord_node = nodes["us-east-1"]
            coord = coord_node.service.coordinator  # type: ignore[union-attr]
            coord._rtt_ns["ap-southeast-1"] = 210_000_000  # as measured over the default link
            local = await c.begin(keys=["us-east/a"])
            assert not coord.txns[local.txn_id].aligned
            now = coord_node.tt.now().latest
            far = await c.begin(keys=["us-east/a", "ap-southeast/b"])
            assert far.ts >= now + 105_000_000  # the one-way delay to ap-southeast
            far2 = await c.begin(keys=["ap-southeast/c"])
            assert far2.ts > far.ts and far2.ts % 4096 == far.ts % 4096 != local.ts % 4096
            await far.put_many({"us-east/a": b"1", "ap-southeast/b": b"2"})
            await far.commit()
            assert coord_node.tt.after(far.ts)  # commit-wait covered the future timestamp
            assert await c.get("ap-southeast/b") == b"2"
            await far2.abort()
            await local.abort()

    run(body)


def test_round_trips_learned_for_future_timestamps_leave_out_a_leaders_wait(
    tmp_path: Path,
) -> None:
    """A read that waits at a far leader for a lower intent says how long it was held there
    (`held_ns`), and the coordinator's round trip to that leader leaves the wait out: otherwise
    a hot key's line would pass for distance and push future timestamps far ahead."""

    async def body() -> None:
        async with cluster(tmp_path) as (cfg, nodes, c):
            coord = nodes["us-east-1"].service.coordinator  # type: ignore[union-attr]
            participant = nodes["eu-west-1"].service.participant  # type: ignore[union-attr]
            held: list[int] = []
            arrived = asyncio.Event()
            orig_exec = participant.exec

            async def exec_(req: pb.ExecRequest) -> pb.ExecResponse:
                arrived.set()
                resp = await orig_exec(req)
                held.append(resp.held_ns)
                return resp

            participant.exec = exec_  # type: ignore[method-assign]
            t1 = await c.begin()
            t2 = await c.begin()
            await t1.put("eu-west/k", b"t1")
            arrived.clear()
            coord._rtt_ns.clear()
            read = asyncio.ensure_future(t2.get("eu-west/k"))
            # Held from its arrival at the leader (on a loaded machine the request itself can
            # take a while to get there, which the held time must not include).
            await asyncio.wait_for(arrived.wait(), 10)
            await asyncio.sleep(0.2)
            assert not read.done()  # waiting on t1's intent at eu-west-1
            await t1.commit()
            assert await read == b"t1"
            await t2.commit()
            assert max(held) >= 150_000_000  # the read's request, held while t1 was open
            assert coord._rtt_ns["eu-west-1"] < 100_000_000  # the wire alone (loopback)

    run(body)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_one_shot_read_only_transactions_read_a_snapshot_in_one_round_trip(
    tmp_path: Path, protocol: str
) -> None:
    """`read_many` is begin, read and commit at the coordinator in one call: it sees every
    committed write, waits on a lower intent like any reader, and leaves nothing open."""

    async def body() -> None:
        async with cluster(tmp_path, replace(FAST, protocol=protocol)) as (cfg, nodes, c):
            await c.run(lambda tx: tx.put_many({"us-east/a": b"1", "eu-west/b": b"2"}))
            with mock.patch.object(c, "_call", wraps=c._call) as calls:
                assert await c.read_many(["us-east/a", "eu-west/b", "us-east/none"]) == [
                    b"1",
                    b"2",
                    None,
                ]
            assert [call.args[1] for call in calls.call_args_list] == ["BeginTxn"]
            assert await c.read_many([]) == []
            # A lower intent: the one-shot read waits for its outcome and then sees it.
            t1 = await c.begin()
            await t1.put("us-east/a", b"t1")
            read = asyncio.ensure_future(c.read_many(["us-east/a"]))
            await asyncio.sleep(0.05)
            if protocol != "d2pl-ttc":
                assert not read.done()
            await t1.commit()
            got = await read
            assert got == [b"t1"] if protocol != "d2pl-ttc" else got in ([b"t1"], [b"1"])
            assert await c.read_many(["us-east/a"]) == [b"t1"]
            for node in nodes.values():  # nothing left open at any coordinator
                assert node.service is not None and not node.service.coordinator.txns
            with pytest.raises(InvalidArgument, match="one-shot"):
                await c._call(
                    cfg.nodes[0].name,
                    "BeginTxn",
                    pb.BeginTxnRequest(read_only=False, read_keys=[b"us-east/a"]),
                    pb.BeginTxnResponse,
                )

    run(body)


# -- writes held for the commit (TxnSettings.commit_with_writes) ------------------------------

HELD = replace(FAST, commit_with_writes=True)


def _intents(nodes: dict[str, Node]) -> dict[bytes, bytes]:
    """Every intent in the cluster: key -> the transaction holding it."""
    return {
        key: intent.txn_id
        for n in nodes.values()
        for ld in n.leaders.values()
        for key, intent in ld.store.scan_intents(b"", None)
    }


def test_held_writes_go_with_the_commit_and_the_record_shard_resolves_its_own(
    tmp_path: Path,
) -> None:
    """A put sends nothing; the commit sends every shard's writes but the record's first, then
    the record's with the commit: that shard records it and resolves its intents at once (no
    Resolve from the coordinator needed), and the other shard's intent points at that record."""

    # The intent sweep (every expiry_s of real time) would resolve the other shard's intent
    # from the record on a slow machine before the test looks: keep it out of the way.
    no_sweep = replace(HELD, expiry_s=60.0)

    async def body() -> None:
        async with cluster(tmp_path, no_sweep) as (cfg, nodes, c):
            tx = await c.begin()
            coord = nodes[tx.coordinator].service.coordinator  # type: ignore[union-attr]
            assert await tx.get_many(["us-east/a", "eu-west/b"], for_update=True) == [None, None]
            with mock.patch.object(coord, "call", wraps=coord.call) as calls:
                await tx.put_many({"us-east/a": b"1", "eu-west/b": b"2"})
                assert calls.call_count == 0 and not _intents(nodes)
                # The coordinator's Resolve never goes out: only the commit itself resolves.
                with mock.patch.object(coord, "_resolve_all", mock.AsyncMock()) as resolve:
                    ts = await tx.commit()
                resolve.assert_awaited_once()
            execs = [call.args[2] for call in calls.call_args_list if call.args[1].endswith("Exec")]
            assert [e.commit for e in execs] == [False, True]
            assert not any(call.args[1].endswith("EndTxn") for call in calls.call_args_list)
            values = {b"us-east/a": b"1", b"eu-west/b": b"2"}
            decider = execs[1].ops[0].key
            (other,) = set(values) - {decider}
            assert _intents(nodes) == {other: tx.txn_id}  # not resolved: no Resolve was sent
            assert execs[1].txn.record_key == decider
            r = await c.get_versioned(decider.decode())
            assert (r.value, r.version_ts) == (values[decider], ts)
            # A reader of the other key asks the record on the decider's shard: committed.
            r = await c.get_versioned(other.decode())
            assert (r.value, r.version_ts) == (values[other], ts)
            # The coordinator's resolution, run now, skips the shard that resolved itself.
            with mock.patch.object(coord, "call", wraps=coord.call) as calls:
                await Coordinator._resolve_all(coord, *resolve.await_args.args)
            sent = [(call.args[1].rsplit("/", 1)[1], call.args[2]) for call in calls.call_args_list]
            assert [(m, list(r.keys)) for m, r in sent if m == "Resolve"] == [("Resolve", [other])]
            assert [m for m, _ in sent] == ["Resolve", "ForgetTxn"]

    run(body)


def test_held_writes_are_read_back_and_refused_early_on_bad_input(tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster(tmp_path, HELD) as (cfg, nodes, c):
            tx = await c.begin()
            await tx.put("us-east/a", b"1")
            await tx.delete("eu-west/b")
            with pytest.raises(InvalidArgument, match="exceeds the limit"):
                await tx.put("us-east/big", b"x" * (cfg.settings.max_value_bytes + 1))
            # A read sends the held writes first, and sees them.
            assert await tx.get_many(["eu-west/b", "us-east/a", "us-east/c"]) == [None, b"1", None]
            assert set(_intents(nodes)) == {b"us-east/a", b"eu-west/b"}
            await tx.put("us-east/c", b"3")
            await tx.commit()
            assert await c.read_many(["us-east/a", "us-east/c", "eu-west/b"]) == [b"1", b"3", None]

    run(body)


def test_a_held_write_under_a_later_read_aborts_at_commit_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        async with cluster(tmp_path, HELD) as (cfg, nodes, c):
            await c.run(lambda tx: tx.put_many({"us-east/k": b"old", "eu-west/j": b"old"}))
            t1 = await c.begin()
            t2 = await c.begin()
            assert t1.ts < t2.ts
            assert await t1.get("eu-west/j") == b"old"  # t1 is known on eu-west's shard
            assert await t2.get("us-east/k") == b"old"
            await t1.put_many({"us-east/k": b"late", "eu-west/j": b"late"})  # held: no error yet
            with pytest.raises(TxnAborted) as e:
                await t1.commit()
            assert e.value.rule == "read-mark" and "us-east/k" in str(e.value)
            await t2.commit()
            assert await c.read_many(["us-east/k", "eu-west/j"]) == [b"old", b"old"]
            for _ in range(100):  # the abort's resolution is asynchronous
                if not _intents(nodes):
                    break
                await asyncio.sleep(0.01)
            assert not _intents(nodes)

    run(body)


def test_a_commit_with_writes_loses_to_a_record_a_waiter_aborted(tmp_path: Path) -> None:
    """The record's shard finds the record already aborted (a waiter pushed the transaction
    after its heartbeat expired): it drops the writes it just laid and the commit fails."""

    async def body() -> None:
        async with cluster(tmp_path, HELD) as (cfg, nodes, c):
            tx = await c.begin()
            assert await tx.get("us-east/a") is None  # one shard: it holds the record
            await tx.put("us-east/a", b"1")
            shard = cfg.shard_for_key(b"us-east/a")
            node = nodes[shard.leader]
            part = node.service.participant  # type: ignore[union-attr]
            part._put_record(
                node.leaders[shard.id], TxnRecord(tx.txn_id, TxnStatus.ABORTED, tx.ts, 0)
            )
            with pytest.raises(TxnAborted) as e:
                await tx.commit()
            assert e.value.rule == "record-aborted"
            assert not _intents(nodes)
            assert await c.get("us-east/a") is None

    run(body)


def test_commit_with_writes_is_refused_where_it_cannot_decide(tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster(tmp_path, HELD) as (cfg, nodes, c):
            shard = cfg.shard_for_key(b"us-east/a")
            header = pb.TxnHeader(txn_id=b"t" * 16, ts=1, record_key=b"eu-west/r")
            put = pb.TxnOp(kind=pb.OP_PUT, key=b"us-east/a", value=b"1")
            for req in (
                pb.ExecRequest(txn=header, shard_id=shard.id, ops=[put], commit=True),
                pb.ExecRequest(
                    txn=pb.TxnHeader(txn_id=b"t" * 16, ts=1, record_key=b"us-east/a"),
                    shard_id=shard.id,
                    ops=[pb.TxnOp(kind=pb.OP_GET, key=b"us-east/a")],
                    commit=True,
                ),
            ):
                with pytest.raises(InvalidArgument, match="commit with writes"):
                    await nodes[shard.leader].service.participant.exec(req)  # type: ignore[union-attr]
            assert not _intents(nodes)

    run(body)


def test_a_commit_runs_to_its_end_when_the_client_stops_waiting(tmp_path: Path) -> None:
    """The client's commit call is cancelled (its deadline passed) while the writes are on
    their way: the coordinator still finishes the commit, instead of leaving the transaction
    open with its intents laid until the silent-client reaper aborts it."""

    async def body() -> None:
        async with cluster(tmp_path, HELD) as (cfg, nodes, c):
            tx = await c.begin()
            coord = nodes[tx.coordinator].service.coordinator  # type: ignore[union-attr]
            assert await tx.get_many(["us-east/a", "eu-west/b"]) == [None, None]
            await tx.put_many({"us-east/a": b"1", "eu-west/b": b"2"})
            entered, release = asyncio.Event(), asyncio.Event()
            real_exec = coord._exec

            async def held_exec(*args: Any, commit: bool = False, **kw: Any) -> pb.ExecResponse:
                if commit:
                    entered.set()
                    await release.wait()
                return await real_exec(*args, commit=commit, **kw)

            with mock.patch.object(coord, "_exec", held_exec):
                call = asyncio.ensure_future(coord.commit(pb.CommitTxnRequest(txn_id=tx.txn_id)))
                await entered.wait()  # the first shard's write is laid; the last is held
                call.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await call
                release.set()
                while coord._background:  # the commit, then the Resolve it spawns
                    await asyncio.wait(set(coord._background))
            assert tx.txn_id not in coord.txns
            assert await c.read_many(["us-east/a", "eu-west/b"]) == [b"1", b"2"]
            assert not _intents(nodes)

    run(body)


# -- inline begin ---------------------------------------------------------------------------------


def _methods(calls: mock.MagicMock) -> list[str]:
    """The methods sent through a client's `_call` spied on with mock.patch.object(wraps=)."""
    return [call.args[1] for call in calls.call_args_list]


def test_run_begins_with_the_first_operation_in_its_round_trip(tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster(tmp_path) as (cfg, nodes, c):
            await c.put("us-east/a", b"0")

            async def fn(tx: AsyncTransaction) -> tuple[list[bytes | None], int, bytes]:
                assert (tx.ts, tx.txn_id) == (0, b"")  # nothing sent yet
                values = await tx.batch(["us-east/a"], {"us-east/b": b"1", "eu-west/c": b"2"})
                return values, tx.ts, tx.txn_id

            with mock.patch.object(c, "_call", wraps=c._call) as calls:
                values, ts, txn_id = await c.run(fn)
            assert _methods(calls) == ["TxnOps", "CommitTxn"]  # no BeginTxn round trip
            assert values == [b"0"] and ts > 0 and len(txn_id) == 16
            for k, v in [("us-east/b", b"1"), ("eu-west/c", b"2")]:
                r = await c.get_versioned(k)
                assert (r.value, r.version_ts) == (v, ts)
            assert not any(n.service.coordinator.txns for n in nodes.values())  # type: ignore[union-attr]

    run(body)


def test_first_operations_sent_together_begin_one_transaction(tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster(tmp_path) as (cfg, nodes, c):
            await c.put("us-east/a", b"A")
            await c.put("eu-west/b", b"B")
            tx = await c.begin(inline=True)
            a, b, _ = await asyncio.gather(
                tx.get("us-east/a"), tx.get("eu-west/b"), tx.put("ap-southeast/c", b"C")
            )
            coord = nodes[tx.coordinator].service.coordinator  # type: ignore[union-attr]
            assert (a, b) == (b"A", b"B") and list(coord.txns) == [tx.txn_id]
            ts = await tx.commit()
            assert (await c.get_versioned("ap-southeast/c")).version_ts == ts

    run(body)


def test_a_refused_first_operation_leaves_nothing_open_and_the_next_one_begins(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        async with cluster(tmp_path) as (cfg, nodes, c):
            tx = await c.begin(inline=True)
            coord = nodes[tx.coordinator].service.coordinator  # type: ignore[union-attr]
            with pytest.raises(InvalidArgument):
                await tx.put("us-east/" + "k" * 100_000, b"v")  # key over the limit
            assert not coord.txns and tx.txn_id == b""
            await tx.put("us-east/a", b"1")
            assert list(coord.txns) == [tx.txn_id]
            ts = await tx.commit()
            assert (await c.get_versioned("us-east/a")).version_ts == ts

    run(body)


def test_an_inline_transaction_without_operations_commits_or_aborts(tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster(tmp_path) as (cfg, nodes, c):
            with mock.patch.object(c, "_call", wraps=c._call) as calls:
                tx = await c.begin(inline=True)
                await tx.abort()  # never begun: nothing to send
                assert _methods(calls) == []
                tx = await c.begin(inline=True)
                ts = await tx.commit()
            assert _methods(calls) == ["BeginTxn", "CommitTxn"] and ts == tx.ts > 0

    run(body)


def test_txn_ops_refuses_to_both_name_and_begin_a_transaction(tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster(tmp_path) as (cfg, nodes, c):
            tx = await c.begin()
            op = pb.TxnOp(kind=pb.OP_GET, key=b"us-east/a")
            for req in (
                pb.TxnOpsRequest(txn_id=tx.txn_id, ops=[op], begin=pb.BeginTxnRequest()),
                pb.TxnOpsRequest(ops=[op], begin=pb.BeginTxnRequest(read_keys=[b"us-east/a"])),
            ):
                with pytest.raises(InvalidArgument):
                    await c._call(tx.coordinator, "TxnOps", req, pb.TxnOpsResponse)
            coord = nodes[tx.coordinator].service.coordinator  # type: ignore[union-attr]
            assert list(coord.txns) == [tx.txn_id]
            await tx.abort()

    run(body)


# -- commit in the last operations' round trip ----------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_batch_with_commit_is_the_whole_transaction_in_one_round_trip(
    tmp_path: Path, protocol: str
) -> None:
    async def body() -> None:
        async with cluster(tmp_path, replace(FAST, protocol=protocol)) as (cfg, nodes, c):
            await c.put("us-east/a", b"0")

            async def fn(tx: AsyncTransaction) -> tuple[list[bytes | None], int]:
                values = await tx.batch(
                    ["us-east/a"], {"us-east/b": b"1", "eu-west/c": b"2"}, commit=True
                )
                assert tx.commit_ts is not None
                with pytest.raises(InvalidArgument):  # it has ended
                    await tx.get("us-east/a")
                return values, tx.commit_ts

            with mock.patch.object(c, "_call", wraps=c._call) as calls:
                values, ts = await c.run(fn)
            assert _methods(calls) == ["TxnOps"]  # begin, the batch and the commit: one call
            assert values == [b"0"]
            for k, v in [("us-east/b", b"1"), ("eu-west/c", b"2")]:
                r = await c.get_versioned(k)
                assert (r.value, r.version_ts) == (v, ts)
            assert not any(n.service.coordinator.txns for n in nodes.values())  # type: ignore[union-attr]

    run(body)


def test_held_writes_sent_with_commit_go_out_once(tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster(tmp_path, replace(FAST, commit_with_writes=True)) as (cfg, nodes, c):
            await c.put("eu-west/k", b"1")

            async def rmw(tx: AsyncTransaction) -> int:
                (v,) = await tx.get_many(["eu-west/k"], for_update=True)
                assert v is not None
                await tx.put_many({"eu-west/k": bytes([v[0] + 1])}, commit=True)
                return await tx.commit()  # no call: already committed

            with mock.patch.object(c, "_call", wraps=c._call) as calls:
                ts = await c.run(rmw)
            assert _methods(calls) == ["TxnOps", "TxnOps"]
            r = await c.get_versioned("eu-west/k")
            assert (r.value, r.version_ts) == (b"2", ts)

    run(body)


def test_an_op_that_fails_before_a_same_request_commit_is_an_abort_and_run_retries(
    tmp_path: Path,
) -> None:
    """A leader that cannot be reached during the ops of a request that also commits: the
    coordinator aborts (nothing was decided), so the client may retry; no outcome is unknown."""

    async def body() -> None:
        async with cluster(tmp_path) as (cfg, nodes, c):
            coord = nodes["us-east-1"].service.coordinator  # type: ignore[union-attr]
            real = coord._run_ops
            failures = [Unavailable("eu-west-1 is unreachable")]

            async def flaky(txn: Any, ops: Any) -> Any:
                if failures:
                    raise failures.pop()
                return await real(txn, ops)

            coord._run_ops = flaky  # type: ignore[method-assign]
            rules: list[str] = []

            async def fn(tx: AsyncTransaction) -> None:
                try:
                    await tx.batch([], {"eu-west/x": b"1"}, commit=True)
                except TxnAborted as e:
                    rules.append(e.rule)
                    raise

            await c.run(fn)
            assert rules == ["op-failed"] and c.retries == 1
            assert await c.get("eu-west/x") == b"1" and not coord.txns

    run(body)


def test_a_commit_that_fails_in_the_same_request_is_an_unknown_outcome_not_retried(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        async with cluster(tmp_path) as (cfg, nodes, c):
            coord = nodes["us-east-1"].service.coordinator  # type: ignore[union-attr]

            async def lost(txn: Any) -> Any:
                raise Unavailable("the record's leader did not answer")

            coord._record_commit = lost  # type: ignore[method-assign]
            calls = 0

            async def fn(tx: AsyncTransaction) -> None:
                nonlocal calls
                calls += 1
                await tx.batch([], {"us-east/x": b"1"}, commit=True)

            with pytest.raises(CommitOutcomeUnknown):
                await c.run(fn)
            assert calls == 1 and c.retries == 0

    run(body)


def test_a_lost_reply_to_a_request_with_commit_is_an_unknown_outcome(tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster(tmp_path) as (cfg, nodes, c):
            real = c._call

            async def reply_lost(node: str, method: str, *a: Any, **kw: Any) -> Any:
                r = await real(node, method, *a, **kw)
                if method == "TxnOps":
                    raise DeadlineExceeded("the reply was lost")
                return r

            c._call = reply_lost  # type: ignore[method-assign]
            with pytest.raises(CommitOutcomeUnknown):
                await c.run(lambda tx: tx.batch([], {"us-east/x": b"1"}, commit=True))
            assert c.retries == 0
            c._call = real  # type: ignore[method-assign]
            assert await c.get("us-east/x") == b"1"  # it had committed

    run(body)


def test_the_sync_client_runs_the_readme_transfer_in_two_calls(tmp_path: Path) -> None:
    """README's transfer: reads for update (which begin it), then writes with the commit."""

    async def body() -> None:
        async with cluster(tmp_path) as (cfg, nodes, c):
            await c.put("us-east/acct/1", b"10")
            await c.put("eu-west/acct/2", b"20")
            keys = ["us-east/acct/1", "eu-west/acct/2"]

            def transfer(tx: Transaction) -> None:
                a, b = tx.get_many(list(keys), for_update=True)
                assert a is not None and b is not None
                tx.put_many(
                    {keys[0]: str(int(a) - 5).encode(), keys[1]: str(int(b) + 5).encode()},
                    commit=True,
                )

            def sync() -> list[str]:
                with (
                    Client(cfg, timeout_s=5) as s,
                    mock.patch.object(s._async, "_call", wraps=s._async._call) as calls,
                ):
                    s.run(transfer, keys=keys)
                    return _methods(calls)

            assert await asyncio.to_thread(sync) == ["TxnOps", "TxnOps"]
            assert [await c.get(k) for k in keys] == [b"5", b"25"]

    run(body)
