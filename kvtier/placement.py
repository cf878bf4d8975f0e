"""Placement of KV-cache blocks across regions: where to load from, when to copy, what to evict.

Purpose
    A block starts in the region that computed it. This module decides three things, each from
    measurements rather than guesses:

    - **Retrieval (`CostModel.plan`)**: for a prefix whose blocks sit in several regions, load each
      block from the region where it is cheapest, and serve only the leading blocks whose
      fetching beats recomputing them locally. Costs come from each link's measured round-trip
      time and bandwidth (exponentially weighted over the connector's own block-store calls,
      seeded from the cluster's configured latency matrix) and the engine's measured prefill
      speed.
    - **Replication (`DemandTracker`)**: a block this region keeps fetching from elsewhere is
      copied here once its demand reaches `replicate_after` loads, bytes first (durable in the
      local block store), metadata second, like any publish.
    - **Eviction (`PlacementSweeper`)**: when a region's published bytes pass `high_water` of its
      capacity, its coldest copies (by last use: the newest lease or the publish time) are
      evicted down to `low_water`: metadata first (refused for pinned or leased copies), bytes
      second. The block store's own LRU is the safety net beneath this, not the policy.

::

    connector.lookup ── rows per region ──▶ CostModel.plan(prefix) ──▶ regions per block, k
    connector.retrieve ── timings ──▶ CostModel.observe_* ; remote hits ──▶ DemandTracker
                                                     └─▶ (demand reached) copy here: put, publish
    PlacementSweeper.sweep() ── region's rows + leases ──▶ evict coldest ──▶ delete bytes

Invariants: a copy is never published in a region before its bytes are durable there; an evicted
copy's metadata goes before its bytes; pinned and leased copies are never evicted. `CostModel`
and `DemandTracker` do no I/O (time and sizes are passed in).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from k2store.errors import K2Error
from kvtier.events import EventKind, EventPublisher
from kvtier.metadata import DEFAULT_LEASE_S, BlockMetadata, NamespaceRecord

__all__ = [
    "CostModel",
    "DemandTracker",
    "LinkEstimate",
    "PlacementPlan",
    "PlacementSweeper",
    "SweepResult",
]

_NS = 1_000_000_000


@dataclass
class LinkEstimate:
    """What loading from one region costs, as measured (EWMA) from this region."""

    rtt_s: float
    bytes_per_s: float
    samples: int = 0


@dataclass(frozen=True, slots=True)
class PlacementPlan:
    num_blocks: int
    """Leading blocks worth loading (the rest are recomputed)."""
    regions: tuple[str, ...]
    """Where to load each of them from."""
    fetch_s: float
    """Estimated time to load them (regions in parallel, one link each)."""
    recompute_s: float
    """Estimated time to recompute them instead."""


RTT_ALPHA = 0.6
"""EWMA weight of a new round-trip sample (transfers use the model's `alpha`)."""


class CostModel:
    """Per-region link estimates and the local prefill speed; `plan` picks what to load."""

    def __init__(
        self,
        local_region: str,
        *,
        rtt_s: Mapping[str, float] | None = None,
        bytes_per_s: float = 125e6,
        local_bytes_per_s: float = 1e9,
        prefill_tokens_per_s: float = 400.0,
        alpha: float = 0.3,
    ) -> None:
        """`rtt_s`: prior round-trip times per region (the cluster's latency matrix);
        `bytes_per_s`: prior wide-area bandwidth (DESIGN's 1 Gbit/s); `prefill_tokens_per_s`:
        prior prefill speed (about 2,048 tokens in 5 s on this CPU, FIGURES.md)."""
        self.local_region = local_region
        self.alpha = alpha
        self.default_bytes_per_s = bytes_per_s
        self.links: dict[str, LinkEstimate] = {
            r: LinkEstimate(t, local_bytes_per_s if r == local_region else bytes_per_s)
            for r, t in (rtt_s or {}).items()
        }
        self.links.setdefault(local_region, LinkEstimate(0.001, local_bytes_per_s))
        self.prefill_tokens_per_s = prefill_tokens_per_s
        self.prefill_model: Callable[[int], float | None] | None = None
        """The engine's estimate of what recomputing n leading tokens costs its pass
        (`PrefillCostModel.marginal`), used by `recompute_s` once it answers; before that, and
        without an engine, the measured rate `prefill_tokens_per_s`."""

    def link(self, region: str) -> LinkEstimate:
        est = self.links.get(region)
        if est is None:
            est = self.links[region] = LinkEstimate(0.1, self.default_bytes_per_s)
        return est

    def _ewma(self, old: float, new: float, samples: int, alpha: float | None = None) -> float:
        a = self.alpha if alpha is None else alpha
        return new if samples == 0 else (1 - a) * old + a * new

    def observe_rtt(self, region: str, seconds: float) -> None:
        """A small call (no payload to speak of) to region's block store took `seconds`. Weighed
        more than a transfer (`RTT_ALPHA`): it measures latency alone, and a link whose latency
        changed should change the plan within a request or two."""
        est = self.link(region)
        est.rtt_s = self._ewma(est.rtt_s, max(seconds, 1e-6), est.samples, RTT_ALPHA)
        est.samples += 1

    def observe_transfer(self, region: str, nbytes: int, seconds: float) -> None:
        """Loading `nbytes` from region took `seconds` end to end."""
        est = self.link(region)
        if nbytes < 64 * 1024:
            self.observe_rtt(region, seconds)
            return
        payload_s = max(seconds - est.rtt_s, seconds * 0.1, 1e-6)
        est.bytes_per_s = self._ewma(est.bytes_per_s, nbytes / payload_s, est.samples)
        est.samples += 1

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            self.prefill_tokens_per_s = (
                1 - self.alpha
            ) * self.prefill_tokens_per_s + self.alpha * (tokens / seconds)

    def fetch_s(self, region: str, nbytes: int) -> float:
        est = self.link(region)
        return est.rtt_s + nbytes / est.bytes_per_s

    def recompute_s(self, tokens: int) -> float:
        if self.prefill_model is not None:
            est = self.prefill_model(tokens)
            if est is not None and est > 0:
                return est
        return tokens / self.prefill_tokens_per_s

    def plan(self, blocks: Sequence[Mapping[str, int]], block_tokens: int) -> PlacementPlan:
        """`blocks[i]`: region -> size of block i's copy there, for the leading blocks found.
        Chooses each block's cheapest region and the prefix length with the largest saving
        (recompute time minus fetch time, fetches from different regions in parallel); 0 when
        no prefix saves anything."""
        regions: list[str] = []
        per_region: dict[str, int] = {}
        best = PlacementPlan(0, (), 0.0, 0.0)
        best_saving = 0.0
        for i, copies in enumerate(blocks):
            if not copies:
                break
            region = min(
                copies, key=lambda r: (self.fetch_s(r, copies[r]), r != self.local_region, r)
            )
            regions.append(region)
            per_region[region] = per_region.get(region, 0) + copies[region]
            fetch = max(self.fetch_s(r, n) for r, n in per_region.items())
            recompute = self.recompute_s((i + 1) * block_tokens)
            if recompute - fetch > best_saving:
                best_saving = recompute - fetch
                best = PlacementPlan(i + 1, tuple(regions), fetch, recompute)
        return best


class DemandTracker:
    """Counts this region's loads of blocks held only elsewhere; says when to copy one here.

    Bounded: remembers the `capacity` most recently seen blocks (older counts are forgotten,
    which only delays a copy)."""

    def __init__(self, replicate_after: int = 2, capacity: int = 100_000) -> None:
        if replicate_after < 1:
            raise ValueError("replicate_after must be at least 1")
        self.replicate_after = replicate_after
        self.capacity = capacity
        self._counts: OrderedDict[bytes, int] = OrderedDict()
        self._done: OrderedDict[bytes, None] = OrderedDict()

    def record_remote_load(self, block_hash: bytes) -> bool:
        """One more remote load of block_hash; True exactly once, when it should be copied."""
        if block_hash in self._done:
            return False
        n = self._counts.pop(block_hash, 0) + 1
        if n >= self.replicate_after:
            self._done[block_hash] = None
            if len(self._done) > self.capacity:
                self._done.popitem(last=False)
            return True
        self._counts[block_hash] = n
        if len(self._counts) > self.capacity:
            self._counts.popitem(last=False)
        return False

    def forget(self, block_hash: bytes) -> None:
        """The copy failed or was evicted: let demand build up again."""
        self._done.pop(block_hash, None)
        self._counts.pop(block_hash, None)


@dataclass
class SweepResult:
    used_bytes: int = 0
    """Published bytes in the region before the sweep."""
    capacity_bytes: int = 0
    evicted: int = 0
    evicted_bytes: int = 0
    kept_held: int = 0
    """Cold copies left in place because they were pinned or leased."""
    deleted_bytes: list[bytes] = field(default_factory=list)
    """Hashes whose bytes were deleted from the region's block store."""


class PlacementSweeper:
    """Keeps one region's published bytes under its capacity by evicting its coldest copies.

    An operator process: it reads every tenant's rows (`BlockMetadata.region_copies` lists the
    tenants, then scans each tenant's root and the shared one) and refunds whoever paid, so on a
    secured cluster its metadata client needs an admin token; a tenant's token is refused."""

    def __init__(
        self,
        metadata: BlockMetadata,
        region: str,
        *,
        capacity_bytes: int,
        delete_bytes: Callable[[list[bytes]], Awaitable[object]] | None = None,
        high_water: float = 0.9,
        low_water: float = 0.8,
        lease_s: float = DEFAULT_LEASE_S,
        events: EventPublisher | None = None,
    ) -> None:
        """`delete_bytes`: an async callable(list of hashes) that drops bytes from the region's
        block store after their metadata is gone (None: leave them to the store's LRU).
        `events`: where to publish the evictions (for the router)."""
        self.events = events
        if not 0 < low_water <= high_water <= 1:
            raise ValueError("need 0 < low_water <= high_water <= 1")
        if capacity_bytes <= 0:
            raise ValueError("capacity_bytes must be positive")
        self.metadata = metadata
        self.region = region
        self.capacity_bytes = capacity_bytes
        self.delete_bytes = delete_bytes
        self.high_water = high_water
        self.low_water = low_water
        self.lease_ns = int(lease_s * _NS)

    async def _rows(self) -> list[tuple[int, str, str, bytes, int]]:
        """(last use ns, owner, nsid, hash, size) of every copy published in the region, every
        tenant's (the sweeper is an operator process: an admin token on a secured cluster)."""
        out = []
        for c in await self.metadata.region_copies(self.region):
            d = c.row.raw
            used = max(int(d.get("last_use_ns", 0)), int(d.get("published_ns", 0)))
            used = max(used, c.newest_lease_ns - self.lease_ns if c.newest_lease_ns else 0)
            used = max(used, c.last_release_ns)  # a reader loaded it then
            out.append((used, c.owner, c.nsid, c.row.block_hash, c.row.size))
        return out

    async def sweep(self) -> SweepResult:
        rows = await self._rows()
        used = sum(size for *_, size in rows)
        result = SweepResult(used, self.capacity_bytes)
        if used <= self.high_water * self.capacity_bytes:
            return result
        target = self.low_water * self.capacity_bytes
        gone: list[bytes] = []
        for _, owner, nsid, block_hash, size in sorted(rows):
            if used <= target:
                break
            rec = NamespaceRecord(nsid, owner, not owner, {})
            try:
                removed = await self.metadata.evict(rec, block_hash, self.region)
            except K2Error:
                continue  # try again next sweep
            if not removed:
                result.kept_held += 1
                continue
            used -= size
            result.evicted += 1
            result.evicted_bytes += size
            gone.append(block_hash)
        if gone and self.events is not None:
            self.events.publish(EventKind.EVICTED, [h.hex() for h in gone])
        if gone and self.delete_bytes is not None:
            await self.delete_bytes(gone)
            result.deleted_bytes = gone
        return result
