"""A block store: KV-block frames in a memory tier (LRU) over a durable disk tier.

Purpose
    One region's holder of block bytes. The gRPC node (`kvtier.blocknode`) serves a `BlockStore`
    to the other regions; tests and embedded users can drive one in process.

Data flow
    ::

        put(key, frame) ──verify──▶ disk tier (RocksDB, fsync) ──▶ memory tier (LRU)
        get(key) ──▶ memory tier ──miss──▶ disk tier ──verify──▶ promote to memory ──▶ frame

    The disk tier is write-through: every stored block is on disk before `put` returns, so the
    memory tier is a cache of the disk tier and evicting from memory loses nothing.

Invariants
    - `put` returns only after the frame is durable (with `sync=True`, the default): this is the
      first phase of the two-phase publish; metadata may name this region only afterwards.
    - Every frame served has passed its checksum since it last came off disk or the network; a
      frame that fails is dropped from both tiers and reported as a miss (never as data).
    - Memory use stays within `memory_bytes` and disk use (sum of frame sizes) within
      `disk_bytes`; the least recently used blocks go first, except those the `evictable` hook
      protects (pins and reader leases, supplied by the placement layer).

Failure modes
    A frame that fails verification on `put`: `CorruptBlock`, nothing stored. A frame larger than
    `max_block_bytes` or than the disk tier: `BlockTooLarge`. No evictable block left to make
    room: `BlockStoreFull`. Disk errors surface as `txn.storage.StorageError`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from kvtier.blocks import verify_frame
from kvtier.errors import BlockStoreFull, BlockTooLarge, CorruptBlock

__all__ = [
    "BlobStore",
    "BlockStore",
    "BlockStoreConfig",
    "BlockStoreStats",
    "MemoryBlobStore",
]


class BlobStore(Protocol):
    """The disk tier's contract: a byte map; `put(sync=True)` is durable when it returns."""

    def put(self, key: bytes, value: bytes, *, sync: bool = True) -> None: ...
    def get(self, key: bytes) -> bytes | None: ...
    def delete(self, key: bytes, *, sync: bool = False) -> None: ...
    def sizes(self) -> Iterator[tuple[bytes, int]]: ...
    def close(self) -> None: ...


class MemoryBlobStore:
    """A `BlobStore` in a dict, for tests and the simulator ("durable" for the process's life).

    `corrupt(key)` flips a payload byte in place, to test what readers do with bad bytes."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}

    def put(self, key: bytes, value: bytes, *, sync: bool = True) -> None:
        self.data[key] = bytes(value)

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def delete(self, key: bytes, *, sync: bool = False) -> None:
        self.data.pop(key, None)

    def sizes(self) -> Iterator[tuple[bytes, int]]:
        for k in sorted(self.data):
            yield k, len(self.data[k])

    def close(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class BlockStoreConfig:
    memory_bytes: int = 256 * 1024 * 1024
    """Memory tier capacity (sum of frame sizes held in memory)."""
    disk_bytes: int = 4 * 1024 * 1024 * 1024
    """Disk tier capacity (sum of frame sizes on disk)."""
    max_block_bytes: int = 64 * 1024 * 1024
    """Largest frame accepted."""
    sync: bool = True
    """fsync each put before acknowledging it (turn off only for throw-away stores)."""


EVICTED_KEPT = 10_000
"""How many evicted keys `BlockStoreStats.evicted` keeps for `drain_evicted` (the newest)."""


@dataclass(slots=True)
class BlockStoreStats:
    puts: int = 0
    memory_hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    corrupt_dropped: int = 0
    memory_evictions: int = 0
    disk_evictions: int = 0
    memory_used: int = 0
    disk_used: int = 0
    blocks: int = 0
    evicted: list[bytes] = field(default_factory=list)
    """Keys evicted or dropped since the last `drain_evicted` (for metadata cleanup/events),
    the newest `EVICTED_KEPT` of them: nothing in a node drains them yet (readers clean up a
    dropped copy's metadata when its load misses), so the list must not grow without bound."""
    evicted_total: int = 0
    """Keys evicted or dropped since the store opened."""


class BlockStore:
    """Thread-safe: gRPC handlers call it from worker threads so disk I/O stays off the loop."""

    def __init__(
        self,
        disk: BlobStore,
        config: BlockStoreConfig | None = None,
        *,
        evictable: Callable[[bytes], bool] | None = None,
    ) -> None:
        """Index the disk tier (reads every entry once: a restart re-learns what it holds)."""
        self.config = config or BlockStoreConfig()
        self._disk = disk
        self._evictable = evictable
        self._lock = threading.Lock()
        # OrderedDict as an LRU: move_to_end on use, popitem(last=False) evicts the coldest.
        self._memory: OrderedDict[bytes, bytes] = OrderedDict()
        self._on_disk: OrderedDict[bytes, int] = OrderedDict()
        self.stats = BlockStoreStats()
        for key, size in disk.sizes():
            self._on_disk[key] = size
            self.stats.disk_used += size
        self.stats.blocks = len(self._on_disk)

    # -- writes --------------------------------------------------------------------------------

    def put(self, key: bytes, frame: bytes) -> bool:
        """Store a verified frame durably; False when the key was already held (then only its
        recency changes). Raises CorruptBlock, BlockTooLarge or BlockStoreFull, storing nothing."""
        size = len(frame)
        if size > self.config.max_block_bytes or size > self.config.disk_bytes:
            raise BlockTooLarge(
                f"block {key.hex()[:16]}: {size} bytes exceeds this store's limit of "
                f"{min(self.config.max_block_bytes, self.config.disk_bytes)}"
            )
        verify_frame(frame, key)
        with self._lock:
            if key in self._on_disk:
                self._on_disk.move_to_end(key)
                return False
            self._make_disk_room(size)
            self._disk.put(key, frame, sync=self.config.sync)
            self._on_disk[key] = size
            self.stats.disk_used += size
            self.stats.blocks += 1
            self.stats.puts += 1
            self._remember(key, frame)
            return True

    def delete(self, key: bytes) -> bool:
        with self._lock:
            return self._drop(key)

    def drain_evicted(self) -> list[bytes]:
        """Keys that left this store (evicted or corrupt) since the last call."""
        with self._lock:
            out, self.stats.evicted = self.stats.evicted, []
            return out

    # -- reads ---------------------------------------------------------------------------------

    def has(self, key: bytes) -> bool:
        with self._lock:
            return key in self._on_disk

    def _memory_hit(self, key: bytes) -> bytes | None:
        """The frame if the memory tier holds it (a hit: LRU and stats updated). Under the lock."""
        frame = self._memory.get(key)
        if frame is not None:
            self._memory.move_to_end(key)
            self._on_disk.move_to_end(key)
            self.stats.memory_hits += 1
        return frame

    def get_if_in_memory(self, key: bytes) -> bytes | None:
        """The frame if the memory tier holds it (counted as a `get`'s memory hit), else None
        without touching the disk: a caller on an event loop can serve a hit without a thread."""
        with self._lock:
            return self._memory_hit(key)

    def get(self, key: bytes) -> bytes | None:
        """The frame, or None on a miss (including a block that failed its checksum and was
        dropped). Disk reads happen under the lock: simple, and RocksDB gets of a block are
        memory-speed once cached; a sharded lock is the next step if this shows in profiles."""
        with self._lock:
            frame = self._memory_hit(key)
            if frame is not None:
                return frame
            if key not in self._on_disk:
                self.stats.misses += 1
                return None
            frame = self._disk.get(key)
            if frame is None:  # lost underneath us (e.g. deleted by hand): forget it
                self._drop(key)
                self.stats.misses += 1
                return None
            try:
                verify_frame(frame, key)
            except CorruptBlock:
                self._drop(key)
                self.stats.corrupt_dropped += 1
                self.stats.misses += 1
                return None
            self._on_disk.move_to_end(key)
            self.stats.disk_hits += 1
            self._remember(key, frame)
            return frame

    def keys(self) -> list[bytes]:
        """Held keys, coldest first."""
        with self._lock:
            return list(self._on_disk)

    def close(self) -> None:
        with self._lock:
            self._memory.clear()
            self._disk.close()

    # -- internals (called with the lock held) -------------------------------------------------

    def _remember(self, key: bytes, frame: bytes) -> None:
        size = len(frame)
        if size > self.config.memory_bytes:
            return
        while self.stats.memory_used + size > self.config.memory_bytes and self._memory:
            _, old = self._memory.popitem(last=False)
            self.stats.memory_used -= len(old)
            self.stats.memory_evictions += 1
        self._memory[key] = frame
        self.stats.memory_used += size

    def _make_disk_room(self, size: int) -> None:
        if self.stats.disk_used + size <= self.config.disk_bytes:
            return
        for victim in list(self._on_disk):
            if self.stats.disk_used + size <= self.config.disk_bytes:
                return
            if self._evictable is not None and not self._evictable(victim):
                continue
            self._drop(victim)
            self.stats.disk_evictions += 1
        if self.stats.disk_used + size > self.config.disk_bytes:
            raise BlockStoreFull(
                f"block store cannot fit {size} bytes: {self.stats.disk_used} of "
                f"{self.config.disk_bytes} used by protected (pinned or leased) blocks"
            )

    def _drop(self, key: bytes) -> bool:
        size = self._on_disk.pop(key, None)
        if size is None:
            return False
        frame = self._memory.pop(key, None)
        if frame is not None:
            self.stats.memory_used -= len(frame)
        self._disk.delete(key)
        self.stats.disk_used -= size
        self.stats.blocks -= 1
        self.stats.evicted_total += 1
        self.stats.evicted.append(key)
        if len(self.stats.evicted) > 2 * EVICTED_KEPT:  # trim in batches: amortized O(1)
            del self.stats.evicted[:-EVICTED_KEPT]
        return True
