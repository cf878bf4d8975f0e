"""Placement across regions (kvtier/placement.py): cost-aware retrieval, demand-driven copies,
eviction of cold copies within capacity with pins and leases honoured."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kvtier_env import SPEC, kv_env, make_kv, namespace, run

from kvtier.blocks import block_hashes
from kvtier.events import ResyncRequest
from kvtier.metadata import block_key
from kvtier.placement import CostModel, DemandTracker, PlacementSweeper
from kvtier.router import metadata_snapshotter

TOKENS = list(range(1, 17))  # four blocks of four tokens
MB = 1_000_000


def model() -> CostModel:
    # DESIGN's RTTs from us-east, 1 Gbit/s, and a prefill of 400 tokens/s.
    return CostModel(
        "us-east",
        rtt_s={"us-east": 0.001, "eu-west": 0.075, "ap-southeast": 0.210},
        bytes_per_s=125e6,
        prefill_tokens_per_s=400,
    )


def test_each_block_comes_from_its_cheapest_region() -> None:
    plan = model().plan(
        [{"eu-west": MB, "ap-southeast": MB}, {"us-east": MB, "eu-west": MB}, {"ap-southeast": MB}],
        block_tokens=256,
    )
    assert plan.regions == ("eu-west", "us-east", "ap-southeast")
    assert plan.num_blocks == 3
    assert plan.fetch_s == pytest.approx(0.210 + MB / 125e6)  # the regions load in parallel


def test_a_remote_block_is_skipped_when_recomputing_it_is_cheaper() -> None:
    m = model()
    # 16 tokens recompute in 40 ms; ap-southeast is 210 ms away: not worth it ...
    assert m.plan([{"ap-southeast": 4096}], block_tokens=16).num_blocks == 0
    # ... but a local copy is, and so is a long remote prefix.
    assert m.plan([{"us-east": 4096}], block_tokens=16).num_blocks == 1
    assert m.plan([{"ap-southeast": MB}] * 8, block_tokens=256).num_blocks == 8
    # The saving is taken over the whole prefix: a cheap local head is kept even when the
    # remote tail is not worth its round trip.
    plan = m.plan([{"us-east": 4096}, {"ap-southeast": 4096}], block_tokens=16)
    assert plan.num_blocks == 1 and plan.regions == ("us-east",)


def test_measurements_move_the_estimates() -> None:
    m = model()
    m.observe_transfer("eu-west", 10 * MB, 0.075 + 10 * MB / 12.5e6)  # a 100 Mbit/s link
    assert m.link("eu-west").bytes_per_s < 125e6
    m.observe_rtt("ap-southeast", 0.010)  # closer than configured
    assert m.link("ap-southeast").rtt_s < 0.210
    before = m.recompute_s(1000)
    m.observe_prefill(1000, 10.0)  # a slower machine: recomputing costs more
    assert m.recompute_s(1000) > before


def test_round_trip_samples_turn_the_plan_within_two_requests() -> None:
    """A link whose latency grows from 75 ms to 4 s: after two round-trip samples a 1,024-token
    prefix (2.56 s to recompute here) is recomputed rather than fetched, and after two samples
    of a fast link again it is fetched. (Weighed like transfers, two samples left it fetching
    at 2.1 s estimated against 4.1 s measured.)"""
    m = model()
    m.observe_transfer("eu-west", 4 * MB, 0.075 + 4 * MB / 125e6)  # the link as configured
    prefix = [{"eu-west": MB}] * 4
    assert m.plan(prefix, block_tokens=256).num_blocks == 4
    for _ in range(2):
        m.observe_rtt("eu-west", 4.0)
    assert m.plan(prefix, block_tokens=256).num_blocks == 0
    for _ in range(2):
        m.observe_rtt("eu-west", 0.075)
    assert m.plan(prefix, block_tokens=256).num_blocks == 4


def test_demand_tracker_says_copy_once_at_the_threshold() -> None:
    d = DemandTracker(replicate_after=3, capacity=2)
    assert [d.record_remote_load(b"a") for _ in range(4)] == [False, False, True, False]
    d.forget(b"a")
    assert [d.record_remote_load(b"a") for _ in range(3)] == [False, False, True]
    d.record_remote_load(b"b")
    d.record_remote_load(b"c")
    d.record_remote_load(b"d")  # b falls out of the bounded table
    assert not d.record_remote_load(b"b")
    with pytest.raises(ValueError):
        DemandTracker(replicate_after=0)


def test_repeated_remote_loads_copy_the_block_here(tmp_path: Path) -> None:
    async def body() -> None:
        async with kv_env(tmp_path) as env:
            ns = namespace()
            await env.metadata.register_namespace(ns)
            east = await env.connector(ns, "us-east")
            west = await env.connector(ns, "eu-west", replicate_after=2)
            kv = make_kv(SPEC, len(TOKENS))
            await east.store(TOKENS, kv)
            first = await west.retrieve(TOKENS)
            await west.settle()
            assert first.by_region == {"us-east": 4} and west.stats.blocks_replicated == 0
            await west.retrieve(TOKENS)
            await west.settle()
            assert west.stats.blocks_replicated == 4
            rows = await env.metadata.rows(west.record, block_hashes(ns, TOKENS), "eu-west")
            assert all(r is not None for r in rows)  # published here, bytes first
            third = await west.retrieve(TOKENS)
            assert third.by_region == {"eu-west": 4} and third.bytes_moved == 0

    run(body)


async def one_block_prompts(env: Any, n: int) -> tuple[Any, Any, list[list[int]], list[bytes]]:
    """A registered namespace, a us-east connector, and n prompts of one block each stored
    through it one second apart (oldest first), with their block hashes."""
    ns = namespace()
    await env.metadata.register_namespace(ns)
    east = await env.connector(ns, "us-east")
    prompts = [[100 * p + i for i in range(1, 5)] for p in range(n)]
    for i, p in enumerate(prompts):
        env.clock.advance(1_000_000_000)
        await east.store(p, make_kv(SPEC, 4, seed=i))
    return ns, east, prompts, [block_hashes(ns, p)[0] for p in prompts]


def test_sweeper_evicts_the_coldest_unheld_copies_down_to_low_water(tmp_path: Path) -> None:
    async def body() -> None:
        async with kv_env(tmp_path) as env:
            ns, east, prompts, hashes = await one_block_prompts(env, 5)
            size = (await env.metadata.rows(east.record, hashes[:1], "us-east"))[0]
            assert size is not None
            # Pin the oldest: it must survive; the next oldest go first.
            await env.metadata.pin(east.record, hashes[:1], "tester", regions=["us-east"])
            deleted: list[bytes] = []

            async def delete(hs: list[bytes]) -> None:
                deleted.extend(hs)

            sweeper = PlacementSweeper(
                env.metadata,
                "us-east",
                capacity_bytes=int(size.size * 4),  # 5 copies on 4 copies' room
                delete_bytes=delete,
                high_water=0.9,
                low_water=0.5,
            )
            result = await sweeper.sweep()
            assert result.used_bytes == 5 * size.size
            assert result.evicted == 3 and result.kept_held == 1
            assert deleted == hashes[1:4]
            left = await env.metadata.rows(east.record, hashes, "us-east")
            assert [r is not None for r in left] == [True, False, False, False, True]
            assert (await sweeper.sweep()).evicted == 0  # under high water now
            raw = await env.client.get(block_key("us-east", ns.tenant, ns.id, hashes[4]))
            assert raw is not None

    run(body)


def test_sweeper_keeps_a_copy_read_a_moment_ago_over_a_newer_unread_one(
    tmp_path: Path,
) -> None:
    """A copy whose readers loaded it (and released their leases) is warmer than one published
    later and never read: the sweeper evicts the unread one (the release keeps the last use)."""

    async def body() -> None:
        async with kv_env(tmp_path) as env:
            ns, east, prompts, hashes = await one_block_prompts(env, 2)
            env.clock.advance(1_000_000_000)
            got = await east.retrieve(prompts[0])  # the older copy is read (lease, release)
            await east.settle()
            assert got.num_tokens == 4
            row = (await env.metadata.rows(east.record, hashes[:1], "us-east"))[0]
            assert row is not None
            deleted: list[bytes] = []

            async def delete(hs: list[bytes]) -> None:
                deleted.extend(hs)

            sweeper = PlacementSweeper(
                env.metadata, "us-east", capacity_bytes=int(row.size * 1.5),
                delete_bytes=delete, high_water=0.9, low_water=0.7,  # room for one after
            )  # fmt: skip
            assert (await sweeper.sweep()).evicted == 1
            assert deleted == [hashes[1]]

    run(body)


class Recorder:
    """Stands in for an EventPublisher: records what would go out on MQTT."""

    def __init__(self) -> None:
        self.events: list[tuple[str, list[str], str, str]] = []

    def publish(
        self, kind: object, blocks: list[str], *, tenant: str = "", src_region: str = ""
    ) -> None:
        self.events.append((str(kind), list(blocks), tenant, src_region))


def test_stores_and_copies_are_published_and_a_resync_reads_them_back(tmp_path: Path) -> None:
    async def body() -> None:
        async with kv_env(tmp_path) as env:
            ns = namespace()
            await env.metadata.register_namespace(ns)
            east = await env.connector(ns, "us-east")
            west = await env.connector(ns, "eu-west", replicate_after=1)
            east.events, west.events = Recorder(), Recorder()  # type: ignore[assignment]
            await east.store(TOKENS, make_kv(SPEC, len(TOKENS)))
            hexes = [h.hex() for h in block_hashes(ns, TOKENS)]
            assert east.events.events == [("stored", hexes, "acme", "")]  # type: ignore[union-attr]
            await west.retrieve(TOKENS)
            await west.settle()
            copied = west.events.events  # type: ignore[union-attr]
            assert sorted(e[1][0] for e in copied) == sorted(hexes)
            assert {(e[0], e[2], e[3]) for e in copied} == {("replicated", "acme", "us-east")}
            snap = await metadata_snapshotter(env.client)(
                ResyncRequest("pub", 1, "eu-west", "eu-west-serve", 3, "gap")
            )
            assert snap.node == "eu-west-serve" and sorted(snap.blocks["acme"]) == sorted(hexes)

    run(body)


def test_sweeper_and_resync_see_every_tenant_and_the_shared_namespace(tmp_path: Path) -> None:
    """Rows live under each tenant's root (and the shared root) since layout version 2: the
    operator's scans list the tenants and cover each root, paying each copy to its publisher."""

    async def body() -> None:
        async with kv_env(tmp_path, tenants=("acme", "globex")) as env:
            await env.metadata.register_tenant("globex", quota_bytes=1 << 30, share=True)
            stored: dict[str, list[bytes]] = {}
            for i, ns in enumerate([namespace("acme"), namespace("globex", shared=True)]):
                await env.metadata.register_namespace(ns)
                conn = await env.connector(ns, "us-east")
                prompt = [50 * i + t for t in range(1, 9)]  # two blocks each
                env.clock.advance(1_000_000_000)
                await conn.store(prompt, make_kv(SPEC, 8, seed=i))
                stored[ns.tenant] = block_hashes(ns, prompt)
            copies = await env.metadata.region_copies("us-east")
            assert sorted((c.owner, c.row.tenant) for c in copies) == [
                ("", "globex"),
                ("", "globex"),
                ("acme", "acme"),
                ("acme", "acme"),
            ]
            assert sorted(await env.metadata.tenants()) == ["acme", "globex"]
            snap = await metadata_snapshotter(env.client)(
                ResyncRequest("pub", 1, "us-east", "us-east-serve", 3, "gap")
            )
            assert {t: sorted(hs) for t, hs in snap.blocks.items()} == {
                t: sorted(h.hex() for h in hs) for t, hs in stored.items()
            }
            size = copies[0].row.size
            sweeper = PlacementSweeper(
                env.metadata, "us-east", capacity_bytes=size * 4, high_water=0.9, low_water=0.6
            )
            result = await sweeper.sweep()  # the two oldest go: acme's, published first
            assert result.evicted == 2 and result.used_bytes == 4 * size
            left = await env.metadata.region_copies("us-east")
            assert sorted(c.row.block_hash for c in left) == sorted(stored["globex"])
            assert (await env.metadata.tenant("acme")).used_bytes == 0  # refunded
            assert (await env.metadata.tenant("globex")).used_bytes == 2 * size

    run(body)
