"""The K2 node process: `NodeService` bound to gRPC, RocksDB and the system clock.

A node leads the shards the cluster file assigns to it, serves its region's time oracle when the
file names it, and forwards requests for other shards to their leaders, so a client may talk to
any node (the handlers are in k2store/service.py). This module owns what is process-bound:

- the data directory, exclusively (DataDirLock), with one RocksDB engine per led shard;
- group commit of those engines' write-ahead logs (k2store/groupcommit.py): replies, error
  statuses and outgoing calls leave only once the writes made before them are synced;
- durable ceilings for issued and read timestamps, and the wait on start that puts every new
  timestamp above them, so a restart after kill -9 never reorders anything;
- the gRPC server (the RPCs of service.METHODS, plus grpc.health.v1), typed errors as statuses;
- with `[security] tls`, mutual TLS and the `Guard` in front of every handler (k2store/security.py);
- the clock: the system clock wrapped in a `SkewedClock` that follows ``clock.toml`` beside the
  cluster file (truetime/skew.py: the Jepsen clock nemesis), re-read every 0.1 s like net.toml;
- graceful shutdown: health goes NOT_SERVING, in-flight requests get `grace_s`, engines close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from k2store.certs import server_credentials
from k2store.cluster import ClusterConfig, NodeConfig
from k2store.datadir import DataDirLock, DurableCeiling, DurableSlots
from k2store.errors import ERROR_METADATA_KEY, K2Error, Unavailable
from k2store.filewatch import FileWatch
from k2store.groupcommit import DurableTransport, GroupCommit
from k2store.rocksengine import RocksEngine
from k2store.security import Guard
from k2store.service import METHODS, Method, NodeService, decode_request
from k2store.shard import Limits, ShardLeader
from k2store.transport import CHANNEL_OPTIONS, Transport, cluster_transport
from truetime import ClockSource, SkewedClock, SystemClock, TimestampOracle, TrueTime
from truetime.skew import CLOCK_FILE, NO_SKEW, ClockSkew, apply_skew, read_clock_skews, skew_for
from txn.storage import DataDirLocked, VersionedStore

log = logging.getLogger("k2.node")

CEILING_STEP_NS = 500_000_000
"""Durable ceilings (oracle timestamps, read timestamps) are recorded this far ahead of use, and
extended by it in a worker thread once use comes within half of it: about 2 fsyncs a second
each, and a node restarted at once waits at most about 1.5 times this (0.75 s) for its clock to
pass them. At 50 ms (20 fsyncs a second each) the oracle's fsyncs queued with the transactions'
own on the disk and cost K2-MVTO 6% of its throughput on node processes (`k2 bench tpcc
--clients-per-region 10`: 417 -> 437-455 txn/s, 0.93x -> 0.98-1.01x MVTO-HLC)."""

SWITCH_INTERVAL_S = 0.001
"""A node process's GIL switch interval (Python's default is 5 ms). The group commit's sync
thread (k2store/groupcommit.py) needs the GIL back when an fsync returns, and on a busy node
the event loop holds it until the interval runs out: up to 5 ms added to every round, and so
to every write's reply."""

Ctx = grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True, slots=True)
class NodeOptions:
    grace_s: float = 5.0
    """How long SIGTERM waits for in-flight requests before closing."""
    batch_size: int = 256
    """Timestamps per K2-TB batch request."""


class Node:
    """One K2 node process. Construct, `await start()`, then `await wait_stopped()`."""

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
        self.clock_watch: ClockWatch | None = None
        if clock is None and cluster.path is not None:
            skewed = SkewedClock(SystemClock(), reported=True)
            self.clock_watch = ClockWatch(
                cluster.path.parent / CLOCK_FILE, name, self.me.region, skewed
            )
            self.clock_watch.poll()  # before start() waits on the ceilings with this clock
            clock = skewed
        self.clock: ClockSource = clock or SystemClock()
        self.tt = TrueTime(
            self.clock,
            st.epsilon_us * 1000,
            st.max_uncertainty_us * 1000,
            unsafe_ignore_clock_bound=st.unsafe_ignore_clock_bound,
        )
        self._watch_task: asyncio.Task[None] | None = None
        # Pays the cluster's wide-area emulation, if any, as this node (k2store/wan.py).
        self.transport: Transport = transport or cluster_transport(cluster, node=name)
        self._engine_factory = engine_factory or (lambda p: RocksEngine(p))
        self.service: NodeService | None = None
        self._lock = DataDirLock(self.me.data_dir)
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._stopped = asyncio.Event()
        self._leaders: dict[int, ShardLeader] = {}
        self._replica_stores: dict[int, VersionedStore] = {}
        self.group: GroupCommit | None = GroupCommit() if st.group_commit else None
        """Group commit of the engines' write-ahead logs (k2store/groupcommit.py), if on."""

    @property
    def leaders(self) -> dict[int, ShardLeader]:
        return self._leaders

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self._lock.acquire()
        if self.clock_watch is not None:
            self._watch_task = asyncio.ensure_future(self.clock_watch.run())
        try:
            oracle_ceiling = DurableCeiling(self.me.data_dir / "oracle.ceiling", CEILING_STEP_NS)
            read_ceiling = DurableCeiling(self.me.data_dir / "read.ceiling", CEILING_STEP_NS)
            # A previous incarnation may have issued timestamps, made them in its coordinator's
            # slots or served reads up to these ceilings. Waiting until they have certainly
            # passed puts every timestamp from here on above them, with no special cases:
            # normally at most CEILING_STEP_NS; after the clock was stepped back, as long as the
            # step (the node would rather not serve than order new writes below old reads).
            ceiling = max(oracle_ceiling.value, read_ceiling.value)
            wait_ns = self.tt.wait_needed_ns(ceiling)
            if wait_ns:
                log.info("waiting %.1f ms for earlier timestamps to pass", wait_ns / 1e6)
                await self.tt.wait_until_after(ceiling)
            oracle_slots = DurableSlots(self.me.data_dir / "oracle.slots")
            oracle = self._open_oracle(ceiling, oracle_slots.slots)
            self._open_engines()
            self.service = NodeService(
                self.cluster,
                self.me.name,
                truetime=self.tt,
                transport=(
                    self.transport
                    if self.group is None
                    else DurableTransport(self.transport, self.group)
                ),
                leaders=self._leaders,
                oracle=oracle,
                oracle_ceiling=oracle_ceiling,
                oracle_slots=oracle_slots,
                read_ceiling=read_ceiling,
                batch_size=self.options.batch_size,
                data_dir=str(self.me.data_dir),
                replica_stores=self._replica_stores,
            )
            self.service.start()
            sec = self.cluster.settings.security
            options = [*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)]
            if sec.tls:
                options.append(("grpc.max_concurrent_streams", sec.max_concurrent_streams))
            server = grpc.aio.server(options=options)
            guard = Guard.for_cluster(self.cluster, self.clock.monotonic_ns)
            server.add_generic_rpc_handlers(_generic_handlers(self.service, guard, self.group))
            health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
            try:
                if sec.tls:
                    server.add_secure_port(self.me.address, server_credentials(sec, self.me.name))
                else:
                    server.add_insecure_port(self.me.address)
            except RuntimeError:
                raise Unavailable(
                    f"node {self.me.name}: cannot listen on {self.me.address}: the port is in "
                    "use or the address is not local"
                ) from None
            await server.start()
            self._server = server
        except BaseException:
            if self._watch_task is not None:
                self._watch_task.cancel()
            if self.service is not None:
                await self.service.stop()
            self._close_engines()
            self._lock.release()
            raise
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "node %s (%s) serving on %s; shards %s%s",
            self.me.name,
            self.me.region,
            self.me.address,
            sorted(self._leaders),
            "; region oracle" if oracle else "",
        )

    def _open_oracle(self, resume_after: int, slots: dict[str, int]) -> TimestampOracle | None:
        if self.cluster.region(self.me.region).oracle != self.me.name:
            return None
        return TimestampOracle(
            self.cluster.region_names().index(self.me.region),
            self.tt,
            ttl_ns=self.cluster.settings.oracle_ttl_us * 1000,
            resume_after=resume_after or None,
            slots=slots,
        )

    def _open_engines(self) -> None:
        st = self.cluster.settings
        limits = Limits(st.max_key_bytes, st.max_value_bytes)
        hashed = st.partitioning == "hash"
        for shard in self.cluster.shards_led_by(self.me.name):
            path = self.me.data_dir / "shards" / str(shard.id)
            path.mkdir(parents=True, exist_ok=True)
            try:
                store = self._grouped(self._engine_factory(path))
            except DataDirLocked as e:
                raise Unavailable(str(e)) from None
            # HAZARD: read marks live in memory and were lost with the previous process. The
            # floor treats every key as read up to now().latest, which start() made larger than
            # any read the old process served (its durable read ceiling), so no write lands below
            # such a read. With clock error beyond the bound, now().latest may not cover it.
            store.read_marks.raise_floor(self.tt.now().latest)
            self._leaders[shard.id] = ShardLeader(shard, store, limits, hashed=hashed)
        if not st.replication.enabled:
            return
        for shard in self.cluster.replicas_on(self.me.name):
            path = self.me.data_dir / "replicas" / str(shard.id)
            path.mkdir(parents=True, exist_ok=True)
            try:
                self._replica_stores[shard.id] = self._grouped(self._engine_factory(path))
            except DataDirLocked as e:
                raise Unavailable(str(e)) from None

    def _grouped(self, store: VersionedStore) -> VersionedStore:
        """The engine, its syncs handed to the group commit when the node has one."""
        if self.group is not None and isinstance(store, RocksEngine):
            store.defer_sync = self.group.defer
        return store

    def _close_engines(self) -> None:
        for leader in self._leaders.values():
            with contextlib.suppress(Exception):
                leader.store.close()
        self._leaders.clear()
        for store in self._replica_stores.values():
            with contextlib.suppress(Exception):
                store.close()
        self._replica_stores.clear()

    async def stop(self, grace_s: float | None = None) -> None:
        if self._stopped.is_set():
            return
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(self.options.grace_s if grace_s is None else grace_s)
        if self.service is not None:
            await self.service.stop()
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
        if self.group is not None:  # what was written is synced before the engines close
            with contextlib.suppress(Exception):
                await self.group.barrier()
            self.group.close()
        await self.transport.close()
        if self.service is not None:
            for ceiling in (self.service.oracle_ceiling, self.service.read_ceiling):
                if isinstance(ceiling, DurableCeiling):
                    await asyncio.to_thread(ceiling.close)  # a write ahead lands before exit
        self._close_engines()
        self._lock.release()
        self._stopped.set()
        log.info("node %s stopped", self.me.name)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


class ClockWatch:
    """Keeps a node's `SkewedClock` at the skew ``clock.toml`` gives it (truetime/skew.py).

    `poll` re-reads the file when its inode, mtime or size changed and applies the node's entry
    if that changed (re-applying an unchanged one would restart its drift); `run` polls every
    `interval_s`. A malformed file is logged and ignored: the previous skew stays.
    """

    def __init__(self, path: Path, node: str, region: str, clock: SkewedClock) -> None:
        self.path = path
        self.node = node
        self.region = region
        self.clock = clock
        self.skew: ClockSkew = NO_SKEW
        self._watch = FileWatch(path)

    def poll(self) -> None:
        if not self._watch.changed():
            return
        try:
            skew = skew_for(read_clock_skews(self.path), self.node, self.region)
        except (OSError, ValueError) as e:
            log.warning("ignoring clock skew file: %s", e)
            return
        if skew != self.skew:
            apply_skew(self.clock, skew)
            self.skew = skew
            log.warning(
                "clock skew now %+.3f ms, drift %+.1f ppm (from %s)",
                skew.offset_ns / 1e6,
                skew.drift_ppm,
                self.path,
            )

    async def run(self, interval_s: float = 0.1) -> None:
        while True:
            self.poll()
            await asyncio.sleep(interval_s)


def _generic_handlers(
    service: NodeService, guard: Guard | None = None, group: GroupCommit | None = None
) -> list[grpc.GenericRpcHandler]:
    """gRPC handlers for every RPC in service.METHODS, grouped by service name. Requests arrive
    as bytes and are decoded in `_adapt`, after authentication (`guard`, None: security off);
    replies and errors leave after `group`'s barrier (None: no group commit)."""
    by_service: dict[str, dict[str, grpc.RpcMethodHandler[Any, Any]]] = {}
    for m in METHODS:
        _, svc, name = m.path.split("/")
        by_service.setdefault(svc, {})[name] = grpc.unary_unary_rpc_method_handler(
            _adapt(service, m, guard, group),
            request_deserializer=None,
            response_serializer=lambda r: r.SerializeToString(),
        )
    return [grpc.method_handlers_generic_handler(svc, hs) for svc, hs in by_service.items()]


def _adapt(
    service: NodeService,
    method: Method,
    guard: Guard | None = None,
    group: GroupCommit | None = None,
) -> Callable[[bytes, Ctx], Any]:
    """Authenticate, decode, authorize, call the handler; K2Errors become statuses with the
    typed reason in the trailers (see k2store/security.py for why the checks live here). With
    `group`, a reply or an error leaves only once every write made before it is durable
    (k2store/groupcommit.py: it may depend on any of them)."""
    handler = service.handler(method.path)
    barrier = group.barrier if group is not None else _no_barrier

    async def call(data: bytes, context: Ctx) -> Message:
        try:
            if guard is None:
                response = await handler(decode_request(method, data))
                await barrier()
                return response
            ident = guard.authenticate(context.invocation_metadata() or (), context.auth_context())
            guard.admit(ident)
            request = decode_request(method, data)
            guard.authorize(ident, method.path, request)
            response = await handler(request)
            guard.observe(ident, method.path, request, response)
            await barrier()
            return response
        except K2Error as e:
            await barrier()
            await context.abort(e.code, str(e), trailing_metadata=((ERROR_METADATA_KEY, e.reason),))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("internal error in %s", method.path)
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"internal error: {type(e).__name__}",
                trailing_metadata=((ERROR_METADATA_KEY, "internal"),),
            )
        raise AssertionError("unreachable: context.abort raises")

    return call


async def _no_barrier() -> None:
    return None


async def serve(cluster: ClusterConfig, name: str) -> None:
    """Run a node until SIGTERM or SIGINT (the body of `k2 node`)."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    node = Node(cluster, name)
    await node.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(node.stop()))
    await node.wait_stopped()
