"""The participant side of transactions at a node: shard leaders running K2-MVTO for coordinators.

Handles Exec (a group of one transaction's operations on one shard; with `commit`, its last writes
and its commit, on the shard of its record), EndTxn and Heartbeat (at the shard holding the
transaction's record), QueryTxn (anyone asking a record for an outcome), Resolve
(turning intents into versions, or dropping them) and ForgetTxn (dropping a record whose intents
are all resolved).

Waiting: when the rules answer `Wait(intent)` (a lower-timestamp transaction U holds the key), the
request first flushes the intents it already installed, then waits for U's intents here to be
resolved. If that takes longer than `push_after_s`, it asks U's record (QueryTxn with
abort_if_expired): a COMMITTED or ABORTED record lets it resolve U's intent itself; a record whose
heartbeat expired is aborted on the spot (U's coordinator died). Then the operation is evaluated
again. The whole wait is bounded by the request timeout.

Durability: intents, records and resolutions are fsynced before any reply. On start (`recover`)
and then every `expiry_s`, a sweep asks the records of all intents present here, so in-doubt
transactions (coordinator or node killed mid-way) are resolved even if no one reads their keys.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message

from k2store.background import stop_tasks
from k2store.cluster import ClusterConfig, TxnSettings
from k2store.errors import InvalidArgument, NotLeader, TxnAborted, Unavailable
from k2store.proto import k2_pb2 as pb
from k2store.shard import ShardLeader
from truetime import HybridLogicalClock, TrueTime, format_ts
from txn.locks import Granted, LockTable, Mode
from txn.mvto import Abort, MvtoRules, ReadDone, ScanDone, Wait, WriteDone
from txn.records import TxnRecord, TxnRef, TxnStatus, record_meta_name
from txn.storage import Intent, Mutation, PutIntent, PutMeta, Version, VersionedStore

log = logging.getLogger("k2.participant")

CallFn = Callable[[str, str, Message, type[Any]], Awaitable[Any]]
PLACE_MAX_LINE = 3
"""A waiting request holds a place in line on a key it has still to write (see Participant.exec)
only while fewer than this many transactions are in that key's line. On a saturated key the
places chain waits into convoys: on the TPC-C-like mix with 334 clients per warehouse, places
on every key cut failed attempts from 64% to 0% but throughput by 30%; with this bound they
fall to 52% for a 9% loss, and at 10 clients per warehouse from 6% to 2.7% (docs/benchmarks.md)."""
FOR_UPDATE_MAX_LINE = 3
"""A read for update of a transaction that may wait on the wide area is refused when it arrives
at a key whose line already holds this many transactions, one of them below it (rule
line-full; Participant._crowded); admitted, it keeps its place in the line however
long the line grows behind it (Participant._reserve). A transaction that stays in its region
(`TxnHeader.region_local`) is never refused: it writes within local round trips. YCSB-T
read-modify-write at theta 0.99 (`run_sim`, 20 s with the first 5 not measured, mean txn/s
over seeds 1-3 at 11 / 33 / 100 clients per region): before the refusal, when a far read
for update was admitted to any line and took a place only while fewer than 8 were in it,
242.9 / 150.3 / 147.3; refused from 2 in line 231.9 / 264.6 / 292.5, from 3 254.6 / 269.1 /
320.1, from 4 244.9 / 257.8 / 300.2, from 8 (33 and 100 only) 243.5 / 256.5; from 3 but with
places still bounded at 8, 254.6 / 268.4 / 308.0, and at 3, 233.0 / 235.6 (11 and 33)."""


MAX_RESTAMPS = 1
"""How many times a leader restamps one restartable request (TxnSettings.restamp) before it lets
the rule abort it. A request overtaken again right after its restamp is on a saturated key,
where retrying at once feeds the convoy and the client's backoff relieves it. TPC-C-like mix in
the simulator (`k2 bench tpcc --sim --duration 10`, K2-MVTO, seed 1 unless named), txn/s and
failed attempts: 30 clients per region, no restamps 6,581 / 6,787 / 6,224 (seeds 1-3), 0.55-0.58%;
at most 1: 6,416 / 6,406 / 6,622, 0.03-0.06%; at most 3: 6,453 / 6,476 / 6,624, 0.01-0.04%.
334 per region: none 22,220 and 22,335 (seed 2), 7.3% / 6.7%; 1: 21,979 and 24,636, 2.7% /
2.3% (worst region 3.5%); 2: 16,533, 1.9%; 3: 20,837 and 20,155, 1.0% / 1.1%; 10: 18,891,
1.0%."""


class _Restamp(Exception):
    """Raised inside `Participant._run` instead of an abort, for `_exec` to run the request
    again at a timestamp of at least `floor` (what the request laid is already undone)."""

    def __init__(self, rule: str, floor: int) -> None:
        super().__init__(rule)
        self.rule = rule
        self.floor = floor


class Participant:
    def __init__(
        self,
        cluster: ClusterConfig,
        node_name: str,
        leaders: dict[int, ShardLeader],
        tt: TrueTime,
        call: CallFn,
        settings: TxnSettings,
        timeout_s: float,
        hlc: HybridLogicalClock | None = None,
    ) -> None:
        self.cluster = cluster
        self.protocol = settings.protocol
        self.hlc = hlc
        self.node_name = node_name
        self.leaders = leaders
        self.tt = tt
        self.call = call
        self.settings = settings
        self.timeout_s = timeout_s
        self.rules = {
            sid: MvtoRules(
                ld.store,
                wait_for_lower=settings.wait_for_lower,
                unsafe_ignore_read_marks=settings.unsafe_ignore_read_marks,
            )
            for sid, ld in leaders.items()
        }
        self._resolved: dict[bytes, asyncio.Event] = {}
        self._key_waiters: dict[bytes, list[int]] = {}
        """key -> timestamps of transactions waiting on it (sorted): see _wait_in_order."""
        self._key_turns: dict[bytes, asyncio.Event] = {}
        self._reserved: dict[bytes, dict[bytes, tuple[int, asyncio.TimerHandle]]] = {}
        """txn_id -> key -> (ts, expiry timer): places held for reads for update (_reserve)."""
        self._heartbeats: dict[bytes, int] = {}
        self.restamp_ts: Callable[[int], Awaitable[int]] | None = None
        """A unique timestamp at least the given floor, from this node's own source
        (`Coordinator.restamp_timestamp`); None: requests are never restamped here."""
        self._restamp_rules = frozenset(
            {"read-mark", "newer-version"}
            | ({"uncertainty"} if settings.protocol == "mvto-hlc" else set())
        )
        """The rules whose abort a restartable request turns into a restamp (see _exec)."""
        self._sweeper: asyncio.Task[None] | None = None
        self.counters: dict[str, int] = {}
        self.seal_check: Callable[[ShardLeader, bytes, int, bytes], str | None] = (
            lambda _l, _k, _t, _x: None
        )
        """Replication's closed-timestamp check (leader, key, ts, txn_id): None, or why the
        write must abort (rule sealed). Called right before an intent is laid down, with no
        await in between."""
        self.in_flight: Callable[[int, bytes, int, bool], None] = lambda _s, _x, _t, _e: None
        """Tells replication a read-write transaction (shard, txn_id, ts) is running here
        (False: it ended here), so seals wait for it rather than refuse its later writes."""
        # d2PL-TTC state: locks, the transactions holding them, and those wounded here.
        self.locks = LockTable()
        self._locked: dict[bytes, _LockedTxn] = {}
        self._wounded: dict[bytes, None] = {}
        self._released: dict[bytes, asyncio.Event] = {}
        # HAZARD: the node starts serving only once its durable read ceiling, which covers the
        # timestamp of every Exec the previous process served, has certainly passed (node.py,
        # SimCluster.restart). So every transaction that may have held locks there has a
        # timestamp below this; with clock error beyond the bound one could slip above it and
        # carry a read made under a lost lock into a commit (a lost update).
        self.started_ts = tt.now().earliest
        """d2PL: transactions below this began before this process started (see _exec_2pl)."""

    # -- helpers -------------------------------------------------------------------------------

    def _leader(self, shard_id: int) -> tuple[ShardLeader, MvtoRules]:
        leader = self.leaders.get(shard_id)
        if leader is None:
            raise NotLeader(f"node {self.node_name} does not lead shard {shard_id}")
        return leader, self.rules[shard_id]

    def _record_leader(self, record_key: bytes) -> ShardLeader:
        shard = self.cluster.shard_for_key(record_key)
        leader = self.leaders.get(shard.id)
        if leader is None:
            raise NotLeader(f"node {self.node_name} does not hold the record shard {shard.id}")
        return leader

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def _wake(self, txn_id: bytes) -> None:
        ev = self._resolved.pop(txn_id, None)
        if ev is not None:
            ev.set()
        self._unreserve_all(txn_id)  # it ended: it will write nothing more here

    # -- reads for update ----------------------------------------------------------------------

    def _reserve(self, txn: TxnRef, key: bytes) -> None:
        """After a read for update: hold txn's place in key's line (see _wait_in_order) until
        its write of key has laid its intent, the transaction ends here, or
        `for_update_hold_s` passes. A later transaction that arrives meanwhile queues behind it
        instead of reading the key first, which would abort the coming write by rule
        read-mark. However long the line has grown behind it: a transaction that may wait on
        the wide area was admitted to a short line (`_crowded`), and one that stays in
        its region writes within local round trips and keeps the line moving in order. Only
        when operations run changes: each still passes the MVTO rules at its timestamp, and
        the place is at txn's own timestamp, so waits still run from higher to lower
        timestamps only (no deadlock)."""
        held = self._reserved.get(txn.txn_id)
        if held is not None and key in held:
            return
        held = self._reserved.setdefault(txn.txn_id, {})
        self._join_line(key, txn.ts)
        timer = asyncio.get_running_loop().call_later(
            self.settings.for_update_hold_s, self._unreserve, txn.txn_id, key
        )
        held[key] = (txn.ts, timer)
        self._count("for-update-places")

    def _crowded(self, key: bytes, ts: int) -> Abort | None:
        """Admission to a crowded hot key: the refusal (rule line-full, retryable) of a read for
        update at ts of a transaction that may wait on the wide area, when key's line already
        holds `FOR_UPDATE_MAX_LINE` places and one of them is below ts; None to admit it.
        Admitted to any line, such a transaction either took a place (see `_reserve`) and held
        up everyone behind it for the round trip to its write, or, when the line was long,
        read without one, was overtaken by a later transaction of the line, and its write
        aborted by rule read-mark after it had held its places on its other keys for that
        round trip: 759 of 768 such reads ended so (YCSB-T read-modify-write, 33 clients per
        region, seed 1, when places were bounded at 8). Refused, it holds nothing while it
        backs off, and the line moves at local speed. The price is fairness under overload: a
        retry takes a new, later timestamp and may find the line full again, so more
        transactions of other regions give up after all their attempts (docs/benchmarks.md),
        while more of them commit. Giving one that had failed several times a place however
        long the line (a priority that survives retries) made convoys that cut throughput to
        a third."""
        line = self._line_length(key)
        if line < FOR_UPDATE_MAX_LINE or not self._lower_in_line(key, ts):
            return None
        return Abort(
            "line-full",
            f"read for update of key {key[:64]!r} at {format_ts(ts)} aborted by rule "
            f"line-full: {line} transactions are in line for it; retry later",
        )

    def _unreserve(self, txn_id: bytes, key: bytes) -> None:
        held = self._reserved.get(txn_id)
        if held is None or key not in held:
            return
        ts, timer = held.pop(key)
        timer.cancel()
        if not held:
            del self._reserved[txn_id]
        self._leave_line(key, ts)

    def _unreserve_all(self, txn_id: bytes) -> None:
        for key in list(self._reserved.get(txn_id, ())):
            self._unreserve(txn_id, key)

    # -- Exec ----------------------------------------------------------------------------------

    async def exec(self, req: pb.ExecRequest) -> pb.ExecResponse:
        """Run a transaction's operations here (see `_exec`); the reply says how long this
        leader held the request (`held_ns`), so the coordinator's one-way delays, which set
        future timestamps, measure the wire and not this key's line."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        resp = await self._exec(req)
        resp.held_ns = max(0, round((loop.time() - start) * 1e9))
        return resp

    async def _exec(self, req: pb.ExecRequest) -> pb.ExecResponse:
        """Check the request, then run it (`_run`). A restartable one (the transaction's
        first request, to this shard only: `ExecRequest.restartable`) that a rule would abort
        is restamped instead: what it laid here is dropped and those waiting on it woken, this
        node gives it a timestamp above the conflict (`restamp_ts`), and it runs again from its
        first operation, up to `MAX_RESTAMPS` times; the reply's `restamped_ts` tells the
        coordinator. Nothing the client can see changes: it had seen nothing of the
        transaction, its reads are all made again at the new timestamp, and the old attempt
        leaves only read marks at its old timestamp, which hold back no write above it. So it
        is the client's own retry, with a later timestamp, made here."""
        leader, rules = self._leader(req.shard_id)
        h = req.txn
        if len(h.txn_id) != 16 or not h.ts:
            raise InvalidArgument("transaction header needs a 16-byte txn_id and a timestamp")
        txn = TxnRef(h.txn_id, h.ts, h.record_key)
        if self.hlc is not None:
            self.hlc.update(h.ts)  # causality: what this node stamps next is above txn.ts
        if req.commit and (
            self.protocol == "d2pl-ttc"
            or h.read_only
            or not h.record_key
            or self.cluster.shard_for_key(h.record_key).id != req.shard_id
            or not req.ops
            or not all(is_write(op) for op in req.ops)
        ):
            raise InvalidArgument(
                "a commit with writes needs only writes, sent to the shard of the record "
                "(K2-MVTO and MVTO-HLC; d2PL-TTC commits by two-phase commit)"
            )
        if not h.read_only:
            self.in_flight(req.shard_id, h.txn_id, h.ts, True)
        if self.protocol == "d2pl-ttc" and not h.read_only:
            return await self._exec_2pl(leader, req)
        ops = list(req.ops)
        for op in ops:  # bad input anywhere in the request: refused before anything changes
            leader.check_key(op.key)
            writes = is_write(op)
            if writes and (h.read_only or not h.record_key):
                raise InvalidArgument("a write needs a read-write transaction with a record key")
            if op.kind == pb.OP_PUT:
                leader.check_value(op.key, op.value)
            if op.kind not in (pb.OP_GET, pb.OP_SCAN, pb.OP_PUT, pb.OP_DELETE):
                raise InvalidArgument(f"unknown operation kind {op.kind}")
        if not (req.restartable and self.settings.restamp and self.restamp_ts is not None):
            return await self._run(leader, rules, req, txn, restartable=False)
        restamps = 0
        while True:
            try:
                resp = await self._run(leader, rules, req, txn, restartable=restamps < MAX_RESTAMPS)
            except _Restamp as r:
                restamps += 1
                leader.counters.restamps += 1  # by rule in the node's counters
                self._count(f"restamp:{r.rule}")
                ts = await self.restamp_ts(r.floor)
                req = _with_ts(req, ts)
                txn = TxnRef(txn.txn_id, ts, txn.record_key)
                continue
            if restamps:
                resp.restamped_ts = txn.ts
            return resp

    async def _run(
        self,
        leader: ShardLeader,
        rules: MvtoRules,
        req: pb.ExecRequest,
        txn: TxnRef,
        *,
        restartable: bool,
    ) -> pb.ExecResponse:
        """Run a checked Exec's operations at txn.ts. `restartable`: where a rule of
        `_restamp_rules` would abort it, undo what it laid here and raise `_Restamp` instead
        (see `_exec`)."""
        h = req.txn
        ops = list(req.ops)
        results: list[pb.TxnOpResult] = [pb.TxnOpResult() for _ in ops]
        laid: list[bytes] = []
        """Keys this request laid intents on (dropped if it is restamped)."""
        pending: list[Mutation] = []
        written: list[bytes] = []
        """Keys written by this request that its transaction had reserved (_reserve)."""
        waited_s = 0.0

        def flush() -> None:
            if pending:
                leader.store.apply(pending, sync=True)
                pending.clear()

        def for_update(op: pb.TxnOp) -> bool:
            """A read for update that counts as one (see `TxnSettings.for_update`)."""
            return op.for_update and self.settings.for_update and not h.read_only

        def evaluate(op: pb.TxnOp) -> ReadDone | ScanDone | WriteDone | Wait | Abort:
            if op.kind == pb.OP_GET:
                flush()
                if for_update(op):
                    # The write this read is for cannot succeed: fail now, before the
                    # transaction waits here or holds places on its other keys for it.
                    doomed = rules.doomed_write(txn, op.key)
                    if doomed is not None:
                        return doomed
                return rules.read(txn, op.key, txn.ts)
            if op.kind == pb.OP_SCAN:
                flush()
                end = op.end if op.has_end else None
                if leader.shard.end is not None and (end is None or end > leader.shard.end):
                    end = leader.shard.end
                limit = op.limit or self.cluster.settings.scan_page_rows
                return rules.scan(txn, op.key, end, txn.ts, limit)
            value = op.value if op.kind == pb.OP_PUT else None
            sealed = self.seal_check(leader, op.key, txn.ts, txn.txn_id)
            return Abort("sealed", sealed) if sealed else rules.write(txn, op.key, value)

        def record(i: int, op: pb.TxnOp, out: ReadDone | ScanDone | WriteDone | Abort) -> None:
            if self.hlc is not None and isinstance(out, ReadDone | ScanDone):
                out = self._uncertainty(leader, txn, op, out)
            if isinstance(out, Abort):
                flush()
                if restartable and out.rule in self._restamp_rules:
                    raise self._restart(leader, rules, txn, laid, op.key, out.rule)
                self._count(f"abort:{out.rule}")
                leader.counters.aborts += 1
                self._unreserve_all(txn.txn_id)  # it writes nothing more anywhere
                raise TxnAborted(out.message)
            if isinstance(out, WriteDone):
                pending.append(out.mutation)
                laid.append(op.key)
                leader.counters.writes += 1
                if txn.txn_id in self._reserved:
                    written.append(op.key)
            elif isinstance(out, ReadDone):
                leader.counters.reads += 1
                results[i] = _read_result(out.version)
                if for_update(op):
                    self._reserve(txn, op.key)
            else:
                leader.counters.reads += 1
                results[i] = pb.TxnOpResult(
                    items=[
                        pb.KeyValue(key=k, value=v.value or b"", version_ts=v.ts)
                        for k, v in out.rows
                    ],
                    more=out.more,
                )

        if not h.region_local:  # admission: before it waits or reads anything (see _crowded)
            for i, op in enumerate(ops):
                if op.kind == pb.OP_GET and for_update(op):
                    refused = self._crowded(op.key, txn.ts)
                    if refused is not None:
                        record(i, op, refused)
        # First pass, for requests of several keys (no scans): run every operation that need
        # not wait, and defer those that must (with every later operation on the same key), so
        # a transaction lays its intents on keys it can take now before it waits for others.
        # Otherwise a later reader overtakes it on those keys while it waits, and its write
        # there aborts by rule read-mark. Operations on one key keep their order.
        deferred: list[int] = []
        several = len(ops) > 1 and all(op.kind != pb.OP_SCAN for op in ops)
        if several:
            blocked: set[bytes] = set()
            for i, op in enumerate(ops):
                if op.key not in blocked and not self._lower_in_line(op.key, txn.ts):
                    out = evaluate(op)
                    if not isinstance(out, Wait):
                        record(i, op, out)
                        continue
                    blocked.add(op.key)
                deferred.append(i)
        else:
            deferred = list(range(len(ops)))
        # Then, while it waits, the request holds a place in line (see _wait_in_order) on every
        # key it still has to write, not only on the one it waits for: a later transaction that
        # arrives meanwhile queues behind it there rather than reading the key first, which
        # would abort this one's write there by rule read-mark (a payment waiting for the
        # warehouse, overtaken on its district by a later new-order). Keys it only reads need
        # no place: a later writer lays its intent above this reader, which reads below it.
        # Nor does a key whose line is already long (see PLACE_MAX_LINE).
        in_line: dict[bytes, None] = {}  # an ordered set: iteration order must not vary
        if several and self.settings.wait_places:
            for i in deferred:
                key = ops[i].key
                if (
                    ops[i].kind != pb.OP_GET
                    and key not in in_line
                    and self._line_length(key) < PLACE_MAX_LINE
                ):
                    in_line[key] = None
                    self._join_line(key, txn.ts)
        try:
            for n, i in enumerate(deferred):
                op = ops[i]
                if op.kind != pb.OP_SCAN and self._lower_in_line(op.key, txn.ts):
                    flush()
                    waited_s += await self._wait_in_order(op.key, txn.ts, b"", b"", 0)
                while True:
                    out = evaluate(op)
                    if not isinstance(out, Wait):
                        break
                    flush()  # what this request installed must not stay unflushed while waiting
                    self._count("waits")
                    waited_s += await self._wait_in_order(
                        out.key, txn.ts, out.intent.txn_id, out.intent.record_key, out.intent.ts
                    )
                    if waited_s > self.timeout_s:
                        raise Unavailable(
                            f"timed out after {waited_s:.1f}s waiting for transaction "
                            f"{out.intent.txn_id.hex()[:12]} on key {out.key[:64]!r}"
                        )
                record(i, op, out)
                if op.key in in_line and all(
                    ops[j].key != op.key or ops[j].kind == pb.OP_GET for j in deferred[n + 1 :]
                ):
                    flush()  # its intent is in place before those behind it look
                    del in_line[op.key]
                    self._leave_line(op.key, txn.ts)
        finally:
            for key in in_line:
                self._leave_line(key, txn.ts)
        flush()
        for key in written:  # its intents are in place: those queued behind them may look
            self._unreserve(txn.txn_id, key)
        if req.commit:
            await self._commit_here(leader, rules, req, [op.key for op in ops])
        return pb.ExecResponse(results=results)

    def _restart(
        self,
        leader: ShardLeader,
        rules: MvtoRules,
        txn: TxnRef,
        laid: list[bytes],
        key: bytes,
        rule: str,
    ) -> _Restamp:
        """Undo a restartable request that met `rule` on key (see `_exec`): drop the intents
        it laid here (already flushed), wake whoever waits on them and free its places.
        Returns the restamp to raise, with the floor its new timestamp must reach: above the
        key's read mark and newest version, or (uncertainty) above the whole window."""
        rules.resolve(txn.txn_id, None, laid)
        self._wake(txn.txn_id)
        if rule == "uncertainty":
            floor = txn.ts + self.max_offset_ns() + 1
        else:
            floor = _above_versions(leader.store, key)
        # The conflict was above txn.ts, so floor already is; kept explicit, as real-time
        # order rests on it (a transaction's timestamp only ever moves up).
        return _Restamp(rule, max(floor, txn.ts + 1))

    async def _commit_here(
        self, leader: ShardLeader, rules: MvtoRules, req: pb.ExecRequest, keys: list[bytes]
    ) -> None:
        """The last writes of a transaction are in place on the shard of its record (its other
        writes went first, see Coordinator._commit_with_writes): record the commit, then resolve
        them here at once rather than when the coordinator's Resolve arrives a one-way delay
        later. A record already aborted (by a waiter, after the heartbeat expired) wins."""
        h = req.txn
        rec = self._decide(leader, h, commit=True)
        committed = rec.status == TxnStatus.COMMITTED
        if committed and self.protocol == "k2-mvto" and not self.settings.early_resolve:
            # HAZARD (commit-wait): without early_resolve the versions show only once ts has
            # certainly passed, as when the coordinator resolves after its commit-wait. With it
            # they show now, and every reader waits out what it returns (Coordinator's
            # contracts).
            await self.tt.wait_until_after(h.ts)
        rules.resolve(h.txn_id, rec.commit_ts if committed else None, keys)
        self.in_flight(req.shard_id, h.txn_id, 0, False)
        self._wake(h.txn_id)
        if not committed:
            raise self._record_aborted(h.txn_id)
        self._count("commits-with-writes")

    def _uncertainty(
        self, leader: ShardLeader, txn: TxnRef, op: pb.TxnOp, out: ReadDone | ScanDone
    ) -> ReadDone | ScanDone | Abort:
        """MVTO-HLC: a value in (ts, ts + max_offset] may have been written before this read
        began in real time, so the read must restart above it (rule ``uncertainty``)."""
        window = txn.ts + self.max_offset_ns()
        if isinstance(out, ReadDone):
            spans: list[tuple[bytes, bytes | None]] = [(op.key, op.key + b"\x00")]
        else:
            spans = [(op.key, out.marked_end)]
        for start, end in spans:
            for key, v in leader.store.scan(start, end, window, None):
                if v.ts > txn.ts:
                    return _uncertain(key, txn.ts, v.ts)
            for key, intent in leader.store.scan_intents(start, end):
                if intent.txn_id != txn.txn_id and txn.ts < intent.ts <= window:
                    return _uncertain(key, txn.ts, intent.ts)
        return out

    def max_offset_ns(self) -> int:
        """The largest distance between two nodes' clocks: each may be off by the bound."""
        return 2 * self.tt.uncertainty_ns()

    # -- d2PL-TTC ------------------------------------------------------------------------------

    async def _exec_2pl(self, leader: ShardLeader, req: pb.ExecRequest) -> pb.ExecResponse:
        """Two-phase locking: shared locks for reads (latest committed value), exclusive locks
        for writes (installed as intents at the start timestamp, not visible), wound-wait."""
        h = req.txn
        info = self._locked.get(h.txn_id)
        if info is None:
            self._check_not_wounded(h.txn_id)
            if h.ts < self.started_ts:
                # It may have run here before a restart, which lost its locks (its intents
                # survive): what it read under them may have changed since. Starting it afresh
                # would let its Prepare succeed and commit a write based on a stale read.
                self._count("abort:locks-lost")
                raise TxnAborted(
                    f"transaction {h.txn_id.hex()[:12]} at {format_ts(h.ts)} aborted by rule "
                    f"locks-lost: it began before node {self.node_name} restarted, and locks it "
                    "held here were lost"
                )
            info = self._locked[h.txn_id] = _LockedTxn(h.ts)
        info.last_ns = _now_ns()
        if h.record_key:
            info.record_key = h.record_key
        results: list[pb.TxnOpResult] = []
        waited_s = 0.0
        for op in req.ops:
            self._check_live(h.txn_id, info)
            leader.check_key(op.key)
            if op.kind == pb.OP_SCAN:
                waited_s += await self._scan_2pl(leader, h, info, op, waited_s)
                results.append(self._scan_rows_2pl(leader, h.txn_id, op))
                continue
            writes = is_write(op)
            if writes and not h.record_key:
                raise InvalidArgument("a write needs a record key")
            if op.kind == pb.OP_PUT:
                leader.check_value(op.key, op.value)
            # A read for update takes the lock its write will need (no upgrade later, which
            # between two readers of a hot key would wound one of them).
            exclusive = writes or (op.for_update and self.settings.for_update)
            mode = Mode.EXCLUSIVE if exclusive else Mode.SHARED
            while True:
                self._check_live(h.txn_id, info)
                got = self.locks.acquire(h.txn_id, h.ts, op.key, mode)
                if isinstance(got, Granted):
                    intent = leader.store.get_intent(op.key)
                    if intent is None or intent.txn_id == h.txn_id:
                        break
                    # An intent without a lock: left by a transaction in doubt across a restart.
                    waited_s += await self._wait_for(
                        op.key, intent.txn_id, intent.record_key, intent.ts
                    )
                else:
                    for victim in sorted(got.wounded):  # sorted: set order depends on the hash salt
                        self._wound(victim)
                    remaining = got.blockers - got.wounded
                    if remaining:
                        waited_s += await self._wait_locks(remaining)
                if waited_s > self.timeout_s:
                    raise Unavailable(
                        f"timed out after {waited_s:.1f}s waiting for locks on {op.key[:64]!r}"
                    )
            if writes:
                value = op.value if op.kind == pb.OP_PUT else None
                sealed = self.seal_check(leader, op.key, h.ts, h.txn_id)
                if sealed:
                    self._count("abort:sealed")
                    raise TxnAborted(sealed)
                leader.store.apply(
                    [PutIntent(op.key, Intent(h.txn_id, h.ts, value, h.record_key))], sync=True
                )
                leader.counters.writes += 1
                results.append(pb.TxnOpResult())
            else:
                intent = leader.store.get_intent(op.key)
                if intent is not None and intent.txn_id == h.txn_id:
                    version: Version | None = Version(intent.ts, intent.value)
                else:
                    version = leader.store.latest_version(op.key)
                leader.counters.reads += 1
                results.append(_read_result(version))
        return pb.ExecResponse(results=results)

    def _scan_span(self, leader: ShardLeader, op: pb.TxnOp) -> tuple[bytes, bytes | None]:
        end = op.end if op.has_end else None
        if leader.shard.end is not None and (end is None or end > leader.shard.end):
            end = leader.shard.end
        return op.key, end

    async def _scan_2pl(
        self, leader: ShardLeader, h: pb.TxnHeader, info: _LockedTxn, op: pb.TxnOp, waited_s: float
    ) -> float:
        """Lock the scanned range SHARED (no phantoms), then wait out intents left in it by
        transactions in doubt across a restart. Returns the seconds waited."""
        start, end = self._scan_span(leader, op)
        waited = 0.0
        while True:
            self._check_live(h.txn_id, info)
            got = self.locks.acquire_range(h.txn_id, h.ts, start, end)
            if isinstance(got, Granted):
                foreign = [
                    (k, i) for k, i in leader.store.scan_intents(start, end) if i.txn_id != h.txn_id
                ]
                if not foreign:
                    return waited
                key, intent = foreign[0]
                waited += await self._wait_for(key, intent.txn_id, intent.record_key, intent.ts)
            else:
                for victim in sorted(got.wounded):  # sorted: set order depends on the hash salt
                    self._wound(victim)
                remaining = got.blockers - got.wounded
                if remaining:
                    waited += await self._wait_locks(remaining)
            if waited_s + waited > self.timeout_s:
                raise Unavailable(
                    f"timed out after {waited_s + waited:.1f}s waiting for range locks on "
                    f"[{start[:64]!r}, {end[:64] if end else end!r})"
                )

    def _scan_rows_2pl(self, leader: ShardLeader, txn_id: bytes, op: pb.TxnOp) -> pb.TxnOpResult:
        """The latest committed rows of the locked range, with the transaction's own intents."""
        start, end = self._scan_span(leader, op)
        limit = op.limit or self.cluster.settings.scan_page_rows
        own = [(k, i) for k, i in leader.store.scan_intents(start, end) if i.txn_id == txn_id]
        rows = dict(leader.store.scan(start, end, _LATEST_TS, limit + 1 + len(own)))
        for key, intent in own:
            rows[key] = Version(intent.ts, intent.value)
        live = sorted((k, v) for k, v in rows.items() if v.value is not None)
        leader.counters.reads += 1
        return pb.TxnOpResult(
            items=[
                pb.KeyValue(key=k, value=v.value or b"", version_ts=v.ts) for k, v in live[:limit]
            ],
            more=len(live) > limit,
        )

    def _check_not_wounded(self, txn_id: bytes) -> None:
        if txn_id in self._wounded:
            raise TxnAborted(
                f"transaction {txn_id.hex()[:12]} aborted by rule wounded: an older transaction "
                f"needed its locks at node {self.node_name} (wound-wait)"
            )

    def _check_live(self, txn_id: bytes, info: _LockedTxn) -> None:
        """Fail an operation whose transaction was wounded or ended here (its locks released)
        while the operation waited, e.g. after the coordinator's call timed out and it aborted:
        locking on would leave a lock that nothing here knows to release."""
        self._check_not_wounded(txn_id)
        if self._locked.get(txn_id) is not info:
            raise TxnAborted(
                f"transaction {txn_id.hex()[:12]} aborted by rule ended: it was resolved at node "
                f"{self.node_name} while this operation waited for locks"
            )

    def _wound(self, victim: bytes) -> None:
        """Abort a younger, unprepared lock holder here: drop its locks and intents."""
        self._wounded[victim] = None
        while len(self._wounded) > 100_000:
            self._wounded.pop(next(iter(self._wounded)))
        self._count("wounds")
        self._release(victim, commit_ts=None)

    def _release(self, txn_id: bytes, commit_ts: int | None) -> None:
        keys = self.locks.release(txn_id)
        self._locked.pop(txn_id, None)
        by_shard: dict[int, list[bytes]] = {}
        for k in keys:
            by_shard.setdefault(self.cluster.shard_for_key(k).id, []).append(k)
        for sid, ks in by_shard.items():
            if sid in self.rules:
                self.rules[sid].resolve(txn_id, commit_ts, ks)
        ev = self._released.pop(txn_id, None)
        if ev is not None:
            ev.set()
        self._wake(txn_id)

    async def _wait_locks(self, blockers: frozenset[bytes]) -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        # Sorted: a frozenset's order depends on the process's hash salt, and the simulator
        # replays a seed only if every iteration order is the same in every process.
        ordered = sorted(blockers)
        events = [self._released.setdefault(b, asyncio.Event()) for b in ordered]
        waits = [asyncio.ensure_future(e.wait()) for e in events]
        done, pending = await asyncio.wait(
            waits, timeout=self.settings.push_after_s, return_when=asyncio.FIRST_COMPLETED
        )
        for w in pending:
            w.cancel()
        if not done:
            # Is a blocker abandoned? Ask its record, or drop it when it went silent here.
            for b in ordered:
                info = self._locked.get(b)
                if info is None:
                    continue
                if info.record_key:
                    try:
                        status, commit_ts = await self._query(
                            b, info.record_key, info.ts, abort_if_expired=True
                        )
                    except Exception:
                        continue
                    if status != TxnStatus.PENDING:
                        self._release(b, commit_ts if status == TxnStatus.COMMITTED else None)
                elif (
                    _now_ns() - info.last_ns > self.settings.expiry_s * 1e9
                    and b not in self.locks.prepared
                ):
                    self._wound(b)
        return loop.time() - start

    async def prepare(self, req: pb.PrepareRequest) -> pb.PrepareResponse:
        h = req.txn
        self._check_not_wounded(h.txn_id)
        info = self._locked.get(h.txn_id)
        if info is None:
            raise TxnAborted(
                f"transaction {h.txn_id.hex()[:12]} aborted by rule locks-lost: node "
                f"{self.node_name} holds no locks for it (it restarted)"
            )
        self.locks.prepared.add(h.txn_id)
        # HAZARD: the commit timestamp must exceed every snapshot read already served on these
        # keys (their read marks) and now().latest; commit-wait then orders it in real time.
        # It must also exceed every version on them: a waiter that pushed a lock holder whose
        # record was COMMITTED took the lock before the holder's commit-wait ended, so that
        # version may lie ahead of now(); committing below it would hide this write under it.
        floor = max(
            [self.tt.now().latest, h.ts]
            + [_above_versions(self._store_for(k), k) for k in self.locks.held_by(h.txn_id)]
        )
        return pb.PrepareResponse(prepare_ts=floor)

    def _store_for(self, key: bytes) -> VersionedStore:
        return self.leaders[self.cluster.shard_for_key(key).id].store

    async def _wait_in_order(
        self, key: bytes, waiter_ts: int, txn_id: bytes, record_key: bytes, ts: int
    ) -> float:
        """`_wait_for`, then let every lower-timestamp transaction waiting on the same key go
        first. When an intent resolves, all its waiters wake at once; in arbitrary order, a
        higher reader could read the key before a lower writer writes it, and the writer would
        then abort by rule read-mark. In timestamp order the lower one lays its intent first
        and the higher one waits for it instead. Waits still run only from higher to lower
        timestamps, so this adds no deadlock."""
        queue = self._join_line(key, waiter_ts)
        try:
            spent = await self._wait_for(key, txn_id, record_key, ts) if txn_id else 0.0
            loop = asyncio.get_running_loop()
            start = loop.time()
            while queue and queue[0] < waiter_ts and loop.time() - start < self.timeout_s:
                turn = self._key_turns.setdefault(key, asyncio.Event())
                # asyncio.timeout rather than wait_for: the same wait without a task per wait.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.settings.push_after_s):
                        await turn.wait()
            return spent + loop.time() - start
        finally:
            self._leave_line(key, waiter_ts)

    def _join_line(self, key: bytes, ts: int) -> list[int]:
        """Take a place at ts in key's line (see _wait_in_order); returns the line. A place
        is held until `_leave_line`, and the line's list lives as long as some place does."""
        queue = self._key_waiters.setdefault(key, [])
        bisect.insort(queue, ts)
        return queue

    def _leave_line(self, key: bytes, ts: int) -> None:
        queue = self._key_waiters[key]
        queue.remove(ts)
        if not queue:
            del self._key_waiters[key]
        if key in self._key_turns:
            self._key_turns.pop(key).set()  # the next waiter in line re-checks

    def _line_length(self, key: bytes) -> int:
        """Places in key's line (see `PLACE_MAX_LINE`, `FOR_UPDATE_MAX_LINE`)."""
        return len(self._key_waiters.get(key, ()))

    def _lower_in_line(self, key: bytes, ts: int) -> bool:
        """Whether a transaction below ts is waiting on key: it goes first (see
        _wait_in_order), so one arriving now must queue behind it, not overtake it."""
        queue = self._key_waiters.get(key)
        return queue is not None and len(queue) > 0 and queue[0] < ts

    async def _wait_for(self, key: bytes, txn_id: bytes, record_key: bytes, ts: int) -> float:
        """Wait for txn_id's intents here to resolve, pushing its record if it takes long.
        Returns the (loop-clock) seconds spent."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        ev = self._resolved.setdefault(txn_id, asyncio.Event())
        try:
            async with asyncio.timeout(self.settings.push_after_s):  # (not wait_for: no task)
                await ev.wait()
            return loop.time() - start
        except TimeoutError:
            pass
        status, commit_ts = await self._query(txn_id, record_key, ts, abort_if_expired=True)
        if status != TxnStatus.PENDING:
            self._count("pushes-resolved")
            shard = self.cluster.shard_for_key(key)
            if shard.id in self.rules:
                self.rules[shard.id].resolve(
                    txn_id, commit_ts if status == TxnStatus.COMMITTED else None, [key]
                )
            self._wake(txn_id)
        return loop.time() - start

    async def _query(
        self, txn_id: bytes, record_key: bytes, ts: int, *, abort_if_expired: bool
    ) -> tuple[TxnStatus, int]:
        req = pb.QueryTxnRequest(
            txn_id=txn_id, record_key=record_key, ts=ts, abort_if_expired=abort_if_expired
        )
        leader = self.cluster.shard_for_key(record_key).leader
        resp: pb.QueryTxnResponse = await self.call(
            leader, "/k2.v1.Participant/QueryTxn", req, pb.QueryTxnResponse
        )
        return TxnStatus(resp.status), resp.commit_ts

    # -- records -------------------------------------------------------------------------------

    def _get_record(self, leader: ShardLeader, txn_id: bytes) -> TxnRecord | None:
        raw = leader.store.get_meta(record_meta_name(txn_id))
        return None if raw is None else TxnRecord.decode(raw)

    def _put_record(self, leader: ShardLeader, rec: TxnRecord) -> None:
        leader.store.apply([PutMeta(record_meta_name(rec.txn_id), rec.encode())], sync=True)

    def _decide(
        self, leader: ShardLeader, h: pb.TxnHeader, *, commit: bool, commit_ts: int = 0
    ) -> TxnRecord:
        """The transaction's outcome at its record: the one already recorded (a waiter may have
        aborted it after its heartbeat expired), else this one (commit at commit_ts, or at its
        timestamp), made durable here before anyone is told: the commit point."""
        rec = self._get_record(leader, h.txn_id)
        if rec is None:
            status = TxnStatus.COMMITTED if commit else TxnStatus.ABORTED
            rec = TxnRecord(h.txn_id, status, h.ts, (commit_ts or h.ts) if commit else 0)
            self._put_record(leader, rec)
        self._heartbeats.pop(h.txn_id, None)
        return rec

    def _record_aborted(self, txn_id: bytes) -> TxnAborted:
        self._count("abort:record-aborted")
        return TxnAborted(
            f"commit of transaction {txn_id.hex()[:12]} aborted by rule record-aborted: "
            "its heartbeat expired and a waiting transaction aborted it"
        )

    async def end_txn(self, req: pb.EndTxnRequest) -> pb.EndTxnResponse:
        h = req.txn
        leader = self._record_leader(h.record_key)
        rec = self._decide(leader, h, commit=req.commit, commit_ts=req.commit_ts)
        if req.commit and rec.status != TxnStatus.COMMITTED:
            raise self._record_aborted(h.txn_id)
        return pb.EndTxnResponse(status=int(rec.status), commit_ts=rec.commit_ts)  # type: ignore[arg-type]

    async def query_txn(self, req: pb.QueryTxnRequest) -> pb.QueryTxnResponse:
        leader = self._record_leader(req.record_key)
        rec = self._get_record(leader, req.txn_id)
        if rec is not None:
            return pb.QueryTxnResponse(status=int(rec.status), commit_ts=rec.commit_ts)  # type: ignore[arg-type]
        now = _now_ns()
        seen = self._heartbeats.setdefault(req.txn_id, now)
        if req.abort_if_expired and now - seen > self.settings.expiry_s * 1e9:
            rec = TxnRecord(req.txn_id, TxnStatus.ABORTED, req.ts, 0)
            self._put_record(leader, rec)
            self._heartbeats.pop(req.txn_id, None)
            self._count("expired-aborted")
            log.info("aborted transaction %s: heartbeat expired", req.txn_id.hex()[:12])
            return pb.QueryTxnResponse(status=pb.TXN_ABORTED)
        return pb.QueryTxnResponse(status=pb.TXN_PENDING)

    async def heartbeat(self, req: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        leader = self._record_leader(req.record_key)
        rec = self._get_record(leader, req.txn_id)
        if rec is not None:
            return pb.HeartbeatResponse(status=int(rec.status))  # type: ignore[arg-type]
        self._heartbeats[req.txn_id] = _now_ns()
        return pb.HeartbeatResponse(status=pb.TXN_PENDING)

    async def forget_txn(self, req: pb.ForgetTxnRequest) -> pb.ForgetTxnResponse:
        leader = self._record_leader(req.record_key)
        leader.store.apply([PutMeta(record_meta_name(req.txn_id), None)], sync=False)
        return pb.ForgetTxnResponse()

    async def resolve(self, req: pb.ResolveRequest) -> pb.ResolveResponse:
        _, rules = self._leader(req.shard_id)
        n = rules.resolve(req.txn_id, req.commit_ts or None, list(req.keys))
        self.in_flight(req.shard_id, req.txn_id, 0, False)
        if self.protocol == "d2pl-ttc":
            self._release(req.txn_id, req.commit_ts or None)  # strict 2PL: locks go at the end
            self._wounded.pop(req.txn_id, None)
        self._wake(req.txn_id)
        return pb.ResolveResponse(resolved=n)

    # -- recovery ------------------------------------------------------------------------------

    def start(self) -> None:
        self._sweeper = asyncio.ensure_future(self._sweep_forever())

    async def stop(self) -> None:
        if self._sweeper is not None:
            await stop_tasks([self._sweeper])

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a sweep is retried; it must never stop for good
                log.warning("intent sweep failed: %s", e)
            await asyncio.sleep(self.settings.expiry_s)

    async def sweep(self) -> int:
        """Ask the records of every intent here and resolve the decided ones. Returns how many."""
        resolved = 0
        for sid, leader in list(self.leaders.items()):
            by_txn: dict[bytes, tuple[bytes, int, list[bytes]]] = {}
            for key, intent in leader.store.scan_intents(b"", None):
                entry = by_txn.setdefault(intent.txn_id, (intent.record_key, intent.ts, []))
                entry[2].append(key)
            for txn_id, (record_key, ts, keys) in by_txn.items():
                try:
                    status, commit_ts = await self._query(
                        txn_id, record_key, ts, abort_if_expired=True
                    )
                except Exception as e:
                    log.debug("sweep: record of %s unreachable: %s", txn_id.hex()[:12], e)
                    continue
                if status != TxnStatus.PENDING and sid in self.rules:
                    resolved += self.rules[sid].resolve(
                        txn_id, commit_ts if status == TxnStatus.COMMITTED else None, keys
                    )
                    self._wake(txn_id)
        return resolved


_LATEST_TS = (1 << 63) - 1
"""Reads under 2PL see the latest committed version: the lock, not a timestamp, isolates them."""


@dataclass
class _LockedTxn:
    ts: int
    record_key: bytes = b""
    last_ns: int = 0


def _with_ts(req: pb.ExecRequest, ts: int) -> pb.ExecRequest:
    """req, its transaction restamped at ts."""
    out = pb.ExecRequest()
    out.CopyFrom(req)
    out.txn.ts = ts
    return out


def is_write(op: pb.TxnOp) -> bool:
    """A put or a delete: an operation that lays an intent (or takes an exclusive lock)."""
    return op.kind in (pb.OP_PUT, pb.OP_DELETE)


def _above_versions(store: VersionedStore, key: bytes) -> int:
    """The smallest commit timestamp above both key's read mark and its newest version."""
    latest = store.latest_version(key)
    return max(store.read_marks.get(key), latest.ts if latest is not None else 0) + 1


def _uncertain(key: bytes, ts: int, seen: int) -> Abort:
    return Abort(
        "uncertainty",
        f"read of key {key[:64]!r} at {format_ts(ts)} aborted by rule uncertainty: a value at "
        f"{format_ts(seen)} lies within the clock uncertainty window; restart above it",
    )


def _read_result(version: Version | None) -> pb.TxnOpResult:
    if version is None or version.value is None:
        return pb.TxnOpResult(found=False, version_ts=version.ts if version else 0)
    return pb.TxnOpResult(found=True, value=version.value, version_ts=version.ts)


def _now_ns() -> int:
    """Local elapsed time for timeouts and heartbeats: the event loop's monotonic clock, which
    the simulator makes virtual. Timestamps never come from here (they come from TrueTime)."""
    return int(asyncio.get_running_loop().time() * 1e9)
