"""The block store's tiers: LRU memory over a disk tier, capacity, checksums, restarts."""

from __future__ import annotations

from pathlib import Path

import pytest
from kvtier_env import SPEC, make_kv

from k2store.rocksengine import RocksBlobStore
from kvtier import blockstore
from kvtier.blocks import FRAME_HEADER_BYTES, encode_block
from kvtier.blockstore import BlockStore, BlockStoreConfig, MemoryBlobStore
from kvtier.errors import BlockStoreFull, BlockTooLarge, CorruptBlock
from txn.storage import DataDirLocked, StorageError

FRAME = FRAME_HEADER_BYTES + SPEC.nbytes


def key(i: int) -> bytes:
    return bytes([i]) * 32


def frame(i: int) -> bytes:
    return encode_block(SPEC, make_kv(SPEC, 4, seed=i), key(i))


def test_put_get_has_delete() -> None:
    s = BlockStore(MemoryBlobStore())
    assert s.put(key(1), frame(1)) is True
    assert s.put(key(1), frame(1)) is False  # already held
    assert s.has(key(1)) and not s.has(key(2))
    assert s.get(key(1)) == frame(1)
    assert s.get(key(2)) is None
    assert (s.stats.memory_hits, s.stats.misses, s.stats.blocks) == (1, 1, 1)
    assert s.delete(key(1)) and not s.has(key(1)) and s.stats.disk_used == 0
    assert s.drain_evicted() == [key(1)] and s.drain_evicted() == []


def test_memory_tier_is_lru_and_disk_keeps_everything() -> None:
    s = BlockStore(MemoryBlobStore(), BlockStoreConfig(memory_bytes=2 * FRAME))
    for i in (1, 2):
        s.put(key(i), frame(i))
    s.get(key(1))  # 1 is now the most recent: 2 goes first
    s.put(key(3), frame(3))
    assert s.stats.memory_evictions == 1 and s.stats.memory_used == 2 * FRAME
    assert s.get(key(1)) == frame(1) and s.stats.disk_hits == 0
    assert s.get(key(2)) == frame(2) and s.stats.disk_hits == 1  # from disk, promoted
    assert s.stats.blocks == 3


def test_disk_capacity_evicts_least_recently_used() -> None:
    s = BlockStore(MemoryBlobStore(), BlockStoreConfig(memory_bytes=FRAME, disk_bytes=3 * FRAME))
    for i in (1, 2, 3):
        s.put(key(i), frame(i))
    s.get(key(1))
    s.put(key(4), frame(4))
    assert s.keys() == [key(3), key(1), key(4)]
    assert s.stats.disk_evictions == 1 and s.drain_evicted() == [key(2)]
    assert s.stats.disk_used == 3 * FRAME


def test_protected_blocks_are_not_evicted() -> None:
    protected = {key(1), key(2)}
    s = BlockStore(
        MemoryBlobStore(),
        BlockStoreConfig(disk_bytes=2 * FRAME),
        evictable=lambda k: k not in protected,
    )
    s.put(key(1), frame(1))
    s.put(key(2), frame(2))
    with pytest.raises(BlockStoreFull):
        s.put(key(3), frame(3))
    assert not s.has(key(3)) and s.has(key(1)) and s.has(key(2))
    protected.discard(key(1))
    s.put(key(3), frame(3))
    assert s.keys() == [key(2), key(3)]


def test_bad_frames_are_refused() -> None:
    s = BlockStore(MemoryBlobStore(), BlockStoreConfig(max_block_bytes=FRAME))
    bad = bytearray(frame(1))
    bad[-1] ^= 1
    with pytest.raises(CorruptBlock):
        s.put(key(1), bytes(bad))
    with pytest.raises(CorruptBlock):  # a frame filed under another block's key
        s.put(key(2), frame(1))
    big = BlockStore(MemoryBlobStore(), BlockStoreConfig(max_block_bytes=FRAME - 1))
    with pytest.raises(BlockTooLarge):
        big.put(key(1), frame(1))
    assert s.stats.blocks == 0 and big.stats.blocks == 0


def test_corrupt_disk_block_is_a_miss_and_is_dropped() -> None:
    disk = MemoryBlobStore()
    s = BlockStore(disk, BlockStoreConfig(memory_bytes=FRAME))
    s.put(key(1), frame(1))
    s.put(key(2), frame(2))  # pushes 1 out of memory
    raw = bytearray(disk.data[key(1)])
    raw[FRAME_HEADER_BYTES + 3] ^= 0x10
    disk.data[key(1)] = bytes(raw)
    assert s.get(key(1)) is None
    assert s.stats.corrupt_dropped == 1 and not s.has(key(1)) and key(1) not in disk.data
    assert s.drain_evicted() == [key(1)]
    assert s.get(key(2)) == frame(2)


def test_rocks_tier_survives_a_restart(tmp_path: Path) -> None:
    s = BlockStore(RocksBlobStore(tmp_path / "blocks"), BlockStoreConfig(memory_bytes=FRAME))
    for i in (1, 2, 3):
        s.put(key(i), frame(i))
    s.close()
    s = BlockStore(RocksBlobStore(tmp_path / "blocks"))
    assert s.stats.blocks == 3 and s.stats.disk_used == 3 * FRAME
    assert s.get(key(2)) == frame(2) and s.stats.disk_hits == 1
    s.close()


def test_rocks_blob_store_contract(tmp_path: Path) -> None:
    b = RocksBlobStore(tmp_path / "b")
    try:
        with pytest.raises(DataDirLocked):
            RocksBlobStore(tmp_path / "b")
        b.put(b"k2", b"xx")
        b.put(b"k1", b"yyy", sync=False)
        assert list(b.sizes()) == [(b"k1", 3), (b"k2", 2)]
        assert b.get(b"k1") == b"yyy" and b.get(b"nope") is None
        b.delete(b"k1")
        assert list(b.sizes()) == [(b"k2", 2)] and b.get(b"k1") is None
    finally:
        b.close()
    with pytest.raises(StorageError):
        b.get(b"k2")


def test_evicted_keys_are_bounded_when_nobody_drains_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long-running node that never drains keeps only the newest evicted keys (the count
    keeps going)."""
    monkeypatch.setattr(blockstore, "EVICTED_KEPT", 3)
    s = BlockStore(MemoryBlobStore())
    for i in range(20):
        s.put(key(i), frame(i))
        s.delete(key(i))
    assert s.stats.evicted_total == 20
    kept = s.drain_evicted()
    assert 3 <= len(kept) <= 6 and kept == [key(i) for i in range(20 - len(kept), 20)]
