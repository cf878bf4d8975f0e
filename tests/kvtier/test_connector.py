"""The connector against an in-process cluster and in-process block stores (tiny tensors)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from kvtier_env import SPEC, Env, PartLog, kv_env, make_kv, namespace, run

from kvtier.blocks import FRAME_HEADER_BYTES, BlockSpec, Layout, Namespace, block_hashes
from kvtier.connector import (
    AsyncKVConnector,
    BlockLocation,
    ConnectorConfig,
    KVConnector,
    arena_bytes,
)
from kvtier.errors import (
    BlockSpecMismatch,
    BlockTooLarge,
    QuotaExceeded,
    SharingNotAllowed,
    UnknownNamespace,
)
from kvtier.metadata import NamespaceRecord, PublishBlock, PublishResult, lease_prefix

TOKENS = list(range(1000, 1018))  # 4 full blocks of 4, 2 tokens left over
N = 16


async def stored_in_us_east(env: Env) -> tuple[Namespace, AsyncKVConnector, AsyncKVConnector]:
    """A namespace, connectors in us-east and eu-west, and TOKENS stored from us-east."""
    ns = namespace()
    await env.metadata.register_namespace(ns)
    east = await env.connector(ns, "us-east")
    west = await env.connector(ns, "eu-west")
    await east.store(TOKENS, make_kv(SPEC, len(TOKENS)))
    return ns, east, west


def test_store_here_retrieve_in_another_region_counts_bytes_moved(tmp_path: Path) -> None:
    async def body() -> None:
        async with kv_env(tmp_path) as env:
            ns = namespace()
            await env.metadata.register_namespace(ns)
            east = await env.connector(ns, "us-east")
            west = await env.connector(ns, "eu-west")
            kv = make_kv(SPEC, len(TOKENS))
            r = await east.store(TOKENS, kv)
            assert (r.num_blocks, r.stored, r.already_present) == (4, 4, 0)
            assert (await east.store(TOKENS, kv)).already_present == 4

            found = await west.lookup([*TOKENS, 7, 7])
            assert found.num_tokens == N and found.by_region == {"us-east": 4}
            await west.settle()  # leases are written in the background
            lease = lease_prefix("us-east", "acme", ns.id, found.blocks[0].block_hash)
            leases = await env.client.scan(lease, lease + "~")
            assert [k for k, _ in leases] == [(lease + west.holder).encode()]
            assert not await env.metadata.evict(west.record, found.blocks[0].block_hash, "us-east")
            got = await west.retrieve(TOKENS, found)
            await west.settle()
            # Released after the load: the row stays as the copy's last use, holding nothing.
            ((_, raw),) = await env.client.scan(lease, lease + "~")
            assert raw == b"released:%d" % env.clock.now_ns()
            assert got.num_tokens == N and torch.equal(got.kv, kv[:, :, :, :N])
            frame_bytes = sum(b.size for b in found.blocks)
            assert got.bytes_moved == frame_bytes == west.stats.bytes_fetched_remote
            assert west.stats.recompute_tokens == 0 and west.stats.failed_loads == 0

            # A prompt that diverges in block 3 shares only the first two blocks.
            other = [*TOKENS[:9], 1, *TOKENS[10:]]
            assert (await west.lookup(other)).num_tokens == 8
            # Local stores are preferred once eu-west holds a copy.
            await west.store(TOKENS, kv)
            again = await west.retrieve(TOKENS)
            assert again.by_region == {"eu-west": 4} and again.bytes_moved == 0

    run(body)


def test_compressed_wide_area_transfer(tmp_path: Path) -> None:
    async def body() -> None:
        spec = BlockSpec(16, 4, 2, 32, "bfloat16")
        async with kv_env(tmp_path) as env:
            ns = namespace(spec=spec)
            await env.metadata.register_namespace(ns)
            east = await env.connector(ns, "us-east")
            west = await env.connector(ns, "eu-west", remote_codec="zlib")
            toks = list(range(64))
            scale = torch.exp(
                torch.randn(4, 2, 2, 1, 32, generator=torch.Generator().manual_seed(1))
            )
            kv = (make_kv(BlockSpec(16, 4, 2, 32, "float32"), 64) * scale).to(torch.bfloat16)
            await east.store(toks, kv)
            got = await west.retrieve(toks)
            assert torch.equal(got.kv, kv)
            raw = sum(b for b in [spec.nbytes] * 4)
            assert 0 < got.bytes_moved < 0.9 * raw

    run(body)


def test_token_major_layout(tmp_path: Path) -> None:
    async def body() -> None:
        spec = BlockSpec(4, 2, 2, 8, "float32", Layout.LKTHD)
        async with kv_env(tmp_path) as env:
            ns = namespace(spec=spec)
            await env.metadata.register_namespace(ns)
            c = await env.connector(ns, "eu-west")
            kv = make_kv(spec, 10)
            assert (await c.store(list(range(10)), kv)).stored == 2
            got = await c.retrieve(list(range(10)))
            assert torch.equal(got.kv, kv[:, :, :8])

    run(body)


def test_tenants_are_isolated_unless_they_opt_in(tmp_path: Path) -> None:
    async def body() -> None:
        async with kv_env(tmp_path, tenants=("acme", "globex", "initech")) as env:
            md = env.metadata
            for t in ("acme", "globex"):
                await md.register_namespace(namespace(t))
            a = await env.connector(namespace("acme"), "us-east")
            g = await env.connector(namespace("globex"), "us-east")
            kv = make_kv(SPEC, len(TOKENS))
            await a.store(TOKENS, kv)
            assert (await g.lookup(TOKENS)).num_tokens == 0
            assert (await g.retrieve(TOKENS)).num_tokens == 0
            # Opted-in tenants share one namespace; one that did not opt in cannot use it.
            for t in ("acme", "globex"):
                await md.register_tenant(t, quota_bytes=1 << 30, share=True)
            await md.register_namespace(namespace("acme", shared=True))
            sa = await env.connector(namespace("acme", shared=True), "us-east")
            sg = await env.connector(namespace("globex", shared=True), "eu-west")
            await sa.store(TOKENS, kv)
            assert torch.equal((await sg.retrieve(TOKENS)).kv, kv[:, :, :, :N])
            # A copy placed by another opted-in tenant is charged to that tenant, there.
            acme_used = (await md.tenant("acme", region="eu-west")).used_bytes
            assert (await sg.store(TOKENS, kv)).stored == 4
            assert (await md.tenant("acme", region="eu-west")).used_bytes == acme_used
            globex = await md.tenant("globex", region="eu-west")
            assert globex.used_bytes == 4 * (await sg.lookup(TOKENS)).blocks[0].size
            with pytest.raises(SharingNotAllowed):
                await env.connector(namespace("initech", shared=True), "us-east")

    run(body)


def test_bad_input_stores_nothing(tmp_path: Path) -> None:
    async def body() -> None:
        async with kv_env(tmp_path) as env:
            ns = namespace()
            with pytest.raises(UnknownNamespace):
                await env.connector(ns, "us-east")
            await env.metadata.register_namespace(ns)
            c = await env.connector(ns, "us-east")
            kv = make_kv(SPEC, len(TOKENS))
            lkthd = BlockSpec(4, 2, 2, 8, "float16", Layout.LKTHD)
            bad = [
                kv.float(),  # dtype
                kv[:, :, :1],  # heads
                kv[:, :, :, :7],  # too few tokens for the full blocks
                make_kv(lkthd, len(TOKENS)),  # layout
                kv[0],  # rank
            ]
            for b in bad:
                with pytest.raises(BlockSpecMismatch):
                    await c.store(TOKENS, b)
            with pytest.raises(BlockSpecMismatch):
                await c.store(TOKENS, "not a tensor")  # type: ignore[arg-type]
            small = await env.connector(ns, "us-east", max_block_bytes=100)
            with pytest.raises(BlockTooLarge):
                await small.store(TOKENS, kv)
            assert all(not d.data for d in env.disks.values())
            assert (await env.metadata.tenant("acme")).used_bytes == 0
            assert (await c.lookup(TOKENS)).num_tokens == 0

    run(body)


def test_bytes_are_durable_before_metadata_names_the_region(tmp_path: Path) -> None:
    async def body() -> None:
        async with kv_env(tmp_path) as env:
            ns = namespace()
            await env.metadata.register_namespace(ns)
            c = await env.connector(ns, "us-east")
            seen: list[bool] = []
            publish = c.metadata.publish

            async def checked(
                rec: NamespaceRecord, tenant: str, region: str, blocks: Sequence[PublishBlock]
            ) -> PublishResult:
                store = env.blocknodes[region].store
                seen.extend(store.has(b.block_hash) for b in blocks)
                assert [await c.metadata.block(rec, b.block_hash) for b in blocks] == [None] * 4
                return await publish(rec, tenant, region, blocks)

            c.metadata.publish = checked  # type: ignore[method-assign]
            await c.store(TOKENS, make_kv(SPEC, len(TOKENS)))
            assert seen == [True] * 4

            # With the block store gone, nothing is published.
            await env.blocknodes["us-east"].stop(0, close_store=False)
            other = list(range(50, 58))
            r = await c.store(other, make_kv(SPEC, 8))
            assert r.stored == 0 and "unavailable" in r.error.lower()
            assert await c.metadata.lookup(c.record, block_hashes(ns, other)) == []
            assert c.stats.unavailable == 1

    run(body)


def test_quota_is_enforced_by_store(tmp_path: Path) -> None:
    async def body() -> None:
        async with kv_env(tmp_path) as env:
            ns = namespace()
            await env.metadata.register_tenant("acme", quota_bytes=1500)
            await env.metadata.register_namespace(ns)
            c = await env.connector(ns, "us-east")
            with pytest.raises(QuotaExceeded):
                await c.store(TOKENS, make_kv(SPEC, len(TOKENS)))  # 4 x 584 bytes
            assert (await c.lookup(TOKENS)).num_tokens == 0
            assert (await env.metadata.tenant("acme")).used_bytes == 0
            assert (await c.store(TOKENS[:8], make_kv(SPEC, 8))).stored == 2

    run(body)


def test_killed_block_store_means_miss_and_recompute(tmp_path: Path) -> None:
    async def body() -> None:
        async with kv_env(tmp_path) as env:
            ns, east, west = await stored_in_us_east(env)
            found = await west.lookup(TOKENS)
            assert found.num_tokens == N
            await env.blocknodes["us-east"].stop(0, close_store=False)
            # Reported, then lost before the load: served nothing, counted for recompute.
            got = await west.retrieve(TOKENS, found)
            assert got.num_tokens == 0 and got.kv.shape == SPEC.shape(0)
            assert west.stats.recompute_tokens == N and west.stats.failed_loads == 4
            # Looked up now: a miss, not an error; the metadata is kept (the node may return).
            assert (await west.lookup(TOKENS)).num_tokens == 0
            assert west.stats.unavailable >= 2
            row = await west.metadata.block(west.record, found.blocks[0].block_hash)
            assert row is not None and "us-east" in row.regions

    run(body)


def test_corrupt_block_is_a_failed_load_and_is_cleaned_up(tmp_path: Path) -> None:
    async def body() -> None:
        async with kv_env(tmp_path) as env:
            ns = namespace()
            await env.metadata.register_namespace(ns)
            c = await env.connector(ns, "eu-west")
            await c.store(TOKENS, make_kv(SPEC, len(TOKENS)))
            store = env.blocknodes["eu-west"].store
            h = block_hashes(ns, TOKENS)
            # Push block 2 out of memory, then flip a byte of it on disk.
            store.config = type(store.config)(memory_bytes=0)
            store._memory.clear()
            store.stats.memory_used = 0
            raw = bytearray(env.disks["eu-west"].data[h[2]])
            raw[-1] ^= 1
            env.disks["eu-west"].data[h[2]] = bytes(raw)
            got = await c.retrieve(TOKENS)
            assert got.num_tokens == 8 and got.failed_blocks == 2
            assert c.stats.failed_loads == 1 and c.stats.recompute_tokens == 8
            assert c.stats.metadata_cleanups == 1
            assert await c.metadata.block(c.record, h[2]) is None
            assert (await c.lookup(TOKENS)).num_tokens == 8

    run(body)


def test_sync_connector(tmp_path: Path) -> None:
    """The sync facade runs its own loop, so the cluster runs on a loop in another thread."""
    ready, done = threading.Event(), threading.Event()
    envs: list[Env] = []

    async def host() -> None:
        async with kv_env(tmp_path) as env:
            await env.metadata.register_namespace(namespace())
            envs.append(env)
            ready.set()
            while not done.is_set():
                await asyncio.sleep(0.01)

    t = threading.Thread(target=lambda: asyncio.run(host()))
    t.start()
    try:
        assert ready.wait(30)
        env = envs[0]
        config = ConnectorConfig(region="ap-southeast")
        with KVConnector.open(env.cfg, namespace(), config=config, stores=env.addresses()) as c:
            kv = make_kv(SPEC, len(TOKENS))
            assert c.store(TOKENS, kv).stored == 4
            assert c.lookup(TOKENS).num_tokens == N
            assert torch.equal(c.retrieve(TOKENS).kv, kv[:, :, :, :N])
            assert c.stats.hit_tokens == 2 * N
    finally:
        done.set()
        t.join(30)


def test_a_region_whose_metadata_is_unreachable_does_not_hide_the_others(tmp_path: Path) -> None:
    async def body() -> None:
        async with kv_env(tmp_path) as env:
            ns = namespace()
            await env.metadata.register_namespace(ns)
            east = await env.connector(ns, "us-east")
            west = await env.connector(ns, "eu-west", timeout_s=1.0)
            kv = make_kv(SPEC, len(TOKENS))
            await east.store(TOKENS, kv)
            await env.nodes["ap-southeast-1"].stop(grace_s=0)  # the whole region's store is gone
            got = await west.retrieve(TOKENS)
            assert got.num_tokens == N and torch.equal(got.kv, kv[:, :, :, :N])
            assert west.stats.unavailable == 1

    run(body)


async def _until(pred: Callable[[], Awaitable[bool]], timeout_s: float = 15.0) -> None:
    """Poll pred until it holds (bounded): replicas see new rows after the visibility delay."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await pred():
        assert loop.time() < deadline, "condition did not hold in time"
        await asyncio.sleep(0.05)


def test_replica_lookup_sees_other_regions_rows_once_visible_and_survives_their_loss(
    tmp_path: Path,
) -> None:
    """With remote_metadata="replica", other regions' rows come from this region's replicas:
    a block stored elsewhere is found once it is visible here, and still found (and loaded from
    another copy) when its home region's node is gone, which a leader read cannot do."""

    async def body() -> None:
        async with kv_env(tmp_path) as env:
            ns = namespace()
            await env.metadata.register_namespace(ns)
            east = await env.connector(ns, "us-east")
            south = await env.connector(ns, "ap-southeast")
            west = await env.connector(ns, "eu-west", remote_metadata="replica", timeout_s=1.0)
            leader = await env.connector(ns, "eu-west", remote_metadata="leader", timeout_s=1.0)
            kv = make_kv(SPEC, len(TOKENS))
            await east.store(TOKENS, kv)
            await south.store(TOKENS, kv)

            async def both_seen() -> bool:
                found = await west.lookup(TOKENS)
                return found.num_tokens == N and set(found.blocks[0].regions) == {
                    "ap-southeast",
                    "us-east",
                }

            await _until(both_seen)
            await env.nodes["us-east-1"].stop(grace_s=0)  # us-east's metadata shard is gone
            found = await west.lookup(TOKENS, confirm_remote=False)
            assert found.num_tokens == N
            got = await west.retrieve(TOKENS, found)
            assert got.kv is not None and torch.equal(got.kv, kv[:, :, :, :N])
            # A leader read of us-east's rows cannot answer; ap-southeast's rows still serve.
            assert (await leader.lookup(TOKENS)).by_region == {"ap-southeast": 4}
            assert leader.stats.unavailable >= 1

    run(body)


def test_retrieve_into_a_sink_hands_over_each_block_once(tmp_path: Path) -> None:
    async def body() -> None:
        async with kv_env(tmp_path) as env:
            ns = namespace()
            await env.metadata.register_namespace(ns)
            east = await env.connector(ns, "us-east")
            kv = make_kv(SPEC, len(TOKENS))
            await east.store(TOKENS, kv)
            out = torch.full(SPEC.shape(N), float("nan"), dtype=SPEC.torch_dtype)
            seen: list[int] = []

            async def sink(i: int, first_layer: int, block: torch.Tensor) -> None:
                assert first_layer == 0 and block.shape == SPEC.shape()  # this region's: whole
                seen.append(i)
                await asyncio.sleep(0)  # other blocks arrive meanwhile; this view stays valid
                out[:, :, :, i * SPEC.block_tokens : (i + 1) * SPEC.block_tokens].copy_(block)

            got = await east.retrieve(TOKENS, sink=sink)
            assert got.num_tokens == N and got.kv is None
            assert sorted(seen) == [0, 1, 2, 3]
            assert torch.equal(out, kv[:, :, :, :N])

    run(body)


def test_a_lookup_that_finds_remote_blocks_samples_that_link_at_most_once_a_second(
    tmp_path: Path,
) -> None:
    """The cost model needs the link's latency even while it chooses to recompute (then nothing
    is transferred to learn from): a lookup that finds blocks in another region samples that
    region's round trip in the background, at most once per `rtt_probe_s`."""

    async def body() -> None:
        async with kv_env(tmp_path) as env:
            ns, east, west = await stored_in_us_east(env)
            prior = west.cost.link("us-east").samples
            await west.lookup(TOKENS)
            await west.settle()
            assert west.stats.rtt_probes == 1
            assert west.cost.link("us-east").samples == prior + 1
            await west.lookup(TOKENS)  # within the second: no new sample
            await west.settle()
            assert west.stats.rtt_probes == 1
            env.clock.advance(1_100_000_000)
            await west.lookup(TOKENS)
            await west.settle()
            assert west.stats.rtt_probes == 2
            # A region's own blocks are never probed; probes off means none at all.
            await east.lookup(TOKENS)
            await east.settle()
            quiet = await env.connector(ns, "eu-west", rtt_probe_s=0.0)
            await quiet.lookup(TOKENS)
            await quiet.settle()
            assert east.stats.rtt_probes == quiet.stats.rtt_probes == 0

    run(body)


def test_loads_in_flight_cover_the_link_s_bandwidth_delay_product(tmp_path: Path) -> None:
    """16 blocks at once keep a 75 ms, 1 Gbit/s link busy with 1.5 MB blocks; a 1 s round trip
    holds 83 of them, so retrieve keeps 64 (the cap) in flight instead of loading in waves
    that each pay a round trip."""

    async def body() -> None:
        async with kv_env(tmp_path) as env:
            ns = namespace()
            await env.metadata.register_namespace(ns)
            west = await env.connector(ns, "eu-west")
            blocks = [BlockLocation(i, bytes([i]) * 32, "us-east", 1_500_000, ("us-east",))
                      for i in range(32)]  # fmt: skip
            link = west.cost.link("us-east")
            link.rtt_s, link.bytes_per_s = 0.075, 125e6
            assert west.loads_in_flight(blocks) == 16
            link.rtt_s = 1.0
            assert west.loads_in_flight(blocks) == 64
            link.rtt_s = 0.3  # 37.5 MB in flight: 25 blocks
            assert west.loads_in_flight(blocks) == 25
            assert west.loads_in_flight(blocks[:0]) == 16

    run(body)


def test_a_sink_takes_other_regions_blocks_in_layer_parts_first_layers_first(
    tmp_path: Path,
) -> None:
    """Blocks from another region come in byte ranges of a few layers each, every block's
    first part asked for before any block's second, each (block, layer) handed over once; the
    bytes are the stored ones. With layer_parts=1 they come whole."""

    async def body() -> None:
        async with kv_env(tmp_path) as env:
            ns, _, _ = await stored_in_us_east(env)
            kv = make_kv(SPEC, len(TOKENS))  # what it stored
            for parts in (2, 1):
                west = await env.connector(ns, "eu-west", layer_parts=parts, replicate_after=0)
                asked = PartLog(west)
                out = torch.full(SPEC.shape(N), float("nan"), dtype=SPEC.torch_dtype)
                handed: list[tuple[int, int, int]] = []

                async def sink(i: int, first: int, part: torch.Tensor) -> None:
                    handed.append((i, first, part.shape[0]))
                    await asyncio.sleep(0)  # the view stays valid until this returns
                    t = slice(i * SPEC.block_tokens, (i + 1) * SPEC.block_tokens)
                    out[first : first + part.shape[0], :, :, t].copy_(part)

                got = await west.retrieve(TOKENS, sink=sink)
                assert got.num_tokens == N and got.kv is None and got.failed_blocks == 0
                assert got.by_region == {"us-east": 4}
                assert torch.equal(out, kv[:, :, :, :N])
                if parts == 2:
                    assert sorted(handed) == [(i, layer, 1) for i in range(4) for layer in (0, 1)]
                    # The header and layer 0 (offset 0) of all four, then layer 1 of all four.
                    starts = [start for _, start in asked.asked]
                    assert len(starts) == 8 and starts[:4] == [0] * 4 and 0 not in starts[4:]
                    assert got.bytes_moved == 4 * (SPEC.nbytes + FRAME_HEADER_BYTES)
                else:
                    assert sorted(handed) == [(i, 0, 2) for i in range(4)]
                    assert asked.asked == []

    run(body)


def test_a_layered_block_that_fails_its_checksum_is_reloaded_or_not_counted(
    tmp_path: Path,
) -> None:
    """The parts of a block are handed over before its checksum can be checked; a block that
    then fails it is loaded whole from another region that holds it (its layers handed over
    again) or, with none, not counted (num_tokens stops before it)."""

    async def body() -> None:
        async with kv_env(tmp_path) as env:
            kv = make_kv(SPEC, len(TOKENS))
            handed: list[tuple[int, int]] = []

            async def sink(i: int, first: int, part: torch.Tensor) -> None:
                handed.extend((i, layer) for layer in range(first, first + part.shape[0]))

            for copies in (("us-east", "ap-southeast"), ("us-east",)):
                ns = namespace(salt=b"%d" % len(copies))
                await env.metadata.register_namespace(ns)
                for region in copies:
                    await (await env.connector(ns, region)).store(TOKENS, kv)
                h = block_hashes(ns, TOKENS)
                west = await env.connector(ns, "eu-west", layer_parts=2, replicate_after=0)
                PartLog(west, damage={("us-east", h[2])})
                found = await west.lookup(TOKENS)
                assert set(found.blocks[2].regions) == set(copies)
                if found.blocks[2].region != "us-east":  # read the damaged copy first
                    blocks = list(found.blocks)
                    blocks[2] = replace(blocks[2], region="us-east")
                    found = replace(found, blocks=tuple(blocks))
                handed.clear()
                got = await west.retrieve(TOKENS, found, sink=sink)
                assert handed.count((1, 0)) == handed.count((1, 1)) == 1
                if len(copies) == 2:
                    assert got.num_tokens == N and got.failed_blocks == 0
                    assert handed.count((2, 0)) == handed.count((2, 1)) == 2
                else:
                    assert got.num_tokens == 8 and got.failed_blocks == 2
                    assert handed.count((2, 0)) == handed.count((2, 1)) == 1
                    assert west.stats.failed_loads == 1

    run(body)


def test_a_layered_block_gone_from_its_store_is_a_miss_and_forgotten(tmp_path: Path) -> None:
    """A block deleted from us-east between lookup and load: its parts miss, it is not
    counted, us-east is removed from its row once (not once per part), and nothing after it
    counts either."""

    async def body() -> None:
        async with kv_env(tmp_path) as env:
            ns, _, _ = await stored_in_us_east(env)
            west = await env.connector(ns, "eu-west", layer_parts=2, replicate_after=0)
            found = await west.lookup(TOKENS)
            h = block_hashes(ns, TOKENS)
            assert env.blocknodes["us-east"].store.delete(h[1])

            async def sink(i: int, first: int, part: torch.Tensor) -> None:
                pass

            got = await west.retrieve(TOKENS, found, sink=sink)
            assert got.num_tokens == 4 and got.failed_blocks == 3
            assert west.stats.metadata_cleanups == 1
            assert await west.metadata.block(west.record, h[1]) is None
            assert (await west.lookup(TOKENS)).num_tokens == 4

    run(body)


def test_the_shared_memory_arena_holds_a_frame_for_every_load_in_flight(tmp_path: Path) -> None:
    """A load that finds no free slot in the arena is streamed over gRPC at a fifth of the
    speed: the arena holds a frame per load retrieve may have in flight, whatever the block
    size (64 MiB held seven of a Llama-3.1-8B-shaped model's 8.4 MB blocks)."""
    cfg = ConnectorConfig("us-east")
    big = BlockSpec(64, 32, 8, 128, "bfloat16")  # Llama-3.1-8B's shape: 8.4 MB a block
    size = arena_bytes(cfg, big)
    assert size >= cfg.max_parallel_loads * (FRAME_HEADER_BYTES + big.nbytes)
    assert arena_bytes(cfg, SPEC) == cfg.shared_memory_bytes  # tiny blocks: the configured size
    assert arena_bytes(replace(cfg, shared_memory_bytes=size * 2), big) == size * 2

    async def body() -> None:
        async with kv_env(tmp_path) as env:
            ns = namespace()
            await env.metadata.register_namespace(ns)
            conn = await env.connector(ns, "us-east")
            assert conn.arena is not None and conn.arena.capacity == arena_bytes(conn.config, SPEC)

    run(body)
