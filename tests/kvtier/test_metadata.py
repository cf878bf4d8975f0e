"""Block metadata transactions: registration, publish with quota, leases, pins, removal."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from kvtier_env import kv_env, namespace, run

from k2store.errors import InvalidArgument
from kvtier.errors import QuotaExceeded, SharingNotAllowed, UnknownNamespace, UnknownTenant
from kvtier.metadata import (
    PublishBlock,
    block_key,
    lease_prefix,
    namespace_key,
    pin_prefix,
    region_key,
    tenant_key,
    usage_key,
)


def blk(i: int, size: int = 100) -> PublishBlock:
    return PublishBlock(bytes([i]) * 32, i, size, 1000 + i)


def test_key_layout() -> None:
    h = bytes(32)
    assert block_key("us-east", "acme", "ab", h) == "us-east/kv/t/acme/blk/ab/" + "00" * 32
    assert block_key("us-east", "", "ab", h) == "us-east/kv/shared/blk/ab/" + "00" * 32
    assert (
        lease_prefix("us-east", "acme", "ab", h) == "us-east/kv/t/acme/lease/ab/" + "00" * 32 + "/"
    )
    assert pin_prefix("eu-west", "", "ab", h) == "eu-west/kv/shared/pin/ab/" + "00" * 32 + "/"
    assert tenant_key("eu-west", "acme") == "eu-west/kv/tenant/acme"
    assert usage_key("eu-west", "acme") == "eu-west/kv/t/acme/usage"
    assert namespace_key("us-east", "acme", "ab") == "us-east/kv/t/acme/ns/ab"
    assert namespace_key("us-east", "", "ab") == "us-east/kv/shared/ns/ab"
    assert region_key("ap-southeast") == "ap-southeast/kv/region/ap-southeast"
    with pytest.raises(InvalidArgument):
        usage_key("eu-west", "")  # the shared namespace pays for nothing


def test_every_row_of_a_region_is_homed_there(tmp_path: Path) -> None:
    async def body() -> None:
        async with kv_env(tmp_path) as env:
            h = bytes(32)
            for r in env.cfg.region_names():
                for key in [
                    block_key(r, "t", "ab", h),
                    lease_prefix(r, "t", "ab", h) + "x",
                    pin_prefix(r, "", "ab", h) + "x",
                    tenant_key(r, "t"),
                    usage_key(r, "t"),
                    namespace_key(r, "t", "ab"),
                    namespace_key(r, "", "ab"),
                    region_key(r),
                ]:
                    assert env.cfg.shard_for_key(key.encode()).home_region == r

    run(body)


def test_namespaces_must_be_registered_and_sharing_needs_an_opt_in(tmp_path: Path) -> None:
    async def body() -> None:
        async with kv_env(tmp_path) as env:
            md = env.metadata
            ns = namespace()
            with pytest.raises(UnknownNamespace):
                await md.namespace(ns)
            rec = await md.register_namespace(ns)
            assert (rec.nsid, rec.tenant, rec.shared) == (ns.id, "acme", False)
            assert (await md.namespace(ns)).fields["hash_algorithm"]
            assert await md.register_namespace(ns) == rec  # idempotent
            for r in env.cfg.region_names():  # readable locally everywhere
                assert await env.client.get(namespace_key(r, "acme", ns.id)) is not None
            with pytest.raises(UnknownTenant):
                await md.register_namespace(namespace("nobody"))
            with pytest.raises(SharingNotAllowed):
                await md.register_namespace(namespace(shared=True))
            await md.register_tenant("acme", quota_bytes=10, share=True)
            await md.register_namespace(namespace(shared=True))
            with pytest.raises(InvalidArgument):
                await md.register_tenant("acme", quota_bytes=-1)

    run(body)


def test_publish_charges_the_quota_in_the_same_transaction(tmp_path: Path) -> None:
    async def body() -> None:
        async with kv_env(tmp_path) as env:
            md = env.metadata
            await md.register_tenant("acme", quota_bytes=350, region_quota={"eu-west": 150})
            rec = await md.register_namespace(namespace())
            r = await md.publish(rec, "acme", "us-east", [blk(1), blk(2)])
            assert (r.published, r.unchanged, r.charged_bytes) == (2, 0, 200)
            r = await md.publish(rec, "acme", "us-east", [blk(1)])
            assert (r.published, r.unchanged, r.charged_bytes) == (0, 1, 0)
            # Two more blocks would need 400 > 350 in us-east: nothing happens.
            with pytest.raises(QuotaExceeded, match="350"):
                await md.publish(rec, "acme", "us-east", [blk(3), blk(4)])
            assert (await md.tenant("acme")).used_bytes == 200
            assert await md.block(rec, blk(3).block_hash) is None
            # Quotas are per region: eu-west has its own usage and its own (smaller) quota.
            r = await md.publish(rec, "acme", "eu-west", [blk(1)])
            assert (r.published, r.charged_bytes) == (1, 100)
            with pytest.raises(QuotaExceeded, match="150"):
                await md.publish(rec, "acme", "eu-west", [blk(2)])
            t = await md.tenant("acme", region="eu-west")
            assert (t.quota_bytes, t.used_bytes, t.blocks) == (150, 100, 1)
            info = await md.block(rec, blk(1).block_hash)
            assert info is not None and info.regions == ("eu-west", "us-east")
            # Bytes that differ from the published ones are refused.
            with pytest.raises(InvalidArgument, match="differ"):
                await md.publish(
                    rec, "acme", "us-east", [PublishBlock(blk(1).block_hash, 1, 100, 7)]
                )
            # The same bytes from a version-1 frame (zlib's CRC-32: another checksum) are the
            # same block, and compare by size only; a different size is still refused.
            old = PublishBlock(blk(1).block_hash, 1, 100, 7, checksum_algorithm="crc32")
            r = await md.publish(rec, "acme", "us-east", [old])
            assert (r.published, r.unchanged) == (0, 1)
            with pytest.raises(InvalidArgument, match="differ"):
                await md.publish(rec, "acme", "us-east", [replace(old, size=99)])
            # Another tenant cannot publish into a private namespace.
            with pytest.raises(SharingNotAllowed):
                await md.publish(rec, "globex", "us-east", [blk(5)])

    run(body)


def test_lookup_finds_the_held_prefix_across_regions(tmp_path: Path) -> None:
    async def body() -> None:
        async with kv_env(tmp_path) as env:
            md = env.metadata
            rec = await md.register_namespace(namespace())
            await md.publish(rec, "acme", "us-east", [blk(1), blk(4)])
            await md.publish(rec, "acme", "ap-southeast", [blk(2)])
            hashes = [blk(i).block_hash for i in (1, 2, 3, 4)]
            found = await md.lookup(rec, hashes)
            assert [(b.index, b.regions) for b in found] == [
                (1, ("us-east",)),
                (2, ("ap-southeast",)),
            ]  # block 3 is nowhere: 4 is unusable
            assert await md.lookup(rec, hashes, regions=["eu-west"]) == []

    run(body)


def test_leases_and_pins_hold_a_copy_and_removal_refunds(tmp_path: Path) -> None:
    async def body() -> None:
        async with kv_env(tmp_path) as env:
            md = env.metadata
            rec = await md.register_namespace(namespace())
            await md.publish(rec, "acme", "us-east", [blk(1), blk(2)])
            await md.publish(rec, "acme", "eu-west", [blk(1)])
            h1, h2 = blk(1).block_hash, blk(2).block_hash
            await md.lease(rec, "us-east", [h1], "reader-1", lease_s=10)
            assert await md.evict(rec, h1, "us-east") is False  # leased
            assert await md.evict(rec, h1, "eu-west") is True  # the lease is on us-east's copy
            env.clock.advance(11 * 10**9)
            await md.pin(rec, [h1], "system-prompt", regions=["us-east"], ttl_s=5)
            assert await md.evict(rec, h1, "us-east") is False  # pinned for 5 s
            env.clock.advance(6 * 10**9)
            await md.pin(rec, [h1], "forever")
            assert await md.evict(rec, h1, "us-east") is False  # pinned until unpinned
            await md.unpin(rec, [h1], "forever")
            await md.release(rec, "us-east", [h1], "reader-1")
            assert await md.evict(rec, h1, "us-east") is True
            assert await md.block(rec, h1) is None
            assert (await md.tenant("acme")).used_bytes == 100
            # remove is for lost bytes: it ignores pins and leases.
            await md.pin(rec, [h2], "p")
            assert await md.remove(rec, [h2], "us-east") == 1
            assert await md.block(rec, h2) is None
            t = await md.tenant("acme")
            assert (t.used_bytes, t.blocks) == (0, 0)

    run(body)


def test_a_released_lease_keeps_the_copys_last_use_and_goes_with_the_copy(
    tmp_path: Path,
) -> None:
    """Releasing a lease after a load must not erase when the copy was last used (placement
    ranks copies by it), must not hold the copy, and evicting the copy takes its lease rows."""

    async def body() -> None:
        async with kv_env(tmp_path) as env:
            md = env.metadata
            rec = await md.register_namespace(namespace())
            await md.publish(rec, "acme", "us-east", [blk(1), blk(2)])
            h1, h2 = blk(1).block_hash, blk(2).block_hash
            env.clock.advance(60 * 10**9)
            await md.lease(rec, "us-east", [h1], "reader-1", lease_s=10)
            await md.lease(rec, "us-east", [h1], "reader-2", lease_s=10)
            env.clock.advance(10**9)
            await md.release(rec, "us-east", [h1], "reader-1")
            released_at = env.clock.now_ns()
            copies = {c.row.block_hash: c for c in await md.region_copies("us-east")}
            assert copies[h1].last_release_ns == released_at
            assert copies[h2].last_release_ns == 0 and copies[h2].newest_lease_ns == 0
            assert copies[h1].newest_lease_ns == released_at - 10**9 + 10 * 10**9  # reader-2's
            assert await md.evict(rec, h1, "us-east") is False  # reader-2 still holds it
            await md.release(rec, "us-east", [h1], "reader-2")
            assert await md.evict(rec, h1, "us-east") is True  # released rows hold nothing
            prefix = lease_prefix("us-east", "acme", rec.nsid, h1)
            assert await env.client.scan(prefix, prefix + "~") == []
            # remove (lost bytes) takes the lease rows too.
            await md.lease(rec, "us-east", [h2], "reader-3", lease_s=10)
            assert await md.remove(rec, [h2], "us-east") == 1
            prefix = lease_prefix("us-east", "acme", rec.nsid, h2)
            assert await env.client.scan(prefix, prefix + "~") == []

    run(body)


def test_block_stores_register_in_their_region_row(tmp_path: Path) -> None:
    async def body() -> None:
        async with kv_env(tmp_path) as env:
            md = env.metadata
            assert await md.region("eu-west") is None
            await md.register_store("eu-west", "127.0.0.1:1", capacity_bytes=10)
            await md.register_store("eu-west", "127.0.0.1:2", capacity_bytes=20)
            await md.register_store("eu-west", "127.0.0.1:1", capacity_bytes=5)
            r = await md.region("eu-west")
            assert r is not None and r.stores == ("127.0.0.1:2", "127.0.0.1:1")
            assert r.capacity_bytes == 20

    run(body)
