"""Userspace TCP link emulation: a loopback port that forwards to another with a wide-area delay.

Purpose
    Kernel netem is not available on every machine, and programs that are not K2 (etcd, Redis)
    cannot use K2's in-process `LinkModel` (k2store/wan.py). A `LinkProxy` stands between such a
    program and its peers or clients instead: it listens on a loopback port, opens a connection
    to the target port for every connection it accepts, and holds each chunk of bytes for the
    link's one-way delay before passing it on, in both directions. `k2 bench etcd` puts one in
    front of every etcd member, so etcd pays the same region RTT matrix as K2 does.

How bytes flow, per accepted connection::

    client --read--> DelayLine(up) --held until released--> write+drain --> target
    client <--write+drain-- held until released <-- DelayLine(down) <--read-- target

    Each direction is a reader task and a writer task joined by a bounded queue: the reader
    stamps every chunk with its release time (arrival + one-way delay + jitter) and blocks when
    `max_chunks_buffered` chunks wait; the writer sleeps until a chunk's release time, writes it
    and waits for the kernel to take it (drain). So a slow receiver slows the sender as it would
    on a real link (backpressure), and the bytes in flight stay bounded.

Contracts
    - Order: release times never decrease within a direction (jitter cannot reorder a TCP
      stream), and one writer sends the chunks in the order they were read.
    - Close: end-of-stream in one direction reaches the other end after the same delay, as a
      half-close (write_eof) where the transport has one; the connection closes when both
      directions have ended. A reset or error in either direction closes both at once.
    - Delay per connection: fixed (`LinkSpec.delay`), or chosen from the connection's first
      bytes by `LinkSpec.route` (e.g. `header_route`: an HTTP header naming the sender, so one
      port can emulate several links into the same member: etcd's peers announce their own URLs
      in ``X-PeerURLs`` on every raft request).
    - Bounded in time: `serve_links` stops after `lifetime_s`, or when its standard input
      closes (the parent died), and closes every connection.

HAZARD: a new connection is set up at once (the proxy accepts on loopback before it dials the
target), so TCP's handshake round trip is not emulated; only bytes are delayed. Bandwidth is not
emulated either (k2store/wan.py charges serialization time on inter-region links; for messages
of a few hundred bytes that is microseconds). Timers read the event loop's monotonic clock,
which is what `asyncio.sleep` waits on; an overloaded loop releases late, never early.

Run as a process (what `k2 bench etcd` does, so that proxy work does not share an event loop
with the clients being timed)::

    python -m k2store.bench.linkproxy --spec links.json [--stats-out stats.json]

The spec is ``{"lifetime_s": 600, "links": [{"name": ..., "listen_port": ..., "target_port":
..., "one_way_ms": ..., "jitter_ms": ..., "route_header": ..., "routes": {value: one_way_ms}}]}``;
once listening the process prints one line, ``ready``, to standard output.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import stat
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from k2store import evloop
from k2store.wan import NetworkSettings

__all__ = [
    "LOOPBACK",
    "DelayLine",
    "LinkDelay",
    "LinkProxy",
    "LinkSpec",
    "LinkStats",
    "Route",
    "header_route",
    "load_spec",
    "serve_links",
]

LOOPBACK = "127.0.0.1"
"""The only address a proxy listens on or dials: benchmarks stay on this machine."""
CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class LinkDelay:
    """What one direction of a link costs: `one_way_ms` plus uniform [0, jitter_ms]."""

    one_way_ms: float = 0.0
    jitter_ms: float = 0.0

    def __post_init__(self) -> None:
        for name in ("one_way_ms", "jitter_ms"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")

    @staticmethod
    def between(settings: NetworkSettings, a: str, b: str) -> LinkDelay:
        """The delay K2's own emulation gives regions `a` and `b` (half the RTT each way)."""
        return LinkDelay(settings.rtt_of(a, b) / 2, settings.jitter_ms)


class DelayLine:
    """Release times of the chunks of one direction of a link. Pure: times are arguments.

    A chunk that arrives at `t` is released at ``t + one_way + U(0, jitter)``, but never before
    the chunk ahead of it: a byte stream is not reordered by jitter.
    """

    def __init__(self, delay: LinkDelay, rng: random.Random) -> None:
        self.delay = delay
        self._rng = rng
        self._last_s = -math.inf

    def release_at(self, arrived_s: float) -> float:
        ms = self.delay.one_way_ms
        if self.delay.jitter_ms > 0:  # draws only with jitter: a seeded run replays exactly
            ms += self._rng.uniform(0.0, self.delay.jitter_ms)
        self._last_s = max(arrived_s + ms / 1000.0, self._last_s)
        return self._last_s


Route = Callable[[bytes], "tuple[str, LinkDelay] | None"]
"""Chooses a connection's delay from the first bytes its client sent, with a name for the
statistics (e.g. the sender); None asks for more bytes."""

DEFAULT_ROUTE = "default"
"""The statistics' name for connections that no route matched (they pay `LinkSpec.delay`)."""


def header_route(header: str, table: Mapping[str, LinkDelay], default: LinkDelay) -> Route:
    """A `Route` for HTTP/1.x: once the request head is complete, the first comma-separated
    value of `header` found in `table` picks the delay, named by that value. A request without
    such a value (or not HTTP) gets `default`, named `DEFAULT_ROUTE`."""
    wanted = header.lower().encode()

    def route(first: bytes) -> tuple[str, LinkDelay] | None:
        end = first.find(b"\r\n\r\n")
        if end < 0:
            return None
        for line in first[:end].split(b"\r\n")[1:]:
            name, sep, value = line.partition(b":")
            if sep and name.strip().lower() == wanted:
                for item in value.decode("latin-1").split(","):
                    hit = table.get(item.strip())
                    if hit is not None:
                        return item.strip(), hit
        return DEFAULT_ROUTE, default

    return route


@dataclass(frozen=True, slots=True)
class LinkSpec:
    """One emulated link: connections to `listen_port` are forwarded to `target_port`."""

    name: str
    target_port: int
    delay: LinkDelay
    """Each direction of every connection (unless `route` chooses another)."""
    listen_port: int = 0
    """0: any free port (`LinkProxy.start` returns the one chosen)."""
    route: Route | None = None
    """Chooses the delay per connection from its first bytes (see `header_route`)."""


@dataclass
class LinkStats:
    """What crossed one link: for the benchmark's JSON, and to check the emulation happened."""

    connections: int = 0
    bytes_up: int = 0
    """Client to target."""
    bytes_down: int = 0
    routed: dict[str, int] = field(default_factory=dict)
    """Connections per route name (`DEFAULT_ROUTE` for those no route matched)."""
    failed_dials: int = 0


class LinkProxy:
    """Forwards a loopback port to another with `LinkSpec`'s delay. Use as an async context
    manager, or `start()` then `close()`; `close()` ends every connection at once."""

    def __init__(
        self,
        spec: LinkSpec,
        *,
        rng: random.Random | None = None,
        max_chunks_buffered: int = 16,
        peek_limit: int = 16 * 1024,
        peek_timeout_s: float = 2.0,
    ) -> None:
        self.spec = spec
        self.stats = LinkStats()
        self.port = 0
        self._rng = rng or random.Random(0)
        self._max_chunks = max_chunks_buffered
        self._peek_limit = peek_limit
        self._peek_timeout_s = peek_timeout_s
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        """Listen; returns the port."""
        self._server = await asyncio.start_server(
            self._accepted, LOOPBACK, self.spec.listen_port, limit=CHUNK_BYTES
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> LinkProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._connection(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # A task cancelled before it first ran never reaches its own cleanup.
        task.add_done_callback(lambda _: writer.close())

    async def _peek(self, reader: asyncio.StreamReader) -> tuple[bytes, str, LinkDelay, bool]:
        """The first bytes, the route's name and delay for them, and whether the client has
        already ended its stream. Without a route: nothing read, the link's delay."""
        route = self.spec.route
        if route is None:
            return b"", DEFAULT_ROUTE, self.spec.delay, False
        first = b""
        ended = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._peek_timeout_s
        while len(first) < self._peek_limit:
            picked = route(first)
            if picked is not None:
                return first, picked[0], picked[1], False
            try:
                async with asyncio.timeout(max(deadline - loop.time(), 0.0)):
                    chunk = await reader.read(CHUNK_BYTES)
            except TimeoutError:
                break
            if not chunk:
                ended = True
                break
            first += chunk
        # Undecided (a silent client, or a head too long): the link's own delay.
        return first, DEFAULT_ROUTE, self.spec.delay, ended

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: asyncio.StreamWriter | None = None
        try:
            first, name, delay, client_ended = await self._peek(reader)
            self.stats.connections += 1
            self.stats.routed[name] = self.stats.routed.get(name, 0) + 1
            try:
                up_reader, upstream = await asyncio.open_connection(
                    LOOPBACK, self.spec.target_port, limit=CHUNK_BYTES
                )
            except OSError:
                self.stats.failed_dials += 1
                return
            up_line, down_line = DelayLine(delay, self._rng), DelayLine(delay, self._rng)
            tasks = [
                asyncio.create_task(
                    self._direction(
                        None if client_ended else reader, upstream, up_line, first, upward=True
                    )
                ),
                asyncio.create_task(
                    self._direction(up_reader, writer, down_line, b"", upward=False)
                ),
            ]
            # Both directions ending (end of stream each way) closes the connection; either
            # failing (a reset) ends it at once, the other direction cancelled.
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for w in (writer, upstream):
                if w is not None:
                    w.close()
                    with contextlib.suppress(Exception):
                        await w.wait_closed()

    async def _direction(
        self,
        src: asyncio.StreamReader | None,
        dst: asyncio.StreamWriter,
        line: DelayLine,
        first: bytes,
        *,
        upward: bool,
    ) -> None:
        """Move one direction's bytes from `src` to `dst`, each chunk held until its release
        time; `first` goes ahead of what `src` yields, and `src` None means the stream already
        ended after `first`. Raises ConnectionResetError when `src` failed."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue(self._max_chunks)

        async def read() -> None:
            if first:
                await queue.put((line.release_at(loop.time()), first))
            try:
                while src is not None:
                    chunk = await src.read(CHUNK_BYTES)
                    await queue.put((line.release_at(loop.time()), chunk))
                    if not chunk:
                        return
            except OSError:
                await queue.put((loop.time(), None))  # the reset is not delayed
                return
            await queue.put((line.release_at(loop.time()), b""))

        reader_task = asyncio.create_task(read())
        try:
            while True:
                release_s, chunk = await queue.get()
                if chunk is None:
                    raise ConnectionResetError(f"{self.spec.name}: the other end reset")
                wait_s = release_s - loop.time()
                if wait_s > 0:
                    await asyncio.sleep(wait_s)
                if not chunk:
                    if dst.can_write_eof():
                        dst.write_eof()
                    else:
                        dst.close()
                    return
                dst.write(chunk)
                await dst.drain()
                if upward:
                    self.stats.bytes_up += len(chunk)
                else:
                    self.stats.bytes_down += len(chunk)
        finally:
            reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader_task


# -- the proxy process --------------------------------------------------------------------------


def load_spec(raw: Mapping[str, Any]) -> tuple[float, list[LinkSpec]]:
    """The lifetime and the links of a spec file's content (see the module docstring)."""
    lifetime_s = float(raw.get("lifetime_s", 600.0))
    if not (math.isfinite(lifetime_s) and lifetime_s > 0):
        raise ValueError(f"lifetime_s must be positive, got {lifetime_s!r}")
    links: list[LinkSpec] = []
    for i, t in enumerate(raw.get("links", [])):
        where = f"links[{i}]"
        try:
            jitter = float(t.get("jitter_ms", 0.0))
            delay = LinkDelay(float(t["one_way_ms"]), jitter)
            route: Route | None = None
            if t.get("route_header"):
                table = {
                    str(value): LinkDelay(float(ms), jitter)
                    for value, ms in dict(t.get("routes", {})).items()
                }
                route = header_route(str(t["route_header"]), table, delay)
            links.append(
                LinkSpec(
                    str(t.get("name", where)),
                    int(t["target_port"]),
                    delay,
                    listen_port=int(t.get("listen_port", 0)),
                    route=route,
                )
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None
    return lifetime_s, links


async def serve_links(
    links: list[LinkSpec],
    lifetime_s: float,
    *,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[list[LinkProxy]], None] | None = None,
    seed: int = 0,
) -> list[LinkProxy]:
    """Run a proxy per link until `lifetime_s` passes or `stop` is set; returns the proxies
    (closed), whose `stats` tell what crossed."""
    rng = random.Random(seed)
    proxies = [LinkProxy(spec, rng=random.Random(rng.random())) for spec in links]
    try:
        for p in proxies:
            await p.start()
        if on_ready is not None:
            on_ready(proxies)
        waiter = asyncio.Event() if stop is None else stop
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(lifetime_s):
                await waiter.wait()
    finally:
        for p in proxies:
            await p.close()
    return proxies


async def _main_async(spec_path: Path, stats_out: Path | None) -> int:
    lifetime_s, links = load_spec(json.loads(spec_path.read_text()))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def stdin_closed() -> None:
        # The parent holds our standard input open; its end (exit, crash) stops the proxies.
        if not os.read(sys.stdin.fileno(), 1024):
            loop.remove_reader(sys.stdin.fileno())
            stop.set()

    with contextlib.suppress(OSError, ValueError, NotImplementedError):
        if stat.S_ISFIFO(os.fstat(sys.stdin.fileno()).st_mode):  # not a terminal or /dev/null
            loop.add_reader(sys.stdin.fileno(), stdin_closed)

    def ready(_: list[LinkProxy]) -> None:
        print("ready", flush=True)

    proxies = await serve_links(links, lifetime_s, stop=stop, on_ready=ready)
    if stats_out is not None:
        stats = {p.spec.name: asdict(p.stats) for p in proxies}
        stats_out.write_text(json.dumps(stats, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m k2store.bench.linkproxy",
        description="Forward loopback ports with an emulated one-way delay per direction.",
    )
    p.add_argument("--spec", type=Path, required=True, help="the links, as JSON")
    p.add_argument("--stats-out", type=Path, default=None, help="write per-link stats on exit")
    args = p.parse_args(argv)
    return evloop.run(_main_async(args.spec, args.stats_out))


if __name__ == "__main__":
    sys.exit(main())
