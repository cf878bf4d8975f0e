"""Client time (`AsyncClient(truetime=...)`): K2-MVTO transactions stamped when the client sends
them, their commit-wait waited out by the client during the reply's trip.

What it buys: a local transaction costs one in-region round trip, not one round trip plus the
commit-wait (2 x epsilon plus the batch's lead). What it must keep: real-time order (a
transaction that begins after another's commit was reported has a larger timestamp) with every
clock within its bound; the checker here is shown to catch a client whose clock runs ahead of
its bound unawares, which reports commits before their timestamps have passed, and the
coordinator to keep the wait of a client whose reading is ahead of its own clock.
"""

from __future__ import annotations

import asyncio
import functools
import random
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from k2store.client import AsyncClient, AsyncTransaction
from k2store.cluster import DEFAULT_REGIONS, ClusterConfig, TxnSettings, local_cluster
from k2store.coordinator import Coordinator
from k2store.sim import SimCluster, run_simulation
from tests.sim.conftest import QUIET
from truetime import SkewedClock, TrueTime

EPSILON_S = QUIET.epsilon_us * 1e-6
TTL_S = QUIET.oracle_local_ttl_us * 1e-6


def _cluster(protocol: str = "k2-mvto", **settings: int) -> ClusterConfig:
    st = replace(QUIET, txn=TxnSettings(protocol=protocol), **settings)
    return local_cluster(
        DEFAULT_REGIONS, ports=[1, 2, 3], root=Path("/nonexistent-sim"), settings=st
    )


def _timed_txn(cfg: ClusterConfig, keys: list[str], client_time: bool) -> float:
    """Virtual seconds of a one-shot read-modify-write of keys from us-east (after a first,
    untimed transaction, so batches and round-trip estimates are warm)."""

    async def main() -> float:
        cluster = SimCluster(cfg)
        client = cluster.txn_client("us-east", client_time=client_time)

        async def rmw(tx: AsyncTransaction) -> None:
            await tx.batch(keys, {k: b"v" for k in keys}, commit=True)

        await client.run(rmw, keys=keys)
        t0 = cluster.now_s
        await client.run(rmw, keys=keys)
        return cluster.now_s - t0

    return run_simulation(main, seed=0)


def test_a_local_transaction_with_client_time_costs_one_round_trip() -> None:
    cfg = _cluster()
    keys = ["us-east/a", "us-east/b"]
    with_time = _timed_txn(cfg, keys, client_time=True)
    without = _timed_txn(cfg, keys, client_time=False)
    # In-region round trip: 1 ms. The client's timestamp is its now().latest at the send; the
    # reply arrives 1 ms later, when now().earliest has passed it (2 x epsilon = 0.8 ms).
    assert with_time == pytest.approx(0.001, abs=2e-5)
    # Stamped on arrival (0.5 ms in) a batch's lead above now().latest and waited out there.
    assert without == pytest.approx(0.001 + 2 * EPSILON_S + TTL_S, abs=1e-4)


def test_a_cross_region_transaction_with_client_time_ends_two_epsilon_sooner() -> None:
    cfg = _cluster()
    keys = ["us-east/a", "eu-west/b"]
    with_time = _timed_txn(cfg, keys, client_time=True)
    without = _timed_txn(cfg, keys, client_time=False)
    # A future timestamp from now().earliest: eu-west's operations go at once instead of
    # waiting until now().earliest passes now().latest (the commit-wait has elapsed during
    # the wide-area round trip either way).
    assert without - with_time == pytest.approx(2 * EPSILON_S, abs=2e-5)
    assert with_time == pytest.approx(0.075 + 0.001, abs=2e-5)


def test_d2pl_keeps_its_commit_wait_at_the_coordinator() -> None:
    # d2PL-TTC releases its locks only once the commit timestamp has passed: client time
    # must not take that wait off the coordinator (the locks would be released early).
    cfg = _cluster("d2pl-ttc")
    elapsed = _timed_txn(cfg, ["us-east/a"], client_time=True)
    assert elapsed > 0.001 + 2 * EPSILON_S


# -- real-time order ---------------------------------------------------------------------------

WIDE = {"epsilon_us": 300_000, "max_uncertainty_us": 600_000}
"""A large uncertainty so that skews within it are large enough to matter (as the Jepsen clock
cases): us-east runs 250 ms ahead, eu-west 250 ms behind."""
SKEW = {"us-east-1": 250_000_000, "eu-west-1": -250_000_000}
KEYS = [f"{r}/reg" for r in DEFAULT_REGIONS]


@dataclass(frozen=True, slots=True)
class Txn:
    region: str
    key: str
    read: bytes | None
    wrote: bytes
    ts: int
    invoked: float
    completed: float


def _history(
    client_offset_ns: dict[str, int], seed: int = 1, ahead_counts: list[int] | None = None
) -> list[Txn]:
    """Two workers per region, each running read-modify-writes of registers (mostly their own
    region's) through clients with client time; `client_offset_ns`: region -> how far its
    clients' clocks are off their node's, without knowing it (clients beyond their bound).
    `ahead_counts` receives each coordinator's count of client readings ahead of its clock."""
    cfg = _cluster(**WIDE)

    async def main() -> list[Txn]:
        cluster = SimCluster(cfg, clock_skew_ns=SKEW)
        out: list[Txn] = []

        async def worker(region: str, n: int) -> None:
            rng = random.Random(f"{seed}:{region}:{n}")
            client: AsyncClient = cluster.txn_client(region, client_time=True)
            if region in client_offset_ns:
                assert client.tt is not None
                clock = SkewedClock(client.tt.clock, offset_ns=client_offset_ns[region])
                client.tt = TrueTime(clock, client.tt.epsilon_ns, client.tt.max_uncertainty_ns)
            for i in range(12):
                key = f"{region}/reg" if rng.random() < 0.6 else rng.choice(KEYS)
                value = f"{region}-{n}-{i}".encode()
                last: list[AsyncTransaction] = []
                read: list[bytes | None] = []

                async def rmw(tx: AsyncTransaction, key: str = key, value: bytes = value) -> None:
                    last.append(tx)
                    read[:] = await tx.batch([key], {key: value}, commit=True)

                start = cluster.now_s
                await client.run(rmw, keys=[key], max_attempts=100)
                ts = last[-1].commit_ts
                assert ts is not None
                out.append(Txn(region, key, read[0], value, ts, start, cluster.now_s))
                await asyncio.sleep(rng.uniform(0, 0.3))

        finished = await cluster.run(
            [functools.partial(worker, r, n) for r in DEFAULT_REGIONS for n in range(2)],
            duration_s=3600,
        )
        assert finished
        assert not cluster.network.internal_errors
        if ahead_counts is not None:
            ahead_counts.extend(
                n.service.coordinator.stats.get("client-clock-ahead", 0)
                for n in cluster.nodes.values()
                if n.service is not None
            )
        return out

    return run_simulation(main, seed=seed)


def realtime_violations(txns: list[Txn]) -> list[tuple[Txn, Txn]]:
    """Pairs (a, b): b began after a's commit was reported but has the smaller timestamp."""
    return [(a, b) for a in txns for b in txns if a.completed < b.invoked and b.ts < a.ts]


def stale_reads(txns: list[Txn]) -> list[Txn]:
    """Transactions whose read is not the register's latest write below their timestamp."""
    out = []
    for t in txns:
        below = [w for w in txns if w.key == t.key and w.ts < t.ts]
        expected = max(below, key=lambda w: w.ts).wrote if below else None
        if t.read != expected:
            out.append(t)
    return out


def test_client_time_keeps_real_time_order_with_clocks_within_their_bound() -> None:
    txns = _history({})
    assert len(txns) == 3 * 2 * 12
    assert len({t.ts for t in txns}) == len(txns), "timestamps must be unique"
    assert realtime_violations(txns) == []
    assert stale_reads(txns) == []


def test_a_client_clock_ahead_of_its_node_keeps_the_wait_at_the_coordinator() -> None:
    # The clients believe their clocks (1 s ahead of their nodes', unreported). Their readings
    # lie above the coordinators' now().latest, so the coordinators stamp on arrival and keep
    # the commit-waits themselves (and count and warn): real-time order holds.
    counts: list[int] = []
    txns = _history({r: 1_000_000_000 for r in DEFAULT_REGIONS}, ahead_counts=counts)
    assert realtime_violations(txns) == []
    assert stale_reads(txns) == []
    assert sum(counts) >= len(txns)  # every attempt (retries too) was counted


def test_a_client_clock_ahead_is_caught_when_the_coordinator_believes_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The same clients, with the coordinator's check removed (it stamps on arrival but leaves
    # the wait to the client, as before the check): each commit's timestamp has "certainly
    # passed" at once on the client's clock, so commits are reported before true time reaches
    # them, and a transaction that begins after a us-east commit (stamped up to 550 ms ahead)
    # from eu-west (up to 50 ms ahead) gets a smaller timestamp. The checker must see it.
    original = Coordinator._client_timestamp

    async def believing(self: Coordinator, client_ts: int) -> tuple[int, bool]:
        ts, _ = await original(self, client_ts)
        return ts, False

    monkeypatch.setattr(Coordinator, "_client_timestamp", believing)
    txns = _history({r: 1_000_000_000 for r in DEFAULT_REGIONS})
    assert realtime_violations(txns)


def test_a_client_clock_far_behind_is_not_believed() -> None:
    # us-east's clients run 1 s behind (unreported): their readings fall below the
    # coordinator's now().earliest, which then stamps as without client time; they wait longer
    # than needed. Taken as given, their timestamps would fall below commits that others had
    # reported before they began (seed 2: ten such pairs).
    txns = _history({"us-east": -1_000_000_000}, seed=2)
    assert realtime_violations(txns) == []
    assert stale_reads(txns) == []


# -- one-shot reads (read_many) ------------------------------------------------------------------


def test_read_many_with_client_time_returns_only_versions_that_have_certainly_passed() -> None:
    # One client writes a register over and over (client time: its versions show at the leader
    # before their timestamps have certainly passed, early_resolve); another reads it in a
    # tight loop with read_many, stamped at its send. Each read must come back only once the
    # version it returns has certainly passed on the reader's clock (the wait is the reader's,
    # `BeginTxnResponse.wait_until`), and must never go back in time.
    cfg = _cluster()
    key = "us-east/reg"

    async def main() -> tuple[dict[bytes, int], list[tuple[bytes | None, int, int]]]:
        cluster = SimCluster(cfg)
        writer = cluster.txn_client("us-east", client_time=True)
        reader = cluster.txn_client("us-east", client_time=True)
        assert reader.tt is not None
        committed: dict[bytes, int] = {}
        reads: list[tuple[bytes | None, int, int]] = []
        done = asyncio.Event()

        async def write() -> None:
            for i in range(40):
                value = f"v{i}".encode()
                last: list[AsyncTransaction] = []

                async def put(tx: AsyncTransaction, value: bytes = value) -> None:
                    last.append(tx)
                    await tx.batch([key], {key: value}, commit=True)

                await writer.run(put, keys=[key])
                ts = last[-1].commit_ts
                assert ts is not None
                committed[value] = ts
            done.set()

        async def read() -> None:
            assert reader.tt is not None
            while not done.is_set():
                start = reader.tt.now().latest
                (value,) = await reader.read_many([key])
                reads.append((value, start, reader.tt.now().earliest))

        finished = await cluster.run([write, read], duration_s=60)
        assert finished
        return committed, reads

    committed, reads = run_simulation(main, seed=1)
    assert len(committed) == 40 and len(reads) >= 30
    seen = [(committed[v], earliest) for v, _, earliest in reads if v is not None]
    assert len({ts for ts, _ in seen}) > 20, "the reads must see most of the writes"
    assert all(earliest > ts for ts, earliest in seen), "a version returned before it passed"
    assert [ts for ts, _ in seen] == sorted(ts for ts, _ in seen), "a read went back in time"
    # Stamped at the send: no read misses a write reported before it began.
    for value, start, _ in reads:
        before = [ts for ts in committed.values() if ts < start - 2 * int(EPSILON_S * 1e9)]
        if before:
            assert value is not None and committed[value] >= max(before)
