"""A cache-aware request router: ranks serving nodes by what it would cost each to answer.

The router keeps, from block events (kvtier.events), which holder holds which chained block
hashes of which tenant, and each serving node's load. For a request (its chained block hashes,
its tenant, the region it comes from) it estimates each serving node's time to first token and
returns the nodes cheapest first, with the breakdown.

Holders and serving nodes
    A holder is whatever publishes events: a block store node of a region, or a serving node
    that publishes its own cache (its `node` name then equals the serving node's name). For a
    serving node `n` in region `R`, a block is
      - local  if `n` itself holds it (no transfer);
      - region if a holder in `R` holds it (an in-region fetch);
      - remote if only holders in other regions hold it (a wide-area fetch).
    Chained hashes make a hit meaningful only as a prefix: block i is usable only if blocks
    0..i-1 are too, so each tier counts leading blocks.

Score (an estimated time to first token in ms; lower is better)::

    total = rtt(client_region, R)                       request and response hop
          + load * queue_ms_per_load                    waiting behind running work
          + local  * local_ms_per_block
          + (region - local) * region_ms_per_block
          + remote_cost                                 see below
          + (n_blocks - used) * prefill_ms_per_block    recompute what is not reused

    remote_cost = max rtt(R, holder region) over the remote blocks + remote_ms_per_block each,
    used only when it beats recomputing those blocks (cost-aware retrieval, DESIGN.md 7).

    Ties go to the longer local prefix, then the node name, so rankings are deterministic. With
    equal loads and RTTs the longest cached prefix wins; with equal prefixes, the lower load; then
    the lower RTT.

Tenants: holdings are kept per tenant; tenant "" is the shared namespace (blocks a tenant opted in
to share) and counts for every tenant. A tenant never gets credit for another tenant's blocks.

The state changes only through `apply` (one event), `replace_holder` (a resync's snapshot) and
`set_load`; `route` is a pure function of that state. `RouterService` wires it to an
`EventSubscriber`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from k2store.client import AsyncClient
from k2store.errors import InvalidArgument
from kvtier.events import BlockEvent, EventKind, EventSubscriber, ResyncRequest
from kvtier.metadata import BlockMetadata

__all__ = [
    "DEFAULT_REGION_RTT_MS",
    "SHARED_TENANT",
    "HolderSnapshot",
    "RouteScore",
    "Router",
    "RouterConfig",
    "RouterRegistration",
    "RouterService",
    "ServingNode",
    "forget_holder",
    "metadata_snapshotter",
    "parse_node_spec",
    "parse_rtt_spec",
    "post_json",
    "registration_request",
    "route_request",
    "serve_router",
]

SHARED_TENANT = ""
MAX_BODY_BYTES = 64 * 1024
"""Largest request body the router's HTTP endpoint reads (registrations are ~200 bytes)."""

DEFAULT_REGION_RTT_MS: dict[tuple[str, str], float] = {
    ("us-east", "eu-west"): 75.0,
    ("us-east", "ap-southeast"): 210.0,
    ("eu-west", "ap-southeast"): 160.0,
}
"""DESIGN.md section 8's round-trip times between the default regions."""


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """Cost model. Defaults: 16-token blocks of a small model on CPU (FIGURES.md: ~2 ms a token
    of prefill), a local load ~free, an in-region fetch ~1 ms RTT plus transfer."""

    prefill_ms_per_block: float = 32.0
    local_ms_per_block: float = 0.2
    region_ms_per_block: float = 1.5
    remote_ms_per_block: float = 6.0
    """Transfer time of one block over a wide-area link (bandwidth-bound), RTT not included."""
    queue_ms_per_load: float = 50.0
    """Added per unit of load (e.g. per running request)."""
    intra_region_rtt_ms: float = 1.0
    unknown_rtt_ms: float = 250.0
    """RTT assumed between regions the table does not name."""
    region_rtt_ms: Mapping[tuple[str, str], float] = field(
        default_factory=lambda: dict(DEFAULT_REGION_RTT_MS)
    )

    def rtt_ms(self, a: str, b: str) -> float:
        if a == b:
            return self.intra_region_rtt_ms
        v = self.region_rtt_ms.get((a, b), self.region_rtt_ms.get((b, a)))
        return self.unknown_rtt_ms if v is None else v


@dataclass(slots=True)
class ServingNode:
    name: str
    region: str
    load: float = 0.0
    available: bool = True
    url: str = ""
    """Where the node serves its API (given when it registers)."""
    expires_at: float | None = None
    """For a registered node: when it is dropped unless it registers again (the router's
    monotonic seconds); None for a node configured on the command line."""


@dataclass(frozen=True, slots=True)
class RouteScore:
    node: str
    region: str
    url: str
    local_prefix: int
    """Leading blocks the node itself holds."""
    region_prefix: int
    """Leading blocks held in the node's region (>= local_prefix)."""
    remote_prefix: int
    """Leading blocks held anywhere (>= region_prefix)."""
    reused_blocks: int
    """Blocks the plan reuses (remote ones only when fetching beats recompute)."""
    recompute_blocks: int
    load: float
    rtt_ms: float
    queue_ms: float
    fetch_ms: float
    prefill_ms: float
    total_ms: float


@dataclass(frozen=True, slots=True)
class HolderSnapshot:
    """A holder's state as read from the store by a resync: tenant -> block hashes held."""

    node: str
    region: str
    blocks: Mapping[str, Iterable[str]]
    load: float | None = None


class Router:
    def __init__(
        self, config: RouterConfig | None = None, nodes: Iterable[ServingNode] = ()
    ) -> None:
        self.config = config or RouterConfig()
        self.nodes: dict[str, ServingNode] = {}
        self._holder_region: dict[str, str] = {}
        self._held: dict[str, dict[str, set[str]]] = {}
        """holder -> tenant -> block hashes"""
        self._where: dict[tuple[str, str], set[str]] = {}
        """(tenant, block hash) -> holders"""
        self.events_applied = 0
        for n in nodes:
            self.add_node(n.name, n.region, load=n.load)

    # -- state ---------------------------------------------------------------------------------

    def add_node(self, name: str, region: str, *, load: float = 0.0) -> None:
        if not name or not region:
            raise InvalidArgument("a serving node needs a name and a region")
        self.nodes[name] = ServingNode(name, region, load)

    def remove_node(self, name: str) -> None:
        self.nodes.pop(name, None)

    def register(
        self, name: str, region: str, *, url: str, load: float, ttl_s: float, now: float
    ) -> None:
        """A serving node announces itself (or renews): routable until `now + ttl_s` unless it
        registers again. Re-registering may change its region or URL."""
        _check_registration(name, region, url, load, ttl_s)
        node = self.nodes.get(name)
        if node is None:
            node = self.nodes[name] = ServingNode(name, region)
        node.region, node.url, node.load = region, url, float(load)
        node.expires_at = now + ttl_s
        node.available = True

    def deregister(self, name: str) -> bool:
        """A registered node leaves (a clean shutdown). Configured nodes stay."""
        node = self.nodes.get(name)
        if node is None or node.expires_at is None:
            return False
        del self.nodes[name]
        return True

    def expire(self, now: float) -> list[str]:
        """Drop registered nodes whose registration ran out; returns their names."""
        gone = [
            n.name for n in self.nodes.values() if n.expires_at is not None and n.expires_at <= now
        ]
        for name in gone:
            del self.nodes[name]
        return gone

    def set_load(self, name: str, load: float) -> None:
        node = self.nodes.get(name)
        if node is not None:
            node.load = max(0.0, float(load))

    def set_available(self, name: str, available: bool) -> None:
        node = self.nodes.get(name)
        if node is not None:
            node.available = available

    def apply(self, ev: BlockEvent) -> None:
        """Apply one event (in the publisher's order). Idempotent per event."""
        self.events_applied += 1
        self._holder_region[ev.node] = ev.region
        if ev.node in self.nodes:
            self.set_load(ev.node, ev.load)
        if ev.kind in (EventKind.STORED, EventKind.REPLICATED):
            for h in ev.blocks:
                self._add(ev.node, ev.tenant, h)
        elif ev.kind is EventKind.EVICTED:
            for h in ev.blocks:
                self._remove(ev.node, ev.tenant, h)

    def replace_holder(self, snap: HolderSnapshot) -> None:
        """Forget what `snap.node` held and take the snapshot instead (after a resync)."""
        for tenant, hashes in list(self._held.get(snap.node, {}).items()):
            for h in list(hashes):
                self._remove(snap.node, tenant, h)
        self._holder_region[snap.node] = snap.region
        for tenant, blocks in snap.blocks.items():
            for h in blocks:
                self._add(snap.node, tenant, h)
        if snap.load is not None:
            self.set_load(snap.node, snap.load)

    def holdings(self, holder: str) -> dict[str, frozenset[str]]:
        return {t: frozenset(b) for t, b in self._held.get(holder, {}).items() if b}

    def _add(self, holder: str, tenant: str, h: str) -> None:
        self._held.setdefault(holder, {}).setdefault(tenant, set()).add(h)
        self._where.setdefault((tenant, h), set()).add(holder)

    def _remove(self, holder: str, tenant: str, h: str) -> None:
        self._held.get(holder, {}).get(tenant, set()).discard(h)
        holders = self._where.get((tenant, h))
        if holders is not None:
            holders.discard(holder)
            if not holders:
                del self._where[(tenant, h)]

    # -- routing -------------------------------------------------------------------------------

    def _holders(self, tenant: str, h: str) -> set[str]:
        own = self._where.get((tenant, h), set())
        if tenant == SHARED_TENANT:
            return own
        return own | self._where.get((SHARED_TENANT, h), set())

    def route(
        self,
        token_block_hashes: Sequence[str | bytes],
        tenant: str,
        *,
        client_region: str | None = None,
        limit: int | None = None,
    ) -> list[RouteScore]:
        """Serving nodes cheapest first (see the module docstring for the score). Hashes may be
        hex strings or raw bytes (hex-encoded here). Unavailable nodes are left out."""
        cfg = self.config
        hashes = [
            h.hex() if isinstance(h, bytes | bytearray) else str(h) for h in token_block_hashes
        ]
        holders = [self._holders(tenant, h) for h in hashes]
        regions_of = [{self._holder_region.get(x, "") for x in hs} for hs in holders]
        n_blocks = len(hashes)
        # Leading blocks held anywhere, and for the remote tier the regions they come from.
        anywhere = _leading(bool(hs) for hs in holders)
        out: list[RouteScore] = []
        for node in self.nodes.values():
            if not node.available:
                continue
            local = _leading(node.name in hs for hs in holders)
            region = _leading(node.region in rs for rs in regions_of)
            region = max(region, local)
            remote = max(anywhere, region)
            fetch = local * cfg.local_ms_per_block + (region - local) * cfg.region_ms_per_block
            used = region
            if remote > region:
                far = max(
                    min(
                        (cfg.rtt_ms(node.region, r) for r in regions_of[i] if r),
                        default=cfg.unknown_rtt_ms,
                    )
                    for i in range(region, remote)
                )
                remote_ms = far + (remote - region) * cfg.remote_ms_per_block
                if remote_ms < (remote - region) * cfg.prefill_ms_per_block:
                    fetch += remote_ms
                    used = remote
            rtt = 0.0 if client_region is None else cfg.rtt_ms(client_region, node.region)
            queue = node.load * cfg.queue_ms_per_load
            prefill = (n_blocks - used) * cfg.prefill_ms_per_block
            out.append(
                RouteScore(
                    node=node.name,
                    region=node.region,
                    url=node.url,
                    local_prefix=local,
                    region_prefix=region,
                    remote_prefix=remote,
                    reused_blocks=used,
                    recompute_blocks=n_blocks - used,
                    load=node.load,
                    rtt_ms=rtt,
                    queue_ms=queue,
                    fetch_ms=round(fetch, 6),
                    prefill_ms=prefill,
                    total_ms=round(rtt + queue + fetch + prefill, 6),
                )
            )
        out.sort(key=lambda s: (s.total_ms, -s.local_prefix, s.node))
        return out if limit is None else out[:limit]


def _leading(flags: Iterable[bool]) -> int:
    n = 0
    for f in flags:
        if not f:
            break
        n += 1
    return n


Snapshotter = Callable[[ResyncRequest], Awaitable[HolderSnapshot]]

log = logging.getLogger("kvtier.router")


async def post_json(url: str, obj: Mapping[str, object], timeout_s: float = 5.0) -> dict[str, Any]:
    """POST obj as JSON to an http:// URL (one request, Connection: close); the JSON reply.
    Raises `ConnectionError` (or `TimeoutError`) when the request fails or is refused."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise InvalidArgument(f"router URL {url!r}: only http://host:port is supported")
    body = json.dumps(obj).encode()

    async def go() -> dict[str, Any]:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
        try:
            writer.write(
                f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            raw = await reader.read(1 << 20)
        finally:
            writer.close()
        head, _, payload = raw.partition(b"\r\n\r\n")
        status = head.split(b" ", 2)[1:2]
        if status != [b"200"]:
            raise ConnectionError(f"{url}: {head[:80]!r} {payload[:200]!r}")
        reply: dict[str, Any] = json.loads(payload)
        return reply

    return await asyncio.wait_for(go(), timeout_s)


class RouterRegistration:
    """Keeps a serving node registered with a router: ``POST /register`` now and every
    `ttl_s / 3` seconds with the node's current load (so a router that restarted learns the node
    again within that time, and one that stops hearing from it drops it after `ttl_s`), and
    ``POST /deregister`` on `close`. A router that cannot be reached is retried on the same
    schedule and never fails the node; the first failure and the recovery are logged."""

    def __init__(
        self,
        router_url: str,
        *,
        name: str,
        region: str,
        url: str,
        load: Callable[[], float] = lambda: 0.0,
        ttl_s: float = 10.0,
    ) -> None:
        _check_registration(name, region, url, 0.0, ttl_s)
        self.router_url = router_url.rstrip("/")
        self.name, self.region, self.url = name, region, url
        self.load, self.ttl_s = load, ttl_s
        self.registrations = 0
        """Successful registrations (the first and every renewal)."""
        self.failures = 0
        self._ok: bool | None = None
        self._task: asyncio.Task[None] | None = None
        self._registered = asyncio.Event()

    async def register_once(self) -> bool:
        msg = {
            "name": self.name,
            "region": self.region,
            "url": self.url,
            "load": max(0.0, float(self.load())),
            "ttl_s": self.ttl_s,
        }
        try:
            await post_json(self.router_url + "/register", msg, timeout_s=min(5.0, self.ttl_s))
        except (OSError, TimeoutError, ValueError) as e:
            self.failures += 1
            if self._ok is not False:
                log.warning("cannot register %s with router %s: %s", self.name, self.router_url, e)
            self._ok = False
            return False
        if self._ok is False:
            log.info("registered %s with router %s again", self.name, self.router_url)
        self._ok = True
        self.registrations += 1
        self._registered.set()
        return True

    async def _loop(self) -> None:
        while True:
            await self.register_once()
            await asyncio.sleep(self.ttl_s / 3)

    def start(self) -> RouterRegistration:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())
        return self

    async def wait_registered(self, timeout_s: float = 10.0) -> None:
        await asyncio.wait_for(self._registered.wait(), timeout_s)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._ok:
            with contextlib.suppress(OSError, TimeoutError, ValueError):
                await post_json(self.router_url + "/deregister", {"name": self.name}, 2.0)


class RouterService:
    """A `Router` fed by an `EventSubscriber`: events update it in order; a gap calls
    `snapshot(request)` (which reads the holder's blocks from the store) and replaces the
    holder's state with it."""

    def __init__(
        self,
        router: Router,
        broker_url: str,
        *,
        snapshot: Snapshotter,
        regions: Sequence[str] | None = None,
        client_id: str | None = None,
    ) -> None:
        self.router = router
        self._snapshot = snapshot

        async def resync(req: ResyncRequest) -> None:
            router.replace_holder(await self._snapshot(req))

        self.subscriber = EventSubscriber(
            broker_url,
            handler=router.apply,
            resync=resync,
            regions=regions,
            client_id=client_id,
        )

    async def start(self) -> RouterService:
        await self.subscriber.start()
        return self

    async def close(self) -> None:
        await self.subscriber.close()

    async def __aenter__(self) -> RouterService:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# -- the router process (`k2 router`) ---------------------------------------------------------


def metadata_snapshotter(client: AsyncClient) -> Snapshotter:
    """The resync hook backed by the store: a holder in region R is credited with every block
    R's metadata says R holds (block stores serve every node of their region), per tenant. It
    reads every tenant's rows: on a secured cluster `client` needs an admin token."""

    async def snapshot(req: ResyncRequest) -> HolderSnapshot:
        blocks: dict[str, list[str]] = {}
        for c in await BlockMetadata(client).region_copies(req.region):
            blocks.setdefault(c.row.tenant, []).append(c.row.block_hash.hex())
        return HolderSnapshot(req.node, req.region, blocks)

    return snapshot


async def forget_holder(req: ResyncRequest) -> HolderSnapshot:
    """The resync hook when no metadata reader is wired in: after a gap the router credits the
    holder with nothing until new events arrive. It may under-credit a node, never over-credit."""
    return HolderSnapshot(req.node, req.region, {})


def parse_node_spec(spec: str) -> ServingNode:
    """``NAME=REGION`` -> ServingNode."""
    name, sep, region = spec.partition("=")
    if not sep or not name or not region:
        raise InvalidArgument(f"serving node {spec!r}: expected NAME=REGION")
    return ServingNode(name, region)


def parse_rtt_spec(spec: str) -> tuple[tuple[str, str], float]:
    """``A:B=MS`` -> ((A, B), MS)."""
    pair, sep, ms = spec.partition("=")
    a, sep2, b = pair.partition(":")
    try:
        value = float(ms)
    except ValueError:
        value = -1.0
    if not sep or not sep2 or not a or not b or value < 0:
        raise InvalidArgument(f"RTT {spec!r}: expected REGION_A:REGION_B=MILLISECONDS")
    return (a, b), value


MAX_TTL_S = 3600.0
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def _check_registration(name: str, region: str, url: str, load: float, ttl_s: float) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"node name {name!r}: 1-128 characters of letters, digits and . _ : -"
        )
    if not isinstance(region, str) or not _NAME.fullmatch(region):
        raise InvalidArgument(f"region {region!r}: 1-128 characters of letters, digits and . _ : -")
    if (
        not isinstance(url, str)
        or not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url)
        or len(url) > 512
    ):
        raise InvalidArgument(f"url {url!r} is not an http(s) URL")
    if isinstance(load, bool) or not isinstance(load, int | float) or not 0 <= load < 1e9:
        raise InvalidArgument(f"load must be a number >= 0, got {load!r}")
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float) or not 0 < ttl_s <= MAX_TTL_S:
        raise InvalidArgument(f"ttl_s must be in (0, {MAX_TTL_S:g}], got {ttl_s!r}")


def registration_request(
    router: Router, path: str, body: bytes, now: float
) -> tuple[int, dict[str, object]]:
    """Answer ``POST /register`` ({"name", "region", "url", "load", "ttl_s"}) or
    ``POST /deregister`` ({"name"}). Returns (status, JSON body)."""
    try:
        req = json.loads(body.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return 400, {"error": f"body is not JSON: {e}"}
    if not isinstance(req, dict):
        return 400, {"error": "body must be a JSON object"}
    if path == "/deregister":
        name = req.get("name")
        if not isinstance(name, str):
            return 400, {"error": "name is required"}
        return 200, {"deregistered": router.deregister(name)}
    if path != "/register":
        return 404, {"error": f"no such path {path!r}: POST /register or /deregister"}
    unknown = set(req) - {"name", "region", "url", "load", "ttl_s"}
    if unknown:
        return 400, {"error": f"unknown fields {sorted(unknown)}"}
    try:
        # Types are checked by register (the JSON may hold anything).
        fields: dict[str, Any] = req
        router.register(
            fields.get("name", ""),
            fields.get("region", ""),
            url=fields.get("url", ""),
            load=fields.get("load", 0.0),
            ttl_s=fields.get("ttl_s", 10.0),
            now=now,
        )
    except InvalidArgument as e:
        return 400, {"error": str(e)}
    return 200, {"registered": req["name"], "ttl_s": req.get("ttl_s", 10.0)}


def route_request(router: Router, target: str) -> tuple[int, dict[str, object]]:
    """Answer one HTTP request target: ``/route?tenant=T&blocks=H1,H2,...[&client_region=R]
    [&limit=N]`` or ``/stats``. Returns (status, JSON body)."""
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(target)
    q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if parts.path == "/stats":
        return 200, {
            "events_applied": router.events_applied,
            "nodes": {
                n.name: {
                    "region": n.region,
                    "load": n.load,
                    "url": n.url,
                    "registered": n.expires_at is not None,
                }
                for n in router.nodes.values()
            },
        }
    if parts.path != "/route":
        return 404, {"error": f"no such path {parts.path!r}: use /route or /stats"}
    if "tenant" not in q:
        return 400, {"error": "tenant is required"}
    try:
        limit = int(q["limit"]) if "limit" in q else None
    except ValueError:
        return 400, {"error": f"limit {q['limit']!r} is not an integer"}
    blocks = [b for b in q.get("blocks", "").split(",") if b]
    ranked = router.route(blocks, q["tenant"], client_region=q.get("client_region"), limit=limit)
    return 200, {"ranked": [dataclasses.asdict(s) for s in ranked]}


async def serve_router(
    broker_url: str,
    nodes: Iterable[ServingNode],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    regions: Sequence[str] | None = None,
    config: RouterConfig | None = None,
    snapshot: Snapshotter = forget_holder,
    started: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run a router: subscribe to events and answer ``GET /route`` and ``GET /stats`` with JSON
    on http://host:port until `stop` is set. `started(port)` is called once both are up."""
    router = Router(config, nodes)
    stop = stop or asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            length = 0
            for _ in range(100):  # headers, bounded: only Content-Length matters
                h = await asyncio.wait_for(reader.readline(), 5.0)
                if h in (b"\r\n", b"\n", b""):
                    break
                name, _, value = h.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip()) if value.strip().isdigit() else -1
            method, _, rest = line.decode("latin-1").partition(" ")
            target = rest.rsplit(" ", 1)[0]
            now = asyncio.get_running_loop().time()
            router.expire(now)
            status: int
            body: dict[str, object]
            if method == "GET":
                status, body = route_request(router, target)
            elif method == "POST":
                if not 0 <= length <= MAX_BODY_BYTES:
                    status, body = 413, {"error": f"body must be 0-{MAX_BODY_BYTES} bytes"}
                else:
                    data = await asyncio.wait_for(reader.readexactly(length), 5.0)
                    status, body = registration_request(router, target, data, now)
            else:
                status, body = 405, {"error": "GET /route, /stats; POST /register, /deregister"}
            out = json.dumps(body).encode()
            reason = {
                200: "OK",
                400: "Bad Request",
                404: "Not Found",
                405: "Not Allowed",
                413: "Payload Too Large",
            }
            writer.write(
                f"HTTP/1.1 {status} {reason.get(status, '')}\r\nContent-Type: application/json"
                f"\r\nContent-Length: {len(out)}\r\nConnection: close\r\n\r\n".encode()
                + out
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port)
    try:
        async with RouterService(router, broker_url, snapshot=snapshot, regions=regions) as svc:
            await svc.subscriber.wait_subscribed(30.0)
            if started is not None:
                started(server.sockets[0].getsockname()[1])
            await stop.wait()
    finally:
        server.close()
        await server.wait_closed()
