"""The transaction coordinator in every node: runs clients' transactions against shard leaders.

::

    client ─BeginTxn─▶ Coordinator: ts from the region's K2-TB batch (no wide-area round trip)
    client ─TxnOps──▶ Coordinator ─Exec (one parallel round per call)─▶ shard leaders
                      (writes alone are held here until the next read or the commit)
    client ─CommitTxn▶ Coordinator ─Exec(held writes)─▶ every written shard but the record's
                                    ─Exec(writes, commit)─▶ record shard: intents, record
                                      COMMITTED (fsynced: the commit point), resolved there
                                    (nothing held: ─EndTxn─▶ record shard)
                                    ─Resolve─▶ other participants (early_resolve: at once)
                                    commit-wait until after(ts), then reply
                                    (without early_resolve: ─Resolve─▶ after the reply)
                                    ─ForgetTxn─▶ record

Contracts:
- A transaction's reads and writes all happen at its one timestamp. Writes wait here until it
  next reads (they go first, so it reads its own writes) or commits (`commit_with_writes`; off,
  and for d2PL-TTC, they go out as intents at once): a conflict a held write meets surfaces
  from the commit.
- The record lives on the shard of the transaction's first written key (its home row), or with
  held writes on the farthest written shard it already reached, so that shard resolves its
  writes as they land; on a shard of the coordinator's if `record_at_home` is off. While writes
  are pending the coordinator heartbeats it, and if this coordinator dies the record's leader
  aborts the transaction after `expiry_s` once someone asks.
- A commit, once begun, runs to its end even if the client stops waiting.
- Commit is acknowledged only after the record is durable AND ts has certainly passed
  (commit-wait), so timestamp order agrees with real-time order. Read-only transactions need no
  record: they wait until the newest version they returned has certainly passed. A K2-MVTO
  client with client time (`BeginTxnRequest.client_waits`) does that wait itself: the reply
  goes at once, carrying `wait_until`, and the client reports the commit only after it.
- A committed transaction's versions show once its record is durable (`early_resolve`), before
  ts has certainly passed: every path that hands a version to a client waits until the
  version's ts has passed first (a read-write reader commit-waits its own larger ts, a read-only
  one the newest version it returned, a replica read serves only timestamps sealed below
  now().earliest), and a waiter that resolves an intent from its record could always see it
  that early. What is not covered: a client that reads in a transaction which then aborts may
  have seen a version whose ts is still ahead of true time.
- Any abort leaves nothing visible: intents of an aborted transaction are dropped.

Transactions whose client goes silent for `client_timeout_s` are aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message

from k2store.background import stop_tasks
from k2store.cluster import ClusterConfig, ShardConfig, TxnSettings
from k2store.errors import (
    ClockUncertain,
    CommitOutcomeUnknown,
    InvalidArgument,
    K2Error,
    TxnAborted,
)
from k2store.participant import is_write
from k2store.proto import k2_pb2 as pb
from truetime import STEP_GRANULARITY, HybridLogicalClock, TrueTime, UncertaintyExceeded

log = logging.getLogger("k2.coordinator")

CallFn = Callable[[str, str, Message, type[Any]], Awaitable[Any]]
P = "/k2.v1.Participant/"
LOCAL_DELAY_NS = 5_000_000
"""One-way delays below this are a region's own: no future timestamp for them."""
CLIENT_AHEAD_WARN_S = 60.0
"""How often at most a coordinator warns of clients whose clocks read ahead of its own."""


def _in_slot(floor: int, low: int) -> int:
    """The smallest timestamp >= floor whose low bits are `low` (a slot's origin: see
    truetime.oracle)."""
    return -(-floor // STEP_GRANULARITY) * STEP_GRANULARITY + low


class _SlotSequence:
    """Strictly increasing timestamps of one K2-TB slot of this node's, each the smallest above
    the last at or above a target: unique (the slot is this node's alone) wherever the targets
    lie, not only at the clock's reading. The first is also at least the slot's first batch
    base (fetched from `source` on first use) plus `lead_ns`: after a restart, above every
    timestamp the sequence gave before as long as those were at most `now().latest` plus
    `lead_ns` when given (see `Coordinator._client_timestamp`, `restamp_timestamp`). Each is
    passed to `cover` (the node's durable ceiling) before it is returned for use."""

    def __init__(
        self,
        source: Callable[[], Awaitable[int]],
        lead_ns: int = 0,
        cover: Callable[[int], None] = lambda t: None,
    ) -> None:
        self.source = source
        self.lead_ns = lead_ns
        self.cover = cover
        self._base: int | None = None
        self._last = 0

    async def next(self, target: int) -> int:
        if self._base is None:
            self._base = await self.source()
        floor = max(target, self._base + self.lead_ns, self._last + 1)
        self._last = _in_slot(floor, self._base % STEP_GRANULARITY)
        self.cover(self._last)
        return self._last


@dataclass
class _Txn:
    txn_id: bytes
    ts: int
    read_only: bool
    record_key: bytes = b""
    writes: dict[int, set[bytes]] = field(default_factory=dict)
    touched: set[int] = field(default_factory=set)
    """Shards that ran operations of this transaction (d2PL: they hold its locks)."""
    max_version_ts: int = 0
    last_activity_ns: int = 0
    heartbeat: asyncio.TimerHandle | asyncio.Task[None] | None = None
    """The timer of the first heartbeat, then the task that sends them (see _start_heartbeat)."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    done: bool = False
    aligned: bool = False
    """A future timestamp was chosen: dispatch each operation to arrive at about ts."""
    stamp_late: bool = False
    """Take a fresh timestamp when the first operation is dispatched (late stamping)."""
    buffered: list[pb.TxnOp] = field(default_factory=list)
    """Writes not sent yet (`TxnSettings.commit_with_writes`): they go before the next read,
    or with the commit."""
    decided_on: int | None = None
    """The shard that recorded the commit with its writes and resolved them itself."""
    client_waits: bool = False
    """The client waits out the commit-wait itself (`BeginTxnRequest.client_waits`, K2-MVTO):
    replies carry `wait_until` instead of being held here."""
    pinned: bool = False
    """Its timestamp was given by the client (`read_ts`): never restamped."""
    sent: bool = False
    """A request of it has gone to a leader (read-only ones too, which `touched` leaves out):
    from then on none is restartable."""
    region_local: bool = False
    """Every key named at begin, and every shard reached since, is led in this coordinator's
    region (`TxnHeader.region_local`)."""

    def header(self, coordinator: str) -> pb.TxnHeader:
        return pb.TxnHeader(
            txn_id=self.txn_id,
            ts=self.ts,
            record_key=self.record_key,
            coordinator=coordinator,
            read_only=self.read_only,
            region_local=self.region_local,
        )


class Coordinator:
    def __init__(
        self,
        cluster: ClusterConfig,
        node_name: str,
        tt: TrueTime,
        timestamp: Callable[[], Awaitable[int]],
        call: CallFn,
        settings: TxnSettings,
        *,
        new_txn_id: Callable[[], bytes] = lambda: os.urandom(16),
        hlc: HybridLogicalClock | None = None,
        future_source: Callable[[], Awaitable[int]] | None = None,
        client_source: Callable[[], Awaitable[int]] | None = None,
        restamp_source: Callable[[], Awaitable[int]] | None = None,
        cover: Callable[[int], None] | None = None,
    ) -> None:
        """`future_source` / `client_source` / `restamp_source`: timestamps of the slots that
        future timestamps, client-stamped ones and restamps are made in (only their low bits
        and first base are used: see `_future_timestamp`, `_client_timestamp`,
        `restamp_timestamp`); without `client_source` the client's timestamp is ignored and
        the transaction stamped on arrival; without `restamp_source` a restamp takes this
        node's next timestamp. `cover(t)`: make t durable in a ceiling that a restarted node
        waits out (`NodeService.read_ceiling`) before a timestamp this coordinator made itself,
        in one of those slots, is used: the batches' high water does not cover them, and only
        the ceiling keeps the next incarnation's from repeating one."""
        self._cover = cover or (lambda t: None)
        self.future_source = future_source or timestamp
        self._last_future = 0
        # A restamp's floor may lead now().latest by a K2-TB batch's lead (see restamp_timestamp).
        self._restamps = (
            _SlotSequence(restamp_source, cluster.settings.oracle_ttl_us * 1000, self._cover)
            if restamp_source
            else None
        )
        self._client_stamps = (
            _SlotSequence(client_source, cover=self._cover) if client_source else None
        )
        self._client_ahead_warned_ns = -(2**62)
        self._rtt_ns: dict[str, int] = {}
        self.protocol = settings.protocol
        self.hlc = hlc
        self.cluster = cluster
        self.node_name = node_name
        self.tt = tt
        self.timestamp = timestamp
        self.call = call
        self.settings = settings
        self.new_txn_id = new_txn_id
        self.txns: dict[bytes, _Txn] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self.stats: dict[str, int] = {"begun": 0, "committed": 0, "aborted": 0}
        self.region = cluster.node(node_name).region

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._reaper = asyncio.ensure_future(self._reap_silent())

    async def stop(self) -> None:
        tasks = [t for t in [self._reaper, *self._background] if t is not None]
        for txn in self.txns.values():
            if isinstance(txn.heartbeat, asyncio.Task):
                tasks.append(txn.heartbeat)
            elif txn.heartbeat is not None:
                txn.heartbeat.cancel()
        await stop_tasks(tasks)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _reap_silent(self) -> None:
        limit = int(self.settings.client_timeout_s * 1e9)
        while True:
            await asyncio.sleep(self.settings.client_timeout_s / 4)
            now = _now_ns()
            for txn in list(self.txns.values()):
                if not txn.done and now - txn.last_activity_ns > limit and not txn.lock.locked():
                    log.info("aborting transaction %s: client silent", txn.txn_id.hex()[:12])
                    await self._abort(txn)

    def _txn(self, txn_id: bytes) -> _Txn:
        txn = self.txns.get(txn_id)
        if txn is None or txn.done:
            raise TxnAborted(
                f"transaction {txn_id.hex()[:12]} aborted by rule unknown-transaction: the "
                f"coordinator {self.node_name} does not know it (it ended, timed out, or the "
                "coordinator restarted)"
            )
        txn.last_activity_ns = _now_ns()
        return txn

    # -- client RPCs -----------------------------------------------------------------------------

    def _hlc_now(self) -> int:
        """MVTO-HLC's timestamp: the hybrid clock's reading, refused (`ClockUncertain`) when
        this node's clock error is beyond the bound, as K2-TB's oracle refuses: other leaders'
        uncertainty windows cannot cover a clock that far off."""
        assert self.hlc is not None
        try:
            self.tt.check()
        except UncertaintyExceeded as e:
            raise ClockUncertain(f"coordinator {self.node_name} refuses to stamp: {e}") from None
        return self.hlc.now()

    async def begin(self, req: pb.BeginTxnRequest) -> pb.BeginTxnResponse:
        # MVTO-HLC stamps with the node's hybrid logical clock; the others with K2-TB batches
        # (d2PL-TTC uses the start timestamp only as its wound-wait priority and snapshot time).
        client_time = self.protocol == "k2-mvto" and self._client_stamps is not None
        client_stamped = client_time and bool(req.client_ts) and not req.read_ts
        if req.read_ts:
            if not req.read_only:
                raise InvalidArgument("read_ts is only for read-only transactions")
            ts = req.read_ts
        elif client_stamped:
            ts, client_ahead = await self._client_timestamp(req.client_ts)
            if client_ahead:  # its wait is not to be trusted: from here on, as without
                client_time = client_stamped = False
        else:
            ts = self._hlc_now() if self.hlc is not None else await self.timestamp()
        future = False
        leaders = [self.cluster.shard_for_key(k).leader for k in req.keys]
        if leaders and self.hlc is None and self.settings.future_ts and not req.read_ts:
            delay = max(self.one_way_ns(leader) for leader in leaders)
            if delay > LOCAL_DELAY_NS:
                # At least now().latest (real-time order) and ahead of true time by about the
                # delay. With client time, from `earliest`: the farthest leader's operations
                # then go at once (held until after(ts - delay), they wait 2 x epsilon from
                # `latest`) and still reach it once ts has certainly passed there, and the
                # commit-wait is 2 x epsilon shorter. Without, from `latest`, so that these
                # timestamps stay as far ahead of the region's local ones (stamped on arrival,
                # a batch's lead above `latest`) as with client time: 2 x epsilon closer, more
                # local transactions stamped meanwhile fall above them (TPC-C sim, 30 clients
                # per region: 2-3% fewer commits).
                now = self.tt.now()
                base = now.earliest if client_stamped else now.latest
                ts = await self._future_timestamp(max(now.latest, base + delay))
                future = True
        txn = _Txn(self.new_txn_id(), ts, req.read_only, aligned=future, pinned=bool(req.read_ts))
        # With early_resolve off the versions show only after the coordinator's wait, so that
        # wait stays and the client has none.
        txn.client_waits = client_time and req.client_waits and self.settings.early_resolve
        # Leaders admit a transaction that stays in this region to a key's line however long:
        # its read for update is followed by its write within local round trips.
        txn.region_local = (
            bool(leaders) and not req.read_only and all(map(self._in_region, leaders))
        )
        # A local transaction takes its final timestamp when its first operation is dispatched
        # (late stamping): between begin and that moment other transactions run, and a write
        # stamped earlier but arriving after a later read of its key aborts by rule read-mark.
        # Not for future timestamps (their dispatch is aligned to them), given read timestamps,
        # or d2PL-TTC (its start timestamp is its wound-wait priority).
        txn.stamp_late = (
            self.settings.late_stamping
            and not future
            and not req.read_ts
            and not client_stamped
            and self.protocol != "d2pl-ttc"
        )
        txn.last_activity_ns = _now_ns()
        self.txns[txn.txn_id] = txn
        self.stats["begun"] += 1
        return pb.BeginTxnResponse(txn_id=txn.txn_id, ts=ts, coordinator=self.node_name)

    async def _future_timestamp(self, target: int) -> int:
        """A unique timestamp >= target. Future timestamps come from a slot of their own
        (coordinator name + "/future"), strictly increasing, so they can collide neither with
        each other nor with the regular batch timestamps of any coordinator (the oracle keeps
        each coordinator's slots across its restarts: `DurableSlots`). Unlike `_SlotSequence`
        it takes a fresh batch timestamp from its slot every time (a floor that is live on the
        oracle's clock), so they stop with the region's oracle as regular timestamps do.

        Across a restart of this node: each is covered by the node's durable ceiling before
        it is used (`cover`), and a restarted node waits until its ceilings have certainly
        passed, so every one made after is above it. (Each is up to the farthest leader's
        one-way delay ahead of the clock, beyond the batches' high water.)"""
        base = await self.future_source()
        floor = max(target, base, self._last_future + 1)
        self._last_future = _in_slot(floor, base % STEP_GRANULARITY)
        self._cover(self._last_future)
        return self._last_future

    async def restamp_timestamp(self, floor: int) -> int:
        """A unique timestamp >= floor for a transaction a leader here restamps
        (`Participant.restamp_ts`; floor is just above the conflict, which was above the
        transaction's old timestamp, so real-time order holds and the commit-wait covers the
        new one).

        K2-MVTO: the next timestamp of this node's restamp slot at or above floor. K2-TB's
        slots make unique timestamps anywhere, not only at the clock's reading, so the
        transaction lands just above the conflict: where it stood in the key's line, instead
        of behind every transaction that arrived since, whose writes its new read marks at
        "now" would doom in turn, restamping them and so on down the line (TPC-C-like mix, 100
        clients per region, seed 1: 43,758 restamps and 11,733 txn/s with the node's next
        timestamp, 7,752 and 12,302 just above the conflict; docs/benchmarks.md). A floor
        beyond `now().latest` by more than a K2-TB batch's lead (`oracle_ttl_us`: the conflict
        was a far transaction's future timestamp) takes a future timestamp instead, so the
        restamp slot never runs further ahead of the clock than that lead. Uniqueness: the
        slot's timestamps here strictly increase, and after a restart start at the slot's
        first batch base plus that lead, while every restamp made before was at most this
        node's `now().latest` at the time plus the lead (and 4 us of rounding), and is
        covered by the node's durable ceiling, which a restarted node waits out: none repeats
        (as for client timestamps, `_client_timestamp`). The first restamps after a start,
        within that lead of it, wait out up to that lead in their commit-wait.

        MVTO-HLC: this node's hybrid clock past floor. A node's unique HLC timestamps come
        from its one clock, so the transaction goes to the back of the line."""
        if self.hlc is not None:
            self.hlc.update(floor)
            return self._hlc_now()
        restamps = self._restamps
        if restamps is not None and floor <= self.tt.now().latest + restamps.lead_ns:
            return await restamps.next(floor)
        ts = await self.timestamp()
        return ts if ts >= floor else await self._future_timestamp(floor)

    async def _client_timestamp(self, client_ts: int) -> tuple[int, bool]:
        """A unique timestamp >= the client's `now().latest` at its send, if that lies inside
        this node's `now()`; otherwise >= this node's `now().latest`, as without client time
        (one behind by more than the bound plus the request's trip cannot take the transaction
        below true time). With it, whether the client's reading was ahead of this node's
        `now().latest`: its clock is then ahead of this node's by more than the request's trip,
        perhaps beyond its bound, so the transaction's commit-wait stays here (the caller turns
        client time off for it) and a warning names the client's lead.

        HAZARD (client time): real-time order needs the timestamp to be at least the true time
        at which the client began, which a client clock within the bound guarantees. A client
        clock behind by more than the bound, but not so far that its reading falls below this
        node's `earliest`, gives a transaction that began after another committed a smaller
        timestamp than it (a stale read); a client clock ahead of its bound ends its wait for
        `wait_until` early and reports commits before their timestamps have passed. This node
        keeps the wait of every client whose reading is ahead of its own `now().latest`, which
        bounds a client's lead over true time by this node's (at most epsilon) plus the
        request's one-way trip: beyond its bound by less than that trip, a client may still
        report a commit up to that trip early.

        Client timestamps come from a slot of their own (coordinator name + "/client"), strictly
        increasing, so they collide with no other slot's. After a restart the first is at least
        that slot's first batch base, which leads the oracle's `now().latest` then; every client
        timestamp made before the restart was at most this node's `now().latest` at the time
        (plus 4 us of rounding), and is covered by the node's durable ceiling before it is
        used, which a restarted node waits out: none is repeated."""
        assert self._client_stamps is not None
        try:
            now = self.tt.checked_now()
        except UncertaintyExceeded as e:
            raise ClockUncertain(f"coordinator {self.node_name} refuses to stamp: {e}") from None
        ahead = client_ts > now.latest
        if ahead:
            self.stats["client-clock-ahead"] = self.stats.get("client-clock-ahead", 0) + 1
            self._warn_client_ahead(client_ts - now.latest)
        target = client_ts if now.earliest <= client_ts <= now.latest else now.latest
        return await self._client_stamps.next(target), ahead

    def _warn_client_ahead(self, lead_ns: int) -> None:
        """Once per `CLIENT_AHEAD_WARN_S` at most: a client's reading was ahead of this node's
        `now().latest` (see `_client_timestamp`); an operator should look at that host's clock."""
        now = _now_ns()
        if now - self._client_ahead_warned_ns < CLIENT_AHEAD_WARN_S * 1_000_000_000:
            return
        self._client_ahead_warned_ns = now
        log.warning(
            "coordinator %s: a client's clock reads %.3f ms ahead of this node's now().latest "
            "(%d such transactions so far); their commit-waits stay at this node. Check that "
            "host's clock synchronisation.",
            self.node_name,
            lead_ns / 1e6,
            self.stats["client-clock-ahead"],
        )

    async def _commit_wait(self, ts: int) -> None:
        """Wait until ts has certainly passed (see the HAZARD notes at the call sites)."""
        if self.settings.unsafe_skip_commit_wait:
            return  # broken on purpose: see TxnSettings.unsafe_skip_commit_wait
        await self.tt.wait_until_after(ts)

    def _in_region(self, node: str) -> bool:
        return self.cluster.node(node).region == self.region

    def one_way_ns(self, node: str) -> int:
        """One-way delay to node: half the smoothed round trip of recent calls; before the
        first one, half the RTT the cluster file's network table gives for the region pair
        (without it, a fresh coordinator's first cross-region transactions would not be
        future-stamped, and K2-VCR would seal them out at the far leader every time)."""
        if node == self.node_name:
            return 0
        measured = self._rtt_ns.get(node)
        if measured is not None:
            return measured // 2
        net = self.cluster.settings.network
        if not net.enabled:
            return 0
        here = self.cluster.node(self.node_name).region
        there = self.cluster.node(node).region
        return int(net.rtt_of(here, there) * 1_000_000) // 2

    async def _exec_call(self, node: str, req: pb.ExecRequest) -> pb.ExecResponse:
        """Exec at node, learning the round trip to it from the reply: the call's time less
        the time the leader says it held the request (`ExecResponse.held_ns`: waits in a hot
        key's line would otherwise pass for distance, and future timestamps would run hundreds
        of milliseconds ahead under load). An error reply teaches nothing: it does not say how
        long it was held."""
        start = _now_ns()
        resp: pb.ExecResponse = await self.call(node, P + "Exec", req, pb.ExecResponse)
        rtt = max(0, _now_ns() - start - resp.held_ns)
        old = self._rtt_ns.get(node)
        # EWMA, but a sample below the estimate counts fully: queueing only adds delay.
        self._rtt_ns[node] = rtt if old is None or rtt < old else (7 * old + rtt) // 8
        return resp

    async def ops(self, req: pb.TxnOpsRequest) -> pb.TxnOpsResponse:
        if not req.HasField("begin"):
            txn = self._txn(req.txn_id)
            r = await self._request_ops(txn, req)
        else:
            # Inline begin (Spanner's clients begin a read-write transaction inside its first
            # statement): begin, then the ops, in the client's one round trip.
            if req.txn_id:
                raise InvalidArgument("TxnOps names a transaction and asks to begin one: pick one")
            if req.begin.read_keys:
                raise InvalidArgument(
                    "read_keys is for BeginTxn (a one-shot read-only transaction)"
                )
            begun = await self.begin(req.begin)
            txn = self.txns[begun.txn_id]
            txn.stamp_late = False  # its timestamp was drawn just now: nothing for late stamping
            try:
                r = await self._request_ops(txn, req)
            except BaseException:
                # The client never learned this transaction's id, so it cannot end it: end it
                # here (an abort by a rule has already done so; this is for bad input and such).
                await self._abort(txn)
                raise
            r.txn_id = begun.txn_id
        if req.commit:
            # The transaction's last operations, then its commit, in one round trip for the
            # client. Errors past this point are the commit's: TxnAborted, or the outcome is
            # unknown (the record may be durable), which the client must not take for an abort.
            try:
                c = await self._commit_detached(txn)
                r.commit_ts, r.wait_until = c.commit_ts, c.wait_until
            except TxnAborted:
                raise
            except K2Error as e:
                if not e.retryable:
                    raise
                raise CommitOutcomeUnknown.of(txn.txn_id, txn.ts, e) from e
        return r

    async def _request_ops(self, txn: _Txn, req: pb.TxnOpsRequest) -> pb.TxnOpsResponse:
        """`_ops`; when a commit follows in the same request, an op that fails and leaves the
        transaction open (a leader unreachable) aborts it, so that every retryable error the
        client hears from such a request before the commit point is an abort, and any other is
        the commit's (outcome unknown)."""
        if not req.commit:
            return await self._ops(txn, req)
        try:
            return await self._ops(txn, req)
        except TxnAborted:
            raise
        except K2Error as e:
            if not e.retryable:
                raise
            await self._abort(txn)
            raise TxnAborted(
                f"transaction {txn.txn_id.hex()[:12]} aborted by rule op-failed: {e}"
            ) from e

    async def _ops(self, txn: _Txn, req: pb.TxnOpsRequest) -> pb.TxnOpsResponse:
        async with txn.lock:
            if txn.stamp_late:
                txn.stamp_late = False
                txn.ts = self._hlc_now() if self.hlc is not None else await self.timestamp()
            ops = list(req.ops)
            try:
                if self._buffers(txn) and ops and all(is_write(op) for op in ops):
                    # Held for the commit (or the next read): checked now, so bad input is
                    # refused where it was given.
                    self._check_ops(txn, ops)
                    txn.buffered.extend(ops)
                    txn.last_activity_ns = _now_ns()
                    return pb.TxnOpsResponse(results=[pb.TxnOpResult() for _ in ops], ts=txn.ts)
                # Reads see the transaction's own writes: the held ones go first. They stay held
                # until that succeeds (sent twice, a write of the same key and value at the
                # same timestamp just lays the same intent again).
                flushed = len(txn.buffered)
                results = (await self._run_ops(txn, txn.buffered + ops))[flushed:]
                txn.buffered = []
            except TxnAborted as e:
                if self.hlc is not None and e.rule == "uncertainty":
                    # Restart above the uncertain value: move this clock past the whole window.
                    self.hlc.update(txn.ts + 2 * self.tt.uncertainty_ns())
                await self._abort(txn)
                raise
            txn.last_activity_ns = _now_ns()
            return pb.TxnOpsResponse(results=results, ts=txn.ts)

    async def commit(self, req: pb.CommitTxnRequest) -> pb.CommitTxnResponse:
        return await self._commit_detached(self._txn(req.txn_id))

    async def _commit_detached(self, txn: _Txn) -> pb.CommitTxnResponse:
        # Once begun, a commit runs to its end even if the client stops waiting (its deadline
        # passed, it went away): cancelled halfway, the transaction would stay open with its
        # writes laid and its heartbeat keeping them alive until the silent-client reaper
        # aborted it (`client_timeout_s` later), and every transaction reading those keys
        # would wait that long. The client then learns nothing, as for any lost reply.
        task = asyncio.ensure_future(self._commit(txn))
        self._background.add(task)
        task.add_done_callback(_finished_quietly)
        task.add_done_callback(self._background.discard)
        return await asyncio.shield(task)

    async def _commit(self, txn: _Txn) -> pb.CommitTxnResponse:
        async with txn.lock:
            if self.protocol == "d2pl-ttc" and not txn.read_only:
                return await self._commit_2pl(txn)
            if not txn.writes and not txn.buffered:
                if self.protocol == "mvto-hlc":
                    self._finish(txn)
                    self.stats["committed"] += 1
                    if txn.touched:
                        self._spawn(self._resolve_all(txn, 0))
                    return pb.CommitTxnResponse(commit_ts=txn.ts, read_only=True)
                # Read-only (or nothing written): no record, no intents. Wait until every version
                # returned has certainly passed, so a later transaction sees them too.
                # HAZARD: as commit-wait; with clock error beyond the bound the wait is too short.
                if not txn.client_waits:
                    await self._commit_wait(txn.max_version_ts)
                self._finish(txn)
                self.stats["committed"] += 1
                if txn.touched:
                    self._spawn(self._resolve_all(txn, 0))  # it ended: nothing to wait for
                return pb.CommitTxnResponse(
                    commit_ts=txn.ts,
                    read_only=True,
                    wait_until=txn.max_version_ts if txn.client_waits else 0,
                )
            try:
                if txn.buffered:
                    await self._commit_with_writes(txn)
                else:
                    await self._record_commit(txn)
            except TxnAborted:
                await self._abort(txn)
                raise
            except K2Error:
                # Outcome unknown to us (the record may or may not be durable). Leave the intents:
                # the record decides, and waiters or the sweep resolve them from it.
                self._finish(txn)
                raise
            self._finish(txn)
            if self.settings.early_resolve:
                # HAZARD (commit-wait, early_resolve): the versions show before ts has certainly
                # passed; real-time order rests on every reader waiting out what it returns
                # (see the module's contracts).
                await self._resolve_committed(txn)
            # A client that waits itself (client_waits) gets the reply at once.
            if self.protocol != "mvto-hlc" and not txn.client_waits:
                # HAZARD (commit-wait): the reply waits until ts has certainly passed; every
                # transaction that begins after the client hears back gets a larger timestamp.
                # With clock error beyond the bound this ordering can break.
                await self._commit_wait(txn.ts)
            self.stats["committed"] += 1
            if not self.settings.early_resolve:
                await self._resolve_committed(txn)
            return pb.CommitTxnResponse(
                commit_ts=txn.ts, wait_until=txn.ts if txn.client_waits else 0
            )

    async def _resolve_committed(self, txn: _Txn) -> None:
        """Resolve a committed transaction's intents: in the background (`async_resolve`) or
        before going on."""
        if self.settings.async_resolve:
            self._spawn(self._resolve_all(txn, txn.ts))
        else:
            await self._resolve_all(txn, txn.ts)

    def _buffers(self, txn: _Txn) -> bool:
        return (
            self.settings.commit_with_writes and self.protocol != "d2pl-ttc" and not txn.read_only
        )

    async def _commit_with_writes(self, txn: _Txn) -> None:
        """Send the buffered writes and commit. Every shard but the record's gets its writes
        first (in parallel); once all are in place the record's shard gets the rest with
        `commit` set: it lays them, records the commit and resolves them there and then. The
        record goes on the farthest shard written (unless an earlier write placed it), so the
        key written across the widest gap is resolved when its write lands instead of a round
        trip later. That shard must already know the transaction (an earlier read there
        counts it in flight, so its seals wait for it): writes sent a round trip after the
        others to a shard that never saw it would arrive after their epoch was sealed, so then
        all writes go at once and the commit follows, as without this refinement. Raises
        TxnAborted (nothing committed) or K2Error (outcome unknown: the record decides)."""
        ops, txn.buffered = txn.buffered, []
        groups = self._split(ops)

        def can_decide(sid: int) -> bool:
            return (sid in txn.touched or len(groups) == 1) and not txn.writes.get(sid)

        if not txn.record_key:
            deciders = [g for g in groups if can_decide(g[0].id)] or groups
            far = max(deciders, key=lambda g: self.one_way_ns(g[0].leader))  # first of ties
            txn.record_key = self._choose_record_key(far[1][0][1].key)
            self._start_heartbeat(txn)
        home = self.cluster.shard_for_key(txn.record_key).id
        last = next(
            (i for i, (sh, _) in enumerate(groups) if sh.id == home and can_decide(home)), None
        )
        for shard, g in groups:
            txn.writes.setdefault(shard.id, set()).update(op.key for _, op in g)
        first = [(sh, [op for _, op in g]) for i, (sh, g) in enumerate(groups) if i != last]
        try:
            if len(first) == 1:
                await self._exec(txn, *first[0], sole=last is None)
            elif first:
                done = await asyncio.gather(
                    *(self._exec(txn, shard, g) for shard, g in first), return_exceptions=True
                )
                for outcome in done:
                    if isinstance(outcome, BaseException):
                        raise outcome
        except TxnAborted:
            raise
        except K2Error as e:
            # Nothing is decided yet (the record is written only below): aborting is safe.
            raise TxnAborted(
                f"transaction {txn.txn_id.hex()[:12]} aborted by rule write-failed: {e}"
            ) from e
        if last is not None:
            shard, g = groups[last]
            await self._exec(txn, shard, [op for _, op in g], commit=True, sole=not first)
            txn.decided_on = shard.id
        else:
            await self._record_commit(txn)

    async def _record_commit(self, txn: _Txn) -> None:
        """Write the record COMMITTED at its shard (EndTxn): the commit point."""
        await self.call(
            self._record_leader(txn),
            P + "EndTxn",
            pb.EndTxnRequest(txn=txn.header(self.node_name), commit=True),
            pb.EndTxnResponse,
        )

    async def _commit_2pl(self, txn: _Txn) -> pb.CommitTxnResponse:
        """Two-phase commit: prepare everywhere, commit_ts above every prepare timestamp and
        now().latest, record it, commit-wait, then release (resolve) everywhere."""
        try:
            prepared = await asyncio.gather(
                *(
                    self.call(
                        self.cluster.shard(sid).leader,
                        P + "Prepare",
                        pb.PrepareRequest(txn=txn.header(self.node_name), shard_id=sid),
                        pb.PrepareResponse,
                    )
                    for sid in sorted(txn.touched)
                )
            )
        except TxnAborted:
            await self._abort(txn)
            raise
        except K2Error as e:
            # A participant did not answer. Nothing was decided, and only this coordinator
            # records COMMITTED, so aborting is certain and safe; leaving the transaction open
            # would keep the other participants' prepared locks (which no one may wound) held
            # until the silent-client reaper ran.
            await self._abort(txn)
            raise TxnAborted(
                f"transaction {txn.txn_id.hex()[:12]} aborted by rule prepare-failed: {e}"
            ) from e
        commit_ts = max([self.tt.now().latest, txn.ts] + [p.prepare_ts for p in prepared])
        if txn.writes:
            try:
                await self.call(
                    self._record_leader(txn),
                    P + "EndTxn",
                    pb.EndTxnRequest(
                        txn=txn.header(self.node_name), commit=True, commit_ts=commit_ts
                    ),
                    pb.EndTxnResponse,
                )
            except TxnAborted:
                await self._abort(txn)
                raise
            except K2Error:
                self._finish(txn)
                raise
        self._finish(txn)
        # HAZARD (commit-wait, as in Spanner): locks are released only once commit_ts has
        # certainly passed. With clock error beyond the bound, real-time order can break.
        await self._commit_wait(commit_ts)
        self.stats["committed"] += 1
        if self.settings.async_resolve:
            self._spawn(self._resolve_all(txn, commit_ts))
        else:
            await self._resolve_all(txn, commit_ts)
        return pb.CommitTxnResponse(commit_ts=commit_ts)

    async def abort(self, req: pb.AbortTxnRequest) -> pb.AbortTxnResponse:
        txn = self.txns.get(req.txn_id)
        if txn is not None and not txn.done:
            async with txn.lock:
                await self._abort(txn)
        return pb.AbortTxnResponse()

    # -- internals -----------------------------------------------------------------------------

    def _finish(self, txn: _Txn) -> None:
        txn.done = True
        self.txns.pop(txn.txn_id, None)
        if txn.heartbeat is not None:
            txn.heartbeat.cancel()

    def _record_leader(self, txn: _Txn) -> str:
        return self.cluster.shard_for_key(txn.record_key).leader

    def _choose_record_key(self, first_write: bytes) -> bytes:
        if self.settings.record_at_home:
            return first_write
        # Refinement off: the record sits on a shard this coordinator leads (or the first one).
        led = self.cluster.shards_led_by(self.node_name) or list(self.cluster.shards)
        return led[0].start + b"\x00"  # inside the shard, and never empty (empty = no record)

    async def _abort(self, txn: _Txn) -> None:
        if txn.done:
            return
        txn.buffered = []  # never sent: nothing to undo
        self._finish(txn)
        self.stats["aborted"] += 1
        if not txn.writes:
            if txn.touched:
                self._spawn(self._resolve_all(txn, 0))  # release read locks / in-flight marks
            return
        try:
            await self.call(
                self._record_leader(txn),
                P + "EndTxn",
                pb.EndTxnRequest(txn=txn.header(self.node_name), commit=False),
                pb.EndTxnResponse,
            )
        except K2Error as e:
            # The record's leader could not be told; the intents stay until a waiter or the
            # sweep finds the heartbeat expired and aborts the record itself.
            log.info("abort of %s not recorded yet: %s", txn.txn_id.hex()[:12], e)
            return
        self._spawn(self._resolve_all(txn, 0))

    async def _resolve_all(self, txn: _Txn, commit_ts: int) -> None:
        # A shard that recorded the commit with its writes resolved them itself.
        done = txn.decided_on if commit_ts else None
        calls = [
            self.call(
                self.cluster.shard(sid).leader,
                P + "Resolve",
                pb.ResolveRequest(
                    txn_id=txn.txn_id, commit_ts=commit_ts, shard_id=sid, keys=sorted(keys)
                ),
                pb.ResolveResponse,
            )
            for sid, keys in [
                *txn.writes.items(),
                *((sid, set()) for sid in txn.touched if sid not in txn.writes),
            ]
            if sid != done
        ]
        if len(calls) == 1:  # one shard (most transactions): no gather, no extra task
            try:
                await calls[0]
            except Exception:
                return  # the record stays; waiters and sweeps resolve the rest from it
        elif calls:
            results = await asyncio.gather(*calls, return_exceptions=True)
            if any(isinstance(r, BaseException) for r in results):
                return  # the record stays; waiters and sweeps resolve the rest from it
        with contextlib.suppress(K2Error):
            await self.call(
                self._record_leader(txn),
                P + "ForgetTxn",
                pb.ForgetTxnRequest(txn_id=txn.txn_id, record_key=txn.record_key),
                pb.ForgetTxnResponse,
            )

    def _start_heartbeat(self, txn: _Txn) -> None:
        """Heartbeat txn's record every `heartbeat_s` until it ends. Most transactions end
        before the first beat is due, so that one waits on a plain timer; only a transaction
        still running then gets a task (same beats, one task fewer per transaction)."""
        txn.heartbeat = asyncio.get_running_loop().call_later(
            self.settings.heartbeat_s, self._heartbeat_due, txn
        )

    def _heartbeat_due(self, txn: _Txn) -> None:
        if not txn.done:
            txn.heartbeat = asyncio.get_running_loop().create_task(self._heartbeat_loop(txn))

    async def _heartbeat_loop(self, txn: _Txn) -> None:
        """Beat now, then every `heartbeat_s`, while txn runs."""
        while not txn.done:
            with contextlib.suppress(K2Error):
                resp: pb.HeartbeatResponse = await self.call(
                    self._record_leader(txn),
                    P + "Heartbeat",
                    pb.HeartbeatRequest(txn_id=txn.txn_id, record_key=txn.record_key, ts=txn.ts),
                    pb.HeartbeatResponse,
                )
                if resp.status == pb.TXN_ABORTED:
                    return
            await asyncio.sleep(self.settings.heartbeat_s)

    def _split(self, ops: list[pb.TxnOp]) -> list[tuple[ShardConfig, list[tuple[int, pb.TxnOp]]]]:
        """Group ops by shard, keeping each op's index; scans are split per shard in key order."""
        groups: dict[int, list[tuple[int, pb.TxnOp]]] = {}
        shards: dict[int, ShardConfig] = {}
        for i, op in enumerate(ops):
            if op.kind == pb.OP_SCAN:
                raise AssertionError("scans are run separately")
            shard = self.cluster.shard_for_key(op.key)
            shards[shard.id] = shard
            groups.setdefault(shard.id, []).append((i, op))
        return [(shards[sid], g) for sid, g in groups.items()]

    async def _exec(
        self,
        txn: _Txn,
        shard: ShardConfig,
        ops: list[pb.TxnOp],
        *,
        commit: bool = False,
        sole: bool = False,
    ) -> pb.ExecResponse:
        """Run ops of txn at shard's leader. `sole`: no other request of txn goes out in this
        round (one shard, no scans); if it is also txn's first, the leader may restamp it
        rather than abort it (`TxnSettings.restamp`, `ExecRequest.restartable`), and txn
        carries on at the timestamp the reply names."""
        restartable = (
            sole
            and self.settings.restamp
            and self.protocol != "d2pl-ttc"
            and not txn.sent
            and not txn.pinned
        )
        txn.sent = True
        if not txn.read_only:
            # d2PL: these shards hold its locks; all protocols: replication counts it in flight
            # there (the seal waits for it) until a Resolve says it ended.
            txn.touched.add(shard.id)
        if txn.region_local and not self._in_region(shard.leader):
            txn.region_local = False  # its keys named at begin were not all it touches
        if txn.aligned:
            # Aligned dispatch: hold the operation so it reaches its leader at about ts. Sent
            # early, a future-stamped intent would sit on a hot local row and abort local
            # writers with lower timestamps in the meantime.
            await self.tt.wait_until_after(txn.ts - self.one_way_ns(shard.leader))
        resp = await self._exec_call(
            shard.leader,
            pb.ExecRequest(
                txn=txn.header(self.node_name),
                shard_id=shard.id,
                ops=ops,
                commit=commit,
                restartable=restartable,
            ),
        )
        if resp.restamped_ts:
            self._adopt_restamp(txn, resp.restamped_ts)
        return resp

    def _adopt_restamp(self, txn: _Txn, ts: int) -> None:
        """The leader ran txn's first request again at ts (see `_exec`): its record, resolution
        and commit-wait (or the client's wait_until) are at ts from here on."""
        if ts <= txn.ts:
            raise AssertionError(
                f"leader restamped transaction {txn.txn_id.hex()[:12]} from {txn.ts} down to {ts}"
            )
        txn.ts = ts
        if self.hlc is not None:
            self.hlc.update(ts)

    def _check_ops(self, txn: _Txn, ops: list[pb.TxnOp]) -> None:
        """Refuse bad input (InvalidArgument) before anything is sent."""
        limits = self.cluster.settings
        for op in ops:
            if len(op.key) > limits.max_key_bytes:
                raise InvalidArgument(
                    f"key of {len(op.key)} bytes exceeds the limit of {limits.max_key_bytes} bytes"
                )
            if is_write(op):
                if txn.read_only:
                    raise InvalidArgument("a read-only transaction cannot write")
                if op.kind == pb.OP_PUT and len(op.value) > limits.max_value_bytes:
                    raise InvalidArgument(
                        f"value of {len(op.value)} bytes exceeds the limit of "
                        f"{limits.max_value_bytes} bytes"
                    )

    async def _run_ops(self, txn: _Txn, ops: list[pb.TxnOp]) -> list[pb.TxnOpResult]:
        self._check_ops(txn, ops)
        for op in ops:
            if is_write(op) and not txn.record_key:
                txn.record_key = self._choose_record_key(op.key)
                self._start_heartbeat(txn)
        results: list[pb.TxnOpResult | None] = [None] * len(ops)
        point = [(i, op) for i, op in enumerate(ops) if op.kind != pb.OP_SCAN]
        if point:
            groups = self._split([op for _, op in point])
            for shard, group in groups:
                keys = (
                    txn.writes.setdefault(shard.id, set())
                    if any(is_write(op) for _, op in group)
                    else None
                )
                if keys is not None:
                    keys.update(op.key for _, op in group if is_write(op))
            responses: list[pb.ExecResponse | BaseException]
            if self.settings.one_shot and len(groups) == 1:
                # One shard (most transactions): no gather, so no task and no extra loop hops.
                shard, g = groups[0]
                sole = len(point) == len(ops)  # scans would follow: they are not restartable
                responses = [await self._exec(txn, shard, [op for _, op in g], sole=sole)]
            elif self.settings.one_shot:
                responses = await asyncio.gather(
                    *(self._exec(txn, shard, [op for _, op in g]) for shard, g in groups),
                    return_exceptions=True,
                )
                for outcome in responses:
                    if isinstance(outcome, BaseException):
                        raise outcome
            else:
                responses = []
                for shard, g in groups:  # one round trip per operation: the ablation baseline
                    rs = pb.ExecResponse()
                    for _, op in g:
                        one = await self._exec(txn, shard, [op])
                        rs.results.extend(one.results)
                    responses.append(rs)
            for (_, g), resp in zip(groups, responses, strict=True):
                assert isinstance(resp, pb.ExecResponse)
                for (j, _), res in zip(g, resp.results, strict=True):
                    results[point[j][0]] = res
        for i, op in enumerate(ops):
            if op.kind == pb.OP_SCAN:
                results[i] = await self._scan(txn, op)
        out: list[pb.TxnOpResult] = []
        for maybe in results:
            assert maybe is not None
            res = maybe
            txn.max_version_ts = max(
                txn.max_version_ts, res.version_ts, *(kv.version_ts for kv in res.items)
            )
            out.append(res)
        return out

    async def _scan(self, txn: _Txn, op: pb.TxnOp) -> pb.TxnOpResult:
        end = op.end if op.has_end else None
        limit = op.limit or self.cluster.settings.scan_page_rows
        out = pb.TxnOpResult()
        hashed = self.cluster.settings.partitioning == "hash"
        for shard in self.cluster.shards_for_range(op.key, end):
            start = op.key if hashed else max(op.key, shard.start)
            want = limit if hashed else limit - len(out.items)
            sub = pb.TxnOp(
                kind=pb.OP_SCAN, key=start, end=end or b"", has_end=end is not None, limit=want
            )
            r = (await self._exec(txn, shard, [sub])).results[0]
            out.items.extend(r.items)
            if not hashed and (r.more or len(out.items) >= limit):
                out.more = r.more or len(out.items) >= limit
                break
            out.more = out.more or r.more
        if hashed:
            items = sorted(out.items, key=lambda kv: kv.key)
            del out.items[:]
            out.items.extend(items[:limit])
            out.more = out.more or len(items) > limit
        return out


def _finished_quietly(task: asyncio.Task[Any]) -> None:
    """A shielded commit's outcome, when the caller who wanted it was cancelled: read it, so it
    is not reported as never retrieved (the record decides; nobody is waiting)."""
    if not task.cancelled():
        task.exception()


def _now_ns() -> int:
    """Local elapsed time for timeouts and heartbeats: the event loop's monotonic clock, which
    the simulator makes virtual. Timestamps never come from here (they come from TrueTime)."""
    return int(asyncio.get_running_loop().time() * 1e9)
