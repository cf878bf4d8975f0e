"""The connector: what a serving framework calls to reuse KV cache (asyncio and sync).

Purpose
    An inference engine asks three things: how much of this prompt is cached (`lookup`), give me
    that KV (`retrieve`), keep the KV I just computed (`store`). It sees token ids and tensors
    only; namespaces, metadata rows, regions and block stores stay behind this API.

Data flow
    ::

        lookup(tokens) ─▶ block_hashes ─▶ metadata.lookup: this region's rows (local read),
                          then every region's rows (one parallel read round) if they fall short
                       ─▶ choose a region per block (local first) ─▶ Has? at its block store
                       ─▶ lease the chosen copies (one blind write per region, in the background)
                       ─▶ LookupResult(num_tokens, blocks with their regions)
        retrieve(tokens) ─▶ Get each block from its region's store (in parallel, verified)
                       ─▶ decode ─▶ concat ─▶ RetrieveResult(kv, num_tokens, bytes moved)
        store(tokens, kv) ─▶ check spec ─▶ split full blocks ─▶ rows: which are new here?
                       ─▶ Put frames into this region's store (durable) ─▶ metadata.publish

Invariants
    - A hit is never reported for a block that cannot be loaded: lookup only counts blocks whose
      store says it holds them, and retrieve serves the longest prefix it actually loaded and
      verified. Tokens a lookup promised but retrieve could not deliver are counted in
      `stats.recompute_tokens` (the engine recomputes them) and each failed block in
      `stats.failed_loads`; a block the store no longer holds, or holds corrupt, is removed from
      that region in the metadata.
    - Bytes before metadata: `store` publishes a region only after its store acknowledged the
      bytes durably.
    - A tenant's namespace includes its tenant name and salt, so its blocks are invisible to
      every other tenant unless it registered a shared namespace (an explicit opt-in).

Failure modes
    Bad input (wrong shape, dtype or layout, token ids out of range, a block above
    `max_block_bytes`): `InvalidArgument` subclasses, raised before anything is stored. An
    unregistered namespace: `UnknownNamespace` at `open`. A block store or the metadata store
    that cannot answer: lookups and retrieves degrade to misses and `store` stores nothing
    (`stats.unavailable` counts these; a block store that is full of protected blocks counts
    the same); nothing raises for them. A region whose metadata cannot be read within
    `timeout_s` is skipped; the others still serve. Over quota: `QuotaExceeded` from `store` (the
    bytes already put stay until the store's LRU or a sweep drops them: deleting them could race
    with another publisher of the same block).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import secrets
import threading
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from k2store import evloop
from k2store.client import AsyncClient
from k2store.cluster import ClusterConfig
from k2store.errors import InvalidArgument, K2Error, Unavailable
from k2store.transport import WanEmulation
from k2store.wan import OVERRIDES_FILE
from kvtier.blocknode import BlockStoreClient, LinkPacer, block_namespace
from kvtier.blocks import (
    FRAME_HEADER_BYTES,
    BlockSpec,
    Namespace,
    block_hashes,
    block_view,
    concat_blocks,
    decode_block,
    encode_block,
    read_header,
    split_blocks,
    verify_frame,
)
from kvtier.errors import BlockSpecMismatch, BlockTooLarge, CorruptBlock
from kvtier.events import EventKind, EventPublisher
from kvtier.metadata import (
    DEFAULT_LEASE_S,
    BlockInfo,
    BlockMetadata,
    NamespaceRecord,
    PublishBlock,
)
from kvtier.placement import CostModel, DemandTracker
from kvtier.shm import ARENA_HEADER_BYTES, SharedArena
from truetime import ClockSource

__all__ = [
    "AsyncKVConnector",
    "BlockLocation",
    "BlockSink",
    "ConnectorConfig",
    "ConnectorStats",
    "KVConnector",
    "LookupResult",
    "RetrieveResult",
    "StoreResult",
]

log = logging.getLogger("kvtier.connector")
T = TypeVar("T")
Tokens = Sequence[int] | torch.Tensor | np.ndarray[Any, Any]
BlockSink = Callable[[int, int, torch.Tensor], Awaitable[None]]
"""`await sink(index, first_layer, part)`: takes layers [first_layer, first_layer + len(part))
of block number `index` of a retrieve (a whole block: first_layer 0 and every layer; see
`retrieve`)."""
_SUNK = torch.empty(0)
"""What a load handed to a sink stands for in retrieve's list (its bytes are gone)."""


@dataclass(frozen=True, slots=True)
class ConnectorConfig:
    region: str
    """The region this serving node runs in: stores go to its block store, loads prefer it."""
    holder: str = ""
    """Lease holder id (default: a random one per connector)."""
    lease_s: float = DEFAULT_LEASE_S
    max_block_bytes: int = 64 * 1024 * 1024
    """Largest frame this connector stores or loads."""
    remote_codec: str = "none"
    """Compression for transfers from other regions (see kvtier.compression.choose_codec)."""
    timeout_s: float = 5.0
    """Deadline of each block store call; past it the block is a miss."""
    parallel_loads: int = 16
    """Blocks fetched at once by retrieve. Enough to keep a wide-area link busy: a 75 ms,
    1 Gbit/s link holds 9.4 MB in flight, and a 64-token SmolLM2 block is 1.5 MB, so 8 at once
    barely covered it and any stall left the link idle (a 2,048-token cross-region load took
    0.48-0.50 s against a 0.45 s floor; 0.46-0.47 s with 16)."""
    max_parallel_loads: int = 64
    """On a long, wide link retrieve keeps about one bandwidth-delay product in flight (the cost
    model's round trip times bandwidth for the region, in blocks), never fewer than
    `parallel_loads` and never more than this; each load in flight holds one frame. With 16 at
    most, a 2,048-token prefix (32 blocks) loaded in two waves and paid two round trips once the
    link held more than 16 blocks (6.4 s at a 3 s round trip against 3.4 s in one wave)."""
    layer_parts: int = 6
    """With a sink, retrieve reads each block from another region in this many parts of
    consecutive layers (byte ranges of its frame), every block's first part first, so that a
    caller can compute on the first layers while the last ones are on the wire (the engine's
    layer-wise prefill; vLLM's connectors wait per layer the same way). More parts overlap more
    and cost a request each. 1: whole frames. Only raw transfers (`remote_codec` "none");
    this region's blocks load whole."""
    cost_aware: bool = True
    """Load each block from its cheapest region, and only the prefix whose loading beats
    recomputing it (kvtier/placement.py); False: every confirmed block, this region first."""
    rtt_probe_s: float = 1.0
    """When a lookup finds blocks in another region whose round trip was last sampled longer
    ago than this, sample it again in the background (a `Has` of no keys to that region's block
    store), so the cost model's latency follows the link even while it recomputes instead of
    fetching (a transfer's time alone cannot tell latency from bandwidth). 0: never."""
    replicate_after: int = 2
    """Copy a block into this region after this many loads of it from other regions (0: never)."""
    shared_memory_bytes: int = 64 * 1024 * 1024
    """A shared-memory arena of at least this size (`arena_bytes`: room for a frame per load in
    flight) for loads from this region's block store when it
    runs on the same host (kvtier/shm.py: one copy instead of a gRPC stream; 0: never). Pages
    are touched only as slots are used; a node on another host is detected and streamed from."""
    remote_metadata: str = "replica"
    """Where lookup reads other regions' block rows: "replica" (this region's replicas, no
    wide-area round trip; rows published in the last visibility delay are missed and those
    blocks recomputed) or "leader" (their home regions: current, one wide-area round trip)."""

    def __post_init__(self) -> None:
        if self.layer_parts < 1:
            raise InvalidArgument(f"layer_parts must be at least 1, got {self.layer_parts}")
        if self.remote_metadata not in ("replica", "leader"):
            raise InvalidArgument(
                f"remote_metadata must be 'replica' or 'leader', got {self.remote_metadata!r}"
            )


@dataclass(slots=True)
class ConnectorStats:
    lookups: int = 0
    lookup_tokens: int = 0
    """Tokens lookups were asked about."""
    hit_tokens: int = 0
    """Tokens lookups reported as loadable."""
    retrieved_tokens: int = 0
    recompute_tokens: int = 0
    """Tokens a lookup reported but retrieve could not load: the engine recomputes them."""
    failed_loads: int = 0
    """Blocks whose load failed after a lookup reported them."""
    unavailable: int = 0
    """Calls to a block store or the metadata store that got no answer (each became a miss)."""
    metadata_cleanups: int = 0
    """Block regions removed from the metadata because the bytes there were gone or corrupt."""
    rtt_probes: int = 0
    """Round-trip samples taken from other regions' block stores (`ConnectorConfig.rtt_probe_s`)."""
    blocks_stored: int = 0
    blocks_already_stored: int = 0
    bytes_stored: int = 0
    bytes_fetched_local: int = 0
    """Wire bytes fetched from this region's block stores."""
    bytes_fetched_remote: int = 0
    """Wire bytes fetched from other regions (after compression): the bytes moved."""
    skipped_by_cost: int = 0
    """Blocks held elsewhere that lookup left to recompute because fetching them cost more."""
    blocks_replicated: int = 0
    """Blocks copied into this region because of repeated remote loads."""


@dataclass(frozen=True, slots=True)
class BlockLocation:
    index: int
    block_hash: bytes
    region: str
    """Where retrieve will load it from."""
    size: int
    regions: tuple[str, ...] = ()
    """Every region the metadata says holds it (fallbacks for retrieve)."""


@dataclass(frozen=True, slots=True)
class LookupResult:
    num_tokens: int
    """Leading tokens that can be served from cache (a multiple of block_tokens)."""
    blocks: tuple[BlockLocation, ...]
    total_blocks: int
    """Full blocks in the tokens asked about."""

    @property
    def by_region(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for b in self.blocks:
            out[b.region] = out.get(b.region, 0) + 1
        return out


@dataclass(frozen=True, slots=True)
class RetrieveResult:
    num_tokens: int
    """Tokens served: kv covers tokens[:num_tokens]; the engine computes the rest."""
    kv: torch.Tensor | None
    """Shape spec.shape(num_tokens) in the namespace's layout and dtype; None when a sink took
    the blocks as they arrived."""
    failed_blocks: int
    bytes_moved: int
    """Wire bytes fetched from other regions for this call."""
    by_region: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StoreResult:
    num_blocks: int
    """Full blocks in the input."""
    stored: int
    """Blocks whose bytes this call put and published here."""
    already_present: int
    """Blocks this region already held."""
    charged_bytes: int
    error: str = ""
    """Why nothing was stored, when an unavailable block or metadata store stopped it."""


class AsyncKVConnector:
    """The connector for asyncio code; create it with `await AsyncKVConnector.open(...)`."""

    def __init__(
        self,
        metadata: BlockMetadata,
        ns: Namespace,
        record: NamespaceRecord,
        stores: Mapping[str, Sequence[BlockStoreClient]],
        config: ConnectorConfig,
        cost: CostModel | None = None,
    ) -> None:
        self.metadata = metadata
        self.ns = ns
        self.spec: BlockSpec = ns.spec
        self.record = record
        self.stores = {r: list(cs) for r, cs in stores.items() if cs}
        self.config = config
        self.holder = config.holder or f"conn-{secrets.token_hex(6)}"
        self.stats = ConnectorStats()
        self._tasks: set[asyncio.Task[None]] = set()
        self.events: EventPublisher | None = None
        """Set to publish stored / replicated events (kvtier/events.py) for the router."""
        self.cost = cost or CostModel(config.region)
        self.demand = DemandTracker(max(config.replicate_after, 1))
        self._mono = self.metadata.clock.monotonic_ns
        self._probed: dict[str, int] = {}
        """Region -> when its last round-trip sample started (monotonic ns)."""
        self.arena: SharedArena | None = None
        """The shared-memory arena the local block store clients receive through, if any."""

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self) -> None:
        """Wait for background lease writes (tests and `close` use it)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    @classmethod
    async def open(
        cls,
        client: AsyncClient,
        ns: Namespace,
        *,
        config: ConnectorConfig,
        stores: Mapping[str, Sequence[str]] | None = None,
        clock: ClockSource | None = None,
    ) -> AsyncKVConnector:
        """Check the namespace is registered (UnknownNamespace otherwise) and connect to the
        block stores: `stores` maps region -> addresses, default the ones registered in the
        metadata by each region's block store node. On a secured cluster the block store
        clients dial with the cluster's TLS settings and `client`'s token, in the block
        namespace of `ns` (`block_namespace`): a tenant's token suffices."""
        client.cluster.region(config.region)
        metadata = BlockMetadata(client, clock=clock)
        record = await metadata.namespace(ns)
        if stores is None:
            found: dict[str, list[str]] = {}
            for r in client.cluster.region_names():
                rr = await metadata.region(r)
                if rr is not None:
                    found[r] = list(rr.stores)
            stores = found
        wan = _wan_of(client.cluster, config.region)
        arena = _open_arena(config, ns.spec) if stores.get(config.region) else None
        # On a secured cluster the block stores see the client's own identity (its token) and
        # work in the namespace's block namespace, which they check against its tenant.
        security = client.cluster.settings.security
        namespace = block_namespace(ns) if security.tls else ""
        clients = {
            r: [
                BlockStoreClient(
                    a,
                    security=security,
                    token=client.token,
                    namespace=namespace,
                    timeout_s=config.timeout_s,
                    codec="none" if r == config.region else config.remote_codec,
                    pacer=None if wan is None else LinkPacer(wan, config.region, r),
                    arena=arena if r == config.region else None,
                )
                for a in addrs
            ]
            for r, addrs in stores.items()
        }
        net = client.cluster.settings.network
        prior = {
            r: (net.rtt_of(config.region, r) / 1000 if net.enabled else 0.001)
            for r in client.cluster.region_names()
        }
        cost = CostModel(config.region, rtt_s=prior, bytes_per_s=net.bandwidth_mbit * 1e6 / 8)
        conn = cls(metadata, ns, record, clients, config, cost)
        conn.arena = arena
        return conn

    async def close(self) -> None:
        await self.settle()
        for cs in self.stores.values():
            for c in cs:
                await c.close()
        if self.arena is not None:
            self.arena.close()
            self.arena = None

    def _probe_links(self, rows: Sequence[BlockInfo]) -> None:
        """Start a round-trip sample of each other region these rows name whose last sample is
        older than `rtt_probe_s` (one in flight per region)."""
        every = int(self.config.rtt_probe_s * 1e9)
        if every <= 0:
            return
        now = self._mono()
        for region in {r for row in rows for r in row.regions} - {self.config.region}:
            last = self._probed.get(region)
            if last is not None and now - last < every:
                continue
            store = self._store_for(region, b"\x00")
            if store is None:
                continue
            self._probed[region] = now
            self._background(self._probe(region, store))

    async def _probe(self, region: str, store: BlockStoreClient) -> None:
        t0 = self._mono()
        try:
            await store.has([])
        except K2Error as e:
            log.debug("round-trip sample of %s failed: %s", region, e)
            return
        self.cost.observe_rtt(region, (self._mono() - t0) / 1e9)
        self.stats.rtt_probes += 1

    def loads_in_flight(self, blocks: Sequence[BlockLocation]) -> int:
        """How many of these blocks retrieve loads at once: `parallel_loads`, or as many as
        fill the slowest-to-fill link's bandwidth-delay product (up to `max_parallel_loads`)."""
        base = max(1, self.config.parallel_loads)
        need = base
        for region in {b.region for b in blocks}:
            sizes = [b.size for b in blocks if b.region == region]
            est = self.cost.link(region)
            avg = max(1.0, sum(sizes) / len(sizes))
            need = max(need, math.ceil(est.rtt_s * est.bytes_per_s / avg))
        return min(need, max(base, self.config.max_parallel_loads))

    def _layer_parts(self) -> list[tuple[int, int]]:
        """The layer ranges a block from another region is read in (see `layer_parts`)."""
        return layer_ranges(self.spec.num_layers, self.config.layer_parts)

    def _layered(self, loc: BlockLocation, parts: Sequence[tuple[int, int]]) -> bool:
        if len(parts) < 2 or loc.region == self.config.region:
            return False
        store = self._store_for(loc.region, loc.block_hash)
        return store is not None and store.codec == "none"

    def _part_range(self, lo: int, hi: int) -> tuple[int, int]:
        """The frame's bytes holding layers [lo, hi) (the first part also holds the header)."""
        per_layer = self.spec.nbytes // self.spec.num_layers
        start = 0 if lo == 0 else FRAME_HEADER_BYTES + lo * per_layer
        return start, FRAME_HEADER_BYTES + hi * per_layer

    def _store_for(self, region: str, block_hash: bytes) -> BlockStoreClient | None:
        cs = self.stores.get(region)
        if not cs:
            return None
        return cs[block_hash[0] % len(cs)]

    def _candidates(self, row: BlockInfo) -> list[str]:
        """Regions to load a block from, best first: by estimated fetch cost (measured links),
        this region first on a tie."""
        return sorted(
            row.regions,
            key=lambda r: (self.cost.fetch_s(r, row.size), r != self.config.region, r),
        )

    # -- lookup --------------------------------------------------------------------------------

    async def lookup(
        self, tokens: Tokens, *, confirm_remote: bool = True, fresh_regions: Sequence[str] = ()
    ) -> LookupResult:
        """How many leading tokens can be served, and from where. The blocks reported are
        leased to this connector for `lease_s`. Never raises for an unavailable store.

        One local round: this region's rows at its leader and (with `remote_metadata` "replica")
        the other regions' rows at this region's replicas, in parallel. Each block's bytes are
        then confirmed at the store it would load from (a `Has` round), except, with
        `confirm_remote=False`, at other regions: a caller that retrieves at once learns the same
        from the load itself (a missing block is a counted miss, recomputed) and saves a
        wide-area round trip. `fresh_regions` are read at their leaders even in "replica" mode
        (a region that stored blocks for this caller a moment ago, like a session's last home)."""
        hashes = block_hashes(self.ns, tokens)
        self.stats.lookups += 1
        self.stats.lookup_tokens += len(hashes) * self.spec.block_tokens
        try:
            unreachable: list[str] = []
            here = self.config.region
            if self.config.remote_metadata == "replica":
                others = [
                    r
                    for r in self.metadata.client.cluster.region_names()
                    if r != here and r not in fresh_regions
                ]
                rows = await self.metadata.lookup(
                    self.record,
                    hashes,
                    replica_regions=others,
                    timeout_s=self.config.timeout_s,
                    unreachable=unreachable,
                )
            else:
                # This region's rows first (a local read); the wide-area round only when they
                # do not cover the whole prompt.
                rows = await self.metadata.lookup(
                    self.record,
                    hashes,
                    regions=[here],
                    timeout_s=self.config.timeout_s,
                    unreachable=unreachable,
                )
                if len(rows) < len(hashes):
                    rows = await self.metadata.lookup(
                        self.record,
                        hashes,
                        timeout_s=self.config.timeout_s,
                        unreachable=unreachable,
                    )
            self.stats.unavailable += len(unreachable)
        except K2Error as e:
            if isinstance(e, InvalidArgument):
                raise
            self.stats.unavailable += 1
            log.warning("metadata lookup failed, reporting a miss: %s", e)
            return LookupResult(0, (), len(hashes))
        self._probe_links(rows)
        chosen = await self._confirm(rows, remote=confirm_remote)
        if self.config.cost_aware and chosen:
            plan = self.cost.plan([{b.region: b.size} for b in chosen], self.spec.block_tokens)
            self.stats.skipped_by_cost += len(chosen) - plan.num_blocks
            chosen = chosen[: plan.num_blocks]
        # The lease is a wide-area write when the copy is remote: take it in the background so
        # the caller can start loading at once (a load that races an eviction is a counted miss).
        self._background(self._lease(chosen))
        result = LookupResult(len(chosen) * self.spec.block_tokens, tuple(chosen), len(hashes))
        self.stats.hit_tokens += result.num_tokens
        return result

    async def _lease(self, chosen: Sequence[BlockLocation], *, release: bool = False) -> None:
        """Lease (or release) the chosen copies, one blind write per region. Best effort: a
        lease that fails only leaves the copy evictable, which a load would survive as a miss."""
        by_region: dict[str, list[bytes]] = {}
        for loc in chosen:
            by_region.setdefault(loc.region, []).append(loc.block_hash)

        async def one(region: str, hashes: list[bytes]) -> None:
            try:
                if release:
                    await self.metadata.release(self.record, region, hashes, self.holder)
                else:
                    await self.metadata.lease(
                        self.record, region, hashes, self.holder, lease_s=self.config.lease_s
                    )
            except K2Error as e:
                log.warning(
                    "could not %s leases in %s: %s", "drop" if release else "take", region, e
                )

        await asyncio.gather(*(one(r, hs) for r, hs in by_region.items()))

    async def _confirm(self, rows: list[BlockInfo], *, remote: bool = True) -> list[BlockLocation]:
        """The longest prefix of rows whose bytes a reachable store says it holds (with
        `remote=False`, a block whose best copy is in another region is taken on the
        metadata's word)."""
        pending: dict[int, list[str]] = {i: self._candidates(r) for i, r in enumerate(rows)}
        located: dict[int, str] = {}
        lost: dict[str, list[bytes]] = {}
        while pending:
            # One Has round per (region, store): every pending block asks its best candidate.
            asks: dict[tuple[str, int], list[int]] = {}
            for i, cands in list(pending.items()):
                while cands and self._store_for(cands[0], rows[i].block_hash) is None:
                    cands.pop(0)
                if not cands:
                    del pending[i]
                    continue
                if not remote and cands[0] != self.config.region:
                    located[i] = cands[0]
                    del pending[i]
                    continue
                store = self._store_for(cands[0], rows[i].block_hash)
                assert store is not None
                asks.setdefault((cands[0], id(store)), []).append(i)
            if not asks:
                break

            async def ask(region: str, idx: list[int]) -> tuple[str, list[int], list[bool] | None]:
                store = self._store_for(region, rows[idx[0]].block_hash)
                assert store is not None
                try:
                    return region, idx, await store.has([rows[i].block_hash for i in idx])
                except K2Error as e:
                    self.stats.unavailable += 1
                    log.warning("block store %s in %s did not answer: %s", store.address, region, e)
                    return region, idx, None

            answers = await asyncio.gather(*(ask(r, idx) for (r, _), idx in asks.items()))
            for region, idx, present in answers:
                for j, i in enumerate(idx):
                    if present is not None and present[j]:
                        located[i] = region
                        del pending[i]
                        continue
                    if present is not None:
                        lost.setdefault(region, []).append(rows[i].block_hash)
                    pending[i].pop(0)
        if lost:
            await self._forget(lost)
        out: list[BlockLocation] = []
        for i, row in enumerate(rows):
            if i not in located:
                break
            out.append(
                BlockLocation(i, row.block_hash, located[i], row.size, tuple(sorted(row.regions)))
            )
        return out

    async def _forget(self, lost: Mapping[str, Sequence[bytes]]) -> None:
        """Metadata cleanup: these regions no longer hold these blocks (best effort)."""
        for region, hashes in lost.items():
            try:
                self.stats.metadata_cleanups += await self.metadata.remove(
                    self.record, hashes, region
                )
            except K2Error as e:
                log.warning("could not remove %s from %d block rows: %s", region, len(hashes), e)

    # -- retrieve ------------------------------------------------------------------------------

    async def retrieve(
        self,
        tokens: Tokens,
        found: LookupResult | None = None,
        *,
        sink: BlockSink | None = None,
    ) -> RetrieveResult:
        """Load the cached prefix of tokens (looked up now unless `found` is given). Serves the
        longest prefix that loads and verifies; the rest is counted for recompute.

        With a `sink`, blocks are handed over as they arrive, in whatever order, as `await
        sink(index, first_layer, part)`, where part is a read-only view of the received bytes
        valid only until the sink returns (a sink that converts it runs the copy off the event
        loop, as the engine does on its torch thread); the result's `kv` is then None. A caller
        that converts blocks into its own buffers this way overlaps the conversion with the
        transfers still in flight and copies each byte once. Blocks from this region come
        whole and verified. Blocks from other regions come in `layer_parts` parts (all blocks'
        first layers first), each handed over on arrival, BEFORE the block's checksum can be
        verified (it covers the whole frame): the block counts only if it then verifies, and a
        part may be handed over again when a block is reloaded from elsewhere. Blocks after the
        first failed one may have been handed over too. Only `num_tokens` count: the caller
        must not use anything it was handed past them."""
        if found is None:
            found = await self.lookup(tokens)
        in_flight = self.loads_in_flight(found.blocks)
        parts = self._layer_parts() if sink is not None else []
        layered = [b for b in found.blocks if self._layered(b, parts)]
        # Parts are a fraction of a block each: the same bytes in flight take more of them.
        sem = asyncio.Semaphore(in_flight * (len(parts) if layered else 1))
        remote_before = self.stats.bytes_fetched_remote
        by_region: dict[str, int] = {}
        lost: dict[str, list[bytes]] = {}
        # region -> [first start, last end, bytes] of this call's block transfers: the cost
        # model plans one link per region carrying all of its blocks, so that is what it must
        # learn from (one block's time under `parallel_loads` concurrency understates the
        # link several times over).
        spans: dict[str, list[int]] = {}

        def account(region: str, t0: int, t1: int, moved: int, delivered: bool) -> None:
            if not delivered:  # a small reply: a round-trip sample
                self.cost.observe_transfer(region, moved, (t1 - t0) / 1e9)
            else:
                span = spans.setdefault(region, [t0, t1, 0])
                span[0], span[1] = min(span[0], t0), max(span[1], t1)
                span[2] += moved
            if region == self.config.region:
                self.stats.bytes_fetched_local += moved
            else:
                self.stats.bytes_fetched_remote += moved

        def loaded(loc: BlockLocation, region: str, frame: bytes | bytearray | memoryview) -> None:
            by_region[region] = by_region.get(region, 0) + 1
            if (
                region != self.config.region
                and self.config.replicate_after > 0
                and self.demand.record_remote_load(loc.block_hash)
            ):
                self._background(self._replicate(loc, bytes(frame)))

        async def load(loc: BlockLocation, skip: str = "") -> torch.Tensor | None:
            regions = [loc.region] + [r for r in loc.regions if r != loc.region]
            async with sem:
                for region in regions:
                    if region == skip:
                        continue
                    store = self._store_for(region, loc.block_hash)
                    if store is None:
                        continue
                    try:
                        t0 = self._mono()
                        async with store.fetch(loc.block_hash, size_hint=loc.size) as got:
                            frame, moved = got
                            account(region, t0, self._mono(), moved, frame is not None)
                            if frame is None:
                                lost.setdefault(region, []).append(loc.block_hash)
                                continue
                            if sink is None:
                                tensor = decode_block(frame, self.spec, block_hash=loc.block_hash)
                            else:  # fetch verified the frame's checksum and key
                                await sink(loc.index, 0, block_view(frame, self.spec))
                                tensor = _SUNK
                            loaded(loc, region, frame)
                    except CorruptBlock:
                        lost.setdefault(region, []).append(loc.block_hash)
                        continue
                    except K2Error as e:
                        self.stats.unavailable += 1
                        log.warning("load of block %d from %s failed: %s", loc.index, region, e)
                        continue
                    return tensor
            return None

        frames = {b.index: bytearray(FRAME_HEADER_BYTES + self.spec.nbytes) for b in layered}
        broken: set[int] = set()  # layered blocks a part of which failed: reloaded whole

        async def load_part(loc: BlockLocation, lo: int, hi: int) -> None:
            assert sink is not None
            if loc.index in broken:
                return
            frame = frames[loc.index]
            start, end = self._part_range(lo, hi)
            store = self._store_for(loc.region, loc.block_hash)
            async with sem:
                if store is None or loc.index in broken:
                    broken.add(loc.index)
                    return
                try:
                    t0 = self._mono()
                    part, moved = await store.get_range(loc.block_hash, start, end - start)
                    account(loc.region, t0, self._mono(), moved, part is not None)
                except CorruptBlock:
                    broken.add(loc.index)
                    return
                except K2Error as e:
                    self.stats.unavailable += 1
                    log.warning("load of block %d from %s failed: %s", loc.index, loc.region, e)
                    broken.add(loc.index)
                    return
                if part is None:
                    if loc.index not in broken:  # (another part may have missed already)
                        lost.setdefault(loc.region, []).append(loc.block_hash)
                    broken.add(loc.index)
                    return
                frame[start:end] = part
            await sink(loc.index, lo, _payload_view(frame, self.spec)[lo:hi])

        async def finish_layered(
            loc: BlockLocation, tasks: list[asyncio.Task[None]]
        ) -> torch.Tensor | None:
            await asyncio.gather(*tasks)
            frame = frames.pop(loc.index)
            if loc.index not in broken:
                try:
                    h = verify_frame(frame, loc.block_hash)
                    if h.spec != self.spec:
                        raise CorruptBlock(f"stored block has spec {h.spec}, not {self.spec}")
                except CorruptBlock as e:
                    log.warning("block %d from %s: %s", loc.index, loc.region, e)
                    lost.setdefault(loc.region, []).append(loc.block_hash)
                else:
                    loaded(loc, loc.region, frame)
                    return _SUNK
            return await load(loc, skip=loc.region)

        # Every block's first part before any block's second: what the caller computes on first.
        part_tasks: dict[int, list[asyncio.Task[None]]] = {b.index: [] for b in layered}
        for lo, hi in parts if layered else []:
            for b in layered:
                part_tasks[b.index].append(asyncio.ensure_future(load_part(b, lo, hi)))
        try:
            tensors = await asyncio.gather(
                *(
                    finish_layered(b, part_tasks[b.index]) if b.index in part_tasks else load(b)
                    for b in found.blocks
                )
            )
        finally:
            for pending in part_tasks.values():
                for task in pending:
                    task.cancel()
        for region, (first, last, nbytes) in spans.items():
            self.cost.observe_transfer(region, nbytes, (last - first) / 1e9)
        served: list[torch.Tensor] = []
        for t in tensors:
            if t is None:
                break
            served.append(t)
        failed = len(found.blocks) - len(served)
        if failed:
            self.stats.failed_loads += sum(1 for t in tensors if t is None)
            self.stats.recompute_tokens += failed * self.spec.block_tokens
        if lost:
            await self._forget(lost)
        self._background(self._lease(found.blocks, release=True))
        n = len(served) * self.spec.block_tokens
        self.stats.retrieved_tokens += n
        return RetrieveResult(
            n,
            None if sink is not None else concat_blocks(self.spec, served),
            failed,
            self.stats.bytes_fetched_remote - remote_before,
            by_region,
        )

    async def _replicate(self, loc: BlockLocation, frame: bytes) -> None:
        """Copy a block this region keeps loading from elsewhere: bytes durable in the local
        store first, then publish the local copy (charged to this namespace's tenant)."""
        store = self._store_for(self.config.region, loc.block_hash)
        if store is None:
            return
        try:
            await store.put(loc.block_hash, frame)
            r = await self.metadata.publish(
                self.record,
                self.ns.tenant,
                self.config.region,
                [_publish_block(loc.block_hash, loc.index, frame)],
            )
            self.stats.blocks_replicated += r.published
            if self.events is not None and r.published:
                self.events.publish(
                    EventKind.REPLICATED,
                    [loc.block_hash.hex()],
                    tenant=self.ns.tenant,
                    src_region=loc.region,
                )
        except K2Error as e:  # full, over quota, unavailable: demand may build up again
            self.demand.forget(loc.block_hash)
            log.info("copy of block %d into %s failed: %s", loc.index, self.config.region, e)

    # -- store ---------------------------------------------------------------------------------

    def _check_store_input(self, tokens: Tokens, kv: torch.Tensor) -> int:
        """Validate before anything is stored; returns the number of full blocks."""
        if not isinstance(kv, torch.Tensor):
            raise BlockSpecMismatch(f"KV must be a torch.Tensor, not {type(kv).__name__}")
        n_tokens = len(tokens)
        ax = self.spec.layout.token_axis
        if kv.dim() != 5:
            raise BlockSpecMismatch(
                f"KV must have 5 dimensions in layout {self.spec.layout.value}, got shape "
                f"{tuple(kv.shape)}"
            )
        kv_tokens = kv.shape[ax]
        self.spec.check_tensor(kv, kv_tokens)
        n_full = n_tokens // self.spec.block_tokens
        if kv_tokens < n_full * self.spec.block_tokens or kv_tokens > n_tokens:
            raise BlockSpecMismatch(
                f"KV covers {kv_tokens} tokens; for {n_tokens} tokens it must cover between "
                f"{n_full * self.spec.block_tokens} and {n_tokens}"
            )
        frame_bytes = self.spec.nbytes + FRAME_HEADER_BYTES
        if frame_bytes > self.config.max_block_bytes:
            raise BlockTooLarge(
                f"a block of this spec is {frame_bytes} bytes; this connector's limit is "
                f"{self.config.max_block_bytes}"
            )
        return n_full

    async def store(self, tokens: Tokens, kv: torch.Tensor) -> StoreResult:
        """Save the full blocks of tokens/kv that this region does not hold yet: bytes into this
        region's block store (durably), then one metadata transaction that publishes them and
        charges the tenant's quota. Raises for bad input (nothing stored) and QuotaExceeded."""
        n_full = self._check_store_input(tokens, kv)
        hashes = block_hashes(self.ns, tokens)[:n_full]
        if not hashes:
            return StoreResult(0, 0, 0, 0)
        try:
            rows = await self.metadata.rows(self.record, hashes, self.config.region)
        except K2Error as e:
            if isinstance(e, InvalidArgument):
                raise
            self.stats.unavailable += 1
            return StoreResult(n_full, 0, 0, 0, error=f"metadata unavailable: {e}")
        todo = [i for i, row in enumerate(rows) if row is None]
        present = n_full - len(todo)
        self.stats.blocks_already_stored += present
        if not todo:
            return StoreResult(n_full, 0, present, 0)
        blocks = split_blocks(self.spec, kv, n_full)
        if any(self._store_for(self.config.region, hashes[i]) is None for i in todo):
            self.stats.unavailable += 1
            return StoreResult(
                n_full, 0, present, 0, error=f"no block store in {self.config.region}"
            )
        sem = asyncio.Semaphore(max(1, self.config.parallel_loads))

        async def put(i: int) -> PublishBlock:
            store = self._store_for(self.config.region, hashes[i])
            assert store is not None
            frame = encode_block(self.spec, blocks[i], hashes[i])
            async with sem:
                await store.put(hashes[i], frame)
            self.stats.bytes_stored += len(frame)
            return _publish_block(hashes[i], i, frame)

        # Phase one: every block durable here before any metadata names this region.
        puts = await asyncio.gather(*(put(i) for i in todo), return_exceptions=True)
        failed = [x for x in puts if isinstance(x, BaseException)]
        for exc in failed:
            if isinstance(exc, InvalidArgument) or not isinstance(exc, K2Error):
                raise exc
        if failed:
            # Unavailable, full (every block protected) or a transfer that arrived corrupt:
            # the engine carries on without caching these blocks.
            self.stats.unavailable += 1
            return StoreResult(n_full, 0, present, 0, error=f"block store refused: {failed[0]}")
        publish = [p for p in puts if isinstance(p, PublishBlock)]
        try:
            r = await self.metadata.publish(
                self.record, self.ns.tenant, self.config.region, publish
            )
        except K2Error as e:
            if not e.retryable or isinstance(e, InvalidArgument):
                raise
            self.stats.unavailable += 1
            return StoreResult(n_full, 0, present, 0, error=f"metadata unavailable: {e}")
        self.stats.blocks_stored += r.published
        if self.events is not None and publish:
            # After the commit: a consumer that acts on the event finds the rows.
            self.events.publish(
                EventKind.STORED, [p.block_hash.hex() for p in publish], tenant=self.ns.tenant
            )
        return StoreResult(n_full, r.published, present + r.unchanged, r.charged_bytes)


def layer_ranges(num_layers: int, parts: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges splitting num_layers layers into `parts` (at most one per layer) runs
    of nearly equal length, in order."""
    n = max(1, min(parts, num_layers))
    bounds = [round(i * num_layers / n) for i in range(n + 1)]
    return list(itertools.pairwise(bounds))


def _payload_view(frame: bytearray, spec: BlockSpec) -> torch.Tensor:
    """The block tensor over a frame being assembled, without the header check of
    `block_view` (the header may not have arrived yet; the frame is verified once whole)."""
    flat = torch.frombuffer(
        frame, dtype=spec.torch_dtype, count=spec.nbytes // spec.itemsize,
        offset=FRAME_HEADER_BYTES,
    )  # fmt: skip
    return flat.view(spec.shape())


def arena_bytes(config: ConnectorConfig, spec: BlockSpec) -> int:
    """The shared-memory arena's size: `shared_memory_bytes`, grown to hold a frame of `spec`
    for every load retrieve may have in flight (`max_parallel_loads`). A fuller arena sends
    the blocks that find no slot over gRPC at a fifth of the speed: with 64 MiB, a
    Llama-3.1-8B-shaped model's 8.4 MB blocks overflowed it at 8 in flight. The memfd's pages
    are touched only as slots are used."""
    slot = -(-(FRAME_HEADER_BYTES + spec.nbytes) // 4096) * 4096
    loads = max(config.parallel_loads, config.max_parallel_loads)
    return max(config.shared_memory_bytes, ARENA_HEADER_BYTES + loads * slot)


def _open_arena(config: ConnectorConfig, spec: BlockSpec) -> SharedArena | None:
    if config.shared_memory_bytes <= 0:
        return None
    try:
        return SharedArena(arena_bytes(config, spec))
    except (OSError, AttributeError) as e:  # no memfd here: stream everything
        log.info("no shared-memory arena for block loads: %s", e)
        return None


def _wan_of(cluster: ClusterConfig, region: str) -> WanEmulation | None:
    """The cluster's wide-area emulation as seen from `region` (None when it has none), so block
    transfers pay the same emulated links as the store's own messages."""
    path = cluster.path.parent / OVERRIDES_FILE if cluster.path is not None else None
    if path is None and not cluster.settings.network.enabled:
        return None
    return WanEmulation(cluster.settings.network, region=region, regions_of={}, overrides_path=path)


class KVConnector:
    """Synchronous facade over `AsyncKVConnector`, with its own K2 client and event loop on a
    daemon thread (safe to share between threads). Close it, or use `with`."""

    def __init__(self, connector: AsyncKVConnector, loop: asyncio.AbstractEventLoop,
                 thread: threading.Thread, client: AsyncClient) -> None:  # fmt: skip
        self._async = connector
        self._loop = loop
        self._thread = thread
        self._client = client

    @classmethod
    def open(
        cls,
        cluster: ClusterConfig | str | Path,
        ns: Namespace,
        *,
        config: ConnectorConfig,
        stores: Mapping[str, Sequence[str]] | None = None,
        clock: ClockSource | None = None,
    ) -> KVConnector:
        loop = evloop.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="kvtier-connector", daemon=True)
        thread.start()

        async def make() -> tuple[AsyncClient, AsyncKVConnector]:
            client = await AsyncClient.connect(cluster, region=config.region)
            try:
                conn = await AsyncKVConnector.open(
                    client, ns, config=config, stores=stores, clock=clock
                )
            except BaseException:
                await client.close()
                raise
            return client, conn

        try:
            client, conn = asyncio.run_coroutine_threadsafe(make(), loop).result()
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=5)
            loop.close()
            raise
        return cls(conn, loop, thread, client)

    @property
    def stats(self) -> ConnectorStats:
        return self._async.stats

    @property
    def spec(self) -> BlockSpec:
        return self._async.spec

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if not self._thread.is_alive():
            coro.close()
            raise Unavailable("connector is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def lookup(self, tokens: Tokens) -> LookupResult:
        return self._run(self._async.lookup(tokens))

    def retrieve(self, tokens: Tokens, found: LookupResult | None = None) -> RetrieveResult:
        return self._run(self._async.retrieve(tokens, found))

    def store(self, tokens: Tokens, kv: torch.Tensor) -> StoreResult:
        return self._run(self._async.store(tokens, kv))

    def close(self) -> None:
        if self._thread.is_alive():
            self._run(self._async.close())
            self._run(self._client.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop.close()

    def __enter__(self) -> KVConnector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _publish_block(block_hash: bytes, index: int, frame: bytes | memoryview) -> PublishBlock:
    h = read_header(frame)
    return PublishBlock(block_hash, index, len(frame), h.checksum, h.checksum_algorithm)
