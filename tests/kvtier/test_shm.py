"""Same-host block reads through a shared-memory arena (kvtier/shm.py): the frame arrives with
one copy, byte for byte what a streamed get returns; a node that cannot use the arena, a frame
larger than the slot, a full arena and a foreign block all end in the streamed path or a miss;
and a request can never steer the node's copy outside the reader's arena."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kvtier_env import make_kv, run

from k2store.errors import InvalidArgument
from kvtier.blocknode import BlockNode, BlockStoreClient
from kvtier.blocks import BlockSpec, encode_block
from kvtier.blockstore import BlockStore, MemoryBlobStore
from kvtier.errors import CorruptBlock
from kvtier.proto import blockstore_pb2 as bpb
from kvtier.shm import ARENA_HEADER_BYTES, ArenaMapper, SharedArena, SharedUnavailable, Slot

SPEC = BlockSpec(16, 4, 2, 32, "bfloat16")


def key(i: int) -> bytes:
    return bytes([i]) * 32


def frame(i: int) -> bytes:
    return encode_block(SPEC, make_kv(SPEC, 16, seed=i), key(i))


async def fetch_bytes(c: BlockStoreClient, k: bytes, size: int) -> tuple[bytes | None, int]:
    async with c.fetch(k, size_hint=size) as (f, moved):
        return (None if f is None else bytes(f)), moved


def test_fetch_through_the_arena_equals_the_streamed_frame() -> None:
    async def body() -> None:
        node = BlockNode(BlockStore(MemoryBlobStore()), "us-east", "127.0.0.1:0")
        await node.start()
        arena = SharedArena(1 << 20)
        shared = BlockStoreClient(node.address, arena=arena)
        plain = BlockStoreClient(node.address)
        try:
            for i in range(1, 4):
                await plain.put(key(i), frame(i))
            size = len(frame(1))
            for i in range(1, 4):
                got, moved = await fetch_bytes(shared, key(i), size)
                assert got == frame(i) == await plain.get(key(i))
                assert moved == size
            assert shared.stats.shared_gets == 3 and plain.stats.shared_gets == 0
            assert await fetch_bytes(shared, key(9), size) == (None, 0)  # a miss
            assert arena.in_use == 0  # every slot came back
            # Without a size hint (nothing to size a slot by) it streams.
            assert (await fetch_bytes(shared, key(1), 0))[0] == frame(1)
            assert shared.stats.shared_gets == 3
        finally:
            await shared.close()
            await plain.close()
            await node.stop(0)
            arena.close()

    run(body)


def test_small_slot_full_arena_and_foreign_node_fall_back_to_streaming() -> None:
    async def body() -> None:
        node = BlockNode(BlockStore(MemoryBlobStore()), "us-east", "127.0.0.1:0")
        await node.start()
        size = len(frame(1))
        arena = SharedArena(ARENA_HEADER_BYTES + size + 64)  # room for one slot
        c = BlockStoreClient(node.address, arena=arena)
        try:
            await c.put(key(1), frame(1))
            # The metadata said less than the frame: TOO_SMALL, then streamed.
            assert (await fetch_bytes(c, key(1), size // 2))[0] == frame(1)
            assert c.stats.shared_gets == 0
            # The arena is full while one fetch holds its only slot: the second one streams.
            async with c.fetch(key(1), size_hint=size) as (outer, _):
                assert outer is not None and c.stats.shared_gets == 1
                assert (await fetch_bytes(c, key(1), size))[0] == frame(1)
                assert c.stats.shared_gets == 1
                assert bytes(outer) == frame(1)
            # An arena the node cannot verify (as from another host or pid namespace): the
            # client streams from then on.
            foreign = SharedArena(1 << 20)
            foreign._mm[8:24] = bytes(16)  # its header does not hold the nonce it sends
            f = BlockStoreClient(node.address, arena=foreign)
            assert (await fetch_bytes(f, key(1), size))[0] == frame(1)
            assert f._arena is None and f.stats.shared_gets == 0
            assert (await fetch_bytes(f, key(1), size))[0] == frame(1)
            await f.close()
            foreign.close()
        finally:
            await c.close()
            await node.stop(0)
            arena.close()

    run(body)


def test_a_frame_torn_in_the_arena_is_a_corrupt_block(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        node = BlockNode(BlockStore(MemoryBlobStore()), "us-east", "127.0.0.1:0")
        await node.start()
        arena = SharedArena(1 << 20)
        c = BlockStoreClient(node.address, arena=arena)
        real_write = ArenaMapper.write

        def torn(
            self: ArenaMapper, pid: int, fd: int, nonce: bytes, off: int, cap: int, data: bytes
        ) -> None:
            bad = bytearray(data)
            bad[-1] ^= 0xFF
            real_write(self, pid, fd, nonce, off, cap, bytes(bad))

        try:
            await c.put(key(1), frame(1))
            monkeypatch.setattr(ArenaMapper, "write", torn)
            with pytest.raises(CorruptBlock):
                await fetch_bytes(c, key(1), len(frame(1)))
            assert arena.in_use == 0
        finally:
            await c.close()
            await node.stop(0)
            arena.close()

    run(body)


def test_the_node_writes_only_inside_an_arena_that_proves_its_nonce() -> None:
    arena = SharedArena(1 << 16)
    mapper = ArenaMapper()
    try:
        pid, fd, nonce = os.getpid(), arena.fd, arena.nonce
        mapper.write(pid, fd, nonce, ARENA_HEADER_BYTES, 64, b"x" * 64)
        with pytest.raises(SharedUnavailable):
            mapper.write(pid, fd, b"\0" * 16, ARENA_HEADER_BYTES, 64, b"x")  # wrong nonce
        with pytest.raises(SharedUnavailable):
            mapper.write(pid, 10_000, nonce, ARENA_HEADER_BYTES, 64, b"x")  # no such fd
        other = os.open(Path(__file__), os.O_RDONLY)
        try:  # an open file that is not an arena (and read-only)
            with pytest.raises(SharedUnavailable):
                mapper.write(pid, other, nonce, ARENA_HEADER_BYTES, 64, b"x")
        finally:
            os.close(other)
        for offset, capacity in ((0, 64), (ARENA_HEADER_BYTES - 1, 64), ((1 << 16) - 32, 64)):
            with pytest.raises(InvalidArgument):  # over the header or past the end
                mapper.write(pid, fd, nonce, offset, capacity, b"y" * 8)
        with pytest.raises(InvalidArgument):  # more than the slot
            mapper.write(pid, fd, nonce, ARENA_HEADER_BYTES, 8, b"z" * 9)
        assert bytes(arena._mm[: len(b"K2ARENA1")]) == b"K2ARENA1"
        assert bytes(arena._mm[ARENA_HEADER_BYTES : ARENA_HEADER_BYTES + 64]) == b"x" * 64
    finally:
        mapper.close()
        arena.close()


def test_shared_get_of_a_missing_arena_answers_no_arena_not_an_error() -> None:
    async def body() -> None:
        node = BlockNode(BlockStore(MemoryBlobStore()), "us-east", "127.0.0.1:0")
        await node.start()
        c = BlockStoreClient(node.address)
        try:
            await c.put(key(1), frame(1))
            r = await c._stub.GetShared(
                bpb.GetSharedRequest(
                    key=key(1), pid=os.getpid(), fd=9999, nonce=bytes(16),
                    offset=ARENA_HEADER_BYTES, capacity=1 << 20,
                )
            )  # fmt: skip
            assert r.status == bpb.SHARED_NO_ARENA and not r.found
        finally:
            await c.close()
            await node.stop(0)

    run(body)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 5000)), max_size=60))
def test_the_arena_allocator_never_overlaps_and_coalesces(ops: list[tuple[bool, int]]) -> None:
    capacity = ARENA_HEADER_BYTES + 16_384
    arena = SharedArena(capacity)
    try:
        held: list[Slot] = []
        for take, size in ops:
            if take or not held:
                s = arena.alloc(size)
                if s is not None:
                    assert s.size >= size and s.offset >= ARENA_HEADER_BYTES
                    assert s.offset + s.size <= capacity
                    for h in held:
                        assert s.offset + s.size <= h.offset or h.offset + h.size <= s.offset
                    held.append(s)
            else:
                arena.free(held.pop(size % len(held)))
            assert arena.in_use == sum(h.size for h in held)
        for h in held:
            arena.free(h)
        # Everything coalesced back into one range: the whole arena can be taken again.
        whole = arena.alloc(capacity - ARENA_HEADER_BYTES)
        assert whole is not None and whole.offset == ARENA_HEADER_BYTES
    finally:
        arena.close()
