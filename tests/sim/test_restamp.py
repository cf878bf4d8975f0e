"""Restamps (`TxnSettings.restamp`): a leader that would abort a transaction's first request, when
that request goes to its shard alone, runs it again at a fresh timestamp above the conflict
instead, and the coordinator carries on at that timestamp.

What it must keep: serializability in commit-timestamp order (the request's reads are all made
again at the new timestamp, its old intents are gone, and the record, the resolution and the
reported commit timestamp are the new one). The workload here is one-shot read-modify-writes
of two hot keys from their own region and from across the wide area, and reads of one key with
writes of the other, so writers waiting in a key's line are overtaken by readers (rule
read-mark) all the time. The serial replay check is shown to catch a coordinator that ignores
the leader's new timestamp.
"""

from __future__ import annotations

import asyncio
import functools
import random
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
from k2store.coordinator import Coordinator
from k2store.errors import TxnAborted
from k2store.participant import Participant
from k2store.proto import k2_pb2 as pb
from k2store.sim import SimCluster, run_simulation
from tests.sim.test_sim_txn_property import Committed, check_serial_replay

HOT = ["us-east/hot/a", "us-east/hot/b"]
COLD = "eu-west/cold"


def _cluster(protocol: str, restamp: bool = True) -> ClusterConfig:
    st = replace(
        ClusterSettings(),
        txn=TxnSettings(protocol=protocol, restamp=restamp),
        replication=ReplicationSettings(enabled=True),
    )
    return local_cluster(DEFAULT_REGIONS, [1, 2, 3], root=Path("/nonexistent-sim"), settings=st)


def _run(cfg: ClusterConfig, seed: int) -> tuple[list[Committed], int, int]:
    """(committed transactions, restamps at the leaders, client-visible failed attempts)."""
    committed: list[Committed] = []
    failed = 0

    async def main() -> int:
        nonlocal failed
        cluster = SimCluster(cfg, seed=seed)
        retry = RetryPolicy(max_attempts=60, initial_backoff_s=0.002, max_backoff_s=0.1)
        regions = ["us-east"] * 8 + ["eu-west"] * 2 + ["ap-southeast"] * 2
        clients = [cluster.txn_client(r, retry=retry) for r in regions]

        async def client_run(c: int) -> None:
            nonlocal failed
            rng = random.Random(f"{seed}:{c}")
            for j in range(20):
                value = f"c{c}-t{j}".encode()
                shape = rng.randrange(4)
                if shape == 0:
                    reads, writes = list(HOT), dict.fromkeys(HOT, value)
                elif shape == 1:
                    reads, writes = [HOT[0]], {HOT[1]: value}
                elif shape == 2:
                    reads, writes = [HOT[1]], {HOT[0]: value}
                else:  # two shards: never restartable
                    reads, writes = [HOT[0], COLD], {COLD: value}
                seen: dict[str, bytes | None] = {}
                holder: list[AsyncTransaction] = []

                async def body(
                    tx: AsyncTransaction,
                    reads: list[str] = reads,
                    writes: dict[str, bytes] = writes,
                ) -> None:
                    nonlocal failed
                    holder.append(tx)
                    try:
                        vals = await tx.batch(reads, dict(writes), commit=True)
                    except TxnAborted:
                        failed += 1
                        raise
                    seen.clear()
                    seen.update(zip(reads, vals, strict=True))

                try:
                    await clients[c].run(body, keys=[*reads, *writes])
                except TxnAborted:
                    continue
                ts = holder[-1].commit_ts
                assert ts is not None
                committed.append((ts, dict(seen), dict(writes)))
                await asyncio.sleep(rng.random() * 0.003)

        finished = await cluster.run(
            [functools.partial(client_run, c) for c in range(len(clients))], 300
        )
        assert finished, "workload did not finish in 300 virtual seconds"
        reader = cluster.txn_client("us-east", retry=retry)
        holder: list[AsyncTransaction] = []

        async def final(tx: AsyncTransaction) -> list[bytes | None]:
            holder.append(tx)
            return await tx.get_many([*HOT, COLD])

        vals = await reader.run(final, read_only=True)
        ts = holder[-1].commit_ts
        assert ts is not None
        committed.append((ts, dict(zip([*HOT, COLD], vals, strict=True)), {}))
        for cl in [*clients, reader]:
            await cl.close()
        return cluster.restamps()

    restamps = run_simulation(main, seed=seed)
    return committed, restamps, failed


@pytest.mark.parametrize("protocol", ["k2-mvto", "mvto-hlc"])
def test_restamped_transactions_equal_a_serial_replay(protocol: str) -> None:
    committed, restamps, failed = _run(_cluster(protocol), seed=7)
    assert restamps >= 10, f"the workload should make leaders restamp, got {restamps}"
    check_serial_replay(committed)
    # What the restamps saved: the same workload without them fails more attempts.
    _, none, failed_without = _run(_cluster(protocol, restamp=False), seed=7)
    assert none == 0
    assert failed < failed_without, (failed, failed_without)


def test_only_a_transactions_first_request_to_one_shard_is_restartable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A transaction whose requests reach two shards, or that already ran a request, must never
    be restamped at one leader: its other requests ran at the old timestamp."""
    seen: dict[bytes, list[tuple[int, bool]]] = {}
    exec_ = Participant._exec

    async def watched(self: Participant, req: pb.ExecRequest) -> pb.ExecResponse:
        seen.setdefault(req.txn.txn_id, []).append((req.shard_id, req.restartable))
        return await exec_(self, req)

    monkeypatch.setattr(Participant, "_exec", watched)
    _, restamps, _ = _run(_cluster("k2-mvto"), seed=7)
    assert restamps >= 10
    several = [calls for calls in seen.values() if len(calls) > 1]
    assert several, "the workload should have transactions of two shards"
    assert sum(1 for calls in seen.values() if calls == [calls[0]] and calls[0][1]) >= 10
    for calls in several:
        assert not any(restartable for _, restartable in calls), calls


@pytest.mark.parametrize("protocol", ["k2-mvto", "mvto-hlc"])
@pytest.mark.parametrize("read_only", [True, False])
def test_a_transaction_of_several_requests_is_restartable_at_its_first_only(
    monkeypatch: pytest.MonkeyPatch, protocol: str, read_only: bool
) -> None:
    """Each request reads what the ones before it read at the same timestamp, so only the first
    may move it. A read-only transaction's requests leave no trace in the coordinator's
    `touched` (once they did count as first every time, and a Jepsen run under MVTO-HLC saw a
    transaction read a key twice with different values)."""
    flags: list[bool] = []
    exec_ = Participant._exec

    async def watched(self: Participant, req: pb.ExecRequest) -> pb.ExecResponse:
        flags.append(req.restartable)
        return await exec_(self, req)

    monkeypatch.setattr(Participant, "_exec", watched)

    async def main() -> None:
        cluster = SimCluster(_cluster(protocol), seed=1)
        client = cluster.txn_client("us-east")
        tx = await client.begin(read_only=read_only)
        for _ in range(3):
            await tx.get(HOT[0])
        if not read_only:
            await tx.put(HOT[0], b"v")
        await tx.commit()
        await client.close()

    run_simulation(main, seed=1)
    assert flags[0] and not any(flags[1:]), flags
    assert len(flags) == (3 if read_only else 4), flags


def test_the_replay_check_catches_a_coordinator_that_ignores_a_restamp(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The leader ran the request at a new timestamp, but the coordinator records, resolves and
    reports the old one: the writes land below reads that already saw past them."""
    monkeypatch.setattr(Coordinator, "_adopt_restamp", lambda self, txn, ts: None)
    committed, restamps, _ = _run(_cluster("k2-mvto"), seed=7)
    assert restamps >= 10
    with pytest.raises(AssertionError):
        check_serial_replay(committed)
