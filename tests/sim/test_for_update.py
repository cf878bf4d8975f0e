"""Reads for update (`get_many(keys, for_update=True)`) in the simulator: a cross-region
read-modify-write keeps its place in the key's line, so a later local transaction queues behind
it instead of reading the key under its coming write (which aborts it by rule read-mark without
the flag, or with `[txn] for_update = false`). The place goes when the write lands, when the
transaction ends, or after `for_update_hold_s`, whichever is first."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from k2store.client import AsyncClient, AsyncTransaction, RetryPolicy
from k2store.cluster import DEFAULT_REGIONS, ClusterSettings, TxnSettings, local_cluster
from k2store.errors import TxnAborted
from k2store.participant import FOR_UPDATE_MAX_LINE
from k2store.sim import SimCluster, run_simulation

KEY = "eu-west/hot"
ONCE = RetryPolicy(max_attempts=1)


def scenario(body: Any, *, protocol: str = "k2-mvto", **txn: Any) -> dict[str, Any]:
    """Run body(cluster, far, near, out) in a three-region simulated cluster where KEY (homed
    in eu-west) holds b"0"; far is a client in us-east, near one in eu-west."""
    base = ClusterSettings()
    settings = replace(
        base,
        txn=TxnSettings(protocol=protocol, **txn),
        network=replace(base.network, enabled=True),
    )
    cfg = local_cluster(
        DEFAULT_REGIONS, [1, 2, 3], root=Path("/nonexistent-sim"), settings=settings
    )
    out: dict[str, Any] = {}

    async def main() -> None:
        cluster = SimCluster(cfg, seed=3)
        far = cluster.txn_client("us-east", retry=ONCE)
        near = cluster.txn_client("eu-west", retry=ONCE)

        async def setup(tx: AsyncTransaction) -> None:
            await tx.put(KEY, b"0")

        await near.run(setup)
        await asyncio.sleep(1.0)
        assert await cluster.run([lambda: body(cluster, far, near, out)], 30.0)

    run_simulation(main, seed=3)
    return out


async def local_rmw(cluster: SimCluster, near: AsyncClient, out: dict[str, Any]) -> None:
    """A local read-modify-write of KEY, started 0.1 s in (after the far one read KEY)."""
    await asyncio.sleep(0.1)
    start = cluster.now_s

    async def bump(tx: AsyncTransaction) -> None:
        v = await tx.get(KEY, for_update=True)
        out["near_read"] = v
        out["near_read_after_s"] = cluster.now_s - start
        await tx.put(KEY, (v or b"") + b"+near")

    await near.run(bump, keys=[KEY])


def far_then_near(for_update: bool) -> Any:
    async def body(
        cluster: SimCluster, far: AsyncClient, near: AsyncClient, out: dict[str, Any]
    ) -> None:
        async def far_rmw() -> None:
            async def bump(tx: AsyncTransaction) -> None:
                (v,) = await tx.get_many([KEY], for_update=for_update)
                await asyncio.sleep(0.05)  # the client thinks a little before it writes
                await tx.put(KEY, (v or b"") + b"+far")

            try:
                await far.run(bump, keys=[KEY])
                out["far"] = "committed"
            except TxnAborted as e:
                out["far"] = e.rule

        await asyncio.gather(far_rmw(), local_rmw(cluster, near, out))

        async def final(tx: AsyncTransaction) -> bytes | None:
            return await tx.get(KEY)

        out["final"] = await near.run(final, read_only=True)

    return body


@pytest.mark.parametrize("protocol", ["k2-mvto", "mvto-hlc"])
def test_a_far_read_for_update_is_not_overtaken_by_a_local_reader(protocol: str) -> None:
    out = scenario(far_then_near(True), protocol=protocol)
    assert out["far"] == "committed"
    # The local transaction waited for the far write, read it, and wrote above it.
    assert out["near_read"] == b"0+far"
    assert out["final"] == b"0+far+near"
    # It waited for the far write to land (released then, not after the 1 s hold).
    assert 0.05 < out["near_read_after_s"] < 0.6


@pytest.mark.parametrize("flag,setting", [(False, True), (True, False)])
def test_without_the_flag_or_the_setting_the_far_write_aborts(flag: bool, setting: bool) -> None:
    out = scenario(far_then_near(flag), for_update=setting)
    assert out["far"] == "read-mark"  # the local reader read KEY under the far write
    assert out["near_read"] == b"0" and out["final"] == b"0+near"


def test_a_place_never_written_is_released_after_the_hold() -> None:
    async def body(
        cluster: SimCluster, far: AsyncClient, near: AsyncClient, out: dict[str, Any]
    ) -> None:
        async def stall() -> None:  # reads for update, then goes quiet for 5 s
            tx = await far.begin(keys=[KEY])
            await tx.get(KEY, for_update=True)
            await asyncio.sleep(5.0)
            await tx.abort()

        await asyncio.gather(stall(), local_rmw(cluster, near, out))

    out = scenario(body, for_update_hold_s=0.5)
    # It waited out the hold (0.5 s from the far read, ~0.04 s in), not the 5 s stall.
    assert 0.3 < out["near_read_after_s"] < 0.8
    assert out["near_read"] == b"0"


def test_a_place_goes_when_its_transaction_aborts() -> None:
    async def body(
        cluster: SimCluster, far: AsyncClient, near: AsyncClient, out: dict[str, Any]
    ) -> None:
        async def give_up() -> None:
            tx = await far.begin(keys=[KEY])
            await tx.get(KEY, for_update=True)
            await asyncio.sleep(0.3)
            await tx.abort()
            out["aborted_at_s"] = cluster.now_s

        await asyncio.gather(give_up(), local_rmw(cluster, near, out))

    out = scenario(body, for_update_hold_s=5.0)
    # Released by the abort's Resolve (~0.3 s in, plus the one-way delay), not the 5 s hold.
    assert 0.15 < out["near_read_after_s"] < 0.6
    assert out["near_read"] == b"0"


def test_for_update_flags_must_match_the_keys() -> None:
    async def body(
        cluster: SimCluster, far: AsyncClient, near: AsyncClient, out: dict[str, Any]
    ) -> None:
        tx = await near.begin()
        try:
            await tx.get_many([KEY, KEY], for_update=[True])
        except Exception as e:
            out["error"] = type(e).__name__
        await tx.abort()

    assert scenario(body)["error"] == "InvalidArgument"


def long_line(*, named_keys: list[str], first: str | None = None) -> dict[str, Any]:
    """FOR_UPDATE_MAX_LINE + 2 transactions in eu-west read KEY for update 10 ms apart and go
    quiet; each begins naming `named_keys` (and reads `first` before KEY). Counts the places
    taken and the reads refused on arrival (rule line-full)."""
    n = FOR_UPDATE_MAX_LINE + 2

    async def body(
        cluster: SimCluster, far: AsyncClient, near: AsyncClient, out: dict[str, Any]
    ) -> None:
        refused: list[str] = []

        async def stall(i: int) -> None:  # each reads for update, then goes quiet
            await asyncio.sleep(0.01 * i)
            tx = await near.begin(keys=named_keys)
            if first is not None:
                await tx.get(first)
            try:
                await tx.get(KEY, for_update=True)
            except TxnAborted as e:
                refused.append(e.rule)
                return
            await asyncio.sleep(2.0)
            await tx.abort()

        await asyncio.gather(*(stall(i) for i in range(n)))
        counters = [node.service.participant.counters for node in cluster.nodes.values()]
        out["places"] = sum(c.get("for-update-places", 0) for c in counters)
        out["refused"] = refused
        out["refusals counted"] = sum(c.get("abort:line-full", 0) for c in counters)

    out = scenario(body, for_update_hold_s=0.2)
    out["n"] = n
    return out


@pytest.mark.parametrize(
    ("named_keys", "first"),
    [([], None), ([KEY, "us-east/other"], None), ([KEY], "us-east/other")],
    ids=["keys-not-named", "names-a-us-east-key", "reads-a-us-east-key-it-did-not-name"],
)
def test_a_full_line_refuses_reads_for_update_that_may_wait_on_the_wide_area(
    named_keys: list[str], first: str | None
) -> None:
    """A read for update that arrives at a key whose line already holds FOR_UPDATE_MAX_LINE
    transactions, one of them below it, is refused at once (rule line-full, retryable)
    instead of joining a convoy; those admitted to the shorter line each take a place in
    turn. So for a transaction that may wait on the wide area: one that named a key of
    another region at begin, named none, or reached another region all the same."""
    out = long_line(named_keys=named_keys, first=first)
    # The first reader took a place and the next MAX - 1 queued behind it; the last two found
    # MAX in line and were refused. The queued ones took places as the holds ran out.
    assert out["refused"] == ["line-full"] * (out["n"] - FOR_UPDATE_MAX_LINE)
    assert out["refusals counted"] == len(out["refused"])
    assert out["places"] == FOR_UPDATE_MAX_LINE


def test_a_transaction_that_stays_in_its_region_is_not_refused_on_a_long_line() -> None:
    """Named at begin, every key in the coordinator's region: the leader admits the read for
    update and gives it its place however long the line (it writes within local round
    trips)."""
    out = long_line(named_keys=[KEY])
    assert out["refused"] == []
    assert out["places"] == out["n"]


def test_an_admitted_read_for_update_keeps_its_place_however_the_line_fills() -> None:
    """A far transaction admitted to a short line queues; by the time it reads, local
    transactions (never refused) have filled the line behind it. It still takes its place,
    so none of them reads the key under its coming write, which then lands."""

    async def body(
        cluster: SimCluster, far: AsyncClient, near: AsyncClient, out: dict[str, Any]
    ) -> None:
        async def holder() -> None:  # a local place held for 0.2 s (for_update_hold_s)
            tx = await near.begin(keys=[KEY])
            await tx.get(KEY, for_update=True)
            await asyncio.sleep(1.0)
            await tx.abort()

        async def far_rmw() -> None:
            await asyncio.sleep(0.01)

            async def rmw(tx: AsyncTransaction) -> None:
                (v,) = await tx.get_many([KEY], for_update=True)
                await tx.put(KEY, (v or b"") + b"f")

            await far.run(rmw, keys=[KEY])
            out["far committed"] = True

        async def local_rmw(i: int) -> None:
            await asyncio.sleep(0.15 + 0.001 * i)

            async def rmw(tx: AsyncTransaction) -> None:
                (v,) = await tx.get_many([KEY], for_update=True)
                await tx.put(KEY, (v or b"") + b"n")

            await near.run(rmw, keys=[KEY])

        await asyncio.gather(
            holder(), far_rmw(), *(local_rmw(i) for i in range(FOR_UPDATE_MAX_LINE + 1))
        )
        out["value"] = await near.read_many([KEY])

    out = scenario(body, for_update_hold_s=0.2)
    assert out["far committed"]
    # Every writer committed once, the far one first among them (it was below them in line).
    assert out["value"] == [b"0f" + b"n" * (FOR_UPDATE_MAX_LINE + 1)]


def doomed_read_for_update(for_update: bool) -> Any:
    """A transaction stamped, then its key read at a later timestamp by another, then its own
    read for update of that key: where does it fail?"""

    async def body(
        cluster: SimCluster, far: AsyncClient, near: AsyncClient, out: dict[str, Any]
    ) -> None:
        other = cluster.txn_client("eu-west", retry=ONCE)
        tx = await near.begin(keys=[KEY, "eu-west/cold"])
        await tx.get("eu-west/cold")  # stamped now (late stamping: at its first operation)
        await asyncio.sleep(0.01)

        async def later_read(rtx: AsyncTransaction) -> bytes | None:
            return await rtx.get(KEY)

        await other.run(later_read, read_only=True)  # marks KEY above tx's timestamp
        try:
            v = await tx.get(KEY, for_update=for_update)
        except TxnAborted as e:
            out["failed"] = ("read", e.rule)
            return
        try:
            await tx.put(KEY, (v or b"") + b"+late")
            await tx.commit()
            out["failed"] = None
        except TxnAborted as e:
            out["failed"] = ("commit", e.rule)

    return body


def test_a_read_for_update_whose_write_is_doomed_fails_at_once() -> None:
    """The key was read above the transaction's timestamp, so its write must abort by rule
    read-mark (marks only grow): the read for update fails then and there, instead of holding
    a place and leaving the transaction to wait and discover it at its commit."""
    assert scenario(doomed_read_for_update(True))["failed"] == ("read", "read-mark")
    # A plain read, or reads for update switched off, find out at the commit.
    assert scenario(doomed_read_for_update(False))["failed"] == ("commit", "read-mark")
    off = scenario(doomed_read_for_update(True), for_update=False)
    assert off["failed"] == ("commit", "read-mark")
