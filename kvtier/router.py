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
import dataclasses
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from k2store.client import AsyncClient
from k2store.errors import InvalidArgument
from kvtier.events import BlockEvent, EventKind, EventSubscriber, ResyncRequest

__all__ = [
    "DEFAULT_REGION_RTT_MS",
    "SHARED_TENANT",
    "HolderSnapshot",
    "RouteScore",
    "Router",
    "RouterConfig",
    "RouterService",
    "ServingNode",
    "forget_holder",
    "metadata_snapshotter",
    "parse_node_spec",
    "parse_rtt_spec",
    "route_request",
    "serve_router",
]

SHARED_TENANT = ""

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


@dataclass(frozen=True, slots=True)
class RouteScore:
    node: str
    region: str
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
    R's metadata says R holds (block stores serve every node of their region), per tenant."""

    async def snapshot(req: ResyncRequest) -> HolderSnapshot:
        prefix = f"{req.region}/kv/blk/"
        rows = await client.scan(prefix, prefix[:-1] + "0")
        blocks: dict[str, list[str]] = {}
        for key, raw in rows:
            parts = key.decode().split("/")  # R, kv, blk, nsid, hash
            if len(parts) == 5:
                tenant = str(json.loads(raw).get("tenant", ""))
                blocks.setdefault(tenant, []).append(parts[4])
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


def route_request(router: Router, target: str) -> tuple[int, dict[str, object]]:
    """Answer one HTTP request target: ``/route?tenant=T&blocks=H1,H2,...[&client_region=R]
    [&limit=N]`` or ``/stats``. Returns (status, JSON body)."""
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(target)
    q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if parts.path == "/stats":
        return 200, {
            "events_applied": router.events_applied,
            "nodes": {n.name: {"region": n.region, "load": n.load} for n in router.nodes.values()},
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
            for _ in range(100):  # headers: read and ignore, bounded
                h = await asyncio.wait_for(reader.readline(), 5.0)
                if h in (b"\r\n", b"\n", b""):
                    break
            method, _, rest = line.decode("latin-1").partition(" ")
            target = rest.rsplit(" ", 1)[0]
            status: int
            body: dict[str, object]
            if method != "GET":
                status, body = 405, {"error": "only GET"}
            else:
                status, body = route_request(router, target)
            data = json.dumps(body).encode()
            reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Not Allowed"}
            writer.write(
                f"HTTP/1.1 {status} {reason.get(status, '')}\r\nContent-Type: application/json"
                f"\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
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
