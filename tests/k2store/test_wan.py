"""Wide-area emulation: the pure link model, its files, and GrpcTransport paying it on loopback."""

from __future__ import annotations

import asyncio
import random
import sys
import tomllib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from k2store import cluster as cluster_mod
from k2store.cluster import ClusterConfig, ClusterSettings, local_cluster
from k2store.errors import ClusterFileError, DeadlineExceeded, Unavailable
from k2store.launcher import free_ports
from k2store.transport import GrpcTransport, WanEmulation, cluster_transport
from k2store.wan import (
    DEFAULT_RTT_MS,
    OVERRIDES_FILE,
    LinkCut,
    LinkModel,
    LinkOverride,
    NetOverrides,
    NetworkSettings,
    overrides_to_toml,
    parse_network,
    parse_overrides,
    read_overrides,
    write_overrides,
)
from truetime import SystemClock

REGIONS = ["us-east", "eu-west", "ap-southeast"]
ON = NetworkSettings(enabled=True)
RNG = random.Random(0)


def one_way(model: LinkModel, a: str, b: str, nbytes: int = 0) -> float:
    return model.delay_for(a, b, nbytes, RNG)


# -- the pure model -----------------------------------------------------------------------------


def test_defaults_are_designs_matrix_and_symmetric() -> None:
    m = LinkModel(ON)
    assert one_way(m, "us-east", "eu-west") == pytest.approx(0.0375)
    assert one_way(m, "us-east", "ap-southeast") == pytest.approx(0.105)
    assert one_way(m, "eu-west", "ap-southeast") == pytest.approx(0.080)
    assert one_way(m, "eu-west", "eu-west") == pytest.approx(0.0005)
    assert one_way(m, "us-east", "mars") == pytest.approx(0.050)  # default_rtt_ms
    for a in REGIONS:
        for b in REGIONS:
            assert one_way(m, a, b, 4096) == one_way(m, b, a, 4096)
    assert ON.bandwidth_mbit == 1000.0


def test_disabled_settings_delay_nothing_but_overrides_still_apply() -> None:
    off = LinkModel(NetworkSettings())
    assert not off.is_active()
    assert one_way(off, "us-east", "ap-southeast", 10**8) == 0.0
    o = NetOverrides().with_link("us-east", "eu-west", LinkOverride(rtt_ms=20.0))
    m = LinkModel(NetworkSettings(), o)
    assert m.is_active()
    assert one_way(m, "eu-west", "us-east") == pytest.approx(0.010)
    assert one_way(m, "eu-west", "ap-southeast") == 0.0


def test_bandwidth_term_on_inter_region_links_only() -> None:
    m = LinkModel(ON)
    kv_cache = 94_000_000  # bytes: 752 Mbit at 1 Gbit/s
    assert one_way(m, "us-east", "eu-west", kv_cache) == pytest.approx(0.0375 + 0.752)
    assert one_way(m, "us-east", "us-east", kv_cache) == pytest.approx(0.0005)
    unlimited = LinkModel(replace(ON, bandwidth_mbit=0.0))
    assert one_way(unlimited, "us-east", "eu-west", kv_cache) == pytest.approx(0.0375)
    slow = LinkModel(ON, NetOverrides().with_link(None, None, LinkOverride(bandwidth_mbit=8.0)))
    assert one_way(slow, "eu-west", "ap-southeast", 1000) == pytest.approx(0.080 + 0.001)


def test_jitter_is_bounded_and_replays_with_the_seed() -> None:
    m = LinkModel(replace(ON, jitter_ms=10.0))

    def draws(seed: int) -> list[float]:
        rng = random.Random(seed)
        return [m.delay_for("us-east", "eu-west", 0, rng) for _ in range(200)]

    a = draws(7)
    assert a == draws(7)
    assert a != draws(8)
    assert all(0.0375 <= d <= 0.0475 for d in a)
    assert max(a) - min(a) > 0.005  # it does vary
    # No jitter: the generator is not touched, so other users of it replay unchanged.
    rng = random.Random(3)
    state = rng.getstate()
    LinkModel(ON).delay_for("us-east", "eu-west", 0, rng)
    assert rng.getstate() == state


def test_override_precedence_pair_over_all_over_base() -> None:
    o = (
        NetOverrides()
        .with_link(None, None, LinkOverride(rtt_ms=50.0, jitter_ms=1.0))
        .with_link("us-east", "eu-west", LinkOverride(rtt_ms=150.0))
        .with_link("ap-southeast", None, LinkOverride(rtt_ms=4.0))
    )
    m = LinkModel(ON, o)
    p = m.link("eu-west", "us-east")
    assert (p.rtt_ms, p.jitter_ms, p.bandwidth_mbit) == (150.0, 1.0, 1000.0)
    assert m.link("eu-west", "ap-southeast").rtt_ms == 50.0
    assert m.link("ap-southeast", "ap-southeast").rtt_ms == 4.0
    assert m.link("us-east", "us-east").jitter_ms == 0.0  # `all` is inter-region only
    rows = m.describe(["us-east", "eu-west"])
    assert [(a, b) for a, b, _ in rows] == [
        ("us-east", "us-east"),
        ("us-east", "eu-west"),
        ("eu-west", "eu-west"),
    ]


def test_partitions_two_way_one_way_isolation_and_by_node() -> None:
    def cut(o: NetOverrides, src: str, dst: str, sn: str | None = None) -> bool:
        try:
            LinkModel(ON, o).delay_for(src, dst, 0, RNG, src_node=sn)
        except LinkCut:
            return True
        return False

    two = NetOverrides().with_cut("us-east", "eu-west")
    assert cut(two, "us-east", "eu-west") and cut(two, "eu-west", "us-east")
    assert not cut(two, "us-east", "ap-southeast")
    one = NetOverrides().with_cut("us-east", "eu-west", one_way=True)
    assert cut(one, "us-east", "eu-west") and not cut(one, "eu-west", "us-east")
    iso = NetOverrides().with_isolated("ap-southeast")
    assert cut(iso, "ap-southeast", "us-east") and cut(iso, "eu-west", "ap-southeast")
    assert not cut(iso, "ap-southeast", "ap-southeast") and not cut(iso, "us-east", "eu-west")
    node = NetOverrides().with_isolated("us-east-1")
    assert cut(node, "us-east", "us-east", sn="us-east-1")
    assert not cut(node, "us-east", "us-east", sn="us-east-2")
    with pytest.raises(LinkCut, match=r"us-east -> eu-west is cut \(cut us-east -> eu-west\)"):
        LinkModel(ON, one).delay_for("us-east", "eu-west", 0, RNG)
    with pytest.raises(ValueError, match="itself"):
        NetOverrides().with_cut("a", "a")

    both = two.with_isolated("ap-southeast").with_cut("us-east-1", "eu-west", one_way=True)
    assert both.healed("us-east") == iso.with_cut("us-east-1", "eu-west", one_way=True)
    assert both.healed("ap-southeast") == two.with_cut("us-east-1", "eu-west", one_way=True)
    assert both.healed("eu-west", "us-east").cuts == {("us-east-1", "eu-west")}
    assert both.healed().cuts == frozenset() and not both.healed().isolated
    lat = NetOverrides().with_link("us-east", "eu-west", LinkOverride(rtt_ms=1.0))
    assert lat.with_cut("a", "b").healed() == lat  # heal keeps latency overrides


def test_overrides_round_trip_through_text_and_file(tmp_path: Path) -> None:
    o = (
        NetOverrides()
        .with_link(None, None, LinkOverride(jitter_ms=2.5))
        .with_link("us-east", "eu-west", LinkOverride(rtt_ms=150.0, bandwidth_mbit=100.0))
        .with_link("eu-west", None, LinkOverride(rtt_ms=3.0))
        .with_cut("ap-southeast", "us-east-1", one_way=True)
        .with_isolated("eu-west-2")
    )
    assert parse_overrides(tomllib.loads(overrides_to_toml(o))) == o
    path = tmp_path / OVERRIDES_FILE
    assert read_overrides(path) == NetOverrides()
    write_overrides(path, o)
    assert read_overrides(path) == o
    assert [p.name for p in tmp_path.iterdir()] == [OVERRIDES_FILE]  # no temp file left
    write_overrides(path, o.healed().with_link(None, None, LinkOverride()))
    assert read_overrides(path).cuts == frozenset()
    write_overrides(path, NetOverrides())
    assert not path.exists()


@pytest.mark.parametrize(
    ("table", "field"),
    [
        ({"enabled": 1}, "network.enabled"),
        ({"jitter_ms": -1}, "network.jitter_ms"),
        ({"bandwidth_mbit": True}, "network.bandwidth_mbit"),
        ({"intra_region_rtt_ms": float("nan")}, "network.intra_region_rtt_ms"),
        ({"latency": 3}, "network.latency"),
        ({"rtt_ms": {"us-east": {"eu-west": "75"}}}, "network.rtt_ms.us-east.eu-west"),
        ({"rtt_ms": {"us-east": {"mars": 75}}}, "network.rtt_ms.us-east.mars"),
        ({"rtt_ms": {"us-east": {"us-east": 1}}}, "network.rtt_ms.us-east.us-east"),
        ({"rtt_ms": {"us-east": 75}}, "network.rtt_ms.us-east"),
        (
            {"rtt_ms": {"us-east": {"eu-west": 75}, "eu-west": {"us-east": 80}}},
            "network.rtt_ms.eu-west.us-east",
        ),
    ],
)
def test_bad_network_table_names_the_field(table: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        parse_network(table, regions=REGIONS)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"all": {"rtt_ms": -5}}, "all.rtt_ms"),
        ({"all": {"latency": 5}}, "all.latency"),
        ({"links": [{"regions": ["a", "b", "c"], "rtt_ms": 1}]}, r"links\[0\].regions"),
        ({"links": [{"regions": ["a", "b"], "rtt": 1}]}, r"links\[0\].rtt"),
        ({"cuts": [{"from": "a"}]}, r"cuts\[0\].to"),
        ({"cuts": [{"from": "a", "to": "a"}]}, r"cuts\[0\].to"),
        ({"isolated": "a"}, "isolated"),
        ({"partitions": []}, "net.partitions"),
    ],
)
def test_bad_overrides_name_the_field(raw: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        parse_overrides(raw)


def test_cluster_file_network_table_round_trip_and_errors(tmp_path: Path) -> None:
    st = ClusterSettings(network=replace(ON, jitter_ms=2.0, bandwidth_mbit=500.0))
    cfg = local_cluster(REGIONS, [1, 2, 3], root=tmp_path, settings=st)
    back = cluster_mod.parse(tomllib.loads(cfg.to_toml()), path=tmp_path / "cluster.toml")
    assert back.settings.network == cfg.settings.network == st.network
    # A two-region cluster keeps only its own pairs in the file, and still parses.
    two = local_cluster(["us-east", "eu-west"], [1, 2], root=tmp_path, settings=st)
    assert two.settings.network.rtt_ms == {frozenset({"us-east", "eu-west"}): 75.0}
    # No [network] table: emulation off (a real deployment has a real network).
    text = cfg.to_toml()
    start = text.index("[network]")
    plain = text[:start] + text[text.index("[[regions]]") :]
    assert not cluster_mod.parse(tomllib.loads(plain)).settings.network.enabled
    path = tmp_path / "bad.toml"
    path.write_text(text.replace("jitter_ms = 2.0", "jitter_ms = -2.0"))
    with pytest.raises(ClusterFileError, match=r"bad.toml: network.jitter_ms: must be"):
        cluster_mod.load(path)
    path.write_text(text.replace("eu-west = { ap-southeast", "eu-wst = { ap-southeast"))
    with pytest.raises(ClusterFileError, match=r"network.rtt_ms.eu-wst: region 'eu-wst'"):
        cluster_mod.load(path)


def test_sim_and_emulation_share_designs_matrix() -> None:
    from k2store.sim.network import DEFAULT_RTT_S, INTRA_REGION_RTT_S

    assert {k: v * 1000 for k, v in DEFAULT_RTT_S.items()} == pytest.approx(dict(DEFAULT_RTT_MS))
    assert pytest.approx(ON.intra_region_rtt_ms) == INTRA_REGION_RTT_S * 1000


# -- GrpcTransport on loopback ------------------------------------------------------------------

HEALTH = "/grpc.health.v1.Health/Check"


@asynccontextmanager
async def health_servers(cfg: ClusterConfig) -> AsyncIterator[None]:
    """A gRPC health service at every node's address: the cheapest real server to call."""
    servers = []
    for n in cfg.nodes:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        server.add_insecure_port(n.address)
        await server.start()
        servers.append(server)
    try:
        yield
    finally:
        for s in servers:
            await s.stop(0)


async def timed_check(t: GrpcTransport, node: str, timeout_s: float = 2.0) -> float:
    loop = asyncio.get_running_loop()
    start = loop.time()
    r = await t.call(
        node,
        HEALTH,
        health_pb2.HealthCheckRequest(),
        health_pb2.HealthCheckResponse,
        timeout_s=timeout_s,
    )
    assert r.status == health_pb2.HealthCheckResponse.SERVING
    return loop.time() - start


def test_transport_pays_one_rtt_across_regions_and_honours_partitions(tmp_path: Path) -> None:
    rtt_s = 0.2
    net = NetworkSettings(
        enabled=True,
        rtt_ms={frozenset({"us-east", "eu-west"}): rtt_s * 1000},
        intra_region_rtt_ms=0.0,
    )
    cfg = local_cluster(
        ["us-east", "eu-west"],
        free_ports(2),
        root=tmp_path,
        settings=ClusterSettings(network=net),
    ).write(tmp_path / "cluster.toml")
    overrides = tmp_path / OVERRIDES_FILE

    async def main() -> None:
        async with health_servers(cfg):
            t = cluster_transport(cfg, region="us-east", check_interval_s=0.0)
            try:
                await timed_check(t, "us-east-1")  # connect both channels before timing
                await timed_check(t, "eu-west-1")
                local = await timed_check(t, "us-east-1")
                remote = await timed_check(t, "eu-west-1")
                assert local < 0.05
                assert rtt_s <= remote < rtt_s + 0.1

                write_overrides(overrides, NetOverrides().with_isolated("eu-west"))
                loop = asyncio.get_running_loop()
                start = loop.time()
                with pytest.raises(Unavailable, match="eu-west is isolated"):
                    await timed_check(t, "eu-west-1")
                assert loop.time() - start < 0.05  # at once: nothing was sent
                assert await timed_check(t, "us-east-1") < 0.05

                # The reply direction cut: the request ran, the answer is lost at the deadline.
                one_way = NetOverrides().with_cut("eu-west", "us-east", one_way=True)
                write_overrides(overrides, one_way)
                start = loop.time()
                with pytest.raises(DeadlineExceeded, match="reply was lost"):
                    await timed_check(t, "eu-west-1", timeout_s=0.4)
                assert 0.4 <= loop.time() - start < 0.5

                # A deadline shorter than the round trip expires, even with the link whole.
                write_overrides(overrides, NetOverrides())
                with pytest.raises(DeadlineExceeded):
                    await timed_check(t, "eu-west-1", timeout_s=0.15)
                assert rtt_s <= await timed_check(t, "eu-west-1") < rtt_s + 0.1
            finally:
                await t.close()

    asyncio.run(main())


def test_node_calling_itself_pays_nothing_and_disabled_costs_no_model() -> None:
    wan = WanEmulation(ON, region="us-east", node="us-east-1", regions_of={"eu-west-1": "eu-west"})
    assert not wan.applies_to("us-east-1") and wan.applies_to("eu-west-1")
    assert wan.delay(0.0, "eu-west-1", 0, outbound=True) == pytest.approx(0.0375)
    off = WanEmulation(NetworkSettings(), region="us-east", regions_of={})
    assert off.delay(0.0, "eu-west-1", 10**9, outbound=False) == 0.0


# -- a real cluster -----------------------------------------------------------------------------


@pytest.mark.slow
def test_cluster_up_emulates_wan_and_cli_partitions_it(tmp_path: Path) -> None:
    from k2store import cli, launcher
    from k2store.client import Client, RetryPolicy

    cfg = launcher.up(tmp_path, regions=["us-east", "eu-west"], progress=False)
    try:
        assert cfg.settings.network.enabled
        with Client(cfg, region="us-east", retry=RetryPolicy(max_attempts=1)) as c:
            c.put(b"eu-west/warm", b"x")
            c.put(b"us-east/warm", b"x")
            clock = SystemClock()
            took = []
            for key in (b"us-east/k", b"eu-west/k"):
                start = clock.monotonic_ns()
                c.put(key, b"v")
                took.append((clock.monotonic_ns() - start) / 1e9)
            local, remote = took
            assert remote >= 0.075 and remote > local + 0.05
            assert (
                cli.main(["cluster", "net", "partition", "eu-west", "--data", str(tmp_path)]) == 0
            )
            asyncio.run(asyncio.sleep(0.25))  # every process re-reads within ~0.1 s
            with pytest.raises(Unavailable, match="isolated"):
                c.put(b"eu-west/k", b"w")
            assert cli.main(["cluster", "net", "heal", "--data", str(tmp_path)]) == 0
            asyncio.run(asyncio.sleep(0.25))
            c.put(b"eu-west/k", b"w")
    finally:
        launcher.down(cfg)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
