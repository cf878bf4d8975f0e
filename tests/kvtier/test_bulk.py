"""The block store node's bulk read path (kvtier/bulk.py): found by readers from a Get reply,
verified like any frame, dropped for gRPC when it fails, absent when switched off."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest
from kvtier_env import make_kv, run

from k2store.errors import InvalidArgument
from kvtier.blocknode import BlockNode, BlockStoreClient
from kvtier.blocks import BlockSpec, encode_block
from kvtier.blockstore import BlockStore, MemoryBlobStore
from kvtier.errors import CorruptBlock

SPEC = BlockSpec(16, 4, 2, 32, "bfloat16")


def key(i: int) -> bytes:
    return bytes([i]) * 32


def frame(i: int) -> bytes:
    return encode_block(SPEC, make_kv(SPEC, 16, seed=i), key(i))


async def node_with(n: int, **kw: bool) -> BlockNode:
    store = BlockStore(MemoryBlobStore())
    for i in range(n):
        store.put(key(i), frame(i))
    node = BlockNode(store, "us-east", "127.0.0.1:0", **kw)
    await node.start()
    return node


@contextlib.asynccontextmanager
async def node_and_client(n: int) -> AsyncIterator[tuple[BlockNode, BlockStoreClient]]:
    """A node holding frames 0..n-1 and a client of it that has read frame 0 (streamed: the
    reply named the bulk port)."""
    node = await node_with(n)
    c = BlockStoreClient(node.address)
    try:
        assert await c.get(key(0)) == frame(0)
        assert c.stats.bulk_gets == 0 and node.bulk is not None
        yield node, c
    finally:
        await c.close()
        await node.stop(0)


def test_reads_move_to_the_bulk_port_once_the_node_names_it() -> None:
    async def body() -> None:
        async with node_and_client(10) as (node, c):
            assert node.bulk is not None and node.bulk.port > 0
            assert await c.get(key(1)) == frame(1)
            assert await c.get(key(99)) is None  # a miss, through the bulk port too
            assert c.stats.bulk_gets == 2
            got = await asyncio.gather(*(c.get(key(i)) for i in range(10)))  # several sockets
            assert got == [frame(i) for i in range(10)]
            async with c.fetch(key(3), size_hint=len(frame(3))) as (view, moved):
                assert view is not None and bytes(view) == frame(3) and moved == len(frame(3))
            assert c.stats.bulk_gets == 13 and node.bulk.served == 12

    run(body)


def test_a_failed_bulk_path_falls_back_to_grpc_for_good() -> None:
    async def body() -> None:
        async with node_and_client(3) as (node, c):
            assert await c.get(key(1)) == frame(1) and c.stats.bulk_gets == 1
            assert node.bulk is not None
            await node.bulk.stop()  # the port goes away (its kept connection too); gRPC stays
            assert await c.get(key(2)) == frame(2)
            assert c.stats.bulk_gets == 1 and c._bulk is None
            assert await c.get(key(1)) == frame(1)  # streamed from now on
            assert c.stats.bulk_gets == 1

    run(body)


def test_a_kept_connection_the_node_closed_is_replaced_once() -> None:
    async def body() -> None:
        async with node_and_client(3) as (node, c):
            assert await c.get(key(1)) == frame(1) and c.stats.bulk_gets == 1
            assert node.bulk is not None and c._bulk is not None
            await node.bulk.stop()  # a restart: the kept connection is dead
            await node.bulk.start()
            c._bulk.port = node.bulk.port  # (a restarted node names its port again)
            assert await c.get(key(2)) == frame(2)
            assert c.stats.bulk_gets == 2 and c._bulk is not None  # still on the bulk path

    run(body)


def test_a_damaged_bulk_frame_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        async with node_and_client(2) as (node, c):
            assert node.bulk is not None
            good = node.store.get

            def damaged(k: bytes) -> bytes | None:
                f = good(k)
                return None if f is None else f[:-1] + bytes([f[-1] ^ 1])

            monkeypatch.setattr(node.bulk, "_get", damaged)
            monkeypatch.setattr(node.bulk, "_peek", damaged)
            with pytest.raises(CorruptBlock):
                await c.get(key(1))

    run(body)


def test_no_bulk_port_when_the_node_or_the_client_says_so() -> None:
    async def body() -> None:
        off = await node_with(2, bulk=False)
        on = await node_with(2)
        plain = BlockStoreClient(off.address)
        refusing = BlockStoreClient(on.address, bulk=False)
        try:
            assert off.bulk is None
            for c in (plain, refusing):
                assert await c.get(key(0)) == frame(0)
                assert await c.get(key(1)) == frame(1)
                assert c.stats.bulk_gets == 0
        finally:
            await plain.close()
            await refusing.close()
            await off.stop(0)
            await on.stop(0)

    run(body)


def test_the_bulk_server_drops_a_connection_that_does_not_speak_its_protocol() -> None:
    async def body() -> None:
        node = await node_with(1)
        try:
            assert node.bulk is not None
            loop = asyncio.get_running_loop()
            s = socket.create_connection(("127.0.0.1", node.bulk.port))
            s.setblocking(False)
            await loop.sock_sendall(s, b"GET / HTTP/1.0\r\n\r\n")
            assert await asyncio.wait_for(loop.sock_recv(s, 100), 5) == b""  # closed
            s.close()
        finally:
            await node.stop(0)

    run(body)


def test_byte_ranges_of_a_frame_through_the_bulk_port_and_grpc() -> None:
    """A layer-wise load reads parts of a frame: the same bytes through either path, cut at the
    frame's end (a short reply is CorruptBlock), a miss as None; compression refuses ranges."""

    async def body() -> None:
        node = await node_with(2)
        whole = frame(1)
        bulk = BlockStoreClient(node.address)
        streamed = BlockStoreClient(node.address, bulk=False)
        try:
            assert await bulk.get(key(0)) == frame(0)  # learns the bulk port
            for c in (bulk, streamed):
                before = c.stats.bulk_gets
                part, moved = await c.get_range(key(1), 100, 5000)
                assert part is not None and bytes(part) == whole[100:5100] and moved == 5000
                head, _ = await c.get_range(key(1), 0, 64)
                assert head is not None and bytes(head) == whole[:64]
                assert await c.get_range(key(9), 0, 64) == (None, 0)
                with pytest.raises(CorruptBlock):  # past the end: fewer bytes than asked
                    await c.get_range(key(1), len(whole) - 10, 20)
                assert c.stats.bulk_gets - before == (4 if c is bulk else 0)
            with pytest.raises(InvalidArgument):
                await streamed.get_range(key(1), 0, 0)
            # A range is raw: a reader asking for a compressed range is refused.
            with pytest.raises(InvalidArgument):
                await streamed._get_streamed(key(1), "zlib", (0, 64))
        finally:
            await bulk.close()
            await streamed.close()
            await node.stop(0)

    run(body)
