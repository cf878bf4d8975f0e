"""The userspace link proxy (k2store/bench/linkproxy.py): the delay is applied each way, bytes
arrive in order, backpressure holds, end of stream crosses, and the proxy stops by itself.

The schedule itself (`DelayLine`) is pure and checked with made-up times; the socket tests use a
short delay (40 ms) and only assert lower bounds plus generous upper ones, so a loaded machine
cannot fail them."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from k2store.bench.linkproxy import (
    DEFAULT_ROUTE,
    DelayLine,
    LinkDelay,
    LinkProxy,
    LinkSpec,
    header_route,
    load_spec,
    serve_links,
)
from k2store.wan import NetworkSettings

DELAY = LinkDelay(40.0)


def test_delay_line_adds_the_one_way_delay() -> None:
    line = DelayLine(LinkDelay(37.5), random.Random(1))
    assert line.release_at(10.0) == pytest.approx(10.0375)
    assert line.release_at(10.5) == pytest.approx(10.5375)


def test_jitter_never_reorders_and_replays_with_a_seed() -> None:
    def schedule(seed: int) -> list[float]:
        line = DelayLine(LinkDelay(10.0, jitter_ms=50.0), random.Random(seed))
        return [line.release_at(i * 0.001) for i in range(200)]

    times = schedule(7)
    assert times == sorted(times)
    assert all(t >= i * 0.001 + 0.010 for i, t in enumerate(times))
    assert any(t > i * 0.001 + 0.030 for i, t in enumerate(times))  # jitter did something
    assert schedule(7) == times


def test_link_delay_comes_from_k2s_rtt_matrix() -> None:
    st = NetworkSettings(enabled=True)
    assert LinkDelay.between(st, "us-east", "eu-west") == LinkDelay(37.5)
    assert LinkDelay.between(st, "ap-southeast", "us-east") == LinkDelay(105.0)
    assert LinkDelay.between(st, "eu-west", "eu-west") == LinkDelay(st.intra_region_rtt_ms / 2)
    with pytest.raises(ValueError, match="one_way_ms"):
        LinkDelay(-1.0)


def test_header_route_waits_for_the_whole_head() -> None:
    a, b, default = LinkDelay(1.0), LinkDelay(2.0), LinkDelay(9.0)
    route = header_route("X-PeerURLs", {"http://127.0.0.1:1": a, "http://127.0.0.1:2": b}, default)
    head = b"GET /raft/stream/message/1 HTTP/1.1\r\nHost: x\r\n"
    assert route(head) is None
    assert route(head + b"x-peerurls: http://127.0.0.1:2,http://127.0.0.1:1\r\n\r\n") == (
        "http://127.0.0.1:2",
        b,
    )
    assert route(head + b"\r\n") == (DEFAULT_ROUTE, default)


# -- over sockets --------------------------------------------------------------------------------


async def _echo_server() -> tuple[asyncio.Server, list[bytes]]:
    """Echoes everything; half-closes when the client does; records what it got."""
    got: list[bytes] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while chunk := await r.read(65536):
                got.append(chunk)
                w.write(chunk)
                await w.drain()
        finally:
            w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, got


def _run(fn: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(20):
            await fn()

    asyncio.run(bounded())


def test_a_round_trip_pays_the_delay_both_ways() -> None:
    async def main() -> None:
        server, _ = await _echo_server()
        port = server.sockets[0].getsockname()[1]
        async with server, LinkProxy(LinkSpec("t", port, DELAY)) as proxy:
            r, w = await asyncio.open_connection("127.0.0.1", proxy.port)
            loop = asyncio.get_running_loop()
            for _ in range(3):
                t0 = loop.time()
                w.write(b"ping")
                assert await r.readexactly(4) == b"ping"
                elapsed = loop.time() - t0
                assert 0.080 <= elapsed < 1.0, elapsed
            w.close()
            await w.wait_closed()
            await w.wait_closed()
            assert proxy.stats.connections == 1
            assert proxy.stats.bytes_up == proxy.stats.bytes_down == 12

    _run(main)


def test_bytes_arrive_in_order_and_end_of_stream_crosses() -> None:
    payload = bytes(random.Random(3).randbytes(3 * 1024 * 1024))

    async def main() -> None:
        server, got = await _echo_server()
        port = server.sockets[0].getsockname()[1]
        spec = LinkSpec("t", port, LinkDelay(5.0, jitter_ms=20.0))
        async with server, LinkProxy(spec, rng=random.Random(2)) as proxy:
            r, w = await asyncio.open_connection("127.0.0.1", proxy.port)

            async def send() -> None:
                for i in range(0, len(payload), 10_000):
                    w.write(payload[i : i + 10_000])
                    await w.drain()
                w.write_eof()  # the echo server closes only after it sees this

            sender = asyncio.create_task(send())
            echoed = await r.read()  # to end of stream: the server's close crossed back
            await sender
            assert b"".join(got) == payload
            assert echoed == payload
            w.close()
            await w.wait_closed()

    _run(main)


def test_a_receiver_that_does_not_read_holds_the_sender_back() -> None:
    async def main() -> None:
        release = asyncio.Event()

        async def stalled(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await release.wait()
            w.close()

        server = await asyncio.start_server(stalled, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, LinkProxy(LinkSpec("t", port, LinkDelay(1.0))) as proxy:
            _, w = await asyncio.open_connection("127.0.0.1", proxy.port)
            sent = 0
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1.5):
                    while sent < 256 * 1024 * 1024:
                        w.write(b"x" * 65536)
                        await w.drain()
                        sent += 65536
            # Kernel buffers on both sides plus the proxy's bounded queue: megabytes, not all.
            assert sent < 64 * 1024 * 1024
            release.set()
            w.transport.abort()  # 10 MB unsent: the client gives up

    _run(main)


def test_a_route_picks_each_connections_delay() -> None:
    async def main() -> None:
        server, _ = await _echo_server()
        port = server.sockets[0].getsockname()[1]
        route = header_route("X-From", {"near": LinkDelay(0.0)}, LinkDelay(60.0))
        async with server, LinkProxy(LinkSpec("t", port, LinkDelay(60.0), route=route)) as proxy:
            loop = asyncio.get_running_loop()
            timings = {}
            for who in ("near", "far"):
                r, w = await asyncio.open_connection("127.0.0.1", proxy.port)
                head = f"GET / HTTP/1.1\r\nX-From: {who}\r\n\r\n".encode()
                t0 = loop.time()
                w.write(head)
                assert await r.readexactly(len(head)) == head
                timings[who] = loop.time() - t0
                w.close()
                await w.wait_closed()
            assert timings["far"] >= 0.120
            assert timings["near"] < timings["far"]
            assert proxy.stats.routed == {"near": 1, DEFAULT_ROUTE: 1}

    _run(main)


def test_the_proxies_stop_by_themselves() -> None:
    async def main() -> None:
        server, _ = await _echo_server()
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        async with server:
            proxies = await serve_links([LinkSpec("t", port, DELAY)], lifetime_s=0.3)
        assert 0.3 <= loop.time() - t0 < 5
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", proxies[0].port)

    _run(main)


def test_a_bad_spec_names_the_link() -> None:
    with pytest.raises(ValueError, match=r"links\[0\]"):
        load_spec({"links": [{"target_port": 1}]})
    with pytest.raises(ValueError, match="lifetime_s"):
        load_spec({"lifetime_s": 0, "links": []})


def test_the_proxy_process_exits_when_its_parent_closes_stdin(tmp_path: Path) -> None:
    spec = tmp_path / "links.json"
    spec.write_text(json.dumps({"lifetime_s": 60, "links": [{"target_port": 9, "one_way_ms": 1}]}))
    stats = tmp_path / "stats.json"
    cmd = [sys.executable, "-m", "k2store.bench.linkproxy", "--spec", str(spec)]
    with subprocess.Popen(
        [*cmd, "--stats-out", str(stats)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    ) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
            assert proc.stdin is not None
            proc.stdin.close()
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    assert json.loads(stats.read_text())["links[0]"]["connections"] == 0
