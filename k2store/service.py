"""The node's request handlers, independent of gRPC, RocksDB and the OS clock.

`NodeService` answers every RPC of the wire protocol (k2store/proto/k2.proto) given protobuf
requests, and talks to other nodes only through a `Transport`; time comes from a `TrueTime` over an
injected clock, storage from the `VersionedStore` inside each `ShardLeader`. The node process
(k2store/node.py) wraps it in a gRPC server over RocksDB and the system clock; the deterministic
simulator wraps the very same object in a simulated network over memory engines and a virtual
clock. `METHODS` is the one table of RPCs both adapters serve.

::

      request ──▶ NodeService.<handler> ──(not leader)──▶ Transport ──▶ leader's NodeService
                     │
                     ▼ (leader)
                 BatchClient ──▶ region oracle (local, or Transport)          K2-TB timestamps
                     │
                     ▼
                 ShardLeader (MVTO rules, no I/O) ──▶ VersionedStore (fsync)
                     │
                     ▼
                 commit-wait: TrueTime.wait_until_after(ts), then reply

Failure modes: every handler raises only `K2Error`s (adapters turn them into statuses); an
unexpected exception is a bug and the adapter reports it as INTERNAL.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from google.protobuf.message import DecodeError, Message

from k2store.cluster import ClusterConfig, NodeConfig
from k2store.coordinator import Coordinator
from k2store.errors import (
    ClockUncertain,
    InvalidArgument,
    KeyTooLarge,
    NotLeader,
    Unavailable,
    ValueTooLarge,
    WriteTooOld,
)
from k2store.participant import Participant
from k2store.proto import k2_pb2 as pb
from k2store.replicator import Replicator
from k2store.shard import Limits, ShardLeader
from k2store.transport import Transport
from replication.log import LoggedStore
from truetime import (
    BatchClient,
    BatchExpired,
    HybridLogicalClock,
    TimestampBatch,
    TimestampOracle,
    TrueTime,
    UncertaintyExceeded,
)
from txn.storage import VersionedStore

MAX_FUTURE_READ_NS = 1_000_000_000
"""A read may ask for a timestamp at most this far beyond now().latest; a later one would set a
read mark that blocks every writer of the key until real time catches up."""

M = TypeVar("M", bound=Message)


class Ceiling(Protocol):
    """A value that only grows and that a restarted node must stay above (see DurableCeiling)."""

    value: int

    def cover(self, t: int) -> None: ...


class SlotBook(Protocol):
    """The oracle's coordinator slots, kept across restarts (see DurableSlots)."""

    slots: dict[str, int]

    def record(self, slots: dict[str, int]) -> None: ...


class MemorySlots:
    """A SlotBook for the simulator and tests: 'survives' a restart as memory does."""

    def __init__(self) -> None:
        self.slots: dict[str, int] = {}

    def record(self, slots: dict[str, int]) -> None:
        self.slots = dict(slots)


class MemoryCeiling:
    """A Ceiling for the simulator and tests, where nothing survives a 'restart' but memory."""

    def __init__(self) -> None:
        self.value = 0

    def cover(self, t: int) -> None:
        self.value = max(self.value, t)


@dataclass(frozen=True, slots=True)
class Method:
    path: str
    request: type[Message]
    response: type[Message]
    handler: str


METHODS: tuple[Method, ...] = (
    Method("/k2.v1.K2/Get", pb.GetRequest, pb.GetResponse, "get"),
    Method("/k2.v1.K2/Put", pb.PutRequest, pb.PutResponse, "put"),
    Method("/k2.v1.K2/Delete", pb.DeleteRequest, pb.DeleteResponse, "delete"),
    Method("/k2.v1.K2/Scan", pb.ScanRequest, pb.ScanResponse, "scan"),
    Method("/k2.v1.K2/ClusterInfo", pb.ClusterInfoRequest, pb.ClusterInfoResponse, "cluster_info"),
    Method(
        "/k2.v1.Oracle/GetTimestampBatch",
        pb.TimestampBatchRequest,
        pb.TimestampBatchResponse,
        "timestamp_batch",
    ),
    Method("/k2.v1.Admin/Status", pb.StatusRequest, pb.StatusResponse, "status"),
    Method("/k2.v1.K2/BeginTxn", pb.BeginTxnRequest, pb.BeginTxnResponse, "begin_txn"),
    Method("/k2.v1.K2/TxnOps", pb.TxnOpsRequest, pb.TxnOpsResponse, "txn_ops"),
    Method("/k2.v1.K2/CommitTxn", pb.CommitTxnRequest, pb.CommitTxnResponse, "commit_txn"),
    Method("/k2.v1.K2/AbortTxn", pb.AbortTxnRequest, pb.AbortTxnResponse, "abort_txn"),
    Method("/k2.v1.Participant/Exec", pb.ExecRequest, pb.ExecResponse, "exec"),
    Method("/k2.v1.Participant/EndTxn", pb.EndTxnRequest, pb.EndTxnResponse, "end_txn"),
    Method("/k2.v1.Participant/Prepare", pb.PrepareRequest, pb.PrepareResponse, "prepare"),
    Method("/k2.v1.Participant/Resolve", pb.ResolveRequest, pb.ResolveResponse, "resolve"),
    Method("/k2.v1.Participant/QueryTxn", pb.QueryTxnRequest, pb.QueryTxnResponse, "query_txn"),
    Method("/k2.v1.Participant/Heartbeat", pb.HeartbeatRequest, pb.HeartbeatResponse, "heartbeat"),
    Method("/k2.v1.Participant/ForgetTxn", pb.ForgetTxnRequest, pb.ForgetTxnResponse, "forget_txn"),
    Method("/k2.v1.Replication/Pull", pb.PullRequest, pb.PullResponse, "pull"),
    Method("/k2.v1.Replication/Snapshot", pb.SnapshotRequest, pb.SnapshotResponse, "snapshot"),
    Method("/k2.v1.Replication/Push", pb.PushRequest, pb.PushResponse, "push"),
    Method("/k2.v1.Replication/Seals", pb.SealsRequest, pb.SealsResponse, "seals"),
    Method(
        "/k2.v1.Replication/ReplicaRead",
        pb.ReplicaReadRequest,
        pb.ReplicaReadResponse,
        "replica_read",
    ),
)
METHODS_BY_PATH = {m.path: m for m in METHODS}


def decode_request(method: Method, data: bytes) -> Message:
    """Parse a request off the wire; malformed bytes are `InvalidArgument` (nothing has run)."""
    try:
        return method.request.FromString(data)
    except DecodeError:
        raise InvalidArgument(
            f"{method.path}: malformed {method.request.DESCRIPTOR.name} ({len(data)} bytes)"
        ) from None


class NodeService:
    """Handlers of one node. Owns nothing durable: the caller opens and closes the engines."""

    def __init__(
        self,
        cluster: ClusterConfig,
        name: str,
        *,
        truetime: TrueTime,
        transport: Transport,
        leaders: dict[int, ShardLeader],
        oracle: TimestampOracle | None,
        oracle_ceiling: Ceiling | None = None,
        oracle_slots: SlotBook | None = None,
        read_ceiling: Ceiling | None = None,
        batch_size: int = 256,
        data_dir: str = "",
        new_txn_id: Callable[[], bytes] | None = None,
        replica_stores: dict[int, VersionedStore] | None = None,
    ) -> None:
        """`leaders`' stores are wrapped in a `LoggedStore` here when replication is on;
        `replica_stores` are the engines of the replicas this node holds (see
        `ClusterConfig.replicas_on`); the caller opens and closes all engines."""
        self.cluster = cluster
        self.me: NodeConfig = cluster.node(name)
        self.region = cluster.region(self.me.region)
        self.tt = truetime
        self.clock = truetime.clock
        self.transport = transport
        self.leaders = leaders
        self.oracle = oracle
        self.oracle_ceiling: Ceiling = oracle_ceiling or MemoryCeiling()
        self.oracle_slots: SlotBook = oracle_slots or MemorySlots()
        self.read_ceiling: Ceiling = read_ceiling or MemoryCeiling()
        # On the oracle's node batches are issued in-line (no round trip, and a short lifetime:
        # `oracle_local_ttl_us`), elsewhere fetched from the region's oracle.
        local = oracle is not None

        def slot_batches(slot: str, size: int) -> BatchClient:
            return BatchClient(
                lambda n: self._fetch_batch(n, slot),
                self.clock,
                batch_size=size,
                fetch_now=(lambda n: self._issue_local(slot, n)) if local else None,
            )

        self.batch = slot_batches(self.me.name, batch_size)
        # Future timestamps come from a slot of their own (see Coordinator._future_timestamp),
        # client-stamped ones from another (see Coordinator._client_timestamp), restamps from
        # a third (see Coordinator.restamp_timestamp).
        self.future_batch = slot_batches(self.me.name + "/future", 16)
        self.client_batch = slot_batches(self.me.name + "/client", 1)
        self.restamp_batch = slot_batches(self.me.name + "/restamp", 1)
        st = cluster.settings
        self.limits = Limits(st.max_key_bytes, st.max_value_bytes)
        self.timeout_s = st.request_timeout_s
        self.protocol = st.txn.protocol
        self.data_dir = data_dir
        self._started_mono = self.clock.monotonic_ns()
        self.hlc: HybridLogicalClock | None = None
        if st.txn.protocol == "mvto-hlc":
            self.hlc = HybridLogicalClock(self.clock, [n.name for n in cluster.nodes].index(name))
            self.hlc.update(truetime.now().latest)  # above the read floor of this node's shards
        self.replicator: Replicator | None = None
        if st.replication.enabled:
            for ld in leaders.values():
                if not isinstance(ld.store, LoggedStore):
                    ld.store = LoggedStore(ld.store, lambda: truetime.now().latest)
            self.replicator = Replicator(
                cluster, name, truetime, self.call, leaders, dict(replica_stores or {})
            )
        self.participant = Participant(
            cluster, name, leaders, truetime, self.call, st.txn, st.request_timeout_s, hlc=self.hlc
        )
        if self.replicator is not None:
            self.participant.seal_check = self.replicator.check_open
            self.participant.in_flight = self.replicator.in_flight
        self.coordinator = Coordinator(
            cluster,
            name,
            truetime,
            self.timestamp,
            self.call,
            st.txn,
            hlc=self.hlc,
            future_source=lambda: self._slot_timestamp(self.future_batch),
            client_source=lambda: self._slot_timestamp(self.client_batch),
            restamp_source=lambda: self._slot_timestamp(self.restamp_batch),
            cover=self.read_ceiling.cover,
            **({"new_txn_id": new_txn_id} if new_txn_id else {}),
        )
        self.participant.restamp_ts = self.coordinator.restamp_timestamp

    def start(self) -> None:
        """Start background work: the intent sweep and the silent-client reaper."""
        self.participant.start()
        self.coordinator.start()
        if self.replicator is not None:
            self.replicator.start()

    async def stop(self) -> None:
        if self.replicator is not None:
            await self.replicator.stop()
        await self.coordinator.stop()
        await self.participant.stop()

    async def call(
        self,
        node: str,
        path: str,
        request: Message,
        response_type: type[M],
        timeout_s: float | None = None,
    ) -> M:
        """Call a method on a node; a call to this node itself skips the transport.
        `timeout_s` defaults to the cluster's request timeout."""
        if node == self.me.name:
            result: M = await self.handler(path)(request)  # type: ignore[assignment]
            return result
        return await self.transport.call(
            node, path, request, response_type, timeout_s=timeout_s or self.timeout_s
        )

    def handler(self, path: str) -> Callable[[Any], Awaitable[Message]]:
        method = METHODS_BY_PATH[path]
        fn: Callable[[Any], Awaitable[Message]] = getattr(self, method.handler)
        return fn

    # -- time ----------------------------------------------------------------------------------

    async def _fetch_batch(self, count: int, coordinator: str = "") -> TimestampBatch:
        """A batch from the region's oracle over the network (on the oracle's own node the
        BatchClients issue in-line instead: `_issue_local`)."""
        coordinator = coordinator or self.me.name
        resp = await self.transport.call(
            self.region.oracle,
            "/k2.v1.Oracle/GetTimestampBatch",
            pb.TimestampBatchRequest(coordinator=coordinator, count=count),
            pb.TimestampBatchResponse,
            timeout_s=self.timeout_s,
        )
        return TimestampBatch(
            oracle_id=resp.oracle_id,
            slot=resp.slot,
            base=resp.base,
            step=resp.step,
            count=resp.count,
            ttl_ns=resp.ttl_ns,
            issued_latest=resp.issued_latest,
        )

    def _issue_local(self, coordinator: str, count: int) -> TimestampBatch:
        """A batch for a coordinator on this, the oracle's, node: no round trip to cover, so a
        short lifetime (`oracle_local_ttl_us`), and timestamps lead true time by less."""
        return self._issue(coordinator, count, self.cluster.settings.oracle_local_ttl_us * 1000)

    def _issue(self, coordinator: str, count: int, ttl_ns: int | None = None) -> TimestampBatch:
        assert self.oracle is not None
        try:
            slot = self.oracle.register(coordinator)
            if self.oracle_slots.slots.get(coordinator) != slot:
                # Durable before the slot's first batch leaves (and again on the next request
                # if this write failed: the assignment in memory alone does not count).
                self.oracle_slots.record(self.oracle.slots)
            batch = self.oracle.issue(slot, count, ttl_ns=ttl_ns)
        except UncertaintyExceeded as e:
            raise ClockUncertain(f"oracle {self.me.name}: {e}") from None
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        self.oracle_ceiling.cover(batch.last)  # durable before the batch leaves this node
        return batch

    async def timestamp(self) -> int:
        """A fresh timestamp from the region's K2-TB batch (>= true time while the batch is live)."""
        try:
            self.tt.check()
            return await self.batch.next_timestamp()
        except UncertaintyExceeded as e:
            raise ClockUncertain(f"node {self.me.name} refuses to serve: {e}") from None
        except BatchExpired as e:
            raise Unavailable(f"node {self.me.name}: timestamp batch arrived stale: {e}") from None

    async def _slot_timestamp(self, batch: BatchClient) -> int:
        """A timestamp from the batch of a slot of this node's (future or client timestamps),
        errors typed as in `timestamp` (a stale batch used to escape as an untyped
        BatchExpired: an INTERNAL error)."""
        try:
            return await batch.next_timestamp()
        except BatchExpired as e:
            raise Unavailable(f"node {self.me.name}: timestamp batch arrived stale: {e}") from None

    def _read_ts_given(self, at_ts: int) -> int:
        limit = self.tt.now().latest + MAX_FUTURE_READ_NS
        if at_ts > limit:
            raise InvalidArgument(
                f"read timestamp {at_ts} is more than {MAX_FUTURE_READ_NS // 1_000_000} ms "
                "in the future"
            )
        return at_ts

    async def _read_ts(self, at_ts: int) -> int:
        ts = self._read_ts_given(at_ts) if at_ts else await self.timestamp()
        # Durable before the read is served: a restarted node waits until this has passed.
        self.read_ceiling.cover(ts)
        return ts

    # -- routing -------------------------------------------------------------------------------

    def leader_for(self, key: bytes, value: bytes | None = None) -> tuple[ShardLeader | None, str]:
        """The local leader of key's shard, or None and the leader's name. Sizes are checked
        first, so bad input is refused where it arrives, before it is forwarded anywhere."""
        if len(key) > self.limits.max_key_bytes:
            raise KeyTooLarge(
                f"key of {len(key)} bytes exceeds the limit of {self.limits.max_key_bytes} bytes"
            )
        if value is not None and len(value) > self.limits.max_value_bytes:
            raise ValueTooLarge(
                f"value of {len(value)} bytes exceeds the limit of "
                f"{self.limits.max_value_bytes} bytes"
            )
        shard = self.cluster.shard_for_key(key)
        return self.leaders.get(shard.id), shard.leader

    async def _forward(self, leader: str, handler: str, request: Any, forwarded: bool) -> Any:
        if forwarded:
            raise NotLeader(
                f"node {self.me.name} does not lead the shard (request forwarded twice)"
            )
        method = next(m for m in METHODS if m.handler == handler)
        request.forwarded = True
        return await self.transport.call(
            leader, method.path, request, method.response, timeout_s=self.timeout_s
        )

    # -- K2 ------------------------------------------------------------------------------------

    async def _as_txn(
        self,
        ops: list[pb.TxnOp],
        read_only: bool,
        read_ts: int = 0,
        *,
        client_ts: int = 0,
        client_waits: bool = False,
    ) -> tuple[list[pb.TxnOpResult], int, pb.CommitTxnResponse]:
        """Run single-key operations as a one-off transaction of the cluster's protocol, so
        intents, locks and clocks govern them like any other; `client_ts` and `client_waits`
        as in BeginTxnRequest (client time). Returns results, ts and the commit's reply."""
        b = await self.coordinator.begin(
            pb.BeginTxnRequest(
                read_only=read_only,
                read_ts=read_ts,
                client_ts=client_ts,
                client_waits=client_waits,
            )
        )
        try:
            r = await self.coordinator.ops(pb.TxnOpsRequest(txn_id=b.txn_id, ops=ops))
            c = await self.coordinator.commit(pb.CommitTxnRequest(txn_id=b.txn_id))
        except BaseException:
            await self.coordinator.abort(pb.AbortTxnRequest(txn_id=b.txn_id))
            raise
        return list(r.results), b.ts, c

    async def get(self, request: pb.GetRequest) -> pb.GetResponse:
        """A read-only transaction of one key: it waits on lower intents like any reader, and
        returns only once the version it read has certainly passed (see Coordinator.commit)."""
        self.leader_for(request.key)
        read_ts = self._read_ts_given(request.at_ts) if request.at_ts else 0
        op = pb.TxnOp(kind=pb.OP_GET, key=request.key)
        (r,), ts, _ = await self._as_txn([op], True, read_ts)
        shard = self.cluster.shard_for_key(request.key)
        return pb.GetResponse(
            found=r.found,
            value=r.value,
            version_ts=r.version_ts if r.found else 0,
            read_ts=ts,
            served_by=shard.leader,
            shard_id=shard.id,
        )

    async def _write(
        self, leader: ShardLeader, key: bytes, value: bytes | None
    ) -> tuple[int, bool]:
        leader.check_key(key)
        if value is not None:
            leader.check_value(key, value)
        ts = await self.timestamp()
        previous = leader.store.latest_version(key)
        if self.replicator is not None:
            sealed = self.replicator.check_open(leader, key, ts, b"")
            if sealed is not None:
                raise WriteTooOld(sealed)
        leader.write(key, value, ts)
        # HAZARD (commit-wait): acknowledging only after ts has certainly passed means every
        # transaction that starts after the client hears back gets a larger timestamp, which is
        # what makes timestamp order agree with real-time order. With clock error beyond the
        # bound the wait ends early and a later reader may be ordered before this write.
        await self.tt.wait_until_after(ts)
        return ts, previous is not None and previous.value is not None

    async def put(self, request: pb.PutRequest) -> pb.PutResponse:
        if self.protocol != "k2-mvto":
            self.leader_for(request.key, request.value)
            op = pb.TxnOp(kind=pb.OP_PUT, key=request.key, value=request.value)
            _, _, c = await self._as_txn([op], False)
            shard = self.cluster.shard_for_key(request.key)
            return pb.PutResponse(commit_ts=c.commit_ts, served_by=shard.leader, shard_id=shard.id)
        leader, leader_name = self.leader_for(request.key, request.value)
        if leader is None:
            resp: pb.PutResponse = await self._forward(
                leader_name, "put", request, request.forwarded
            )
            return resp
        ts, _ = await self._write(leader, request.key, request.value)
        return pb.PutResponse(commit_ts=ts, served_by=self.me.name, shard_id=leader.shard.id)

    async def delete(self, request: pb.DeleteRequest) -> pb.DeleteResponse:
        if self.protocol != "k2-mvto":
            self.leader_for(request.key)
            ops = [
                pb.TxnOp(kind=pb.OP_GET, key=request.key),
                pb.TxnOp(kind=pb.OP_DELETE, key=request.key),
            ]
            (r, _), _, c = await self._as_txn(ops, False)
            shard = self.cluster.shard_for_key(request.key)
            return pb.DeleteResponse(
                commit_ts=c.commit_ts, existed=r.found, served_by=shard.leader, shard_id=shard.id
            )
        leader, leader_name = self.leader_for(request.key)
        if leader is None:
            resp: pb.DeleteResponse = await self._forward(
                leader_name, "delete", request, request.forwarded
            )
            return resp
        ts, existed = await self._write(leader, request.key, None)
        return pb.DeleteResponse(
            commit_ts=ts, existed=existed, served_by=self.me.name, shard_id=leader.shard.id
        )

    async def scan(self, request: pb.ScanRequest) -> pb.ScanResponse:
        """One page of one shard, as a read-only transaction (see get)."""
        shard = self.cluster.shard(request.shard_id)
        lim = self.limits.max_key_bytes
        if len(request.start) > lim or len(request.end) > lim:
            raise KeyTooLarge(f"scan bound exceeds the key limit of {lim} bytes")
        hashed = self.cluster.settings.partitioning == "hash"
        if not hashed and not shard.contains(request.start):
            raise NotLeader(f"scan start {request.start[:64]!r} is not in shard {shard.id}")
        end = request.end if request.has_end else None
        if not hashed and shard.end is not None and (end is None or end > shard.end):
            end = shard.end
        if end is not None and end <= request.start:
            raise InvalidArgument(
                f"scan end {end[:64]!r} must sort after start {request.start[:64]!r}"
            )
        limit = request.limit or self.cluster.settings.scan_page_rows
        read_ts = self._read_ts_given(request.at_ts) if request.at_ts else 0
        op = pb.TxnOp(
            kind=pb.OP_SCAN, key=request.start, end=end or b"", has_end=end is not None, limit=limit
        )
        (r,), ts, _ = await self._as_txn([op], True, read_ts)
        items = list(r.items)[:limit]
        more = r.more and bool(items)
        return pb.ScanResponse(
            items=items,
            read_ts=ts,
            more=more,
            resume_key=items[-1].key + b"\x00" if more else b"",
            served_by=shard.leader,
        )

    async def cluster_info(self, request: pb.ClusterInfoRequest) -> pb.ClusterInfoResponse:
        c = self.cluster
        return pb.ClusterInfoResponse(
            cluster_name=c.settings.name,
            partitioning=c.settings.partitioning,
            nodes=[pb.NodeInfo(name=x.name, region=x.region, address=x.address) for x in c.nodes],
            shards=[
                pb.ShardInfo(
                    id=s.id,
                    start=s.start,
                    end=s.end or b"",
                    has_end=s.end is not None,
                    home_region=s.home_region,
                    leader=s.leader,
                )
                for s in c.shards
            ],
            max_key_bytes=c.settings.max_key_bytes,
            max_value_bytes=c.settings.max_value_bytes,
        )

    # -- Oracle --------------------------------------------------------------------------------

    async def timestamp_batch(self, request: pb.TimestampBatchRequest) -> pb.TimestampBatchResponse:
        if self.oracle is None:
            raise NotLeader(f"node {self.me.name} is not the oracle of region {self.me.region}")
        if not request.coordinator:
            raise InvalidArgument("coordinator name is required")
        b = self._issue(request.coordinator, request.count)
        return pb.TimestampBatchResponse(
            oracle_id=b.oracle_id,
            slot=b.slot,
            base=b.base,
            step=b.step,
            count=b.count,
            ttl_ns=b.ttl_ns,
            issued_latest=b.issued_latest,
        )

    # -- transactions --------------------------------------------------------------------------

    async def begin_txn(self, request: pb.BeginTxnRequest) -> pb.BeginTxnResponse:
        if not request.read_keys:
            return await self.coordinator.begin(request)
        # A one-shot read-only transaction: begin, read, commit here, one round trip for the
        # client instead of three (the same coordinator steps, so the same guarantees).
        if not request.read_only or request.keys:
            raise InvalidArgument("read_keys is for a one-shot read-only transaction")
        ops = [pb.TxnOp(kind=pb.OP_GET, key=k) for k in request.read_keys]
        results, ts, c = await self._as_txn(
            ops,
            True,
            request.read_ts,
            client_ts=request.client_ts,
            client_waits=request.client_waits,
        )
        return pb.BeginTxnResponse(
            ts=ts, coordinator=self.me.name, results=results, wait_until=c.wait_until
        )

    async def txn_ops(self, request: pb.TxnOpsRequest) -> pb.TxnOpsResponse:
        return await self.coordinator.ops(request)

    async def commit_txn(self, request: pb.CommitTxnRequest) -> pb.CommitTxnResponse:
        return await self.coordinator.commit(request)

    async def abort_txn(self, request: pb.AbortTxnRequest) -> pb.AbortTxnResponse:
        return await self.coordinator.abort(request)

    async def exec(self, request: pb.ExecRequest) -> pb.ExecResponse:
        self.read_ceiling.cover(request.txn.ts)  # reads at txn.ts: durable before serving
        return await self.participant.exec(request)

    async def end_txn(self, request: pb.EndTxnRequest) -> pb.EndTxnResponse:
        return await self.participant.end_txn(request)

    async def prepare(self, request: pb.PrepareRequest) -> pb.PrepareResponse:
        return await self.participant.prepare(request)

    async def resolve(self, request: pb.ResolveRequest) -> pb.ResolveResponse:
        return await self.participant.resolve(request)

    async def query_txn(self, request: pb.QueryTxnRequest) -> pb.QueryTxnResponse:
        return await self.participant.query_txn(request)

    async def heartbeat(self, request: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        return await self.participant.heartbeat(request)

    async def forget_txn(self, request: pb.ForgetTxnRequest) -> pb.ForgetTxnResponse:
        return await self.participant.forget_txn(request)

    # -- replication ---------------------------------------------------------------------------

    def _replication(self) -> Replicator:
        if self.replicator is None:
            raise Unavailable(
                f"replication is disabled in cluster {self.cluster.settings.name!r} "
                "([replication] enabled = false)"
            )
        return self.replicator

    async def pull(self, request: pb.PullRequest) -> pb.PullResponse:
        return await self._replication().pull(request)

    async def snapshot(self, request: pb.SnapshotRequest) -> pb.SnapshotResponse:
        return await self._replication().snapshot(request)

    async def push(self, request: pb.PushRequest) -> pb.PushResponse:
        return await self._replication().push(request)

    async def seals(self, request: pb.SealsRequest) -> pb.SealsResponse:
        return await self._replication().seals(request)

    async def replica_read(self, request: pb.ReplicaReadRequest) -> pb.ReplicaReadResponse:
        return await self._replication().replica_read(request)

    # -- Admin ---------------------------------------------------------------------------------

    async def status(self, request: pb.StatusRequest) -> pb.StatusResponse:
        return pb.StatusResponse(
            name=self.me.name,
            region=self.me.region,
            pid=os.getpid(),
            uptime_s=(self.clock.monotonic_ns() - self._started_mono) / 1e9,
            now_latest=self.tt.now().latest,
            uncertainty_ns=self.tt.uncertainty_ns(),
            shards=[
                pb.ShardStatus(
                    id=sid,
                    keys_estimate=ld.store.key_count_estimate(),
                    horizon=ld.store.horizon,
                    reads=ld.counters.reads,
                    writes=ld.counters.writes,
                    aborts=ld.counters.aborts,
                    restamps=ld.counters.restamps,
                )
                for sid, ld in sorted(self.leaders.items())
            ],
            is_oracle=self.oracle is not None,
            oracle_refusals=self.oracle.refusals if self.oracle else 0,
            client_clock_ahead=self.coordinator.stats.get("client-clock-ahead", 0),
            data_dir=self.data_dir,
            replication=self.replicator.status()
            if self.replicator is not None
            else pb.ReplicationStatus(enabled=False),
        )
