"""The node's replication driver: sealing, log serving, replica pulling, replica reads.

The protocol cores live in `replication/` and do no I/O: `LoggedStore` (the log, written in the
same batch as the versions), `Sealer` (when to close and seal), `ReplicaApplier` (in-order apply,
persisted position) and `Visibility` (the region's visible timestamp, delay histograms). This
module runs them on a node: background tasks on the node's event loop, RPC handlers for the
`Replication` service, and calls to other nodes through the node's `call` (gRPC in a process, the
simulated network in the simulator).

::

    leader ── every tick: Sealer.step(now, oldest intent) ──▶ closed_ts, SEAL(t) appended
       │   Pull(from_lsn) long poll ◀──────────────── replica puller (other region)
       │   Snapshot(start) pages    ◀──────────────── (when it fell behind a truncation)
       ▼                                                   │ ReplicaApplier.apply
    Visibility (seals of own shards + own replicas + region peers' Seals) ──▶ visible_ts
       ▲
    ReplicaRead(keys | scan, mode) ── at visible ts / fresh / bounded staleness, local only

Failure modes: a puller that cannot reach its leader backs off and retries for ever (the region
keeps serving reads at its last visible timestamp; bounded-staleness reads start failing once
it is too old, fresh reads time out with `NotVisibleYet`). A replica killed mid-apply resumes from
its persisted `next_lsn`. A leader restart keeps its log and seal (both in its store).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Protocol, TypeVar

from google.protobuf.message import Message

from k2store.background import stop_tasks
from k2store.cluster import ClusterConfig, ReplicationSettings, ShardConfig
from k2store.errors import (
    BelowHorizon,
    InvalidArgument,
    K2Error,
    NotLeader,
    NotVisibleYet,
    StalenessExceeded,
    Unavailable,
)
from k2store.proto import k2_pb2 as pb
from k2store.shard import ShardLeader
from replication.epochs import Sealer, SealPolicy
from replication.log import KIND_SEAL, LogEntry, LoggedStore, decode_entry
from replication.replica import ReplicaApplier, ReplicaGap
from replication.visibility import Visibility
from truetime import TrueTime
from txn.storage import BelowRetentionHorizon, Version, VersionedStore

log = logging.getLogger("k2.replication")

M = TypeVar("M", bound=Message)


class Call(Protocol):
    async def __call__(
        self,
        node: str,
        path: str,
        request: Message,
        response_type: type[M],
        timeout_s: float | None = None,
    ) -> M: ...


R = "/k2.v1.Replication/"
SNAPSHOT_KEYS = 256


def policy_from(settings: ReplicationSettings) -> SealPolicy:
    ms = 1_000_000
    return SealPolicy(
        kind=settings.policy,
        epoch_ns=int(settings.epoch_ms * ms),
        grace_ns=int(settings.grace_ms * ms),
        max_txn_lifetime_ns=int(settings.max_txn_lifetime_ms * ms),
        target_lag_ns=int(settings.closed_ts_lag_ms * ms),
    )


class _ReplicaState:
    def __init__(self, shard: ShardConfig, applier: ReplicaApplier) -> None:
        self.shard = shard
        self.applier = applier
        self.lag_entries = 0
        self.last_appended_ns = 0
        self.snapshots = 0


class Replicator:
    """Replication on one node. Leader stores must already be wrapped in `LoggedStore`."""

    def __init__(
        self,
        cluster: ClusterConfig,
        name: str,
        tt: TrueTime,
        call: Call,
        leaders: dict[int, ShardLeader],
        replica_stores: dict[int, VersionedStore],
    ) -> None:
        self.cluster = cluster
        self.name = name
        self.region = cluster.node(name).region
        self.tt = tt
        self.call = call
        self.settings = cluster.settings.replication
        st = self.settings
        self.policy = policy_from(st)
        self.tick_s = st.tick_ms / 1000
        self.short_timeout_s = min(2.0, cluster.settings.request_timeout_s)
        """Deadline of replication's own calls (beyond a pull's wait): a wide-area round trip
        and a loaded node, well short of the request timeout."""
        self.leaders = leaders
        self.logs: dict[int, LoggedStore] = {}
        self.sealers: dict[int, Sealer] = {}
        self._appended: dict[int, asyncio.Event] = {}
        self._acked: dict[int, dict[str, int]] = {}
        self.seal_aborts: dict[int, int] = {}
        self.seals_logged: dict[int, int] = {}
        """shard -> seals logged (this node leads it)."""
        self.seal_pushes = 0
        """Push calls sent to replicas (each carries, for one replica node, the log through the
        new seal of every shard sealed in the same step)."""
        self._to_push: dict[int, frozenset[str]] = {}
        """Shards whose new seal awaits this step's pushes (`_push_seals`) -> the replica nodes
        whose pull was waiting when the seal was logged (that pull brings it)."""
        self._parked: dict[int, set[str]] = {}
        """shard -> replica nodes whose pull is waiting here for the log to grow."""
        self._stopped = False
        self.seal_queries = 0
        """Seals calls sent to peers in this region (the visible timestamp's inputs)."""
        self.active: dict[int, dict[bytes, int]] = {}
        """shard -> read-write transactions running there (txn_id -> ts); see in_flight."""
        txn = cluster.settings.txn
        self.in_flight_limit_ns = int((2 * txn.expiry_s + txn.client_timeout_s) * 1e9)
        self.visibility = Visibility(self.region, (s.id for s in cluster.shards))
        for sid, leader in leaders.items():
            store = leader.store
            if not isinstance(store, LoggedStore):
                raise TypeError(f"shard {sid}: leader store must be a LoggedStore")
            self.logs[sid] = store
            self.sealers[sid] = Sealer(self.policy, closed=store.closed_ts, sealed=store.sealed_ts)
            self._appended[sid] = asyncio.Event()
            self._acked[sid] = {}
            self._parked[sid] = set()
            self.seal_aborts[sid] = 0
            self.seals_logged[sid] = 0
            self.active[sid] = {}
            store.on_append = self._on_append_fn(sid, leader.shard.home_region)
            self.visibility.set_seal(sid, store.sealed_ts)
        self.replicas: dict[int, _ReplicaState] = {}
        for sid, rstore in replica_stores.items():
            state = _ReplicaState(cluster.shard(sid), ReplicaApplier(rstore))
            self.replicas[sid] = state
            self.visibility.set_seal(sid, state.applier.sealed_ts)
        self.peers = [
            n.name for n in cluster.nodes_in(self.region) if n.name != name
        ]  # region peers whose seals this node merges
        self._tasks: list[asyncio.Task[None]] = []
        self._pushes: set[asyncio.Task[None]] = set()
        self._visible_changed = asyncio.Event()
        self._last_visible = 0
        self._wake = asyncio.Event()
        self._seal_waiting = True
        """The last tick's seal waits on a transaction, so its end should wake the tick loop."""

    def _on_append_fn(self, sid: int, home: str) -> Callable[[LogEntry], None]:
        def on_append(entry: LogEntry) -> None:
            event = self._appended[sid]
            event.set()
            self._appended[sid] = asyncio.Event()
            if entry.kind != KIND_SEAL:
                self.visibility.observe(entry.max_ts, entry.appended_ns, home)
            else:
                self.seals_logged[sid] += 1
                if not self._to_push:
                    # The step seals its other shards before yielding: push them all together.
                    asyncio.get_running_loop().call_soon(self._push_seals)
                # Taken now: the woken pulls leave the parked set before the pushes go out.
                self._to_push[sid] = frozenset(self._parked[sid])

        return on_append

    def _push_seals(self) -> None:
        """Send each replica node, in one Push, the log of every shard sealed since the last
        call from the replica's last acknowledged position through the new seal (see
        PushRequest): fire and forget; a lost push costs only latency. A replica whose pull is
        waiting here gets nothing: the seal woke that pull, which carries it as soon."""
        sealed, self._to_push = self._to_push, {}
        if self._stopped:
            return
        by_holder: dict[str, list[pb.ShardLog]] = {}
        for sid, pulling in sorted(sealed.items()):
            store = self.logs[sid]
            shard = self.cluster.shard(sid)
            for region in self.cluster.regions:
                holder = self.cluster.replica_node(shard, region.name)
                if holder is None or holder in pulling:
                    continue
                acked = self._acked[sid].get(holder, 0)
                if acked < store.first_lsn:
                    continue  # it needs a snapshot (or has not pulled yet): its pull handles it
                entries = store.read_log_raw(acked, self.settings.pull_max_entries)
                if entries:
                    by_holder.setdefault(holder, []).append(
                        pb.ShardLog(shard_id=sid, entries=entries)
                    )
        for holder, logs in by_holder.items():
            self.seal_pushes += 1
            req = pb.PushRequest(shards=logs)
            task = asyncio.get_running_loop().create_task(self._push(holder, req))
            self._pushes.add(task)
            task.add_done_callback(self._pushes.discard)

    async def _push(self, holder: str, req: pb.PushRequest) -> None:
        with contextlib.suppress(K2Error):
            await self.call(holder, R + "Push", req, pb.PushResponse, self.short_timeout_s)

    async def push(self, req: pb.PushRequest) -> pb.PushResponse:
        states = [(self.replicas.get(log.shard_id), log) for log in req.shards]
        missing = sorted({log.shard_id for state, log in states if state is None})
        if missing:  # checked before anything is applied: a bad push changes nothing
            raise NotLeader(f"{self.name} holds no replica of shard(s) {missing}")
        positions: dict[int, int] = {}
        for state, log in states:
            assert state is not None
            entries = [decode_entry(raw) for raw in log.entries]
            applier = state.applier
            if applier.snapshot_lsn == 0 and entries and entries[0].lsn <= applier.next_lsn:
                self._applied(state, applier.apply(entries))
            positions[log.shard_id] = applier.next_lsn
        return pb.PushResponse(next_lsn=positions)

    def _applied(self, state: _ReplicaState, fresh: list[LogEntry]) -> None:
        home = state.shard.home_region
        for e in fresh:
            if e.kind != KIND_SEAL:
                self.visibility.observe(e.max_ts, e.appended_ns, home)
            state.last_appended_ns = e.appended_ns
        if fresh:
            self.visibility.set_seal(state.shard.id, state.applier.sealed_ts)
            self._visibility_moved()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._tick_loop()))
        for sid in self.replicas:
            self._tasks.append(loop.create_task(self._pull_loop(sid)))

    async def stop(self) -> None:
        self._stopped = True  # a push step already scheduled sends nothing
        tasks, self._tasks = self._tasks, []
        tasks += list(self._pushes)
        await stop_tasks(tasks)

    # -- leader: sealing -----------------------------------------------------------------------

    def in_flight(self, shard_id: int, txn_id: bytes, ts: int, running: bool) -> None:
        """A read-write transaction at ts runs on (running) or has ended at (not running) a
        shard led here. One that arrived before its ts was closed may still write below the
        closed timestamp: the seal waits for it, as for an intent."""
        active = self.active.get(shard_id)
        if active is None:
            return
        if not running:
            ended_ts = active.pop(txn_id, None)
            # A seal may have been waiting for it: only then can an early tick seal more. A
            # seal waits only on transactions at or below the closed timestamp, and none at
            # all when the last tick said so (the next scheduled tick, at the epoch boundary or
            # the publishing interval, comes anyway); waking for any other transaction's end
            # would cost a tick per transaction and change nothing. Region peers' ticks also
            # merge their seals, so they still wake on every end.
            if self.peers or (
                self._seal_waiting
                and (ended_ts is None or ended_ts <= self.logs[shard_id].closed_ts)
            ):
                self._wake.set()
        elif txn_id not in active and self.logs[shard_id].check_open(ts):
            active[txn_id] = ts

    def _expire_in_flight(self, now_ns: int) -> None:
        """Forget transactions whose end was never heard of (coordinator gone, Resolve lost):
        past the horizon their records have expired and a sweep aborted them."""
        horizon = now_ns - self.in_flight_limit_ns
        for active in self.active.values():
            for txn_id in [t for t, ts in active.items() if ts < horizon]:
                del active[txn_id]

    def check_open(self, leader: ShardLeader, key: bytes, ts: int, txn_id: bytes) -> str | None:
        """None if a write at ts by txn_id may go in; else the abort message (rule sealed)."""
        store = self.logs.get(leader.shard.id)
        if store is None or store.check_open(ts) or txn_id in self.active[leader.shard.id]:
            return None
        self.seal_aborts[leader.shard.id] += 1
        return (
            f"write of key {key[:64]!r} at ts {ts} aborted by rule sealed: shard "
            f"{leader.shard.id} closed every timestamp up to {store.closed_ts} for replication "
            f"({self.policy.kind}); retry with a new timestamp"
        )

    def seal_step(self) -> bool:
        """Step every led shard's sealer; returns whether some seal waits on a transaction."""
        now = self.tt.now()
        waiting = False
        for sid, store in self.logs.items():
            oldest = store.oldest_intent_ts()
            active = self.active[sid]
            if active:
                first = min(active.values())
                oldest = first if oldest is None else min(oldest, first)
            if self.settings.unsafe_seal_before_resolve:
                oldest = None  # broken on purpose: see ReplicationSettings
            step = self.sealers[sid].step(now, oldest)
            waiting = waiting or step.waiting_on_intent
            store.closed_ts = max(store.closed_ts, step.closed)
            if step.seal is not None:
                store.append_seal(step.seal)
                self.visibility.set_seal(sid, step.seal)
        self._visibility_moved()
        return waiting

    def _visibility_moved(self) -> None:
        """Measure what the visible timestamp now covers; wake readers waiting for it."""
        before = self.visibility.visible_ts()
        self.visibility.advance(self.tt.now().latest)
        if self.visibility.visible_ts() != before or self._last_visible != before:
            self._last_visible = self.visibility.visible_ts()
            self._visible_changed.set()
            self._visible_changed = asyncio.Event()

    def _next_tick_s(self, waiting: bool) -> float:
        """K2-VCR seals move only at epoch boundaries (+ grace): with nothing to wait for, sleep
        until the next one instead of polling. The other policies move continuously."""
        p = self.policy
        if waiting:
            # Woken early by the Resolve that ends the transaction the seal waits for; the
            # timeout catches intents cleaned up otherwise (pushes, the abandoned-txn sweep).
            return max(self.tick_s, 0.05)
        if p.kind != "vcr":
            # Continuous policies could seal every tick; like CockroachDB's closed-timestamp
            # side transport (200 ms) they publish at an interval: here the epoch length, so
            # every policy costs the same log entries and pushes.
            return p.epoch_ns / 1e9
        if self.peers:
            return self.tick_s
        after_grace = self.tt.now().earliest - p.grace_ns
        to_next = p.epoch_ns - after_grace % p.epoch_ns
        return max(self.tick_s, to_next / 1e9)

    def _truncate(self) -> None:
        """Drop what every replica has acknowledged; keep at most max_log_entries regardless
        (a replica further behind than that catches up by snapshot)."""
        keep = self.settings.max_log_entries
        for sid, store in self.logs.items():
            shard = self.cluster.shard(sid)
            holders = {self.cluster.replica_node(shard, r.name) for r in self.cluster.regions}
            acked = self._acked[sid]
            floor = min((acked.get(h, 0) for h in holders if h is not None), default=store.next_lsn)
            store.truncate(max(floor, store.next_lsn - keep))

    async def _tick_loop(self) -> None:
        last_housekeeping = self.tt.clock.monotonic_ns()
        while True:
            waiting = False
            try:
                waiting = self._seal_waiting = self.seal_step()
                if self.peers:
                    await self._merge_peer_seals()
                    self._visibility_moved()
                mono = self.tt.clock.monotonic_ns()
                if mono - last_housekeeping > 1_000_000_000:
                    last_housekeeping = mono
                    self._truncate()
                    self._expire_in_flight(self.tt.now().earliest)
            except asyncio.CancelledError:
                raise
            except Exception:  # a failed tick must not stop sealing for good
                log.exception("replication tick failed on %s", self.name)
            self._wake.clear()
            # asyncio.timeout rather than wait_for: the same wait without a task per tick.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._next_tick_s(waiting)):
                    await self._wake.wait()

    async def _merge_peer_seals(self) -> None:
        async def one(peer: str) -> None:
            self.seal_queries += 1
            try:
                r = await self.call(
                    peer, R + "Seals", pb.SealsRequest(), pb.SealsResponse, self.short_timeout_s
                )
            except K2Error:
                return
            for sid, ts in r.seals.items():
                self.visibility.set_seal(sid, ts)

        await asyncio.gather(*(one(p) for p in self.peers))

    # -- leader: serving the log ---------------------------------------------------------------

    def _log_for(self, shard_id: int) -> LoggedStore:
        store = self.logs.get(shard_id)
        if store is None:
            self.cluster.shard(shard_id)  # UnknownShard for a typo
            raise NotLeader(f"node {self.name} does not lead shard {shard_id}")
        return store

    async def pull(self, req: pb.PullRequest) -> pb.PullResponse:
        store = self._log_for(req.shard_id)
        if req.replica:
            self._acked[req.shard_id][req.replica] = req.from_lsn
        if req.from_lsn < store.first_lsn:
            return pb.PullResponse(
                snapshot_needed=True,
                first_lsn=store.first_lsn,
                next_lsn=store.next_lsn,
                sealed_ts=store.sealed_ts,
            )
        if req.from_lsn >= store.next_lsn and req.wait_ms:
            event = self._appended[req.shard_id]
            parked = self._parked[req.shard_id]
            if req.replica:
                parked.add(req.replica)
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(req.wait_ms / 1000):
                        await event.wait()
            finally:
                parked.discard(req.replica)
        limit = req.max_entries or self.settings.pull_max_entries
        return pb.PullResponse(
            entries=store.read_log_raw(req.from_lsn, limit),
            first_lsn=store.first_lsn,
            next_lsn=store.next_lsn,
            sealed_ts=store.sealed_ts,
        )

    async def snapshot(self, req: pb.SnapshotRequest) -> pb.SnapshotResponse:
        store = self._log_for(req.shard_id)
        shard = self.cluster.shard(req.shard_id)
        next_lsn, sealed = store.next_lsn, store.sealed_ts  # before reading: see ReplicaApplier
        max_keys = req.max_keys or SNAPSHOT_KEYS
        start = max(req.start, shard.start)
        rows = store.scan_versions(start, shard.end, max_keys + 1)
        more = len(rows) > max_keys
        rows = rows[:max_keys]
        return pb.SnapshotResponse(
            rows=[
                pb.SnapshotRow(
                    key=k,
                    versions=[
                        pb.SnapshotVersion(ts=v.ts, value=v.value or b"", tombstone=v.value is None)
                        for v in vs
                    ],
                )
                for k, vs in rows
            ],
            more=more,
            next_start=rows[-1][0] + b"\x00" if more else b"",
            next_lsn=next_lsn,
            sealed_ts=sealed,
        )

    async def seals(self, req: pb.SealsRequest) -> pb.SealsResponse:
        out = {sid: s.sealed_ts for sid, s in self.logs.items()}
        out.update({sid: r.applier.sealed_ts for sid, r in self.replicas.items()})
        return pb.SealsResponse(seals=out)

    # -- replica: pulling ----------------------------------------------------------------------

    async def _pull_loop(self, sid: int) -> None:
        state = self.replicas[sid]
        backoff = 0.05
        while True:
            try:
                if state.applier.snapshot_lsn:
                    await self._install_snapshot(state)
                await self._pull_once(state)
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except (K2Error, ReplicaGap) as e:
                log.debug("replica of shard %d on %s: %s", sid, self.name, e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
            except Exception:
                log.exception("replica of shard %d on %s failed", sid, self.name)
                await asyncio.sleep(1.0)

    async def _pull_once(self, state: _ReplicaState) -> None:
        st = self.settings
        req = pb.PullRequest(
            shard_id=state.shard.id,
            from_lsn=state.applier.next_lsn,
            max_entries=st.pull_max_entries,
            wait_ms=int(st.pull_wait_ms),
            replica=self.name,
        )
        # A short deadline: across a partition (a silent one drops messages) the puller must
        # notice and retry soon, so the region catches up right after the link heals.
        r = await self.call(
            state.shard.leader,
            R + "Pull",
            req,
            pb.PullResponse,
            st.pull_wait_ms / 1000 + self.short_timeout_s,
        )
        if r.snapshot_needed:
            state.applier.begin_snapshot(r.first_lsn)
            return
        entries = [decode_entry(raw) for raw in r.entries]
        self._applied(state, state.applier.apply(entries))
        state.lag_entries = max(0, r.next_lsn - state.applier.next_lsn)

    async def _install_snapshot(self, state: _ReplicaState) -> None:
        start = b""
        sealed_at_start: int | None = None
        while True:
            req = pb.SnapshotRequest(shard_id=state.shard.id, start=start, max_keys=SNAPSHOT_KEYS)
            r = await self.call(
                state.shard.leader, R + "Snapshot", req, pb.SnapshotResponse, self.short_timeout_s
            )
            if sealed_at_start is None:
                sealed_at_start = r.sealed_ts
                if r.next_lsn < state.applier.snapshot_lsn:
                    raise ReplicaGap("leader's log is behind the snapshot position")
                state.applier.begin_snapshot(r.next_lsn)
            state.applier.apply_snapshot_page(
                [
                    (
                        row.key,
                        [Version(v.ts, None if v.tombstone else v.value) for v in row.versions],
                    )
                    for row in r.rows
                ]
            )
            if not r.more:
                break
            start = r.next_start
        state.applier.finish_snapshot(sealed_at_start)
        state.snapshots += 1
        self.visibility.set_seal(state.shard.id, state.applier.sealed_ts)
        self._visibility_moved()

    # -- replica reads -------------------------------------------------------------------------

    def _local_store(self, shard: ShardConfig) -> VersionedStore | None:
        if shard.id in self.logs:
            return self.logs[shard.id]
        r = self.replicas.get(shard.id)
        return r.applier.store if r is not None else None

    async def _wait_visible(self, ts: int) -> None:
        # Half the request timeout: the caller's own deadline must not expire first, so it
        # hears NotVisibleYet (what happened) rather than a bare DeadlineExceeded.
        wait_ns = int(self.cluster.settings.request_timeout_s * 0.5e9)
        deadline = self.tt.clock.monotonic_ns() + wait_ns
        while self.visibility.visible_ts() < ts:
            left = (deadline - self.tt.clock.monotonic_ns()) / 1e9
            if left <= 0:
                raise NotVisibleYet(
                    f"timestamp {ts} is not visible in region {self.region} yet (visible: "
                    f"{self.visibility.visible_ts()}); replication from a shard's home region "
                    "is stalled or cut off"
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 0.5)):
                    await self._visible_changed.wait()

    async def replica_read(self, req: pb.ReplicaReadRequest) -> pb.ReplicaReadResponse:
        visible = self.visibility.visible_ts()
        if req.at_ts:
            ts = req.at_ts
            if ts > self.tt.now().latest + 1_000_000_000:
                raise InvalidArgument(f"replica read at {ts} is more than 1 s in the future")
        elif req.mode == pb.READ_FRESH:
            ts = self.tt.now().latest
        else:
            if visible == 0 and not req.min_ts:
                raise Unavailable(f"region {self.region} has no visible timestamp yet")
            ts = max(visible, req.min_ts)
            if req.mode == pb.READ_BOUNDED:
                staleness = self.tt.now().latest - visible
                if staleness > req.max_staleness_ns:
                    raise StalenessExceeded(
                        f"replicas in {self.region} are {staleness / 1e6:.0f} ms behind, beyond "
                        f"the bound of {req.max_staleness_ns / 1e6:.0f} ms (nearest_only: not "
                        "sent to another region); raise max_staleness or read fresh"
                    )
        await self._wait_visible(ts)
        results: list[pb.TxnOpResult | None] = [None] * len(req.keys)
        by_holder: dict[str, list[int]] = {}
        for i, key in enumerate(req.keys):
            shard = self.cluster.shard_for_key(key)
            holder = self.cluster.local_holder(shard, self.region)
            by_holder.setdefault(holder, []).append(i)
        items: list[pb.KeyValue] = []
        more = False

        async def remote(holder: str, idx: list[int], scan: bool) -> None:
            nonlocal items, more
            if req.forwarded:
                raise NotLeader(f"{self.name} does not hold the replica (forwarded twice)")
            sub = pb.ReplicaReadRequest(
                keys=[req.keys[i] for i in idx], at_ts=ts, forwarded=True, has_scan=scan
            )
            if scan:
                sub.scan_start, sub.scan_end = req.scan_start, req.scan_end
                sub.scan_has_end, sub.scan_limit = req.scan_has_end, req.scan_limit
            r = await self.call(holder, R + "ReplicaRead", sub, pb.ReplicaReadResponse)
            for i, res in zip(idx, r.results, strict=True):
                results[i] = res
            if scan:
                items, more = list(r.items), r.more

        jobs = []
        scan_holder = None
        if req.has_scan:
            scan_shard = self.cluster.shard_for_key(req.scan_start)
            scan_holder = self.cluster.local_holder(scan_shard, self.region)
        for holder, idx in by_holder.items():
            if holder == self.name:
                for i in idx:
                    results[i] = self._read_local(req.keys[i], ts)
            else:
                jobs.append(remote(holder, idx, holder == scan_holder))
        if scan_holder is not None:
            if scan_holder == self.name:
                items, more = self._scan_local(req, ts)
            elif scan_holder not in by_holder:
                jobs.append(remote(scan_holder, [], True))
        await asyncio.gather(*jobs)
        return pb.ReplicaReadResponse(
            results=[r or pb.TxnOpResult() for r in results],
            items=items,
            more=more,
            read_ts=ts,
            served_by=self.name,
            visible_ts=self.visibility.visible_ts(),
        )

    def _store_for_key(self, key: bytes) -> tuple[ShardConfig, VersionedStore]:
        shard = self.cluster.shard_for_key(key)
        store = self._local_store(shard)
        if store is None:
            raise NotLeader(f"{self.name} holds no replica of shard {shard.id}")
        return shard, store

    def _read_local(self, key: bytes, ts: int) -> pb.TxnOpResult:
        _, store = self._store_for_key(key)
        try:
            v = store.get(key, ts)
        except BelowRetentionHorizon as e:
            raise BelowHorizon(str(e)) from None
        if v is None or v.value is None:
            return pb.TxnOpResult(found=False)
        return pb.TxnOpResult(found=True, value=v.value, version_ts=v.ts)

    def _scan_local(self, req: pb.ReplicaReadRequest, ts: int) -> tuple[list[pb.KeyValue], bool]:
        shard, store = self._store_for_key(req.scan_start)
        end = req.scan_end if req.scan_has_end else None
        if shard.end is not None and (end is None or end > shard.end):
            end = shard.end
        limit = req.scan_limit or self.cluster.settings.scan_page_rows
        try:
            rows = store.scan(req.scan_start, end, ts, limit + 1)
        except BelowRetentionHorizon as e:
            raise BelowHorizon(str(e)) from None
        return (
            [pb.KeyValue(key=k, value=v.value or b"", version_ts=v.ts) for k, v in rows[:limit]],
            len(rows) > limit,
        )

    # -- status --------------------------------------------------------------------------------

    def status(self) -> pb.ReplicationStatus:
        now = self.tt.now().latest
        shards = [
            pb.ReplicationShardStatus(
                shard_id=sid,
                role="leader",
                next_lsn=s.next_lsn,
                first_lsn=s.first_lsn,
                sealed_ts=s.sealed_ts,
                closed_ts=s.closed_ts,
                seal_aborts=self.seal_aborts[sid],
                seals=self.seals_logged[sid],
            )
            for sid, s in sorted(self.logs.items())
        ]
        for sid, r in sorted(self.replicas.items()):
            caught_up = r.lag_entries == 0
            shards.append(
                pb.ReplicationShardStatus(
                    shard_id=sid,
                    role="replica",
                    next_lsn=r.applier.next_lsn,
                    sealed_ts=r.applier.sealed_ts,
                    lag_entries=r.lag_entries,
                    lag_ms=0.0
                    if caught_up or not r.last_appended_ns
                    else max(0.0, (now - r.last_appended_ns) / 1e6),
                    snapshots=r.snapshots,
                )
            )
        delays = [
            pb.VisibilityDelay(
                from_region=home,
                count=h.count,
                p50_ms=h.quantile(0.5),
                p99_ms=h.quantile(0.99),
                max_ms=h.max_ms,
                mean_ms=h.total_ms / h.count if h.count else 0.0,
            )
            for home, h in sorted(self.visibility.delays.items())
        ]
        return pb.ReplicationStatus(
            enabled=True,
            policy=self.policy.kind,
            visible_ts=self.visibility.visible_ts(),
            shards=shards,
            delays=delays,
            seal_pushes=self.seal_pushes,
            seal_queries=self.seal_queries,
        )
