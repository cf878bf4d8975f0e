"""A region's visible timestamp, and how long committed writes take to become visible there.

Purpose
    Reads on local replicas are consistent at the region's visible timestamp: the minimum, over
    every shard of the cluster, of the newest seal the region holds for it (the leader's own
    seal for shards homed here, the local replica's applied seal for the others). `Visibility`
    keeps those seals and answers `visible_ts()`.

    Visibility delay is the time from an entry's append at its leader to the moment the reading
    region's visible timestamp covers it. `Visibility` is told of applied entries (`observe`) and
    measures each when the visible timestamp passes it (`advance`), into a histogram per
    (home region, reading region) pair.

No I/O; time is passed in (the node's TrueTime latest, comparable with the leader's append
time up to the clocks' error bound).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["Histogram", "Visibility"]


@dataclass
class Histogram:
    """Log-bucketed latencies in milliseconds (about 4% resolution), with exact count and sum."""

    buckets: dict[int, int] = field(default_factory=dict)
    count: int = 0
    total_ms: float = 0.0
    max_ms: float = 0.0

    def add(self, ms: float) -> None:
        ms = max(ms, 0.0)
        b = int(math.log(ms + 1.0, 1.04))
        self.buckets[b] = self.buckets.get(b, 0) + 1
        self.count += 1
        self.total_ms += ms
        self.max_ms = max(self.max_ms, ms)

    def quantile(self, q: float) -> float:
        if not self.count:
            return 0.0
        rank = q * (self.count - 1)
        seen = 0
        for b in sorted(self.buckets):
            seen += self.buckets[b]
            if seen > rank:
                return min(float(1.04 ** (b + 0.5)) - 1.0, self.max_ms)
        return self.max_ms

    def merge(self, other: Histogram) -> None:
        for b, n in other.buckets.items():
            self.buckets[b] = self.buckets.get(b, 0) + n
        self.count += other.count
        self.total_ms += other.total_ms
        self.max_ms = max(self.max_ms, other.max_ms)


class Visibility:
    """Seals known to one region, its visible timestamp, and visibility-delay histograms."""

    MAX_PENDING = 200_000
    """Entries awaiting visibility kept for measurement; beyond this the oldest are dropped."""

    def __init__(self, region: str, shard_ids: Iterable[int]) -> None:
        self.region = region
        self.seals: dict[int, int] = dict.fromkeys(shard_ids, 0)
        self.delays: dict[str, Histogram] = {}
        """Home region of the shard -> delay histogram (ms) into this region."""
        self._pending: list[tuple[int, int, str]] = []  # (max ts, appended_ns, home region)

    def set_seal(self, shard_id: int, sealed_ts: int) -> None:
        if sealed_ts > self.seals.get(shard_id, 0):
            self.seals[shard_id] = sealed_ts

    def visible_ts(self) -> int:
        return min(self.seals.values(), default=0)

    def observe(self, max_ts: int, appended_ns: int, home_region: str) -> None:
        """An entry with versions up to `max_ts`, appended at its leader at `appended_ns`, is
        now stored in this region (it becomes visible when the visible ts reaches max_ts)."""
        heapq.heappush(self._pending, (max_ts, appended_ns, home_region))
        if len(self._pending) > self.MAX_PENDING:
            self._pending = heapq.nsmallest(self.MAX_PENDING // 2, self._pending)
            heapq.heapify(self._pending)

    def advance(self, now_ns: int) -> int:
        """Record the delay of every observed entry the visible ts now covers; returns it."""
        visible = self.visible_ts()
        pending = self._pending
        while pending and pending[0][0] <= visible:
            _, appended, home = heapq.heappop(pending)
            hist = self.delays.get(home)
            if hist is None:
                hist = self.delays[home] = Histogram()
            hist.add((now_ns - appended) / 1e6)
        return visible
