"""A hybrid logical clock, for the MVTO-HLC baseline (CockroachDB-like).

Timestamps keep truetime's layout: the low SLOT_BITS name the issuer (here a node tag), so HLC
timestamps are unique across nodes. `now()` is at least the physical clock and strictly above
everything this clock issued or saw; `update(ts)` folds in a timestamp received in a message, so
causally later events get larger timestamps.

HAZARD: HLC alone does not bound how far a timestamp lags true time; a reader protects real-time
order only with an uncertainty window (a value in (ts, ts + max_offset] forces a restart above it).
If clocks drift apart by more than max_offset, a read may miss a write that finished before it.
"""

from __future__ import annotations

from truetime.clock import ClockSource
from truetime.oracle import STEP_GRANULARITY


class HybridLogicalClock:
    def __init__(self, clock: ClockSource, tag: int) -> None:
        if not 0 <= tag < STEP_GRANULARITY:
            raise ValueError(f"tag must be in [0, {STEP_GRANULARITY}), got {tag}")
        self.clock = clock
        self.tag = tag
        self._last = 0

    def now(self) -> int:
        physical = self.clock.now_ns() // STEP_GRANULARITY * STEP_GRANULARITY
        base = max(physical, self._last // STEP_GRANULARITY * STEP_GRANULARITY + STEP_GRANULARITY)
        self._last = base + self.tag
        return self._last

    def update(self, ts: int) -> None:
        """Fold in a timestamp seen in a message: later now() calls return more than it."""
        if ts > self._last:
            self._last = ts

    @property
    def last(self) -> int:
        return self._last
