"""The cache-aware router: prefix first, then load, then RTT; events and resyncs move the ranking;
tenants never get credit for each other's blocks; and one run through a real broker."""

from __future__ import annotations

import asyncio
import json
import random
import sys
from typing import Any

import pytest

from k2store.errors import InvalidArgument
from kvtier.broker import EmbeddedBroker
from kvtier.events import BlockEvent, EventKind, EventPublisher, ReconnectPolicy, ResyncRequest
from kvtier.router import (
    SHARED_TENANT,
    HolderSnapshot,
    Router,
    RouterConfig,
    RouterRegistration,
    RouterService,
    parse_node_spec,
    parse_rtt_spec,
    post_json,
    registration_request,
    serve_router,
)
from truetime import ManualClock

H = [f"{i:016x}" for i in range(8)]  # a request's chained block hashes
US, EU, AP = "us-east", "eu-west", "ap-southeast"

_seq: dict[str, int] = {}


def event(
    kind: EventKind,
    node: str,
    region: str,
    blocks: list[str],
    *,
    tenant: str = "acme",
    load: float = 0.0,
) -> BlockEvent:
    _seq[node] = _seq.get(node, 0) + 1
    return BlockEvent(kind, node, 1, _seq[node], region, node, tenant, tuple(blocks), load=load)


def two_nodes() -> Router:
    r = Router()
    r.add_node("gpu-a", US)
    r.add_node("gpu-b", US)
    return r


def names(r: Router, **kw: object) -> list[str]:
    return [s.node for s in r.route(H, "acme", **kw)]  # type: ignore[arg-type]


def test_longest_cached_prefix_wins_and_eviction_changes_the_ranking() -> None:
    r = two_nodes()
    r.apply(event(EventKind.STORED, "gpu-a", US, H[:3]))
    r.apply(event(EventKind.STORED, "gpu-b", US, H[:5]))
    a, b = r.route(H, "acme")[::-1]
    assert names(r) == ["gpu-b", "gpu-a"]
    assert (a.local_prefix, b.local_prefix) == (3, 5)
    # The other node's blocks are in-region for each: region prefix is the best of both.
    assert a.region_prefix == b.region_prefix == 5
    assert b.recompute_blocks == 3 and b.prefill_ms == 3 * RouterConfig().prefill_ms_per_block
    assert b.total_ms == pytest.approx(b.rtt_ms + b.queue_ms + b.fetch_ms + b.prefill_ms)
    # gpu-b evicts block 1: its local prefix drops to 1, and gpu-a leads.
    r.apply(event(EventKind.EVICTED, "gpu-b", US, [H[1]]))
    first = r.route(H, "acme")[0]
    assert first.node == "gpu-a" and first.local_prefix == 3
    assert r.route(H, "acme")[1].local_prefix == 1


def test_with_equal_prefixes_load_decides_then_rtt() -> None:
    r = Router()
    r.add_node("gpu-us", US)
    r.add_node("gpu-eu", EU)
    r.add_node("gpu-us2", US)
    for n, region in [("gpu-us", US), ("gpu-eu", EU), ("gpu-us2", US)]:
        r.apply(event(EventKind.STORED, n, region, H[:4]))
    r.set_load("gpu-us", 1)
    ranked = r.route(H, "acme", client_region=US)
    assert [s.node for s in ranked] == ["gpu-us2", "gpu-us", "gpu-eu"]
    assert ranked[0].rtt_ms == 1.0 and ranked[2].rtt_ms == 75.0
    assert ranked[1].queue_ms == RouterConfig().queue_ms_per_load
    # Load beats RTT only up to a point: at load 2 the local node costs more than eu-west's RTT.
    r.set_load("gpu-us", 2)
    assert names(r, client_region=US) == ["gpu-us2", "gpu-eu", "gpu-us"]
    r.set_load("gpu-us", 1)
    # Load from a heartbeat moves gpu-us2 behind gpu-us.
    r.apply(BlockEvent(EventKind.HEARTBEAT, "gpu-us2", 1, _seq["gpu-us2"], US, "gpu-us2", load=1.2))
    assert names(r, client_region=US)[:2] == ["gpu-us", "gpu-us2"]
    # RTT: from ap-southeast, eu-west (160 ms) beats us-east (210 ms) at equal load and prefix.
    r.set_load("gpu-us", 0)
    r.set_load("gpu-us2", 0)
    assert names(r, client_region=AP)[0] == "gpu-eu"


def test_region_and_remote_tiers_and_cost_aware_remote_fetch() -> None:
    r = Router(RouterConfig(prefill_ms_per_block=40.0))
    r.add_node("gpu-us", US)
    r.add_node("gpu-ap", AP)
    r.apply(event(EventKind.STORED, "bs-us", US, H))  # a us-east block store holds it all
    us, ap = sorted(r.route(H, "acme"), key=lambda s: s.node)[::-1]
    assert (us.local_prefix, us.region_prefix, us.remote_prefix) == (0, 8, 8)
    assert (ap.local_prefix, ap.region_prefix, ap.remote_prefix) == (0, 0, 8)
    # 8 blocks from 210 ms away (+6 ms each) beat recomputing 8 x 40 ms: fetched.
    assert ap.reused_blocks == 8 and ap.fetch_ms == pytest.approx(210 + 8 * 6.0)
    # One block is not worth a 210 ms round trip: recomputed.
    one = r.route(H[:1], "acme")
    ap1 = next(s for s in one if s.node == "gpu-ap")
    assert ap1.remote_prefix == 1 and ap1.reused_blocks == 0 and ap1.fetch_ms == 0
    assert names(r)[0] == "gpu-us"
    r.apply(event(EventKind.REPLICATED, "bs-ap", AP, H))
    ap2 = next(s for s in r.route(H, "acme") if s.node == "gpu-ap")
    assert ap2.region_prefix == 8 and ap2.fetch_ms == pytest.approx(8 * 1.5)


def test_tenants_are_isolated_unless_blocks_are_shared() -> None:
    r = two_nodes()
    r.apply(event(EventKind.STORED, "gpu-a", US, H, tenant="other"))
    assert all(s.reused_blocks == 0 for s in r.route(H, "acme"))
    assert r.route(H, "other")[0].local_prefix == 8
    r.apply(event(EventKind.STORED, "gpu-b", US, H[:2], tenant=SHARED_TENANT))
    best = r.route(H, "acme")[0]
    assert best.node == "gpu-b" and best.local_prefix == 2


def test_resync_snapshot_replaces_a_holder_and_bytes_hashes_work() -> None:
    r = two_nodes()
    r.apply(event(EventKind.STORED, "gpu-a", US, H))
    r.replace_holder(HolderSnapshot("gpu-a", US, {"acme": H[:2]}, load=1.0))
    assert r.holdings("gpu-a") == {"acme": frozenset(H[:2])}
    a = next(s for s in r.route([bytes.fromhex(h) for h in H], "acme") if s.node == "gpu-a")
    assert a.local_prefix == 2 and a.load == 1.0
    r.set_available("gpu-a", False)
    assert names(r) == ["gpu-b"]
    assert r.route([], "acme")[0].total_ms == 0.0
    with pytest.raises(InvalidArgument):
        r.add_node("", US)


def test_router_service_through_the_embedded_broker() -> None:
    """A holder publishes; the router ranks by its events; a publisher restart (new epoch)
    resyncs the holder from the snapshot hook."""
    snapshots: list[ResyncRequest] = []

    async def snapshot(req: ResyncRequest) -> HolderSnapshot:
        snapshots.append(req)
        return HolderSnapshot(req.node, req.region, {"acme": H[:1]})

    async def body() -> None:
        router = two_nodes()
        fast = ReconnectPolicy(initial_backoff_s=0.01, max_backoff_s=0.05)
        async with EmbeddedBroker() as b, RouterService(router, b.url, snapshot=snapshot) as svc:
            await svc.subscriber.wait_subscribed()
            clock = ManualClock()
            async with EventPublisher(
                b.url,
                region=US,
                node="gpu-b",
                clock=clock,
                epoch=1,
                reconnect=fast,
                heartbeat_s=None,
                rng=random.Random(3),
            ) as pub:
                await pub.wait_connected()
                pub.publish("stored", H[:6], tenant="acme")
                await pub.flush()
                for _ in range(200):
                    if router.events_applied:
                        break
                    await asyncio.sleep(0.01)
                assert router.route(H, "acme")[0].node == "gpu-b"
            async with EventPublisher(
                b.url,
                region=US,
                node="gpu-b",
                clock=clock,
                epoch=2,
                reconnect=fast,
                heartbeat_s=None,
                rng=random.Random(4),
            ) as pub2:
                await pub2.wait_connected()
                pub2.publish("stored", [H[7]], tenant="acme")
                await pub2.flush()
                for _ in range(200):
                    if snapshots:
                        break
                    await asyncio.sleep(0.01)
        assert snapshots and "new epoch" in snapshots[0].reason
        assert router.holdings("gpu-b") == {"acme": frozenset(H[:1])}

    asyncio.run(body())


async def http_get(port: int, target: str) -> tuple[int, dict[str, Any]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def router_answers_over_http(broker_url: str, port: int) -> None:
    async with EventPublisher(
        broker_url, region=US, node="gpu-a", clock=ManualClock(), heartbeat_s=None, epoch=1
    ) as pub:
        await pub.wait_connected()
        pub.publish("stored", H[:4], tenant="acme")
        await pub.flush()
        target = f"/route?tenant=acme&client_region={EU}&blocks={','.join(H)}"
        for _ in range(300):
            status, body = await http_get(port, target)
            if body["ranked"][0]["local_prefix"] == 4:
                break
            await asyncio.sleep(0.01)
    assert status == 200
    assert [s["node"] for s in body["ranked"]] == ["gpu-a", "gpu-b"]
    assert body["ranked"][0]["rtt_ms"] == 75.0
    assert (await http_get(port, "/route?blocks=aa"))[0] == 400
    assert (await http_get(port, "/nope"))[0] == 404
    status, stats = await http_get(port, "/stats")
    assert status == 200 and stats["events_applied"] >= 1


def test_router_process_in_process() -> None:
    async def body() -> None:
        async with EmbeddedBroker() as b:
            ports: list[int] = []
            stop = asyncio.Event()
            task = asyncio.create_task(
                serve_router(
                    b.url,
                    [parse_node_spec(f"gpu-a={US}"), parse_node_spec(f"gpu-b={US}")],
                    started=ports.append,
                    stop=stop,
                )
            )
            for _ in range(300):
                if ports or task.done():
                    break
                await asyncio.sleep(0.01)
            try:
                await router_answers_over_http(b.url, ports[0])
            finally:
                stop.set()
                await asyncio.wait_for(task, 5)

    asyncio.run(body())
    with pytest.raises(InvalidArgument):
        parse_node_spec("no-region")
    assert parse_rtt_spec("a:b=12.5") == (("a", "b"), 12.5)
    with pytest.raises(InvalidArgument):
        parse_rtt_spec("a:b=-1")


@pytest.mark.slow
def test_k2_router_command() -> None:
    """`k2 router` as its own process, fed through the embedded broker of this test."""

    async def body() -> None:
        async with EmbeddedBroker() as b:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "k2store", "router", "--broker", b.url,
                "--node", f"gpu-a={US}", "--node", f"gpu-b={US}",
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            try:
                assert proc.stdout is not None
                line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
                port = int(line.split("127.0.0.1:")[1].split("/")[0])
                await router_answers_over_http(b.url, port)
            finally:
                proc.terminate()
                await asyncio.wait_for(proc.wait(), 10)

    asyncio.run(body())


def test_registered_nodes_are_routed_renewed_expired_and_deregistered() -> None:
    r = two_nodes()
    r.register("serve-eu", EU, url="http://127.0.0.1:9001", load=2.0, ttl_s=10.0, now=100.0)
    (eu,) = [s for s in r.route(H, "acme", client_region=EU) if s.node == "serve-eu"]
    assert eu.url == "http://127.0.0.1:9001" and eu.load == 2.0
    # Renewal moves the deadline and updates what changed; expiry drops only registered nodes.
    r.register("serve-eu", EU, url="http://127.0.0.1:9002", load=0.0, ttl_s=10.0, now=105.0)
    assert r.expire(110.0) == [] and r.nodes["serve-eu"].url == "http://127.0.0.1:9002"
    assert r.expire(115.0) == ["serve-eu"]
    assert names(r) == ["gpu-a", "gpu-b"]
    r.register("serve-eu", EU, url="http://127.0.0.1:9002", load=0.0, ttl_s=1.0, now=0.0)
    assert r.deregister("serve-eu") and "serve-eu" not in r.nodes
    assert not r.deregister("gpu-a") and "gpu-a" in r.nodes  # configured, not registered


@pytest.mark.parametrize(
    "body, status",
    [
        (b"not json", 400),
        (b"[1, 2]", 400),
        (b'{"name": "n", "region": "us-east", "url": "http://h:1", "color": "red"}', 400),
        (b'{"name": "", "region": "us-east", "url": "http://h:1"}', 400),
        (b'{"name": "n/../x", "region": "us-east", "url": "http://h:1"}', 400),
        (b'{"name": "n", "region": 7, "url": "http://h:1"}', 400),
        (b'{"name": "n", "region": "us-east", "url": "ftp://h:1"}', 400),
        (b'{"name": "n", "region": "us-east", "url": "http://h:1", "load": -1}', 400),
        (b'{"name": "n", "region": "us-east", "url": "http://h:1", "load": true}', 400),
        (b'{"name": "n", "region": "us-east", "url": "http://h:1", "ttl_s": 0}', 400),
        (b'{"name": "n", "region": "us-east", "url": "http://h:1", "ttl_s": 1e9}', 400),
        (b'{"name": "n", "region": "us-east", "url": "http://h:1", "ttl_s": 5}', 200),
    ],
)
def test_registration_requests_are_validated(body: bytes, status: int) -> None:
    r = Router()
    got, reply = registration_request(r, "/register", body, now=0.0)
    assert got == status, reply
    assert ("n" in r.nodes) == (status == 200)
    assert registration_request(r, "/elsewhere", b"{}", 0.0)[0] == 404


def test_serving_nodes_register_over_http_and_leave_on_close() -> None:
    async def body() -> None:
        async with EmbeddedBroker() as b:
            ports: list[int] = []
            stop = asyncio.Event()
            task = asyncio.create_task(serve_router(b.url, [], started=ports.append, stop=stop))
            for _ in range(300):
                if ports or task.done():
                    break
                await asyncio.sleep(0.01)
            url = f"http://127.0.0.1:{ports[0]}"
            load = [3.0]
            reg = RouterRegistration(
                url, name="serve-eu", region=EU, url="http://127.0.0.1:9001", load=lambda: load[0]
            ).start()
            try:
                await reg.wait_registered()
                status, stats = await http_get(ports[0], "/stats")
                node = stats["nodes"]["serve-eu"]
                assert node == {
                    "region": EU,
                    "load": 3.0,
                    "url": "http://127.0.0.1:9001",
                    "registered": True,
                }
                status, routed = await http_get(ports[0], f"/route?tenant=acme&blocks={H[0]}")
                assert [s["url"] for s in routed["ranked"]] == ["http://127.0.0.1:9001"]
                # A refused registration is an error the caller sees, not a silent success.
                with pytest.raises(ConnectionError):
                    await post_json(url + "/register", {"name": "x"})
                await reg.close()
                status, stats = await http_get(ports[0], "/stats")
                assert stats["nodes"] == {}
            finally:
                await reg.close()
                stop.set()
                await asyncio.wait_for(task, 5)
        # With no router to talk to, registration fails quietly and is retried, never raised.
        lost = RouterRegistration(url, name="serve-eu", region=EU, url="http://127.0.0.1:9001")
        assert not await lost.register_once() and lost.failures == 1
        with pytest.raises(InvalidArgument):
            RouterRegistration(url, name="bad name", region=EU, url="http://127.0.0.1:9001")

    asyncio.run(body())
