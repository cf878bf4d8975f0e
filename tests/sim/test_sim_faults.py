"""Faults: partitions, drops and crashes, and what callers see; acknowledged writes survive."""

from __future__ import annotations

import asyncio

import pytest

from k2store.client import RetryPolicy
from k2store.cluster import ClusterConfig
from k2store.errors import DeadlineExceeded, Unavailable
from k2store.sim import SimCluster, SimNetwork, run_simulation

ONCE = RetryPolicy(max_attempts=1)


def test_cut_link_times_out_and_heal_restores(cfg: ClusterConfig) -> None:
    async def main() -> None:
        cluster = SimCluster(cfg)
        client = cluster.client("us-east", retry=ONCE, timeout_s=2.0)
        cluster.partition("us-east", "eu-west")
        t0 = cluster.now_s
        with pytest.raises(DeadlineExceeded, match="eu-west-1"):
            await client.put("eu-west/k", b"lost")
        assert cluster.now_s - t0 == pytest.approx(2.0)
        # Other links are unaffected.
        await client.put("us-east/k", b"here")
        await client.put("ap-southeast/k", b"there")
        cluster.heal()
        w = await client.put("eu-west/k", b"back")
        assert w.served_by == "eu-west-1"
        assert await client.get("eu-west/k") == b"back"
        stats = cluster.network.region_stats()[("us-east", "eu-west")]
        assert stats.dropped == 1

    run_simulation(main, seed=0)


def test_one_way_cut_loses_the_reply_but_not_the_write(cfg: ClusterConfig) -> None:
    async def main() -> None:
        cluster = SimCluster(cfg)
        client = cluster.client("us-east", retry=ONCE, timeout_s=1.0)
        cluster.partition("eu-west", "us-east", one_way=True)
        with pytest.raises(DeadlineExceeded):
            await client.put("eu-west/k", b"ambiguous")
        cluster.heal("eu-west", "us-east")
        # The request arrived and was applied; only the answer was lost.
        assert await client.get("eu-west/k") == b"ambiguous"

    run_simulation(main, seed=0)


def test_isolated_node_and_node_to_node_cut(cfg: ClusterConfig) -> None:
    async def main() -> None:
        cluster = SimCluster(cfg)
        client = cluster.client("us-east", retry=ONCE, timeout_s=1.0)
        # Forwarding crosses the cut node pair: the forwarding node's own call times out after
        # the cluster's request timeout (10 s), so the client's 1 s deadline fires first.
        cluster.partition("us-east-1", "eu-west-1")
        with pytest.raises(DeadlineExceeded):
            await client.get("eu-west/k", via="us-east-1")
        assert await client.get("eu-west/k") is None  # the client's own link is fine
        cluster.heal()
        cluster.isolate("us-east-1")
        with pytest.raises(DeadlineExceeded):
            await client.get("us-east/k")
        cluster.heal()
        assert await client.get("us-east/k") is None

    run_simulation(main, seed=0)


def test_drops_are_retried_by_the_client(cfg: ClusterConfig) -> None:
    async def main() -> int:
        net = SimNetwork(drop_probability=0.2)
        cluster = SimCluster(cfg, network=net)
        client = cluster.client("us-east", retry=RetryPolicy(max_attempts=20), timeout_s=0.5)
        for i in range(20):
            await client.put(f"eu-west/k{i}", b"v")
        net.set_drop_probability(0.0)
        for i in range(20):
            assert await client.get(f"eu-west/k{i}") == b"v"
        return client.retries

    assert run_simulation(main, seed=11) > 0


def test_acknowledged_puts_survive_a_crash(cfg: ClusterConfig) -> None:
    async def main() -> None:
        cluster = SimCluster(cfg)
        client = cluster.client("us-east", retry=ONCE)
        acked = {}
        last_ts = 0
        for i in range(50):
            w = await client.put(f"us-east/k{i % 7}", f"v{i}".encode())
            acked[f"us-east/k{i % 7}"] = f"v{i}".encode()
            last_ts = max(last_ts, w.commit_ts)
        reads = [await client.get_versioned(k) for k in acked]
        last_read = max(r.read_ts for r in reads)

        cluster.crash("us-east-1")
        t0 = cluster.now_s
        with pytest.raises(Unavailable, match="connection refused"):
            await client.get("us-east/k0")
        assert cluster.now_s - t0 == pytest.approx(0.001, abs=1e-6)  # refused after one RTT

        await cluster.restart("us-east-1")
        for k, v in acked.items():
            assert await client.get(k) == v
        # The new incarnation orders everything after what the old one issued or served.
        w = await client.put("us-east/k0", b"after")
        assert w.commit_ts > max(last_ts, last_read)
        assert await client.get("us-east/k0") == b"after"
        assert cluster.node("us-east-1").boots == 2
        assert not cluster.network.internal_errors

    run_simulation(main, seed=0)


def test_crash_mid_request_resets_the_connection(cfg: ClusterConfig) -> None:
    async def main() -> None:
        cluster = SimCluster(cfg)
        client = cluster.client("us-east", retry=ONCE)

        async def crash_during_commit_wait() -> None:
            await asyncio.sleep(0.0376)  # the request reached eu-west at 37.5 ms
            cluster.crash("eu-west-1")

        task = cluster.loop.create_task(crash_during_commit_wait())
        with pytest.raises(Unavailable, match="crashed serving"):
            await client.put("eu-west/k", b"unacknowledged")
        await task
        await cluster.restart("eu-west-1")
        # The write was installed before the commit-wait: not acknowledged, yet durable.
        assert await client.get("eu-west/k") == b"unacknowledged"

    run_simulation(main, seed=0)


def test_crashed_oracle_stalls_its_region_until_restart(cfg2: ClusterConfig) -> None:
    async def main() -> None:
        cluster = SimCluster(cfg2)
        client = cluster.client("us-east", retry=ONCE, timeout_s=30)
        await client.put(b"us-east/a", b"1")  # led by us-east-2, oracle us-east-1
        cluster.crash("us-east-1")
        # us-east-2 has a live batch for a while (TTL 2 ms); after that it cannot get
        # timestamps, and its oracle call is refused.
        await asyncio.sleep(0.01)
        with pytest.raises(Unavailable):
            await client.put(b"us-east/a", b"2")
        await cluster.restart("us-east-1")
        await client.put(b"us-east/a", b"3")
        assert await client.get(b"us-east/a") == b"3"

    run_simulation(main, seed=0)


def test_a_restarted_oracle_gives_every_coordinator_its_old_slot(cfg2: ClusterConfig) -> None:
    """Coordinators make timestamps of their own above their batches' bases (future, client,
    restamp), beyond the oracle's ceiling: after an oracle restart no other coordinator may get
    their slot, whatever order they ask in."""

    async def main() -> None:
        cluster = SimCluster(cfg2)
        client = cluster.client("us-east", retry=ONCE, timeout_s=30)
        await client.put(b"us-east/a", b"1")
        before = cluster.node("us-east-1").service
        assert before is not None and before.oracle is not None
        before._issue("us-east-2/future", 1)
        slots = before.oracle.slots
        assert set(slots) == {"us-east-2", "us-east-2/future"}
        cluster.crash("us-east-1")
        await cluster.restart("us-east-1")
        after = cluster.node("us-east-1").service
        assert after is not None and after.oracle is not None
        assert after._issue("a-newcomer", 1).slot not in slots.values()  # asks first
        await client.put(b"us-east/a", b"2")
        assert slots.items() <= after.oracle.slots.items()

    run_simulation(main, seed=0)


def test_a_restarted_coordinator_makes_no_timestamp_below_one_it_made_before(
    cfg: ClusterConfig,
) -> None:
    """A coordinator's future timestamps run up to a one-way delay ahead of its clock, beyond
    the oracle's high water: the node's durable ceiling covers each before it is used, and a
    restarted node waits it out, so a quick restart cannot give a timestamp again."""

    async def main() -> None:
        cluster = SimCluster(cfg)
        client = cluster.client("us-east", retry=ONCE, timeout_s=30)
        await client.put(b"us-east/a", b"1")
        service = cluster.node("us-east-1").service
        assert service is not None
        far = await service.coordinator._future_timestamp(service.tt.now().latest + 100_000_000)
        cluster.crash("us-east-1")
        await cluster.restart("us-east-1")
        service = cluster.node("us-east-1").service
        assert service is not None
        assert service.tt.now().earliest > far  # the restart waited until it had passed
        near = await service.coordinator._future_timestamp(service.tt.now().latest + 1_000_000)
        assert near > far
        assert await client.get(b"us-east/a") == b"1"

    run_simulation(main, seed=0)
