"""The K2 node process: binds the protocol cores to the system clock, gRPC and RocksDB.

::

      client ──gRPC──▶ K2 service ──(not leader)──▶ Transport ──▶ leader node
                          │
                          ▼ (leader)
                     BatchClient ──▶ region oracle (local call or Transport)   K2-TB timestamps
                          │
                          ▼
                     ShardLeader (MVTO rules, no I/O) ──▶ VersionedStore (RocksEngine, fsync)
                          │
                          ▼
                     commit-wait: TrueTime.wait_until_after(ts), then reply

A node leads the shards the cluster file assigns to it, serves the oracle of its region when the
file names it, and forwards requests for other shards to their leaders, so a client may talk to
any node. It owns its data directory exclusively (DataDirLock), recovers from whatever RocksDB
synced before a crash, and on SIGTERM stops taking requests, lets in-flight ones finish, and
closes its engines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from k2store.cluster import ClusterConfig, NodeConfig
from k2store.datadir import DataDirLock
from k2store.errors import (
    ERROR_METADATA_KEY,
    ClockUncertain,
    InvalidArgument,
    K2Error,
    KeyTooLarge,
    NotLeader,
    Unavailable,
    ValueTooLarge,
)
from k2store.proto import k2_pb2 as pb
from k2store.proto import k2_pb2_grpc as pb_grpc
from k2store.rocksengine import RocksEngine
from k2store.shard import Limits, ShardLeader
from k2store.storage import DataDirLocked, VersionedStore
from k2store.transport import CHANNEL_OPTIONS, GrpcTransport, Transport
from truetime import (
    BatchClient,
    ClockSource,
    SystemClock,
    TimestampBatch,
    TimestampOracle,
    TrueTime,
    UncertaintyExceeded,
)

log = logging.getLogger("k2.node")

K = "/k2.v1.K2/"
MAX_FUTURE_READ_NS = 1_000_000_000
"""A read may ask for a timestamp at most this far beyond now().latest; a later one would set a
read mark that blocks every writer of the key until real time catches up."""

R = TypeVar("R")
M = TypeVar("M", bound=Message)
Ctx = grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True, slots=True)
class NodeOptions:
    grace_s: float = 5.0
    """How long SIGTERM waits for in-flight requests before closing."""
    batch_size: int = 256
    """Timestamps per K2-TB batch request."""


class Node:
    """One K2 node. Construct, `await start()`, then `await wait_stopped()`."""

    def __init__(
        self,
        cluster: ClusterConfig,
        name: str,
        *,
        clock: ClockSource | None = None,
        transport: Transport | None = None,
        engine_factory: Callable[[os.PathLike[str]], VersionedStore] | None = None,
        options: NodeOptions | None = None,
    ) -> None:
        self.cluster = cluster
        self.me: NodeConfig = cluster.node(name)
        self.options = options or NodeOptions()
        st = cluster.settings
        self.clock: ClockSource = clock or SystemClock()
        self.tt = TrueTime(self.clock, st.epsilon_us * 1000, st.max_uncertainty_us * 1000)
        self.transport: Transport = transport or GrpcTransport(
            {n.name: n.address for n in cluster.nodes}
        )
        self._engine_factory = engine_factory or (lambda p: RocksEngine(p))
        self.region = cluster.region(self.me.region)
        self.oracle: TimestampOracle | None = None
        if self.region.oracle == self.me.name:
            oracle_id = cluster.region_names().index(self.me.region)
            self.oracle = TimestampOracle(oracle_id, self.tt, ttl_ns=st.oracle_ttl_us * 1000)
        self.batch = BatchClient(self._fetch_batch, self.clock, batch_size=self.options.batch_size)
        self.limits = Limits(st.max_key_bytes, st.max_value_bytes)
        self.leaders: dict[int, ShardLeader] = {}
        self._lock = DataDirLock(self.me.data_dir)
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._stopped = asyncio.Event()
        self._started_mono = self.clock.monotonic_ns()

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self._lock.acquire()
        try:
            self._open_engines()
            server = grpc.aio.server(options=[*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)])
            pb_grpc.add_K2Servicer_to_server(_K2Service(self), server)
            pb_grpc.add_OracleServicer_to_server(_OracleService(self), server)
            pb_grpc.add_AdminServicer_to_server(_AdminService(self), server)
            health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
            try:
                server.add_insecure_port(self.me.address)
            except RuntimeError:
                raise Unavailable(
                    f"node {self.me.name}: cannot listen on {self.me.address}: the port is in use or "
                    "the address is not local"
                ) from None
            await server.start()
            self._server = server
        except BaseException:
            self._close_engines()
            self._lock.release()
            raise
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "node %s (%s) serving on %s; shards %s%s",
            self.me.name,
            self.me.region,
            self.me.address,
            sorted(self.leaders),
            "; region oracle" if self.oracle else "",
        )

    def _open_engines(self) -> None:
        hashed = self.cluster.settings.partitioning == "hash"
        for shard in self.cluster.shards_led_by(self.me.name):
            path = self.me.data_dir / "shards" / str(shard.id)
            path.mkdir(parents=True, exist_ok=True)
            try:
                store = self._engine_factory(path)
            except DataDirLocked as e:
                raise Unavailable(str(e)) from None
            # HAZARD: read marks live in memory and were lost with the previous process. Raising the
            # floor to now().latest treats every key as read up to now, so no write below a read
            # served before the restart can land. If the clock is off by more than the bound, the
            # floor may sit below such a read and a late write could change what it returned.
            store.read_marks.raise_floor(self.tt.now().latest)
            self.leaders[shard.id] = ShardLeader(shard, store, self.limits, hashed=hashed)

    def _close_engines(self) -> None:
        for leader in self.leaders.values():
            with contextlib.suppress(Exception):
                leader.store.close()
        self.leaders.clear()

    async def stop(self, grace_s: float | None = None) -> None:
        if self._stopped.is_set():
            return
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(self.options.grace_s if grace_s is None else grace_s)
        await self.transport.close()
        self._close_engines()
        self._lock.release()
        self._stopped.set()
        log.info("node %s stopped", self.me.name)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    # -- time ----------------------------------------------------------------------------------

    async def _fetch_batch(self, count: int) -> TimestampBatch:
        if self.oracle is not None:
            return self._issue_local(self.me.name, count)
        resp = await self.transport.call(
            self.region.oracle,
            "/k2.v1.Oracle/GetTimestampBatch",
            pb.TimestampBatchRequest(coordinator=self.me.name, count=count),
            pb.TimestampBatchResponse,
            timeout_s=self.cluster.settings.request_timeout_s,
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
        assert self.oracle is not None
        try:
            return self.oracle.issue(self.oracle.register(coordinator), count)
        except UncertaintyExceeded as e:
            raise ClockUncertain(f"oracle {self.me.name}: {e}") from None

    async def timestamp(self) -> int:
        """A fresh timestamp from the region's K2-TB batch (>= true time while the batch is live)."""
        self._check_clock()
        try:
            return await self.batch.next_timestamp()
        except UncertaintyExceeded as e:
            raise ClockUncertain(str(e)) from None

    def _check_clock(self) -> None:
        try:
            self.tt.check()
        except UncertaintyExceeded as e:
            raise ClockUncertain(f"node {self.me.name} refuses to serve: {e}") from None

    def check_read_ts(self, at_ts: int) -> None:
        limit = self.tt.now().latest + MAX_FUTURE_READ_NS
        if at_ts > limit:
            raise InvalidArgument(
                f"read timestamp {at_ts} is more than {MAX_FUTURE_READ_NS // 1_000_000} ms in the future"
            )

    def leader_for(self, key: bytes, value: bytes | None = None) -> tuple[ShardLeader | None, str]:
        """The local leader of key's shard, or None and the leader's name; checks sizes first so
        that bad input is refused where it arrives, before it is forwarded anywhere."""
        if len(key) > self.limits.max_key_bytes:
            raise KeyTooLarge(
                f"key of {len(key)} bytes exceeds the limit of {self.limits.max_key_bytes} bytes"
            )
        if value is not None and len(value) > self.limits.max_value_bytes:
            raise ValueTooLarge(
                f"value of {len(value)} bytes exceeds the limit of {self.limits.max_value_bytes} bytes"
            )
        shard = self.cluster.shard_for_key(key)
        return self.leaders.get(shard.id), shard.leader

    async def forward(self, leader: str, method: str, request: Any, response_type: type[M]) -> M:
        request.forwarded = True
        result: M = await self.transport.call(
            leader,
            K + method,
            request,
            response_type,
            timeout_s=self.cluster.settings.request_timeout_s,
        )
        return result


def _handles_errors(fn: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """Turn K2Errors into gRPC statuses with the typed reason in the trailing metadata."""

    async def wrapper(self: Any, request: Any, context: Ctx) -> R:
        try:
            return await fn(self, request, context)
        except K2Error as e:
            await context.abort(e.code, str(e), trailing_metadata=((ERROR_METADATA_KEY, e.reason),))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("internal error in %s", fn.__name__)
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"internal error: {type(e).__name__}",
                trailing_metadata=((ERROR_METADATA_KEY, "internal"),),
            )
        raise AssertionError("unreachable: context.abort raises")

    wrapper.__name__ = fn.__name__
    return wrapper


class _K2Service(pb_grpc.K2Servicer):
    def __init__(self, node: Node) -> None:
        self.node = node

    @_handles_errors
    async def Get(
        self, request: pb.GetRequest, context: Ctx
    ) -> pb.GetResponse:
        n = self.node
        leader, leader_name = n.leader_for(request.key)
        if leader is None:
            if request.forwarded:
                raise NotLeader(
                    f"node {n.me.name} does not lead the shard of key {request.key[:64]!r}"
                )
            return await n.forward(leader_name, "Get", request, pb.GetResponse)
        if request.at_ts:
            n.check_read_ts(request.at_ts)
            ts = request.at_ts
        else:
            ts = await n.timestamp()
        version = leader.read(request.key, ts)
        if version is not None:
            # HAZARD: a version is returned only once its timestamp has certainly passed, so a read
            # that starts after this one returns (at a timestamp >= true time) sees it too. With
            # clock error beyond the bound the wait is too short and a later read may miss it.
            await n.tt.wait_until_after(version.ts)
        found = version is not None and version.value is not None
        return pb.GetResponse(
            found=found,
            value=version.value
            if found and version is not None and version.value is not None
            else b"",
            version_ts=version.ts if found and version is not None else 0,
            read_ts=ts,
            served_by=n.me.name,
            shard_id=leader.shard.id,
        )

    async def _write(self, key: bytes, value: bytes | None) -> tuple[int, bool, ShardLeader]:
        n = self.node
        leader, _ = n.leader_for(key)
        assert leader is not None
        leader.check_key(key)
        if value is not None:
            leader.check_value(key, value)
        ts = await n.timestamp()
        previous = leader.store.latest_version(key)
        leader.write(key, value, ts)
        # HAZARD (commit-wait): acknowledging only after ts has certainly passed means every
        # transaction that starts after the client hears back gets a larger timestamp, which is
        # what makes timestamp order agree with real-time order. With clock error beyond the bound
        # the wait ends early and a later reader may be ordered before this write.
        await n.tt.wait_until_after(ts)
        return ts, previous is not None and previous.value is not None, leader

    @_handles_errors
    async def Put(
        self, request: pb.PutRequest, context: Ctx
    ) -> pb.PutResponse:
        n = self.node
        leader, leader_name = n.leader_for(request.key, request.value)
        if leader is None:
            if request.forwarded:
                raise NotLeader(
                    f"node {n.me.name} does not lead the shard of key {request.key[:64]!r}"
                )
            return await n.forward(leader_name, "Put", request, pb.PutResponse)
        ts, _, leader = await self._write(request.key, request.value)
        return pb.PutResponse(commit_ts=ts, served_by=n.me.name, shard_id=leader.shard.id)

    @_handles_errors
    async def Delete(
        self, request: pb.DeleteRequest, context: Ctx
    ) -> pb.DeleteResponse:
        n = self.node
        leader, leader_name = n.leader_for(request.key)
        if leader is None:
            if request.forwarded:
                raise NotLeader(
                    f"node {n.me.name} does not lead the shard of key {request.key[:64]!r}"
                )
            return await n.forward(leader_name, "Delete", request, pb.DeleteResponse)
        ts, existed, leader = await self._write(request.key, None)
        return pb.DeleteResponse(
            commit_ts=ts, existed=existed, served_by=n.me.name, shard_id=leader.shard.id
        )

    @_handles_errors
    async def Scan(
        self, request: pb.ScanRequest, context: Ctx
    ) -> pb.ScanResponse:
        n = self.node
        try:
            shard = n.cluster.shard(request.shard_id)
        except K2Error:
            raise
        leader = n.leaders.get(shard.id)
        if leader is None:
            if request.forwarded:
                raise NotLeader(f"node {n.me.name} does not lead shard {shard.id}")
            return await n.forward(shard.leader, "Scan", request, pb.ScanResponse)
        if request.at_ts:
            n.check_read_ts(request.at_ts)
            ts = request.at_ts
        else:
            ts = await n.timestamp()
        limit = request.limit or n.cluster.settings.scan_page_rows
        page = leader.scan(request.start, request.end if request.has_end else None, ts, limit)
        if page.items:
            # HAZARD: as for Get, every returned version's timestamp must have passed.
            await n.tt.wait_until_after(max(v.ts for _, v in page.items))
        return pb.ScanResponse(
            items=[
                pb.KeyValue(key=k, value=v.value or b"", version_ts=v.ts) for k, v in page.items
            ],
            read_ts=ts,
            more=page.more,
            resume_key=page.resume_key,
            served_by=n.me.name,
        )

    @_handles_errors
    async def ClusterInfo(
        self, request: pb.ClusterInfoRequest, context: Ctx
    ) -> pb.ClusterInfoResponse:
        c = self.node.cluster
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


class _OracleService(pb_grpc.OracleServicer):
    def __init__(self, node: Node) -> None:
        self.node = node

    @_handles_errors
    async def GetTimestampBatch(
        self, request: pb.TimestampBatchRequest, context: Ctx
    ) -> pb.TimestampBatchResponse:
        n = self.node
        if n.oracle is None:
            raise NotLeader(f"node {n.me.name} is not the oracle of region {n.me.region}")
        if not request.coordinator:
            raise InvalidArgument("coordinator name is required")
        try:
            b = n._issue_local(request.coordinator, request.count)
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        return pb.TimestampBatchResponse(
            oracle_id=b.oracle_id,
            slot=b.slot,
            base=b.base,
            step=b.step,
            count=b.count,
            ttl_ns=b.ttl_ns,
            issued_latest=b.issued_latest,
        )


class _AdminService(pb_grpc.AdminServicer):
    def __init__(self, node: Node) -> None:
        self.node = node

    @_handles_errors
    async def Status(
        self, request: pb.StatusRequest, context: Ctx
    ) -> pb.StatusResponse:
        n = self.node
        return pb.StatusResponse(
            name=n.me.name,
            region=n.me.region,
            pid=os.getpid(),
            uptime_s=(n.clock.monotonic_ns() - n._started_mono) / 1e9,
            now_latest=n.tt.now().latest,
            uncertainty_ns=n.tt.uncertainty_ns(),
            shards=[
                pb.ShardStatus(
                    id=sid,
                    keys_estimate=ld.store.key_count_estimate(),
                    horizon=ld.store.horizon,
                    reads=ld.counters.reads,
                    writes=ld.counters.writes,
                    aborts=ld.counters.aborts,
                )
                for sid, ld in sorted(n.leaders.items())
            ],
            is_oracle=n.oracle is not None,
            oracle_refusals=n.oracle.refusals if n.oracle else 0,
            data_dir=str(n.me.data_dir),
        )


async def serve(cluster: ClusterConfig, name: str) -> None:
    """Run a node until SIGTERM or SIGINT (the body of `k2 node`)."""
    node = Node(cluster, name)
    await node.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(node.stop()))
    await node.wait_stopped()
