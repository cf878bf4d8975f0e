"""Latency in virtual time: wide-area round trips, commit-wait, bandwidth and jitter."""

from __future__ import annotations

import functools

import pytest

from k2store.cluster import ClusterConfig, ClusterSettings
from k2store.sim import SimCluster, SimNetwork, run_simulation

EPSILON_S = ClusterSettings().epsilon_us * 1e-6
TTL_S = ClusterSettings().oracle_local_ttl_us * 1e-6
COMMIT_WAIT_S = 2 * EPSILON_S + TTL_S
"""A write's timestamp is about now().latest + TTL (the batch lifetime the oracle gives a
coordinator on its own node, as each region's single node is here); commit-wait lasts until
now().earliest passes it: TTL plus both halves of the uncertainty interval (plus step
rounding)."""
REMOTE_COMMIT_WAIT_S = 2 * EPSILON_S + ClusterSettings().oracle_ttl_us * 1e-6
"""The same for a coordinator that fetches its batches from the oracle over the network: the
batch must cover the round trip, so it lives (and leads true time) the full `oracle_ttl_us`."""


def test_remote_put_costs_one_rtt_plus_commit_wait(cfg: ClusterConfig) -> None:
    async def main() -> tuple[float, str]:
        cluster = SimCluster(cfg)
        client = cluster.client("us-east")
        t0 = cluster.now_s
        w = await client.put("eu-west/user/1", b"alice")
        return cluster.now_s - t0, w.served_by

    elapsed, served_by = run_simulation(main, seed=0)
    assert served_by == "eu-west-1"
    assert elapsed == pytest.approx(0.075 + COMMIT_WAIT_S, abs=0.0002)


def test_local_get_costs_one_in_region_rtt(cfg: ClusterConfig) -> None:
    async def main() -> tuple[float, float, bytes | None]:
        cluster = SimCluster(cfg)
        client = cluster.client("us-east")
        await client.put("us-east/user/1", b"bob")
        t0 = cluster.now_s
        missing = await client.get("us-east/user/2")
        t1 = cluster.now_s
        value = await client.get("us-east/user/1")
        assert missing is None
        return t1 - t0, cluster.now_s - t1, value

    miss_s, hit_s, value = run_simulation(main, seed=0)
    assert value == b"bob"
    # The version read has long passed (the put commit-waited), so no wait on the read side.
    assert miss_s == pytest.approx(0.001, abs=1e-6)
    assert hit_s == pytest.approx(0.001, abs=1e-6)


def test_remote_get_from_each_region(cfg: ClusterConfig) -> None:
    async def main() -> dict[str, float]:
        cluster = SimCluster(cfg)
        out = {}
        for region in ("us-east", "eu-west", "ap-southeast"):
            client = cluster.client(region)
            t0 = cluster.now_s
            await client.get("ap-southeast/x")
            out[region] = cluster.now_s - t0
        return out

    rtts = run_simulation(main, seed=0)
    # Plus well under a microsecond of serialization of the small messages at 1 Gbit/s.
    assert rtts == pytest.approx(
        {"us-east": 0.210, "eu-west": 0.160, "ap-southeast": 0.001}, abs=1e-6
    )


def test_forwarding_pays_both_hops(cfg: ClusterConfig) -> None:
    async def main() -> float:
        cluster = SimCluster(cfg)
        client = cluster.client("us-east")
        t0 = cluster.now_s
        # Sent to the local node, which forwards to the eu-west leader.
        await client.get("eu-west/x", via="us-east-1")
        return cluster.now_s - t0

    assert run_simulation(main, seed=0) == pytest.approx(0.001 + 0.075, abs=1e-6)


def test_non_oracle_leader_fetches_batches_over_the_network(cfg2: ClusterConfig) -> None:
    async def main() -> tuple[str, float, int]:
        cluster = SimCluster(cfg2)
        client = cluster.client("us-east")
        key = b"us-east/a"  # shard led by us-east-2; the region's oracle is us-east-1
        t0 = cluster.now_s
        w = await client.put(key, b"v")
        elapsed = cluster.now_s - t0
        stats = cluster.network.link_stats[("us-east-2", "us-east-1")]
        return w.served_by, elapsed, stats.messages

    served_by, elapsed, batch_requests = run_simulation(main, seed=0)
    assert served_by == "us-east-2"
    assert batch_requests == 1
    # client RTT + oracle RTT + commit-wait (the batch's base is set at the oracle, half an
    # in-region RTT before the leader uses it, so the wait is that much shorter).
    assert elapsed == pytest.approx(0.001 + 0.001 + REMOTE_COMMIT_WAIT_S - 0.0005, abs=0.0002)


def test_bandwidth_queues_large_messages(cfg: ClusterConfig) -> None:
    size = 10_000_000  # 80 ms on a 1 Gbit/s link

    async def main() -> list[float]:
        cluster = SimCluster(cfg)
        done: list[float] = []

        async def put(key: str) -> None:
            await cluster.client("us-east").put(key, bytes(size))
            done.append(cluster.now_s)

        await cluster.run(
            [functools.partial(put, "eu-west/big1"), functools.partial(put, "eu-west/big2")],
            duration_s=60,
        )
        return done

    first, second = run_simulation(main, seed=0)
    transfer = size * 8 / 1e9
    assert first == pytest.approx(transfer + 0.075 + COMMIT_WAIT_S, abs=0.001)
    # The second message waited behind the first on the us-east -> eu-west link.
    assert second == pytest.approx(2 * transfer + 0.075 + COMMIT_WAIT_S, abs=0.001)


def test_rtt_and_bandwidth_change_at_run_time(cfg: ClusterConfig) -> None:
    async def main() -> tuple[float, float]:
        net = SimNetwork()
        cluster = SimCluster(cfg, network=net)
        client = cluster.client("us-east")
        net.set_rtt("us-east", "eu-west", 0.020)
        t0 = cluster.now_s
        await client.get("eu-west/x")
        t1 = cluster.now_s
        net.set_bandwidth(8e6, "us-east", "eu-west")  # 1 MB/s
        await client.put("eu-west/x", bytes(100_000))
        return t1 - t0, cluster.now_s - t1

    get_s, put_s = run_simulation(main, seed=0)
    assert get_s == pytest.approx(0.020, abs=1e-6)
    assert put_s == pytest.approx(0.020 + 0.1 + COMMIT_WAIT_S, abs=0.001)


def test_jitter_only_adds_delay(cfg: ClusterConfig) -> None:
    async def main() -> list[float]:
        cluster = SimCluster(cfg, network=SimNetwork(jitter_s=0.010))
        client = cluster.client("us-east")
        out = []
        for _ in range(20):
            t0 = cluster.now_s
            await client.get("eu-west/x")
            out.append(cluster.now_s - t0)
        return out

    samples = run_simulation(main, seed=3)
    assert all(0.075 <= s <= 0.095 + 1e-9 for s in samples)
    assert len(set(samples)) > 10


def test_trace_and_traffic_counters(cfg: ClusterConfig) -> None:
    async def main() -> SimNetwork:
        net = SimNetwork(record_trace=True)
        cluster = SimCluster(cfg, network=net)
        await cluster.client("us-east").put("eu-west/k", b"v" * 1000)
        return net

    net = run_simulation(main, seed=0)
    events = [(e.event, e.src, e.dst, e.method) for e in net.trace]
    assert events == [
        ("send", "client-us-east-1", "eu-west-1", "/k2.v1.K2/Put"),
        ("deliver", "client-us-east-1", "eu-west-1", "/k2.v1.K2/Put"),
        ("send", "eu-west-1", "client-us-east-1", "/k2.v1.K2/Put:reply"),
        ("deliver", "eu-west-1", "client-us-east-1", "/k2.v1.K2/Put:reply"),
    ]
    # one-way latency + serialization of the whole protobuf at 1 Gbit/s (8 ns per byte)
    assert net.trace[1].t_ns - net.trace[0].t_ns == 37_500_000 + net.trace[0].size * 8
    request = net.link_stats[("client-us-east-1", "eu-west-1")]
    assert (request.messages, request.dropped) == (1, 0)
    assert request.bytes == net.trace[0].size > 1000
    assert net.region_stats()[("eu-west", "us-east")].messages == 1
