"""`MemoryEngine`: the in-memory `VersionedStore`, for the deterministic simulator and tests.

Purpose
    The same semantics as `RocksEngine`, with none of its cost: the simulator runs thousands of
    transactions per second of wall time through it, and a property test holds the two engines
    against each other. Nothing is durable: `sync` is accepted and ignored, and `close` discards
    nothing (a closed engine only refuses further calls, as the RocksDB one does).

Structure
    - per key, two parallel lists sorted by ascending timestamp (timestamps, values). Writes
      usually carry the newest timestamp, so they append; `get` is one bisect.
    - a sorted list of the keys that have versions, for scans (bisect to the start, then walk).
      A new key is inserted with `insort`, a memmove of the pointer array: cheap at simulator
      sizes and much cheaper than re-sorting on every scan.
    - intents: a dict plus its own sorted key list; metadata: a dict.

Invariants
    Every key in `_keys` has at least one version and vice versa; `_intent_keys` is exactly the
    sorted keys of `_intents`. A batch is validated in full (`plan_batch`) before anything is
    touched, and applying a validated plan cannot fail, so batches are atomic.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Sequence

from txn.readmarks import ReadMarks
from txn.storage import (
    GcStats,
    Intent,
    Mutation,
    StorageError,
    Version,
    VersionedStore,
    check_gc_horizon,
    plan_batch,
)

__all__ = ["MemoryEngine"]


class _History:
    """Committed versions of one key, ascending by timestamp."""

    __slots__ = ("tss", "values")

    def __init__(self) -> None:
        self.tss: list[int] = []
        self.values: list[bytes | None] = []

    def put(self, ts: int, value: bytes | None) -> None:
        tss = self.tss
        if not tss or ts > tss[-1]:
            tss.append(ts)
            self.values.append(value)
            return
        i = bisect_left(tss, ts)
        if i < len(tss) and tss[i] == ts:
            self.values[i] = value  # same (key, ts) rewritten: last write wins
        else:
            tss.insert(i, ts)
            self.values.insert(i, value)


class MemoryEngine(VersionedStore):
    """An in-memory multi-version store with `RocksEngine`'s semantics and no durability."""

    def __init__(self, *, read_marks: ReadMarks | None = None) -> None:
        """`read_marks`: the read-mark table to expose (a fresh default-sized one if None)."""
        self.read_marks = read_marks if read_marks is not None else ReadMarks()
        self._histories: dict[bytes, _History] = {}
        self._keys: list[bytes] = []
        self._intents: dict[bytes, Intent] = {}
        self._intent_keys: list[bytes] = []
        self._meta: dict[bytes, bytes] = {}
        self._horizon = 0
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("memory engine is closed")

    # -- reads ----------------------------------------------------------------------------------

    def get(self, key: bytes, ts: int) -> Version | None:
        self._check_open()
        if ts < self._horizon:
            self.check_read_ts(key, ts)
        history = self._histories.get(key)
        if history is None:
            return None
        i = bisect_right(history.tss, ts) - 1
        if i < 0:
            return None
        return Version(history.tss[i], history.values[i])

    def get_intent(self, key: bytes) -> Intent | None:
        self._check_open()
        return self._intents.get(key)

    def latest_version(self, key: bytes) -> Version | None:
        self._check_open()
        history = self._histories.get(key)
        if history is None:
            return None
        return Version(history.tss[-1], history.values[-1])

    def versions(self, key: bytes) -> list[Version]:
        self._check_open()
        history = self._histories.get(key)
        if history is None:
            return []
        return [
            Version(ts, value)
            for ts, value in zip(reversed(history.tss), reversed(history.values), strict=True)
        ]

    def scan(
        self, start: bytes, end: bytes | None, ts: int, limit: int | None = None
    ) -> list[tuple[bytes, Version]]:
        self._check_open()
        self.check_read_ts(start, ts)
        rows: list[tuple[bytes, Version]] = []
        if limit is not None and limit <= 0:
            return rows
        keys = self._keys
        stop = len(keys) if end is None else bisect_left(keys, end)
        histories = self._histories
        for index in range(bisect_left(keys, start), stop):
            key = keys[index]
            history = histories[key]
            i = bisect_right(history.tss, ts) - 1
            if i < 0:
                continue
            value = history.values[i]
            if value is None:
                continue
            rows.append((key, Version(history.tss[i], value)))
            if limit is not None and len(rows) >= limit:
                break
        return rows

    def scan_versions(
        self, start: bytes, end: bytes | None, max_keys: int
    ) -> list[tuple[bytes, list[Version]]]:
        self._check_open()
        keys = self._keys
        lo = bisect_left(keys, start)
        hi = len(keys) if end is None else bisect_left(keys, end)
        return [(key, self.versions(key)) for key in keys[lo : min(hi, lo + max(max_keys, 0))]]

    def scan_intents(self, start: bytes, end: bytes | None) -> list[tuple[bytes, Intent]]:
        self._check_open()
        keys = self._intent_keys
        lo = bisect_left(keys, start)
        hi = len(keys) if end is None else bisect_left(keys, end)
        return [(key, self._intents[key]) for key in keys[lo:hi]]

    def get_meta(self, name: bytes) -> bytes | None:
        self._check_open()
        return self._meta.get(name)

    @property
    def horizon(self) -> int:
        return self._horizon

    def key_count_estimate(self) -> int:
        """Exact here: keys with committed versions."""
        return len(self._keys)

    # -- writes ---------------------------------------------------------------------------------

    def apply(self, mutations: Sequence[Mutation], *, sync: bool = True) -> None:
        """Atomic; `sync` is meaningless in memory and ignored."""
        self._check_open()
        plan = plan_batch(mutations, self._intents.get)
        # From here on nothing can fail: the plan is valid and the structures accept anything.
        histories = self._histories
        for key, ts, value in plan.versions:
            history = histories.get(key)
            if history is None:
                history = histories[key] = _History()
                insort(self._keys, key)
            history.put(ts, value)
        for key, intent in plan.intents.items():
            if intent is None:
                if self._intents.pop(key, None) is not None:
                    del self._intent_keys[bisect_left(self._intent_keys, key)]
            else:
                if key not in self._intents:
                    insort(self._intent_keys, key)
                self._intents[key] = intent
        for name, value in plan.meta.items():
            if value is None:
                self._meta.pop(name, None)
            else:
                self._meta[name] = value

    def gc(self, horizon: int) -> GcStats:
        self._check_open()
        check_gc_horizon(horizon)
        if horizon < self._horizon:
            return GcStats(0, 0)
        self._horizon = horizon
        removed = 0
        emptied: list[bytes] = []
        for key, history in self._histories.items():
            # Versions below the horizon occupy tss[:below]; the newest of them, tss[below-1],
            # is what a read at the horizon sees, so it stays unless it is a tombstone.
            below = bisect_left(history.tss, horizon)
            if below == 0:
                continue
            drop = below if history.values[below - 1] is None else below - 1
            if drop == 0:
                continue
            del history.tss[:drop]
            del history.values[:drop]
            removed += drop
            if not history.tss:
                emptied.append(key)
        keys_scanned = len(self._histories)
        for key in emptied:
            del self._histories[key]
            del self._keys[bisect_left(self._keys, key)]
        return GcStats(versions_removed=removed, keys_scanned=keys_scanned)

    def close(self) -> None:
        self._closed = True
