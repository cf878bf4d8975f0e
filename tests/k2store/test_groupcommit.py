"""Group commit (k2store/groupcommit.py): one write-ahead-log sync per round for every engine
written since the last, and nothing leaves a node before the writes made before it are durable.

The unit tests drive `GroupCommit` with fake engines whose syncs the test holds and releases
(threading events: the syncs run on the group's own thread); the node tests check the rule on a
real node process's RocksDB engines in this process."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.message import Message

from k2store.client import AsyncClient, RetryPolicy
from k2store.cluster import ClusterSettings, local_cluster
from k2store.cluster import load as load_cluster
from k2store.errors import ClusterFileError
from k2store.groupcommit import DurableTransport, GroupCommit
from k2store.launcher import free_ports
from k2store.node import Node
from k2store.proto import k2_pb2 as pb
from k2store.rocksengine import RocksEngine
from truetime import ManualClock
from txn.storage import StorageError


class FakeEngine:
    """Counts its syncs; each sync waits for `release` (set: syncs pass at once)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.syncs = 0
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()
        self.fail: Exception | None = None

    def sync_wal(self) -> None:
        self.entered.set()
        assert self.release.wait(10), "the test never released the sync"
        if self.fail is not None:
            raise self.fail
        self.syncs += 1


def run(body: Any) -> None:
    asyncio.run(body())


async def until(cond: Any) -> None:
    """Let the loop turn until cond() holds (bounded)."""
    for _ in range(10_000):
        if cond():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition never held")


def test_nothing_written_means_no_round() -> None:
    async def body() -> None:
        g = GroupCommit()
        await g.barrier()
        assert (g.rounds, g.syncs) == (0, 0)
        g.close()

    run(body)


def test_writes_in_one_turn_share_one_sync_per_engine() -> None:
    """Three requests write to two engines in one turn of the loop, then wait: one round, one
    sync of each engine, and every waiter returns after it."""

    async def body() -> None:
        g = GroupCommit()
        a, b = FakeEngine("a"), FakeEngine("b")

        async def request(engine: FakeEngine) -> int:
            g.defer(engine)
            await g.barrier()
            return engine.syncs

        got = await asyncio.gather(request(a), request(b), request(a))
        assert got == [1, 1, 1]  # each saw its engine synced before it returned
        assert (g.deferred, g.rounds, g.syncs) == (3, 1, 2)
        g.close()

    run(body)


def test_a_barrier_waits_for_the_sync_of_what_was_written_before_it() -> None:
    """A write made while a round's sync runs is not in that round: its barrier waits for the
    next round, which starts when the running one ends. A barrier with nothing unsynced still
    waits for a running round (it may hold writes made before the call)."""

    async def body() -> None:
        g = GroupCommit()
        e = FakeEngine("e")
        e.release.clear()
        g.defer(e)
        first = asyncio.ensure_future(g.barrier())
        await until(e.entered.is_set)  # round 1 is syncing, held
        g.defer(e)  # written during round 1
        second = asyncio.ensure_future(g.barrier())
        third = asyncio.ensure_future(g.barrier())  # nothing new: still after round 2
        await asyncio.sleep(0)
        assert not first.done() and not second.done() and not third.done()
        e.entered.clear()
        e.release.set()
        await first
        assert e.syncs >= 1
        await second
        await third
        assert (e.syncs, g.rounds) == (2, 2)
        # Nothing unsynced, a round running: a barrier waits for that round.
        e.release.clear()
        e.entered.clear()
        g.defer(e)
        writer = asyncio.ensure_future(g.barrier())
        await until(e.entered.is_set)
        assert not g.dirty
        onlooker = asyncio.ensure_future(g.barrier())
        await asyncio.sleep(0)
        assert not onlooker.done()
        e.release.set()
        await asyncio.gather(writer, onlooker)
        assert e.syncs == 3
        g.close()

    run(body)


def test_a_failed_sync_fails_its_waiters_and_is_tried_again() -> None:
    async def body() -> None:
        g = GroupCommit()
        e = FakeEngine("e")
        e.fail = StorageError("disk on fire")
        g.defer(e)
        waiters = [asyncio.ensure_future(g.barrier()) for _ in range(2)]
        results = await asyncio.gather(*waiters, return_exceptions=True)
        assert all(isinstance(r, StorageError) for r in results)
        assert g.dirty  # still owed a sync
        e.fail = None
        await g.barrier()
        assert e.syncs == 1 and not g.dirty
        g.close()

    run(body)


def test_a_cancelled_waiter_does_not_cancel_the_round() -> None:
    async def body() -> None:
        g = GroupCommit()
        e = FakeEngine("e")
        e.release.clear()
        g.defer(e)
        quitter = asyncio.ensure_future(g.barrier())
        stayer = asyncio.ensure_future(g.barrier())
        await until(e.entered.is_set)
        quitter.cancel()
        e.release.set()
        await stayer
        assert e.syncs == 1 and quitter.cancelled()
        g.close()

    run(body)


class FakeTransport:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.synced_at_call: list[int] = []

    async def call(
        self,
        node: str,
        method: str,
        request: Message,
        response_type: type[Any],
        *,
        timeout_s: float,
    ) -> Any:
        self.synced_at_call.append(self.engine.syncs)
        return response_type()

    async def close(self) -> None:
        pass


def test_an_outgoing_call_leaves_after_the_writes_before_it_are_durable() -> None:
    async def body() -> None:
        g = GroupCommit()
        e = FakeEngine("e")
        inner = FakeTransport(e)
        t = DurableTransport(inner, g)
        await t.call("n", "/m", pb.StatusRequest(), pb.StatusResponse, timeout_s=1)
        g.defer(e)
        await t.call("n", "/m", pb.StatusRequest(), pb.StatusResponse, timeout_s=1)
        assert inner.synced_at_call == [0, 1]
        g.close()

    run(body)


# -- on a node ------------------------------------------------------------------------------------


class CountingEngine(RocksEngine):
    """A RocksEngine that appends "sync" to `log` after each write-ahead-log sync."""

    log: list[str]

    def sync_wal(self) -> None:
        super().sync_wal()
        self.log.append("sync")


def test_a_node_replies_to_a_write_only_after_its_sync(tmp_path: Path) -> None:
    """A put through a node: its engine writes without an fsync and the reply leaves after the
    group's round has synced it; the engines never sync per write. With group commit off
    (`[cluster] group_commit = false`) each write syncs itself and no round runs."""
    for on in (True, False):
        root = tmp_path / str(on)
        root.mkdir()
        settings = ClusterSettings(group_commit=on)
        cfg = local_cluster(["us-east"], free_ports(1), root=root, settings=settings).write(
            root / "cluster.toml"
        )
        assert load_cluster(root / "cluster.toml").settings.group_commit is on
        log: list[str] = []

        def engine(p: Any) -> RocksEngine:
            e = CountingEngine(p)
            e.log = log
            return e

        async def body() -> None:
            node = Node(cfg, cfg.nodes[0].name, clock=ManualClock(), engine_factory=engine)
            await node.start()
            client = AsyncClient(cfg, timeout_s=5, retry=RetryPolicy(max_attempts=2))
            try:
                for i in range(3):
                    log.append("put")
                    await client.put(b"k%d" % i, b"v")
                    log.append("replied")
                    # Every write before the reply was synced before it left.
                    assert log[-2] == ("sync" if on else "put"), log
            finally:
                await client.close()
                await node.stop(grace_s=0)
            if on:
                assert node.group is not None and node.group.rounds >= 3
                assert node.group.deferred >= 3
            else:
                assert node.group is None and "sync" not in log

        run(body)


def test_group_commit_setting_is_checked(tmp_path: Path) -> None:
    cfg = local_cluster(["us-east"], free_ports(1), root=tmp_path).write(tmp_path / "c.toml")
    text = (tmp_path / "c.toml").read_text()
    assert "group_commit = true" in text
    (tmp_path / "bad.toml").write_text(text.replace("group_commit = true", 'group_commit = "yes"'))
    with pytest.raises(ClusterFileError, match=r"cluster\.group_commit: expected true or false"):
        load_cluster(tmp_path / "bad.toml")
    assert cfg.settings.group_commit
