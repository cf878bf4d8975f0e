"""MVTO read marks: for each key, the highest timestamp at which any read of it was served.

Purpose
    Multi-version timestamp ordering lets a transaction at `ts` write key `k` only if no read of
    `k` at a timestamp above `ts` has been served already; otherwise that read would have missed a
    write that precedes it in timestamp order. `ReadMarks` answers "what is the highest timestamp
    a read of `k` was served at?" (`get`) and records reads: a point read marks one key
    (`raise_key`); a scan marks a whole key range (`raise_range`), including keys that do not
    exist yet, so that a later insert into the scanned range cannot slip under the scan (phantom
    protection).

Invariant (the only one that matters for correctness)
    `get(k)` is never lower than the timestamp of any read of `k` recorded since the structure
    was created (or since the last `raise_floor` that stood in for lost marks). It may be higher:
    a too-high mark only causes an unnecessary abort and retry, never a missed conflict.

How it stays small
    Marks are kept in memory, never persisted. Three layers answer `get(k)`, and the answer is
    the maximum of them:

    - `floor`: a mark for every key. Raised when entries are evicted and on restart.
    - point marks: a dict from key to mark.
    - range marks: disjoint half-open ranges `[start, end)` kept sorted by start, each with one
      mark; a lookup is a bisect (O(log n)). Overlapping scans are folded in by splitting at their
      boundaries and taking the maximum of the marks, and neighbours with equal marks merge.

    The number of point plus range entries is capped at `max_entries`. When an insert goes over
    the cap, the entries with the lowest marks are evicted (down to 3/4 of the cap, so that
    eviction is amortised) and the floor is raised to the highest evicted mark. That keeps the
    invariant: every evicted key is still covered, by the floor.

Failure modes
    None at run time beyond `ValueError` for a non-positive `max_entries`. The hazard is at
    restart; see `raise_floor`.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

__all__ = ["DEFAULT_MAX_READ_MARKS", "ReadMarks"]

DEFAULT_MAX_READ_MARKS = 100_000
"""Default cap on point plus range entries: a few tens of MB at worst, fine on a laptop."""


class ReadMarks:
    """In-memory MVTO read marks with a floor, point marks and sorted range marks."""

    __slots__ = ("_ends", "_floor", "_marks", "_max_entries", "_points", "_starts")

    def __init__(self, *, max_entries: int = DEFAULT_MAX_READ_MARKS) -> None:
        """`max_entries`: cap on point plus range entries before low marks are folded into the
        floor. Smaller caps use less memory and cause more spurious aborts."""
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self._max_entries = max_entries
        self._floor = 0
        self._points: dict[bytes, int] = {}
        # Range marks: parallel lists, sorted by start, pairwise disjoint. An end of None means
        # "to the end of the key space" and can only be the last range's.
        self._starts: list[bytes] = []
        self._ends: list[bytes | None] = []
        self._marks: list[int] = []

    # -- queries --------------------------------------------------------------------------------

    @property
    def floor(self) -> int:
        """The mark every key has at least."""
        return self._floor

    @property
    def max_entries(self) -> int:
        return self._max_entries

    def __len__(self) -> int:
        """Point plus range entries held (the quantity `max_entries` caps)."""
        return len(self._points) + len(self._starts)

    def get(self, key: bytes) -> int:
        """The highest timestamp any recorded read of `key` was served at (0 if none)."""
        mark = self._floor
        point = self._points.get(key)
        if point is not None and point > mark:
            mark = point
        i = bisect_right(self._starts, key) - 1
        if i >= 0:
            end = self._ends[i]
            if (end is None or key < end) and self._marks[i] > mark:
                mark = self._marks[i]
        return mark

    def ranges(self) -> list[tuple[bytes, bytes | None, int]]:
        """The range marks as `(start, end, mark)`, sorted and disjoint (debugging, tests)."""
        return list(zip(self._starts, self._ends, self._marks, strict=True))

    # -- updates --------------------------------------------------------------------------------

    def raise_key(self, key: bytes, ts: int) -> None:
        """Record a read of `key` served at `ts`."""
        if ts <= self._floor:
            return
        old = self._points.get(key)
        if old is None:
            self._points[key] = ts
            self._maybe_evict()
        elif ts > old:
            self._points[key] = ts

    def raise_range(self, start: bytes, end: bytes | None, ts: int) -> None:
        """Record a scan of `[start, end)` served at `ts` (`end None`: to the end of key space).

        Every key in the range is marked, including keys not written yet (phantom protection).
        """
        if ts <= self._floor or (end is not None and end <= start):
            return
        starts, ends = self._starts, self._ends
        # The window of existing ranges that overlap or touch [start, end): touching ones are
        # included so that they can merge with the new pieces when their marks are equal.
        lo = bisect_left(starts, start)
        if lo > 0:
            prev_end = ends[lo - 1]
            if prev_end is None or prev_end >= start:
                lo -= 1
        hi = len(starts) if end is None else bisect_right(starts, end)
        window = list(zip(starts[lo:hi], ends[lo:hi], self._marks[lo:hi], strict=True))
        pieces = _fold_range(window, start, end, ts)
        self._starts[lo:hi] = [p[0] for p in pieces]
        self._ends[lo:hi] = [p[1] for p in pieces]
        self._marks[lo:hi] = [p[2] for p in pieces]
        if len(pieces) > len(window):
            self._maybe_evict()

    def raise_floor(self, ts: int) -> None:
        """Raise the mark of every key to at least `ts`. Never lowers the floor.

        HAZARD (clock bound): read marks are not persisted, so a restarted node has forgotten
        which reads it served. Before serving any write after a restart the node must call
        `raise_floor(clock.now().latest)`: every read served before the restart was served at a
        timestamp no later than true time at that moment, which is below `now().latest` as long
        as the clock's uncertainty bound held across the restart. If the bound is exceeded (a
        clock that ran ahead before the crash, or a `latest` that underestimates true time after
        it), a lost mark can lie above the new floor; a write could then commit below a read that
        already happened, and that read will have missed it: MVTO's serialisability breaks
        silently. The same applies to a replica promoted to leader: its floor must be raised the
        same way before it accepts writes.
        """
        if ts <= self._floor:
            return
        self._floor = ts
        self._drop_at_or_below(ts)

    # -- eviction -------------------------------------------------------------------------------

    def _maybe_evict(self) -> None:
        count = len(self._points) + len(self._starts)
        if count <= self._max_entries:
            return
        # Evict down to 3/4 of the cap so that a steady stream of inserts pays for a sort only
        # once per max_entries/4 inserts rather than on every insert.
        target = self._max_entries - self._max_entries // 4
        to_evict = count - target
        marks = sorted([*self._points.values(), *self._marks])
        # Conservative: the floor goes to the highest evicted mark, so every evicted key keeps a
        # mark at least as high as it had. Ties at the threshold are evicted too (they are
        # covered by the floor exactly), so slightly more than `to_evict` may go.
        threshold = marks[to_evict - 1]
        self._floor = max(self._floor, threshold)
        self._drop_at_or_below(self._floor)

    def _drop_at_or_below(self, floor: int) -> None:
        """Forget entries the floor already covers."""
        self._points = {k: m for k, m in self._points.items() if m > floor}
        keep = [i for i, m in enumerate(self._marks) if m > floor]
        if len(keep) != len(self._marks):
            self._starts = [self._starts[i] for i in keep]
            self._ends = [self._ends[i] for i in keep]
            self._marks = [self._marks[i] for i in keep]


def _fold_range(
    window: list[tuple[bytes, bytes | None, int]], start: bytes, end: bytes | None, ts: int
) -> list[tuple[bytes, bytes | None, int]]:
    """Fold the range mark `[start, end) -> ts` into `window` (sorted, disjoint ranges).

    A sweep over every boundary in play: between two consecutive boundaries the mark is
    constant (the window range covering that stretch, max'd with `ts` inside `[start, end)`).
    Stretches with no mark are dropped and contiguous stretches with equal marks are merged,
    so the result is again sorted, disjoint and as short as possible. The window is a handful
    of ranges, so the sort is cheap.
    """
    points = {start}
    unbounded = end is None
    if end is not None:
        points.add(end)
    for s, e, _ in window:
        points.add(s)
        if e is None:
            unbounded = True
        else:
            points.add(e)
    bounds = sorted(points)

    out: list[tuple[bytes, bytes | None, int]] = []
    j = 0  # index of the first window range that may cover the current stretch
    last = len(bounds) - 1
    for i, lo in enumerate(bounds):
        hi: bytes | None
        if i < last:
            hi = bounds[i + 1]
        elif unbounded:
            hi = None
        else:
            break  # the last boundary only closes the stretch before it
        # Advance past window ranges that end at or before this stretch.
        while j < len(window):
            covered_end = window[j][1]
            if covered_end is None or covered_end > lo:
                break
            j += 1
        mark = 0
        if j < len(window) and window[j][0] <= lo:
            mark = window[j][2]
        if start <= lo and (end is None or lo < end) and ts > mark:
            mark = ts
        if mark == 0:
            continue
        if out and out[-1][1] == lo and out[-1][2] == mark:
            out[-1] = (out[-1][0], hi, mark)
        else:
            out.append((lo, hi, mark))
    return out
