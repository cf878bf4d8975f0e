"""Sessions in the simulator: a three-region cluster on a virtual clock, production client and
transactions. Create, append, read from another region, move, expire, list, tenant isolation,
and concurrent appends from two regions that must all land, in order."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from k2store.client import RetryPolicy
from k2store.cluster import DEFAULT_REGIONS, ClusterConfig, local_cluster
from k2store.errors import InvalidArgument
from k2store.sim import SimCluster, VirtualClock, current_sim_loop, run_simulation
from kvtier.sessions import (
    Consistency,
    SessionExpired,
    SessionNotFound,
    SessionStore,
    TurnInput,
    parse_session_id,
    session_keys,
)
from truetime import ManualClock

T = TypeVar("T")
US, EU, AP = DEFAULT_REGIONS
RETRY = RetryPolicy(max_attempts=50, initial_backoff_s=0.005, max_backoff_s=0.2)


@pytest.fixture(scope="module")
def cfg() -> ClusterConfig:
    return local_cluster(DEFAULT_REGIONS, ports=[1, 2, 3], root=Path("/nonexistent-sim"))


def sim(
    cfg: ClusterConfig,
    body: Callable[[SimCluster, dict[str, SessionStore]], Awaitable[T]],
    *,
    seed: int = 1,
    clock: ManualClock | None = None,
) -> T:
    async def main() -> T:
        cluster = SimCluster(cfg, seed=seed)
        src = clock or VirtualClock(current_sim_loop())
        stores = {
            r: SessionStore(
                cluster.txn_client(r, retry=RETRY), src, rng=random.Random(f"{seed}:{r}")
            )
            for r in DEFAULT_REGIONS
        }
        return await body(cluster, stores)

    return run_simulation(main, seed=seed)


def test_create_append_read_from_another_region(cfg: ClusterConfig) -> None:
    async def body(cluster: SimCluster, s: dict[str, SessionStore]) -> None:
        info = await s[US].create("acme", "smollm2", ttl_s=60)
        assert info.home_region == US and info.num_turns == 0
        assert parse_session_id(info.session_id)[0] == US
        r1 = await s[US].append(
            "acme", info.session_id, TurnInput("user", [1, 2, 3], ["aa", "bb"], "hi")
        )
        assert (r1.index, r1.num_turns) == (0, 1) and r1.commit_ts > 0
        # Read-your-writes from eu-west right after the us-east append committed.
        got = await s[EU].get("acme", info.session_id)
        assert [t.role for t in got.turns] == ["user"]
        assert got.token_ids == (1, 2, 3) and got.block_keys == ("aa", "bb")
        assert got.turns[0].region == US and got.info.num_tokens == 3
        r2 = await s[EU].append("acme", info.session_id, TurnInput("assistant", [4], ["cc"]))
        assert r2.index == 1
        # A replica read in ap-southeast: read-your-writes at the caller's last commit, and,
        # once that is visible there, no wide-area round trip.
        again = await s[AP].get(
            "acme", info.session_id, consistency=Consistency.REPLICA, min_commit_ts=r2.commit_ts
        )
        assert again.token_ids == (1, 2, 3, 4) and again.turns[1].region == EU
        t0 = cluster.now_s
        local = await s[AP].get(
            "acme", info.session_id, consistency=Consistency.REPLICA, min_commit_ts=r2.commit_ts
        )
        assert local.token_ids == (1, 2, 3, 4) and (cluster.now_s - t0) < 0.01
        tail = await s[AP].get("acme", info.session_id, from_turn=1)
        assert [t.index for t in tail.turns] == [1]

    sim(cfg, body)


def test_turns_are_separate_keys_and_append_does_not_rewrite_history(cfg: ClusterConfig) -> None:
    async def body(cluster: SimCluster, s: dict[str, SessionStore]) -> None:
        info = await s[US].create("acme", "m", name="big")
        for i in range(5):
            await s[US].append("acme", info.session_id, TurnInput("user", [i]))
        keys = session_keys("acme", info.session_id, US)
        c = s[US].client
        rows = await c.scan(keys.turn_prefix, keys.turn_prefix[:-1] + b"0")
        assert [k[len(keys.turn_prefix) :] for k, _ in rows] == [b"%010d" % i for i in range(5)]
        versions = [(await c.get_versioned(k)).version_ts for k, _ in rows]
        assert versions == sorted(versions) and len(set(versions)) == 5  # each written once

    sim(cfg, body)


def test_concurrent_appends_from_two_regions_all_land_in_order(cfg: ClusterConfig) -> None:
    per_writer = 6

    async def body(cluster: SimCluster, s: dict[str, SessionStore]) -> list[str]:
        info = await s[US].create("acme", "m", name="chat")
        sid = info.session_id
        done: list[tuple[str, int]] = []  # (text, index the append reported)

        async def writer(region: str) -> None:
            for i in range(per_writer):
                r = await s[region].append("acme", sid, TurnInput("user", [i], text=f"{region}{i}"))
                done.append((f"{region}{i}", r.index))

        finished = await cluster.run([lambda: writer(US), lambda: writer(EU)], 120.0)
        assert finished
        got = await s[AP].get("acme", sid)
        texts = [t.text for t in got.turns]
        assert len(texts) == 2 * per_writer and got.info.num_turns == 2 * per_writer
        assert [t.index for t in got.turns] == list(range(2 * per_writer))
        for region in (US, EU):  # each writer's turns appear in the order it appended them
            assert [t for t in texts if t.startswith(region)] == [
                f"{region}{i}" for i in range(per_writer)
            ]
        # Each append reported the index its turn landed at.
        assert sorted(done, key=lambda d: d[1]) == [(t.text, t.index) for t in got.turns]
        assert s[US].client.retries + s[EU].client.retries > 0, "expected some conflicts"
        return texts

    texts = sim(cfg, body, seed=7)
    assert texts == sim(cfg, body, seed=7)  # deterministic replay


def test_append_is_idempotent_per_turn_id(cfg: ClusterConfig) -> None:
    async def body(cluster: SimCluster, s: dict[str, SessionStore]) -> None:
        sid = (await s[US].create("acme", "m")).session_id
        a = await s[US].append("acme", sid, TurnInput("user", [1], turn_id="t-1"))
        b = await s[EU].append("acme", sid, TurnInput("user", [1], turn_id="t-1"))
        assert (a.index, a.duplicate) == (0, False)
        assert (b.index, b.duplicate) == (0, True)
        assert (await s[US].get("acme", sid)).info.num_turns == 1
        assert s[EU].stats.duplicate_appends == 1

    sim(cfg, body)


def test_move_home_then_read_and_append_everywhere(cfg: ClusterConfig) -> None:
    async def body(cluster: SimCluster, s: dict[str, SessionStore]) -> None:
        sid = (await s[US].create("acme", "m")).session_id
        await s[US].append("acme", sid, TurnInput("user", [1, 2], ["h1"]))
        moved = await s[EU].move("acme", sid, EU)
        assert moved.home_region == EU
        c = s[US].client
        old, new = session_keys("acme", sid, US), session_keys("acme", sid, EU)
        assert await c.get(old.record) is None and await c.get(old.turn(0)) is None
        assert await c.get(new.record) is not None and await c.get(new.turn(0)) is not None
        # us-east still has the old home cached: the locator corrects it.
        await s[US].append("acme", sid, TurnInput("assistant", [3]))
        for r in DEFAULT_REGIONS:
            got = await s[r].get("acme", sid)
            assert got.info.home_region == EU and got.token_ids == (1, 2, 3)
        with pytest.raises(InvalidArgument, match="not in the cluster"):
            await s[US].move("acme", sid, "mars")

    sim(cfg, body)


def test_ttl_expiry_with_an_injected_clock(cfg: ClusterConfig) -> None:
    clock = ManualClock(start_ns=1_700_000_000 * 10**9)

    async def body(cluster: SimCluster, s: dict[str, SessionStore]) -> None:
        short = (await s[US].create("acme", "m", ttl_s=10)).session_id
        long = (await s[US].create("acme", "m", ttl_s=100)).session_id
        clock.advance(8 * 10**9)
        await s[US].append("acme", short, TurnInput("user", [1]))  # sliding: now expires at 18 s
        clock.advance(8 * 10**9)
        assert (await s[EU].get("acme", short)).info.num_turns == 1
        clock.advance(3 * 10**9)
        with pytest.raises(SessionExpired):
            await s[EU].get("acme", short)
        with pytest.raises(SessionExpired):
            await s[US].append("acme", short, TurnInput("user", [2]))
        assert [i.session_id for i in await s[AP].list_sessions("acme")] == [long]
        assert len(await s[AP].list_sessions("acme", include_expired=True)) == 2
        assert await s[US].sweep_expired("acme") == 1
        with pytest.raises(SessionNotFound) as e:
            await s[US].get("acme", short)
        assert not isinstance(e.value, SessionExpired)
        assert [i.session_id for i in await s[US].list_sessions("acme")] == [long]

    sim(cfg, body, clock=clock)


def test_tenant_isolation_and_listing(cfg: ClusterConfig) -> None:
    async def body(cluster: SimCluster, s: dict[str, SessionStore]) -> None:
        a1 = (await s[US].create("acme", "m", name="one")).session_id
        a2 = (await s[EU].create("acme", "m", name="two")).session_id
        b1 = (await s[US].create("beta", "m", name="one")).session_id
        assert a1 == b1 == f"{US}:one"  # same id, different tenants: different sessions
        await s[US].append("beta", b1, TurnInput("user", [99]))
        assert (await s[US].get("acme", a1)).info.num_turns == 0
        assert [i.session_id for i in await s[AP].list_sessions("acme")] == sorted([a1, a2])
        assert [i.session_id for i in await s[AP].list_sessions("beta")] == [b1]
        assert await s[AP].list_sessions("gamma") == []
        with pytest.raises(SessionNotFound):
            await s[US].get("gamma", a1)
        with pytest.raises(SessionNotFound):
            await s[US].append("beta", a2, TurnInput("user", [1]))
        with pytest.raises(InvalidArgument):
            await s[US].get("acme/../beta", a1)
        with pytest.raises(InvalidArgument, match="exists"):
            await s[US].create("acme", "m", name="one")
        assert await s[US].delete("acme", a2) and not await s[US].delete("acme", a2)
        assert [i.session_id for i in await s[AP].list_sessions("acme")] == [a1]

    sim(cfg, body)


@pytest.mark.parametrize(
    "bad",
    [
        lambda s: s.create("", "m"),
        lambda s: s.create("t", ""),
        lambda s: s.create("t", "m", ttl_s=0),
        lambda s: s.create("t", "m", home="nowhere"),
        lambda s: s.get("t", "no-colon"),
        lambda s: s.append("t", "us-east:x", TurnInput("user", [-1])),
        lambda s: s.append("t", "us-east:x", TurnInput("")),
        lambda s: s.get("t", "us-east:x", from_turn=-1),
    ],
)
def test_bad_input_is_refused(
    cfg: ClusterConfig, bad: Callable[[SessionStore], Awaitable[object]]
) -> None:
    async def body(cluster: SimCluster, s: dict[str, SessionStore]) -> None:
        with pytest.raises(InvalidArgument):
            await bad(s[US])

    sim(cfg, body)


def test_sessions_on_a_real_in_process_cluster(tmp_path: Path) -> None:
    """The same operations over gRPC on loopback: nodes in-process, a manual clock."""
    from dataclasses import replace

    from k2store.client import AsyncClient
    from k2store.cluster import ClusterSettings, TxnSettings
    from k2store.launcher import free_ports
    from k2store.node import Node

    txn = TxnSettings(push_after_s=0.02, expiry_s=0.3, heartbeat_s=0.05, client_timeout_s=5.0)
    settings = replace(ClusterSettings(), txn=txn)
    cfg = local_cluster(list(DEFAULT_REGIONS), free_ports(3), root=tmp_path, settings=settings)
    cfg = cfg.write(tmp_path / "cluster.toml")
    clock = ManualClock()
    retry = RetryPolicy(max_attempts=30, initial_backoff_s=0.001, max_backoff_s=0.01)

    async def body() -> None:
        nodes = [Node(cfg, n.name, clock=clock) for n in cfg.nodes]
        for node in nodes:
            await node.start()
        clients = {r: AsyncClient(cfg, timeout_s=5, retry=retry, region=r) for r in (US, EU)}
        try:
            us = SessionStore(clients[US], clock, rng=random.Random(1))
            eu = SessionStore(clients[EU], clock, rng=random.Random(2))
            sid = (await us.create("acme", "smollm2")).session_id
            await us.append("acme", sid, TurnInput("user", [1, 2], ["b0"]))
            got = await eu.get("acme", sid)
            assert got.token_ids == (1, 2) and got.turns[0].region == US
            await eu.move("acme", sid, EU)
            await us.append("acme", sid, TurnInput("assistant", [3]))
            assert (await eu.get("acme", sid)).token_ids == (1, 2, 3)
            assert await eu.list_sessions("beta") == []
        finally:
            for c in clients.values():
                await c.close()
            for node in nodes:
                await node.stop(grace_s=0)

    asyncio.run(body())


def test_long_sessions_are_read_and_moved_page_by_page(
    cfg: ClusterConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kvtier.sessions as sessions_mod

    monkeypatch.setattr(sessions_mod, "_SCAN_PAGE", 4)

    async def body(cluster: SimCluster, s: dict[str, SessionStore]) -> None:
        sid = (await s[US].create("acme", "m")).session_id
        for i in range(11):
            await s[US].append("acme", sid, TurnInput("user", [i]))
        assert (await s[EU].get("acme", sid)).token_ids == tuple(range(11))
        assert [t.index for t in (await s[EU].get("acme", sid, from_turn=5)).turns] == list(
            range(5, 11)
        )
        await s[US].move("acme", sid, AP)
        got = await s[EU].get("acme", sid)
        assert got.info.home_region == AP and got.token_ids == tuple(range(11))

    sim(cfg, body)
