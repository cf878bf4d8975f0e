"""The simulated wide-area network: latency, jitter, drops, partitions and bandwidth between regions.

Purpose
    `SimNetwork` carries every message between simulated nodes and clients, on the virtual clock
    of a `SimEventLoop`. `SimTransport` is the `k2store.transport.Transport` a simulated node or
    client uses: the protocol code (`NodeService`) calls it exactly as it calls `GrpcTransport` in
    the real process, and cannot tell the difference.

How a call flows::

    caller ──serialize──▶ request on link src→dst ──(delay)──▶ dst's NodeService.handler(path)
       ▲                                                               │
       └──────────── response or typed error ◀──(delay)── link dst→src ┘

    delay = queueing behind earlier messages on the link (bandwidth) + size / bandwidth
            + one-way latency (RTT / 2) + jitter (uniform in [0, jitter])

    Requests and responses cross as serialized protobuf bytes and are parsed anew at the other
    end, so no mutable object is ever shared between nodes (a handler that mutates its request,
    as forwarding does, cannot affect the caller), and sizes are the real wire sizes.

Model
    - Endpoints are nodes (serve requests while attached to a `NodeService`) and clients (only
      call). Each sits in a region; node, client and region names share one namespace.
    - Latency, jitter, drop probability and bandwidth are set per unordered region pair (one
      value for both directions; within a region, the pair (r, r)). Defaults are DESIGN.md's:
      us-east<->eu-west 75 ms RTT, us-east<->ap-southeast 210 ms, eu-west<->ap-southeast 160 ms,
      1 ms inside a region, 1 Gbit/s per inter-region link and no limit inside a region.
    - Bandwidth is a FIFO per direction of an inter-region link: a 94 MB message holds the link
      for ~0.75 s at 1 Gbit/s and everything behind it waits. Messages between the same two
      endpoints can still overtake each other through jitter, as separate RPCs can.
    - Partitions cut ordered pairs of names (a node or a region at either end); `isolate` cuts a
      node or a region off from everyone else. They are checked when a message is sent: one
      already in flight still arrives.

Failure semantics (what the caller of `SimTransport.call` sees)
    - Request or response dropped (random drop or a cut): `DeadlineExceeded` after `timeout_s`
      of virtual time. The handler may have run: the outcome is ambiguous, as on a real network.
    - Target node down (crashed, not yet restarted): `Unavailable` after one round trip, the
      connection refused by the target machine's OS. A node that crashes while serving a request
      answers `Unavailable` (connection reset) the same way.
    - The caller itself is a crashed node: `Unavailable` at once (a dead process sends nothing).
    - A handler raising a `K2Error`: the same type with the same message, re-raised at the caller.
      Any other exception is a bug: it is recorded in `internal_errors` and the caller gets a
      plain `K2Error` "internal error", as the gRPC adapter reports INTERNAL.

Determinism
    Random choices (jitter, drops) come from one `random.Random` seeded by `reseed`, drawn in
    event order, and only when the relevant knob is non-zero. `trace_digest()` hashes every send,
    drop and delivery (virtual time, endpoints, method, payload bytes): two runs with the same
    seed have the same digest.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf.message import Message

from k2store.errors import DeadlineExceeded, K2Error, Unavailable, UnknownNode
from k2store.service import METHODS_BY_PATH
from k2store.sim.loop import SimEventLoop, current_sim_loop

if TYPE_CHECKING:
    from k2store.service import NodeService
    from k2store.wan import NetworkSettings

__all__ = [
    "DEFAULT_BANDWIDTH_BPS",
    "DEFAULT_RTT_S",
    "INTRA_REGION_RTT_S",
    "LinkStats",
    "SimNetwork",
    "SimTransport",
    "TraceEvent",
]

M = TypeVar("M", bound=Message)

DEFAULT_RTT_S: Mapping[frozenset[str], float] = {
    frozenset({"us-east", "eu-west"}): 0.075,
    frozenset({"us-east", "ap-southeast"}): 0.210,
    frozenset({"eu-west", "ap-southeast"}): 0.160,
}
"""Round-trip times between DESIGN.md's default regions."""
INTRA_REGION_RTT_S = 0.001
UNKNOWN_PAIR_RTT_S = 0.100
"""RTT between two regions with no entry in the table (a made-up region in a test)."""
DEFAULT_BANDWIDTH_BPS = 1e9
"""Bits per second on each direction of an inter-region link."""

_NS = 1_000_000_000
_ERROR_OVERHEAD_BYTES = 16
"""Wire size charged for an error reply on top of its message (status code and reason)."""


@dataclass(slots=True)
class LinkStats:
    """Traffic on one directed link (src endpoint -> dst endpoint); only ever grows."""

    messages: int = 0
    """Messages sent (including those then dropped)."""
    bytes: int = 0
    """Payload bytes sent (serialized protobuf, or the error message for an error reply)."""
    dropped: int = 0
    """Messages lost to a random drop or a partition."""


@dataclass(frozen=True, slots=True)
class TraceEvent:
    """One network event, kept when `SimNetwork(record_trace=True)`."""

    t_ns: int
    event: str
    """"send", "drop" or "deliver"."""
    src: str
    dst: str
    method: str
    """The RPC path; a response carries its request's path with a ":reply" suffix."""
    size: int


@dataclass(slots=True)
class _LinkParams:
    """Settings of one unordered region pair; both directions use them."""

    one_way_ns: int
    jitter_ns: int = 0
    drop_probability: float = 0.0
    bandwidth_bps: float | None = None
    """None: unlimited (no serialization delay, no queueing)."""


@dataclass(slots=True)
class _Endpoint:
    name: str
    region: str
    is_node: bool
    service: NodeService | None = None
    """The handlers while the node is up; None while it is down (always None for clients)."""
    incarnation: int = 0
    """Bumped on every crash, so replies addressed to a dead incarnation are discarded."""
    inflight: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    """Handler tasks by message id (insertion order = arrival order, for deterministic crash)."""


@dataclass(slots=True)
class _Pending:
    """A request in flight, and where its reply goes."""

    msg_id: int
    src: str
    src_incarnation: int
    dst: str
    method: str
    reply: asyncio.Future[_Outcome]
    loop: SimEventLoop
    """The simulation's loop (looked up once per call, not at every hop)."""


@dataclass(slots=True)
class _Link:
    """What `_transmit` needs about a directed endpoint pair, looked up once."""

    loopback: bool
    regions: tuple[str, str]
    """(source region, destination region): the bandwidth queue this pair shares."""
    params: _LinkParams
    stats: LinkStats | None
    """None until the first message: `link_stats` lists only pairs that carried one."""


class _TimedOut(K2Error):
    """Marks a reply the deadline completed (never raised: `call` raises DeadlineExceeded)."""


_Outcome = tuple[bytes, type[K2Error] | None]
"""A reply on the wire: the serialized response, or an error message and its type."""


def _expire(reply: asyncio.Future[_Outcome]) -> None:
    if not reply.done():
        reply.set_result((b"", _TimedOut))


class SimNetwork:
    """Latency matrix, faults and traffic counters between simulated endpoints.

    All settings may be changed while a simulation runs; a change applies to messages sent
    afterwards. Times are in seconds (floats) at the API and whole nanoseconds inside.
    """

    def __init__(
        self,
        *,
        rtt_s: Mapping[frozenset[str], float] | None = None,
        intra_region_rtt_s: float = INTRA_REGION_RTT_S,
        unknown_pair_rtt_s: float = UNKNOWN_PAIR_RTT_S,
        jitter_s: float = 0.0,
        drop_probability: float = 0.0,
        bandwidth_bps: float | None = DEFAULT_BANDWIDTH_BPS,
        intra_region_bandwidth_bps: float | None = None,
        seed: int | str = 0,
        record_trace: bool = False,
    ) -> None:
        """`rtt_s`: RTT per unordered region pair (DESIGN.md's table by default); pairs absent
        from it get `unknown_pair_rtt_s`. `jitter_s` and `drop_probability` apply to every link
        until changed per pair; `bandwidth_bps` to every inter-region link,
        `intra_region_bandwidth_bps` to links inside a region (None: unlimited)."""
        _check_nonneg("intra_region_rtt_s", intra_region_rtt_s)
        _check_nonneg("unknown_pair_rtt_s", unknown_pair_rtt_s)
        _check_nonneg("jitter_s", jitter_s)
        _check_probability(drop_probability)
        _check_bandwidth(bandwidth_bps)
        _check_bandwidth(intra_region_bandwidth_bps)
        self._rtt_table = dict(DEFAULT_RTT_S if rtt_s is None else rtt_s)
        self._intra_rtt_s = intra_region_rtt_s
        self._unknown_rtt_s = unknown_pair_rtt_s
        self._jitter_s = jitter_s
        self._drop_probability = drop_probability
        self._bandwidth_bps = bandwidth_bps
        self._intra_bandwidth_bps = intra_region_bandwidth_bps
        self._params: dict[tuple[str, str], _LinkParams] = {}
        self._busy_until_ns: dict[tuple[str, str], int] = {}
        self._endpoints: dict[str, _Endpoint] = {}
        self._cuts: set[tuple[str, str]] = set()
        self._isolated: set[str] = set()
        self._next_msg_id = 0
        self._links: dict[tuple[str, str], _Link] = {}
        self._rng = random.Random(seed)
        self._digest = hashlib.sha256()
        self._tags: dict[tuple[str, str, str, str], bytes] = {}
        self.record_trace = record_trace
        self.trace: list[TraceEvent] = []
        self.link_stats: dict[tuple[str, str], LinkStats] = {}
        """Traffic per directed (src, dst) endpoint pair."""
        self.internal_errors: list[tuple[str, str, BaseException]] = []
        """(node, method, exception) for every handler that raised something not a K2Error."""

    @classmethod
    def from_settings(cls, net: NetworkSettings, **kwargs: Any) -> SimNetwork:
        """The network a cluster file's ``[network]`` table describes (RTT matrix, RTT of
        pairs absent from it, intra-region RTT, jitter, bandwidth), so the simulator's delays
        and the coordinator's RTT priors (`NetworkSettings.rtt_of`) agree. `kwargs` go to the
        constructor (seed, record_trace, drop_probability, ...)."""
        return cls(
            rtt_s={pair: ms / 1000 for pair, ms in net.rtt_ms.items()},
            intra_region_rtt_s=net.intra_region_rtt_ms / 1000,
            unknown_pair_rtt_s=net.default_rtt_ms / 1000,
            jitter_s=net.jitter_ms / 1000,
            bandwidth_bps=net.bandwidth_mbit * 1e6 if net.bandwidth_mbit > 0 else None,
            **kwargs,
        )

    def reseed(self, seed: int | str) -> None:
        """Restart the random stream (jitter, drops) from `seed`."""
        self._rng = random.Random(seed)

    # -- endpoints -----------------------------------------------------------------------------

    def add_node(self, name: str, region: str) -> None:
        """Register a node (down until `attach`)."""
        self._add(_Endpoint(name, region, is_node=True))

    def add_client(self, name: str, region: str) -> None:
        """Register a client: it calls, never serves, never crashes."""
        self._add(_Endpoint(name, region, is_node=False))

    def _add(self, ep: _Endpoint) -> None:
        if ep.name in self._endpoints:
            raise ValueError(f"endpoint {ep.name!r} is already registered")
        self._endpoints[ep.name] = ep

    def attach(self, name: str, service: NodeService) -> None:
        """The node is up and serves requests with `service`."""
        ep = self._endpoint(name)
        if not ep.is_node:
            raise ValueError(f"{name!r} is a client; only nodes serve")
        ep.service = service

    def detach(self, name: str) -> None:
        """The node's process dies: in-flight handlers are cancelled (their callers get
        `Unavailable`), replies to its outstanding calls are discarded, new requests are refused."""
        ep = self._endpoint(name)
        ep.service = None
        ep.incarnation += 1
        tasks = list(ep.inflight.values())  # arrival order: deterministic
        ep.inflight.clear()
        for t in tasks:
            t.cancel()

    def is_up(self, name: str) -> bool:
        return self._endpoint(name).service is not None

    def region_of(self, name: str) -> str:
        return self._endpoint(name).region

    def endpoints(self) -> list[str]:
        return list(self._endpoints)

    def _endpoint(self, name: str) -> _Endpoint:
        ep = self._endpoints.get(name)
        if ep is None:
            raise UnknownNode(f"unknown endpoint {name!r}; the network has {list(self._endpoints)}")
        return ep

    # -- link settings -------------------------------------------------------------------------

    def _pair_params(self, a: str, b: str) -> _LinkParams:
        key = (a, b) if a <= b else (b, a)
        p = self._params.get(key)
        if p is None:
            if a == b:
                rtt, bw = self._intra_rtt_s, self._intra_bandwidth_bps
            else:
                rtt = self._rtt_table.get(frozenset({a, b}), self._unknown_rtt_s)
                bw = self._bandwidth_bps
            p = _LinkParams(
                one_way_ns=round(rtt * _NS / 2),
                jitter_ns=round(self._jitter_s * _NS),
                drop_probability=self._drop_probability,
                bandwidth_bps=bw,
            )
            self._params[key] = p
        return p

    def rtt_s(self, region_a: str, region_b: str) -> float:
        """Round-trip propagation time between two regions, without jitter or bandwidth."""
        return 2 * self._pair_params(region_a, region_b).one_way_ns / _NS

    def set_rtt(self, region_a: str, region_b: str, rtt_s: float) -> None:
        _check_nonneg("rtt_s", rtt_s)
        self._pair_params(region_a, region_b).one_way_ns = round(rtt_s * _NS / 2)

    def set_jitter(self, jitter_s: float, region_a: str | None = None, region_b: str = "") -> None:
        """Extra one-way delay, uniform in [0, jitter_s], on one region pair or (no pair given)
        on every pair, including ones not used yet."""
        _check_nonneg("jitter_s", jitter_s)
        ns = round(jitter_s * _NS)
        for p in self._select(region_a, region_b):
            p.jitter_ns = ns
        if region_a is None:
            self._jitter_s = jitter_s

    def set_drop_probability(
        self, probability: float, region_a: str | None = None, region_b: str = ""
    ) -> None:
        """Chance that any one message on the pair (or on every pair) is lost."""
        _check_probability(probability)
        for p in self._select(region_a, region_b):
            p.drop_probability = probability
        if region_a is None:
            self._drop_probability = probability

    def set_bandwidth(
        self, bandwidth_bps: float | None, region_a: str | None = None, region_b: str = ""
    ) -> None:
        """Bits per second per direction on one pair, or on every inter-region pair (None:
        unlimited)."""
        _check_bandwidth(bandwidth_bps)
        if region_a is not None:
            self._pair_params(region_a, region_b or region_a).bandwidth_bps = bandwidth_bps
            return
        for (a, b), p in self._params.items():
            if a != b:
                p.bandwidth_bps = bandwidth_bps
        self._bandwidth_bps = bandwidth_bps

    def _select(self, region_a: str | None, region_b: str) -> list[_LinkParams]:
        if region_a is None:
            return list(self._params.values())
        return [self._pair_params(region_a, region_b or region_a)]

    # -- partitions ----------------------------------------------------------------------------

    def partition(self, a: str, b: str, *, one_way: bool = False) -> None:
        """Drop messages from `a` to `b` (and from `b` to `a` unless `one_way`). Each side is a
        node, a client or a region; a region side matches every endpoint in it."""
        self._check_name(a)
        self._check_name(b)
        self._cuts.add((a, b))
        if not one_way:
            self._cuts.add((b, a))

    def isolate(self, name: str) -> None:
        """Cut a node (or a whole region) off from every endpoint outside it."""
        self._check_name(name)
        self._isolated.add(name)

    def heal(self, a: str | None = None, b: str | None = None) -> None:
        """Remove the cut between `a` and `b` (both directions), or every cut and isolation."""
        if a is None:
            self._cuts.clear()
            self._isolated.clear()
            return
        if b is None:
            self._isolated.discard(a)
            return
        self._cuts.discard((a, b))
        self._cuts.discard((b, a))

    def is_cut(self, src: str, dst: str) -> bool:
        s, d = self._endpoint(src), self._endpoint(dst)
        if self._cuts:
            for x in (s.name, s.region):
                for y in (d.name, d.region):
                    if (x, y) in self._cuts:
                        return True
        for iso in self._isolated:
            # Cut when exactly one end is inside the isolated node or region.
            if (iso in (s.name, s.region)) != (iso in (d.name, d.region)):
                return True
        return False

    def _check_name(self, name: str) -> None:
        if name not in self._endpoints and all(
            ep.region != name for ep in self._endpoints.values()
        ):
            raise UnknownNode(f"{name!r} is neither an endpoint nor a region of the network")

    # -- metrics -------------------------------------------------------------------------------

    def region_stats(self) -> dict[tuple[str, str], LinkStats]:
        """`link_stats` summed per directed (src region, dst region) pair."""
        out: dict[tuple[str, str], LinkStats] = {}
        for (src, dst), st in self.link_stats.items():
            key = (self._endpoints[src].region, self._endpoints[dst].region)
            agg = out.setdefault(key, LinkStats())
            agg.messages += st.messages
            agg.bytes += st.bytes
            agg.dropped += st.dropped
        return out

    def trace_digest(self) -> str:
        """SHA-256 over every network event so far: equal for runs with equal event order."""
        return self._digest.copy().hexdigest()

    def _record(
        self, t_ns: int, event: str, src: str, dst: str, method: str, payload: bytes
    ) -> None:
        # The bytes hashed are f"{t_ns}|{event}|{src}|{dst}|{method}|{len(payload)}|" + payload;
        # the middle part is built once per distinct (event, src, dst, method).
        key = (event, src, dst, method)
        tag = self._tags.get(key)
        if tag is None:
            tag = self._tags[key] = f"|{event}|{src}|{dst}|{method}|".encode()
        self._digest.update(b"%d%s%d|%s" % (t_ns, tag, len(payload), payload))
        if self.record_trace:
            self.trace.append(TraceEvent(t_ns, event, src, dst, method, len(payload)))

    # -- moving messages -----------------------------------------------------------------------

    def _transmit(self, now: int, src: str, dst: str, method: str, payload: bytes) -> int | None:
        """Account for a message sent at virtual time `now` (ns) and return its delay in ns, or
        None if it is lost."""
        link = self._links.get((src, dst))
        if link is None:
            link = self._link(src, dst)
        stats = link.stats
        if stats is None:
            stats = link.stats = self.link_stats[(src, dst)] = LinkStats()
        stats.messages += 1
        stats.bytes += len(payload)
        self._record(now, "send", src, dst, method, payload)
        if link.loopback:
            return 0  # loopback: no wire
        p = link.params
        if ((self._cuts or self._isolated) and self.is_cut(src, dst)) or (
            p.drop_probability > 0 and self._rng.random() < p.drop_probability
        ):
            stats.dropped += 1
            self._record(now, "drop", src, dst, method, b"")
            return None
        start = now
        if p.bandwidth_bps is not None:
            # FIFO per direction: wait for the messages ahead, then hold the link for our bits.
            busy = self._busy_until_ns
            start = max(now, busy.get(link.regions, 0))
            tx_ns = -(-len(payload) * 8 * _NS // round(p.bandwidth_bps))
            busy[link.regions] = start + tx_ns
            start += tx_ns
        jitter = self._rng.randint(0, p.jitter_ns) if p.jitter_ns > 0 else 0
        return start - now + p.one_way_ns + jitter

    def _link(self, src: str, dst: str) -> _Link:
        """The cached routing facts of a directed endpoint pair (endpoints never move region,
        and a pair's `_LinkParams` object is never replaced, only changed in place)."""
        s, d = self._endpoints[src], self._endpoints[dst]
        link = self._links[(src, dst)] = _Link(
            src == dst,
            (s.region, d.region),
            self._pair_params(s.region, d.region),
            self.link_stats.get((src, dst)),
        )
        return link

    async def call(
        self,
        src: str,
        dst: str,
        method: str,
        request: Message,
        response_type: type[M],
        timeout_s: float,
    ) -> M:
        """Send `request` from `src` to `dst` and wait for the reply; see the module docstring
        for every outcome."""
        loop = current_sim_loop()
        s = self._endpoint(src)
        if dst not in self._endpoints:
            self._endpoint(dst)  # UnknownNode
        if s.is_node and s.service is None:
            raise Unavailable(f"node {src!r} is down and cannot send {method}")
        if method not in METHODS_BY_PATH:
            raise K2Error(f"unknown method {method!r} (UNIMPLEMENTED)")
        payload = request.SerializeToString()
        reply: asyncio.Future[_Outcome] = loop.create_future()
        self._next_msg_id += 1
        pending = _Pending(self._next_msg_id, src, s.incarnation, dst, method, reply, loop)
        now = loop.virtual_ns()
        delay = self._transmit(now, src, dst, method, payload)
        if delay is not None:
            loop.call_at((now + delay) / _NS, self._arrive, pending, payload)
        # The deadline: a plain timer that completes the reply future, rather than
        # asyncio.timeout (which cancels and uncancels the calling task): one per message.
        deadline = (
            loop.call_later(timeout_s, _expire, reply)
            if timeout_s > 0
            else loop.call_soon(_expire, reply)
        )
        try:
            body, error = await reply
        finally:
            deadline.cancel()
        if error is not None:
            if error is _TimedOut:
                raise DeadlineExceeded(
                    f"node {dst!r} did not answer {method} from {src!r} within {timeout_s} s"
                )
            raise error(body.decode())
        return response_type.FromString(body)

    def _arrive(self, pending: _Pending, payload: bytes) -> None:
        loop = pending.loop
        self._record(
            loop.virtual_ns(), "deliver", pending.src, pending.dst, pending.method, payload
        )
        ep = self._endpoints[pending.dst]
        if ep.service is None:
            # The machine is up but no process listens: the OS refuses the connection.
            self._reply(
                pending, _error(Unavailable, f"node {pending.dst!r} is down (connection refused)")
            )
            return
        task = loop.create_task(self._serve(ep, ep.service, pending, payload))
        ep.inflight[pending.msg_id] = task

    async def _serve(
        self, ep: _Endpoint, service: NodeService, pending: _Pending, payload: bytes
    ) -> None:
        method = METHODS_BY_PATH[pending.method]
        incarnation = ep.incarnation
        try:
            handler = getattr(service, method.handler)
            response = await handler(method.request.FromString(payload))
            outcome: _Outcome = (response.SerializeToString(), None)
        except K2Error as e:
            outcome = _error(type(e), str(e))
        except asyncio.CancelledError:
            # The node crashed mid-request (or the simulation is ending): the kernel resets the
            # connection, which the caller sees as UNAVAILABLE.
            self._reply(
                pending,
                _error(Unavailable, f"node {pending.dst!r} crashed serving {pending.method}"),
            )
            raise
        except Exception as e:
            self.internal_errors.append((pending.dst, pending.method, e))
            outcome = _error(K2Error, f"internal error: {type(e).__name__}")
        finally:
            ep.inflight.pop(pending.msg_id, None)
        if ep.incarnation == incarnation:  # else the process died meanwhile and sends nothing
            self._reply(pending, outcome)

    def _reply(self, pending: _Pending, outcome: _Outcome) -> None:
        body, error = outcome
        size = body if error is None else body + bytes(_ERROR_OVERHEAD_BYTES)
        loop = pending.loop
        now = loop.virtual_ns()
        delay = self._transmit(now, pending.dst, pending.src, pending.method + ":reply", size)
        if delay is not None:
            loop.call_at((now + delay) / _NS, self._arrive_reply, pending, outcome)

    def _arrive_reply(self, pending: _Pending, outcome: _Outcome) -> None:
        self._record(
            pending.loop.virtual_ns(),
            "deliver",
            pending.dst,
            pending.src,
            pending.method + ":reply",
            outcome[0],
        )
        if self._endpoints[pending.src].incarnation != pending.src_incarnation:
            return  # the caller's process died since it asked; nobody is listening
        if not pending.reply.done():  # else the caller timed out or was cancelled
            pending.reply.set_result(outcome)


class SimTransport:
    """The `Transport` of one simulated endpoint (a node or a client) over a `SimNetwork`."""

    def __init__(self, network: SimNetwork, from_node: str) -> None:
        self.network = network
        self.from_node = from_node

    async def call(
        self, node: str, method: str, request: Message, response_type: type[M], *, timeout_s: float
    ) -> M:
        return await self.network.call(
            self.from_node, node, method, request, response_type, timeout_s
        )

    async def close(self) -> None:
        pass


def _error(cls: type[K2Error], message: str) -> _Outcome:
    return message.encode(), cls


def _check_nonneg(name: str, value: float) -> None:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def _check_probability(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"drop probability must be in [0, 1], got {p}")


def _check_bandwidth(bps: float | None) -> None:
    if bps is not None and bps <= 0:
        raise ValueError(f"bandwidth must be positive bits/s or None (unlimited), got {bps}")
