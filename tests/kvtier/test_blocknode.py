"""The block store over gRPC: chunked streaming, compression, typed errors, a node going away."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from kvtier_env import make_kv, run

from k2store.transport import WanEmulation
from k2store.wan import NetOverrides, NetworkSettings, write_overrides
from kvtier.blocknode import BlockNode, BlockStoreClient, LinkPacer
from kvtier.blocks import BlockSpec, encode_block
from kvtier.blockstore import BlockStore, BlockStoreConfig, MemoryBlobStore
from kvtier.errors import BlockStoreUnavailable, BlockTooLarge, CorruptBlock

SPEC = BlockSpec(16, 4, 2, 32, "bfloat16")


def key(i: int) -> bytes:
    return bytes([i]) * 32


def frame(i: int) -> bytes:
    return encode_block(SPEC, make_kv(SPEC, 16, seed=i), key(i))


def test_chunked_put_get_has_delete_with_and_without_compression() -> None:
    async def body() -> None:
        node = BlockNode(BlockStore(MemoryBlobStore()), "us-east", "127.0.0.1:0")
        await node.start()
        raw = BlockStoreClient(node.address, chunk_bytes=1000)  # a frame is ~33 chunks
        packed = BlockStoreClient(node.address, chunk_bytes=1000, codec="zlib")
        try:
            assert await raw.put(key(1), frame(1)) is True
            assert await packed.put(key(2), frame(2)) is True
            assert await raw.put(key(1), frame(1)) is False
            assert await raw.get(key(2)) == frame(2)
            assert await packed.get(key(1)) == frame(1)
            assert raw.stats.bytes_received == len(frame(2))
            assert 0 < packed.stats.bytes_received < len(frame(1))
            assert packed.stats.frame_bytes_received == len(frame(1))
            assert await raw.get(key(3)) is None
            assert await raw.has([key(1), key(3), key(2)]) == [True, False, True]
            assert await raw.delete([key(1), key(3)]) == 1
            st = await raw.node_stats()
            assert (st.region, st.blocks, st.puts) == ("us-east", 1, 2)
        finally:
            await raw.close()
            await packed.close()
            await node.stop(0)

    run(body)


def test_store_errors_cross_the_wire_typed() -> None:
    async def body() -> None:
        config = BlockStoreConfig(max_block_bytes=len(frame(1)) - 1)
        node = BlockNode(BlockStore(MemoryBlobStore(), config), "us-east", "127.0.0.1:0")
        await node.start()
        c = BlockStoreClient(node.address, chunk_bytes=4096)
        try:
            with pytest.raises(BlockTooLarge):
                await c.put(key(1), frame(1))
            small = BlockSpec(4, 1, 1, 8, "float16")
            f = encode_block(small, make_kv(small, 4), key(2))
            with pytest.raises(CorruptBlock):
                await c.put(key(3), f)  # filed under the wrong key
            assert await c.put(key(2), f) is True
        finally:
            await c.close()
            await node.stop(0)

    run(body)


def test_a_stopped_node_is_unavailable_not_a_crash() -> None:
    async def body() -> None:
        node = BlockNode(BlockStore(MemoryBlobStore()), "us-east", "127.0.0.1:0")
        await node.start()
        c = BlockStoreClient(node.address, timeout_s=1.0)
        await c.put(key(1), frame(1))
        await node.stop(0)
        try:
            with pytest.raises(BlockStoreUnavailable):
                await c.get(key(1))
            with pytest.raises(BlockStoreUnavailable):
                await c.has([key(1)])
            assert c.stats.failures == 2
        finally:
            await c.close()

    run(body)


def test_emulated_link_queues_transfers_and_honours_cuts(tmp_path: Path) -> None:
    async def body() -> None:
        settings = NetworkSettings(
            enabled=True, rtt_ms={frozenset({"us-east", "eu-west"}): 40.0}, bandwidth_mbit=8.0
        )
        path = tmp_path / "net.toml"
        wan = WanEmulation(settings, region="eu-west", regions_of={}, overrides_path=path)
        pacer = LinkPacer(wan, "eu-west", "us-east")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        # Two 100 kB replies at 1 MB/s share the link: the second ends 0.2 s in, plus half an RTT.
        await asyncio.gather(*(pacer.pay(100_000, outbound=False) for _ in range(2)))
        elapsed = loop.time() - t0
        assert 0.22 <= elapsed < 1.0
        write_overrides(path, NetOverrides().with_cut("us-east", "eu-west", one_way=True))
        wan._next_check = float("-inf")  # look at the file now rather than within 0.1 s
        with pytest.raises(BlockStoreUnavailable, match="cut"):
            await pacer.pay(10, outbound=False)
        await pacer.pay(10, outbound=True)  # the cut is one way

    run(body)
