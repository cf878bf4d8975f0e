"""A whole K2 cluster in one process: real `NodeService`s over a simulated network and memory.

Purpose
    `SimCluster` builds, for every node of a `ClusterConfig`, exactly what `k2store.node.Node`
    builds (a `NodeService` with one `ShardLeader` per led shard, the region's `TimestampOracle`
    on the oracle node, a `TrueTime`), but binds it to a `SimTransport`, `MemoryEngine`s and a
    per-node `SkewedClock` over the loop's `VirtualClock`. Clients (`SimClient`) route keys to
    leaders the way `k2store.client.AsyncClient` does, from a pseudo-node in their region, so
    every request pays the wide-area latency a real client there would.

::

    SimClient("us-east") ──SimNetwork──▶ leader NodeService ──▶ ShardLeader ──▶ MemoryEngine
                                             │  TrueTime(SkewedClock(VirtualClock))
                                             └─ BatchClient ──▶ region oracle (local or network)

Lifecycle of a node (mirrors node.py)
    - boot: wait until the durable ceilings (highest issued oracle timestamp, highest read
      timestamp) have certainly passed, start the oracle above them, give every shard's read
      marks a floor of now().latest, attach the service to the network.
    - `crash(name)`: the process dies. In-flight handlers are cancelled, callers get
      `Unavailable`, replies to the node's own calls are discarded. The shards' `MemoryEngine`s
      survive (every write is "synced" before it is acknowledged), as do the ceilings (they model
      node.py's `DurableCeiling` files, recorded exactly rather than 50 ms ahead); read marks,
      oracle slots and timestamp batches are lost.
    - `await restart(name)`: boot again on the same engines; the node refuses requests until
      the ceiling wait is over, as the real process does not listen before then.

Invariants
    The protocol code is the production code; only the bindings differ. Randomness comes from
    the cluster seed: the network's stream and each client's retry jitter derive from it.
    A cluster must be built inside a running simulation (`run_simulation`).
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from k2store.client import AsyncClient, ReadResult, RetryPolicy, WriteResult
from k2store.cluster import ClusterConfig
from k2store.errors import InvalidArgument, K2Error
from k2store.memengine import MemoryEngine
from k2store.proto import k2_pb2 as pb
from k2store.service import MemoryCeiling, MemorySlots, NodeService
from k2store.shard import Limits, ShardLeader
from k2store.sim.loop import SimEventLoop, VirtualClock, current_sim_loop
from k2store.sim.network import SimNetwork, SimTransport
from truetime import SkewedClock, TimestampOracle, TrueTime
from txn.readmarks import ReadMarks

__all__ = ["SimClient", "SimCluster", "SimNode", "Workload"]

T = TypeVar("T")
K = "/k2.v1.K2/"
KeyLike = bytes | str
Workload = Callable[[], Coroutine[Any, Any, object]]
"""A workload: a no-argument coroutine function, typically a closure over clients."""


@dataclass(slots=True)
class SimNode:
    """One simulated node: its machine (clock, engines, durable ceilings) and its process."""

    name: str
    region: str
    clock: SkewedClock
    """The machine's clock: survives restarts, and carries the injected skew."""
    engines: dict[int, MemoryEngine]
    """Shard id -> engine; the 'disk', kept across crashes."""
    replica_engines: dict[int, MemoryEngine] = field(default_factory=dict)
    """Shard id -> engine of the replica this node holds (kept across crashes too)."""
    oracle_ceiling: MemoryCeiling = field(default_factory=MemoryCeiling)
    oracle_slots: MemorySlots = field(default_factory=MemorySlots)
    """The oracle's coordinator slots (its node's 'disk', kept across crashes)."""
    read_ceiling: MemoryCeiling = field(default_factory=MemoryCeiling)
    service: NodeService | None = None
    """The running process's handlers; None while crashed."""
    boots: int = 0

    @property
    def up(self) -> bool:
        return self.service is not None


class SimCluster:
    """A simulated K2 cluster. Build it inside `run_simulation`; see the module docstring."""

    def __init__(
        self,
        config: ClusterConfig,
        *,
        seed: int | None = None,
        network: SimNetwork | None = None,
        clock_skew_ns: Mapping[str, int] | None = None,
        batch_size: int = 256,
    ) -> None:
        """`seed`: the run's seed (default: the running loop's). `network`: a configured
        `SimNetwork` (default: the config's ``[network]`` table when it is enabled, else
        DESIGN.md's regions); it is reseeded from `seed`.
        `clock_skew_ns`: node name -> initial clock offset (change later with `set_clock_skew`).
        `batch_size`: timestamps per K2-TB batch request, as `NodeOptions.batch_size`."""
        self.loop: SimEventLoop = current_sim_loop()
        self.config = config
        self.seed = self.loop.seed if seed is None else seed
        if network is None:
            net = config.settings.network
            network = SimNetwork.from_settings(net) if net.enabled else SimNetwork()
        self.network = network
        self.network.reseed(f"{self.seed}:network")
        self._txn_ids = random.Random(f"{self.seed}:txn-ids")
        self._stopping: set[asyncio.Task[None]] = set()
        self.batch_size = batch_size
        self._true_clock = VirtualClock(self.loop)
        self._client_count = 0
        skew = dict(clock_skew_ns or {})
        for name in skew:
            config.node(name)  # UnknownNode on a typo
        self.nodes: dict[str, SimNode] = {}
        for n in config.nodes:
            engines = {s.id: MemoryEngine() for s in config.shards_led_by(n.name)}
            replicas = (
                {s.id: MemoryEngine() for s in config.replicas_on(n.name)}
                if config.settings.replication.enabled
                else {}
            )
            node = SimNode(
                n.name,
                n.region,
                SkewedClock(self._true_clock, skew.get(n.name, 0)),
                engines,
                replicas,
            )
            self.nodes[n.name] = node
            self.network.add_node(n.name, n.region)
        for node in self.nodes.values():
            # Fresh ceilings are 0, so the first boot needs no wait and can be synchronous.
            self._boot(node)

    # -- time ----------------------------------------------------------------------------------

    @property
    def now_s(self) -> float:
        """Virtual seconds since the simulation started (true time, no skew)."""
        return self.loop.time()

    def true_time_ns(self) -> int:
        """True time as a timestamp-comparable reading (ns since the Unix epoch)."""
        return self._true_clock.now_ns()

    def set_clock_skew(
        self, name: str, offset_ns: int | None = None, drift_ppm: float | None = None
    ) -> None:
        """Make node `name`'s clock lie by `offset_ns` and/or run fast by `drift_ppm` from now on.

        Beyond the configured epsilon this breaks K2's real-time guarantees (see the HAZARD
        notes in truetime); that is what fault-injection runs are for."""
        clock = self.node(name).clock
        if offset_ns is not None:
            clock.set_offset(offset_ns)
        if drift_ppm is not None:
            clock.set_drift_ppm(drift_ppm)

    # -- nodes ---------------------------------------------------------------------------------

    def node(self, name: str) -> SimNode:
        self.config.node(name)  # UnknownNode with the cluster's node list
        return self.nodes[name]

    def service(self, name: str) -> NodeService:
        """The running handlers of node `name` (to inspect leaders, counters, the oracle)."""
        svc = self.node(name).service
        if svc is None:
            raise RuntimeError(f"node {name!r} is down")
        return svc

    def restamps(self) -> int:
        """Requests the leaders of the running nodes restamped instead of aborting
        (`TxnSettings.restamp`), as their Status would sum them."""
        return sum(
            ld.counters.restamps
            for node in self.nodes.values()
            if node.service is not None
            for ld in node.service.participant.leaders.values()
        )

    def _truetime(self, node: SimNode) -> TrueTime:
        st = self.config.settings
        return TrueTime(node.clock, st.epsilon_us * 1000, st.max_uncertainty_us * 1000)

    def _boot(self, node: SimNode, tt: TrueTime | None = None) -> None:
        cfg = self.config
        st = cfg.settings
        tt = tt or self._truetime(node)
        resume_after = max(node.oracle_ceiling.value, node.read_ceiling.value)
        oracle = None
        if cfg.region(node.region).oracle == node.name:
            oracle = TimestampOracle(
                cfg.region_names().index(node.region),
                tt,
                ttl_ns=st.oracle_ttl_us * 1000,
                resume_after=resume_after or None,
                slots=node.oracle_slots.slots,
            )
        limits = Limits(st.max_key_bytes, st.max_value_bytes)
        hashed = st.partitioning == "hash"
        leaders: dict[int, ShardLeader] = {}
        for shard in cfg.shards_led_by(node.name):
            engine: MemoryEngine = node.engines[shard.id]
            # HAZARD: read marks are memory, lost with the process; as in node.py the floor
            # stands in for them and is above every read the previous incarnation served only
            # because boot waited out the read ceiling and the clock is within its bound.
            marks = ReadMarks(max_entries=engine.read_marks.max_entries)
            marks.raise_floor(tt.now().latest)
            engine.read_marks = marks
            leaders[shard.id] = ShardLeader(shard, engine, limits, hashed=hashed)
        node.service = NodeService(
            cfg,
            node.name,
            truetime=tt,
            transport=SimTransport(self.network, node.name),
            leaders=leaders,
            oracle=oracle,
            oracle_ceiling=node.oracle_ceiling,
            oracle_slots=node.oracle_slots,
            read_ceiling=node.read_ceiling,
            batch_size=self.batch_size,
            data_dir=f"sim:{node.name}",
            new_txn_id=lambda: self._txn_ids.randbytes(16),
            replica_stores=dict(node.replica_engines),
        )
        node.service.start()  # the intent sweep and the silent-client reaper, on virtual time
        node.boots += 1
        self.network.attach(node.name, node.service)

    def crash(self, name: str) -> None:
        """Kill node `name` (kill -9): see the module docstring for what survives."""
        node = self.node(name)
        if node.service is None:
            raise RuntimeError(f"node {name!r} is already down")
        service, node.service = node.service, None
        self.network.detach(name)
        # Its background loops die with it (what a kill -9 does to a process's tasks).
        stopping = asyncio.ensure_future(service.stop())
        self._stopping.add(stopping)
        stopping.add_done_callback(self._stopping.discard)

    async def restart(self, name: str) -> None:
        """Start a crashed node again on its engines; returns once it serves."""
        node = self.node(name)
        if node.service is not None:
            raise RuntimeError(f"node {name!r} is running; crash it first")
        tt = self._truetime(node)
        ceiling = max(node.oracle_ceiling.value, node.read_ceiling.value)
        # As node.py's start(): every timestamp from here on must be above what the previous
        # incarnation issued or read at.
        await tt.wait_until_after(ceiling)
        if node.service is None:  # nobody restarted it meanwhile
            self._boot(node, tt)

    # -- faults --------------------------------------------------------------------------------

    def partition(self, a: str, b: str, *, one_way: bool = False) -> None:
        """Cut the link between two nodes, clients or regions (see `SimNetwork.partition`)."""
        self.network.partition(a, b, one_way=one_way)

    def isolate(self, name: str) -> None:
        self.network.isolate(name)

    def heal(self, a: str | None = None, b: str | None = None) -> None:
        self.network.heal(a, b)

    # -- clients and workloads -----------------------------------------------------------------

    def client(
        self,
        region: str,
        *,
        retry: RetryPolicy | None = None,
        timeout_s: float | None = None,
    ) -> SimClient:
        """A client located in `region` (its own endpoint there on the network)."""
        self.config.region(region)  # UnknownNode on a typo
        self._client_count += 1
        name = f"client-{region}-{self._client_count}"
        self.network.add_client(name, region)
        return SimClient(
            self,
            name,
            region,
            retry=retry or RetryPolicy(),
            timeout_s=timeout_s or self.config.settings.request_timeout_s,
            rng=random.Random(f"{self.seed}:{name}"),
        )

    def txn_client(
        self,
        region: str,
        *,
        retry: RetryPolicy | None = None,
        timeout_s: float | None = None,
        client_class: type[AsyncClient] = AsyncClient,
        client_time: bool = False,
    ) -> AsyncClient:
        """The production `AsyncClient` (transactions and all) located in `region`, talking over
        the simulated network with seeded backoff jitter. `client_class`: a subclass to build
        instead (benchmarks that watch attempts), taking AsyncClient's arguments.
        `client_time`: the client has client time (AsyncClient's `truetime`) on the clock of
        its region's first node, as a client embedded in that serving node would."""
        self.config.region(region)
        self._client_count += 1
        name = f"client-{region}-{self._client_count}"
        self.network.add_client(name, region)
        return client_class(
            self.config,
            region=region,
            retry=retry,
            timeout_s=timeout_s,
            transport=SimTransport(self.network, name),
            rng=random.Random(f"{self.seed}:{name}"),
            truetime=self._truetime(self.nodes[self.config.nodes_in(region)[0].name])
            if client_time
            else None,
        )

    async def run(self, workload: Workload | Sequence[Workload], duration_s: float) -> bool:
        """Run the workload(s) concurrently for at most `duration_s` virtual seconds.

        Returns True if every workload finished by itself, False if the deadline cancelled some.
        The first exception a workload raises (other than that cancellation) is re-raised once
        all have stopped."""
        workloads = [workload] if callable(workload) else list(workload)
        tasks = [self.loop.create_task(w()) for w in workloads]
        timed_out = False

        def stop() -> None:
            nonlocal timed_out
            timed_out = True
            for t in tasks:
                t.cancel()

        handle = self.loop.call_later(duration_s, stop)
        try:
            results = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            handle.cancel()
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                raise r
        return not timed_out


class SimClient:
    """`AsyncClient`'s routing and retries, sending from a client endpoint in one region.

    Retries follow `RetryPolicy` with backoff jitter from the client's own seeded generator
    (the real client uses the global one, which would break replay)."""

    def __init__(
        self,
        cluster: SimCluster,
        name: str,
        region: str,
        *,
        retry: RetryPolicy,
        timeout_s: float,
        rng: random.Random,
    ) -> None:
        self.cluster = cluster
        self.name = name
        self.region = region
        self.retry = retry
        self.timeout_s = timeout_s
        self._rng = rng
        self._transport = SimTransport(cluster.network, name)
        self.retries = 0
        """Attempts retried after a retryable error."""

    async def _with_retry(self, attempt: Callable[[], Awaitable[T]]) -> T:
        backoff = self.retry.initial_backoff_s
        for i in range(self.retry.max_attempts):
            try:
                return await attempt()
            except K2Error as e:
                if not e.retryable or i == self.retry.max_attempts - 1:
                    raise
                self.retries += 1
                await asyncio.sleep(backoff * (0.5 + self._rng.random()))
                backoff = min(backoff * 2, self.retry.max_backoff_s)
        raise AssertionError("unreachable")

    async def _call(self, node: str, method: str, request: Any, response_type: type[T]) -> T:
        result: T = await self._transport.call(
            node, K + method, request, response_type, timeout_s=self.timeout_s
        )  # type: ignore[type-var]
        return result

    def _route(self, key: bytes, via: str | None) -> str:
        cfg = self.cluster.config
        if via is not None:
            cfg.node(via)
            return via
        return cfg.shard_for_key(key).leader

    async def get(
        self, key: KeyLike, *, at_ts: int | None = None, via: str | None = None
    ) -> bytes | None:
        return (await self.get_versioned(key, at_ts=at_ts, via=via)).value

    async def get_versioned(
        self, key: KeyLike, *, at_ts: int | None = None, via: str | None = None
    ) -> ReadResult:
        k = _bytes(key)
        node = self._route(k, via)
        req = pb.GetRequest(key=k, at_ts=at_ts or 0)
        r = await self._with_retry(lambda: self._call(node, "Get", req, pb.GetResponse))
        return ReadResult(r.value if r.found else None, r.version_ts, r.read_ts, r.served_by)

    async def put(self, key: KeyLike, value: bytes, *, via: str | None = None) -> WriteResult:
        k = _bytes(key)
        node = self._route(k, via)
        req = pb.PutRequest(key=k, value=bytes(value))
        r = await self._with_retry(lambda: self._call(node, "Put", req, pb.PutResponse))
        return WriteResult(r.commit_ts, r.served_by)

    async def delete(self, key: KeyLike, *, via: str | None = None) -> WriteResult:
        k = _bytes(key)
        node = self._route(k, via)
        req = pb.DeleteRequest(key=k)
        r = await self._with_retry(lambda: self._call(node, "Delete", req, pb.DeleteResponse))
        return WriteResult(r.commit_ts, r.served_by, existed=r.existed)

    async def scan(
        self,
        start: KeyLike = b"",
        end: KeyLike | None = None,
        *,
        limit: int | None = None,
        at_ts: int | None = None,
    ) -> list[tuple[bytes, bytes]]:
        """Live keys in [start, end) in key order, all read at one timestamp."""
        rows = await self.scan_versioned(start, end, limit=limit, at_ts=at_ts)
        return [(k, v) for k, v, _ in rows]

    async def scan_versioned(
        self,
        start: KeyLike = b"",
        end: KeyLike | None = None,
        *,
        limit: int | None = None,
        at_ts: int | None = None,
    ) -> list[tuple[bytes, bytes, int]]:
        """As `AsyncClient.scan_versioned`: shard by shard, the first answer fixing the
        snapshot timestamp for the rest."""
        cfg = self.cluster.config
        s = _bytes(start)
        e = None if end is None else _bytes(end)
        if limit is not None and limit <= 0:
            raise InvalidArgument(f"scan limit must be positive, got {limit}")
        if e is not None and e <= s:
            raise InvalidArgument(f"scan end {e!r} must sort after start {s!r}")
        hashed = cfg.settings.partitioning == "hash"
        ts = at_ts or 0
        out: list[tuple[bytes, bytes, int]] = []
        for shard in cfg.shards_for_range(s, e):
            lo = s if hashed else max(s, shard.start)
            hi = e if hashed else _min_end(e, shard.end)
            while True:
                want = 0 if limit is None else (limit if hashed else limit - len(out))
                req = pb.ScanRequest(
                    start=lo,
                    end=hi or b"",
                    has_end=hi is not None,
                    limit=want,
                    at_ts=ts,
                    shard_id=shard.id,
                )
                r = await self._with_retry(
                    functools.partial(self._call, shard.leader, "Scan", req, pb.ScanResponse)
                )
                ts = ts or r.read_ts
                out.extend((kv.key, kv.value, kv.version_ts) for kv in r.items)
                if not r.more or (limit is not None and not hashed and len(out) >= limit):
                    break
                lo = r.resume_key
            if limit is not None and not hashed and len(out) >= limit:
                break
        if hashed:
            out.sort(key=lambda row: row[0])
        return out[:limit] if limit is not None else out


def _bytes(k: KeyLike) -> bytes:
    return k if isinstance(k, bytes) else k.encode()


def _min_end(a: bytes | None, b: bytes | None) -> bytes | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)
