"""Block events on MQTT: what each holder of KV blocks stored, evicted or received by replication.

Data flow::

    block store / serving node                          router, placement, any consumer
    EventPublisher.publish(kind, blocks)                 EventSubscriber (aiomqtt, QoS 1)
      seq += 1, into a bounded outbox  --MQTT-->  decode -> EventSequencer.offer()
      background task sends in order,                       in order    -> handler(event)
      reconnects with backoff                               gap / new   -> resync hook re-reads
                                                            epoch          the store, then
                                                                           resync_done()

Topics: ``<prefix>/<region>/<kind>`` with prefix ``k2/kv`` and kind one of ``stored``,
``evicted``, ``replicated``, ``heartbeat``; a consumer of one region subscribes to
``k2/kv/<region>/+``, of all regions to ``k2/kv/+/+``.

Payload: one UTF-8 JSON object (keys sorted), version 1::

    {"v": 1, "kind": "stored", "publisher": "bs-us-east-1", "epoch": 4711, "seq": 12,
     "region": "us-east", "node": "bs-us-east-1", "tenant": "acme",
     "blocks": ["9f2c...", ...], "src_region": "", "load": 0.0, "ts_ns": 1700000000000000000}

- `blocks` are chained block hashes as hex strings, opaque here. `replicated` means the bytes
  are now also held in `region` (copied from `src_region`); `tenant` "" is the shared namespace
  (blocks a tenant opted in to share).
- `heartbeat` carries the publisher's last assigned `seq` (it consumes no number) and its load.

Security: with `MqttCredentials` (kvtier/broker.py) publishers and subscribers connect with TLS
and log in as a principal of the cluster (its name, its bearer token); the broker URL is then
``mqtts://``. Credentials are never logged (log lines name the URL, which holds none).

Sequence contract (per publisher id)
    - `epoch` is chosen when a publisher starts and never reused; within an epoch `seq` runs
      1, 2, 3, ... with no gaps at the source. A number is consumed when the event is created,
      before it is sent, so an event the publisher fails to deliver (outbox overflow while the
      broker is away) shows up at every consumer as a gap, never as silence.
    - An event is published only after the change it describes is durable and (for metadata)
      committed to the store. So a resync that reads the store after the consumer has seen seq
      s reflects every event up to s.
    - QoS 1 may deliver twice, and brokers only order messages within one topic: consumers drop
      duplicates, hold early events (up to `reorder_window`), and declare a gap when the window
      fills or when a heartbeat shows a hole that a previous heartbeat already showed.
    - A gap, an unknown publisher that did not start at seq 1, or a new epoch (a restart) makes
      the consumer call its resync hook for that publisher; events up to the highest seq seen are
      then dropped (the store covers them) and later ones are applied in order. Applying an
      event twice is harmless (stored/evicted are set operations).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from k2store.errors import InvalidArgument
from kvtier.broker import MqttCredentials, client_options, parse_broker_url
from truetime.clock import ClockSource

__all__ = [
    "DEFAULT_TOPIC_PREFIX",
    "PAYLOAD_VERSION",
    "BlockEvent",
    "EventKind",
    "EventPublisher",
    "EventSequencer",
    "EventSubscriber",
    "ReconnectPolicy",
    "ResyncRequest",
    "SequencerStats",
    "Step",
    "decode_event",
    "encode_event",
    "event_topic",
    "subscription_topic",
]

log = logging.getLogger(__name__)

DEFAULT_TOPIC_PREFIX = "k2/kv"
PAYLOAD_VERSION = 1


class EventKind(enum.StrEnum):
    STORED = "stored"
    EVICTED = "evicted"
    REPLICATED = "replicated"
    HEARTBEAT = "heartbeat"


@dataclass(frozen=True, slots=True)
class BlockEvent:
    kind: EventKind
    publisher: str
    epoch: int
    seq: int
    region: str
    node: str
    """The holder whose blocks changed (a block store node or a serving node)."""
    tenant: str = ""
    blocks: tuple[str, ...] = ()
    src_region: str = ""
    load: float = 0.0
    ts_ns: int = 0


def event_topic(region: str, kind: EventKind | str, prefix: str = DEFAULT_TOPIC_PREFIX) -> str:
    return f"{prefix}/{region}/{EventKind(kind).value}"


def subscription_topic(region: str | None = None, prefix: str = DEFAULT_TOPIC_PREFIX) -> str:
    """The filter for every event of `region` (None: of every region)."""
    return f"{prefix}/{region or '+'}/+"


def encode_event(ev: BlockEvent) -> bytes:
    return json.dumps(
        {
            "v": PAYLOAD_VERSION,
            "kind": ev.kind.value,
            "publisher": ev.publisher,
            "epoch": ev.epoch,
            "seq": ev.seq,
            "region": ev.region,
            "node": ev.node,
            "tenant": ev.tenant,
            "blocks": list(ev.blocks),
            "src_region": ev.src_region,
            "load": ev.load,
            "ts_ns": ev.ts_ns,
        },
        separators=(",", ":"),
        sort_keys=True,
    ).encode()


def decode_event(payload: bytes | bytearray | str) -> BlockEvent:
    """Parse a payload; InvalidArgument (naming the field) for anything malformed."""
    try:
        d = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"event payload is not JSON: {e}") from None
    if not isinstance(d, dict) or d.get("v") != PAYLOAD_VERSION:
        version = d.get("v") if isinstance(d, dict) else None
        raise InvalidArgument(f"event payload version {version!r}: expected {PAYLOAD_VERSION}")
    try:
        ev = BlockEvent(
            kind=EventKind(d["kind"]),
            publisher=_str(d, "publisher"),
            epoch=_int(d, "epoch"),
            seq=_int(d, "seq"),
            region=_str(d, "region"),
            node=_str(d, "node"),
            tenant=str(d.get("tenant", "")),
            blocks=tuple(str(b) for b in d.get("blocks", ())),
            src_region=str(d.get("src_region", "")),
            load=float(d.get("load", 0.0)),
            ts_ns=int(d.get("ts_ns", 0)),
        )
    except (KeyError, ValueError, TypeError) as e:
        raise InvalidArgument(f"event payload field {e}") from None
    if ev.seq < 0 or (ev.seq == 0 and ev.kind is not EventKind.HEARTBEAT):
        raise InvalidArgument(f"event seq {ev.seq} from {ev.publisher!r}: must be >= 1")
    return ev


def _str(d: dict[str, Any], k: str) -> str:
    v = d[k]
    if not isinstance(v, str) or not v:
        raise ValueError(f"{k!r} must be a non-empty string")
    return v


def _int(d: dict[str, Any], k: str) -> int:
    v = d[k]
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"{k!r} must be an integer")
    return v


# -- the consumer core: no I/O --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResyncRequest:
    """Re-read the state of `node` (in `region`) from the store: events up to `upto_seq` of this
    publisher epoch are covered by the store and will not be applied."""

    publisher: str
    epoch: int
    region: str
    node: str
    upto_seq: int
    reason: str


@dataclass(frozen=True, slots=True)
class Step:
    """What the driver must do after `offer`: apply `deliver` in order, then (if set) resync."""

    deliver: tuple[BlockEvent, ...] = ()
    resync: ResyncRequest | None = None
    duplicate: bool = False


@dataclass
class SequencerStats:
    delivered: int = 0
    duplicates: int = 0
    reordered: int = 0
    """Events that arrived early and were delivered once the missing ones came."""
    gaps: int = 0
    resyncs: int = 0
    stale_epoch: int = 0


@dataclass
class _Stream:
    publisher: str
    epoch: int
    region: str
    node: str
    next_seq: int
    """The next seq to deliver."""
    max_seen: int = 0
    held: dict[int, BlockEvent] = field(default_factory=dict)
    suspect_upto: int | None = None
    """A heartbeat said events up to here existed while some were missing."""
    resyncing: ResyncRequest | None = None
    needs_resync: bool = False
    """A resync was lost (overflow while resyncing, or the hook failed): ask again."""
    retired_epochs: deque[int] = field(default_factory=lambda: deque(maxlen=8))


class EventSequencer:
    """Per-publisher ordering, de-duplication and gap detection (see the module docstring).

    Step function: `offer` an event, get back what to deliver and whether to resync; after the
    resync, call `resync_done` with the same request and deliver what it returns (or
    `resync_failed`, and the next event of that publisher asks again). While a publisher is
    being resynced its events are held, not delivered.
    """

    def __init__(self, *, reorder_window: int = 64, max_held: int = 4096) -> None:
        if reorder_window < 0 or max_held < reorder_window:
            raise InvalidArgument("need 0 <= reorder_window <= max_held")
        self.reorder_window = reorder_window
        self.max_held = max_held
        self.streams: dict[str, _Stream] = {}
        self.stats = SequencerStats()

    def offer(self, ev: BlockEvent) -> Step:
        st = self.streams.get(ev.publisher)
        if st is not None and ev.epoch != st.epoch and ev.epoch in st.retired_epochs:
            self.stats.stale_epoch += 1
            return Step(duplicate=True)
        if ev.kind is EventKind.HEARTBEAT:
            return self._heartbeat(st, ev)
        if st is None:
            if ev.seq != 1:
                return self._restart(ev, "first event seen is not seq 1")
            st = self.streams[ev.publisher] = _Stream(ev.publisher, ev.epoch, ev.region, ev.node, 1)
        elif ev.epoch != st.epoch:
            return self._restart(ev, f"new epoch {ev.epoch} (was {st.epoch})")
        if ev.seq < st.next_seq or ev.seq in st.held:
            self.stats.duplicates += 1
            return Step(duplicate=True)
        st.max_seen = max(st.max_seen, ev.seq)
        st.held[ev.seq] = ev
        if st.resyncing is not None:
            if len(st.held) > self.max_held:  # forget them; resync_done asks again
                st.held.clear()
                st.needs_resync = True
            return Step()
        if st.needs_resync:
            return Step(resync=self._gap(st, "an earlier resync did not complete"))
        out = self._drain(st)
        if len(st.held) > self.reorder_window:
            return Step(out, self._gap(st, f"{len(st.held)} events held past a hole"))
        return Step(out)

    def resync_done(self, req: ResyncRequest) -> Step:
        """The store has been re-read for `req`: drop what it covers, deliver what follows."""
        st = self.streams.get(req.publisher)
        if st is None or st.resyncing != req:
            return Step()
        st.resyncing = None
        st.suspect_upto = None
        if st.needs_resync:
            return Step(resync=self._gap(st, "events overflowed while resyncing"))
        self.stats.resyncs += 1
        st.held = {s: e for s, e in st.held.items() if s > req.upto_seq}
        st.next_seq = max(st.next_seq, req.upto_seq + 1)
        return Step(self._drain(st))

    def resync_failed(self, req: ResyncRequest) -> None:
        """The hook could not re-read the store; the publisher's next event asks again."""
        st = self.streams.get(req.publisher)
        if st is not None and st.resyncing == req:
            st.resyncing = None
            st.needs_resync = True

    def invalidate(self, publisher: str) -> None:
        """The consumer's view of `publisher` can no longer be trusted (its handler failed):
        the publisher's next event or heartbeat asks for a resync."""
        st = self.streams.get(publisher)
        if st is not None and st.resyncing is None:
            st.needs_resync = True

    def check_gaps(self) -> list[ResyncRequest]:
        """Declare every open hole a gap now (a driver calls this when it has been idle)."""
        return [
            self._gap(st, "hole still open when checked")
            for st in self.streams.values()
            if st.resyncing is None and (st.held or st.needs_resync)
        ]

    # -- internals -------------------------------------------------------------------------------

    def _heartbeat(self, st: _Stream | None, ev: BlockEvent) -> Step:
        hb = (ev,)
        if st is None:
            if ev.seq != 0:
                return Step(hb, self._restart(ev, "first heard of after seq 0").resync)
            self.streams[ev.publisher] = _Stream(ev.publisher, ev.epoch, ev.region, ev.node, 1)
            return Step(hb)
        if ev.epoch != st.epoch:
            return Step(hb, self._restart(ev, f"new epoch {ev.epoch} (was {st.epoch})").resync)
        st.max_seen = max(st.max_seen, ev.seq)
        if st.resyncing is not None:
            return Step(hb)
        if st.needs_resync:
            return Step(hb, self._gap(st, "an earlier resync did not complete"))
        if ev.seq < st.next_seq:
            st.suspect_upto = None
            return Step(hb)
        if st.suspect_upto is not None and st.next_seq <= st.suspect_upto:
            return Step(hb, self._gap(st, f"seq {st.next_seq} missing across two heartbeats"))
        st.suspect_upto = ev.seq
        return Step(hb)

    def _restart(self, ev: BlockEvent, reason: str) -> Step:
        """A publisher seen for the first time mid-stream, or in a new epoch: start its stream
        after `ev` (which the resync covers) and resync."""
        old = self.streams.get(ev.publisher)
        st = _Stream(ev.publisher, ev.epoch, ev.region, ev.node, ev.seq + 1, max_seen=ev.seq)
        if old is not None:
            st.retired_epochs = old.retired_epochs
            st.retired_epochs.append(old.epoch)
        self.streams[ev.publisher] = st
        return Step(resync=self._gap(st, reason))

    def _gap(self, st: _Stream, reason: str) -> ResyncRequest:
        self.stats.gaps += 1
        st.needs_resync = False
        req = ResyncRequest(st.publisher, st.epoch, st.region, st.node, st.max_seen, reason)
        st.resyncing = req
        return req

    def _drain(self, st: _Stream) -> tuple[BlockEvent, ...]:
        out: list[BlockEvent] = []
        for _ in range(len(st.held)):
            ev = st.held.pop(st.next_seq, None)
            if ev is None:
                break
            out.append(ev)
            st.next_seq += 1
        self.stats.reordered += max(0, len(out) - 1)
        self.stats.delivered += len(out)
        return tuple(out)


# -- drivers: aiomqtt ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReconnectPolicy:
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    max_consecutive_failures: int = 600
    """Connection attempts in a row that may fail before the driver gives up and records the
    error (about 20 minutes at the maximum backoff)."""
    connect_timeout_s: float = 5.0


class EventPublisher:
    """Publishes one holder's block events (see the module docstring for the contract).

    `publish` never blocks and never raises for broker trouble: it numbers the event and queues
    it; a background task sends the queue in order over one aiomqtt connection, reconnecting with
    backoff. When the queue is full the oldest event is dropped (counted in `dropped`); its
    number is gone, so consumers see the gap and resync.
    """

    def __init__(
        self,
        broker_url: str,
        *,
        region: str,
        node: str,
        clock: ClockSource,
        publisher_id: str | None = None,
        epoch: int | None = None,
        topic_prefix: str = DEFAULT_TOPIC_PREFIX,
        outbox_limit: int = 4096,
        heartbeat_s: float | None = 1.0,
        reconnect: ReconnectPolicy | None = None,
        rng: random.Random | None = None,
        credentials: MqttCredentials | None = None,
    ) -> None:
        """`epoch`: unique per publisher start (default: random 63 bits from `rng`).
        `heartbeat_s`: interval of heartbeats (None: none; consumers then find a lost last
        event only when the next one arrives). `clock` stamps events (`ts_ns`).
        `credentials`: TLS and a login for a secured broker (kvtier/broker.py)."""
        self.address = parse_broker_url(broker_url)
        self.credentials = credentials
        for what, v in (("region", region), ("node", node)):
            if not v or "/" in v or "+" in v or "#" in v:
                raise InvalidArgument(f"{what} {v!r}: must be non-empty, without / + #")
        if outbox_limit < 1:
            raise InvalidArgument(f"outbox_limit must be >= 1, got {outbox_limit}")
        self.region = region
        self.node = node
        self.publisher_id = publisher_id or node
        self._rng = rng or random.Random()
        self.epoch = epoch if epoch is not None else self._rng.getrandbits(63)
        self.clock = clock
        self.topic_prefix = topic_prefix
        self.outbox_limit = outbox_limit
        self.heartbeat_s = heartbeat_s
        self.reconnect = reconnect or ReconnectPolicy()
        self.seq = 0
        """Last number assigned."""
        self.load = 0.0
        self._outbox: deque[BlockEvent] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self.sent = 0
        self.dropped = 0
        self.connects = 0
        self.failure: BaseException | None = None
        """Set when the driver gave up (ReconnectPolicy.max_consecutive_failures)."""

    # -- the caller's side ----------------------------------------------------------------------

    def publish(
        self,
        kind: EventKind | str,
        blocks: Sequence[str],
        *,
        tenant: str = "",
        src_region: str = "",
    ) -> BlockEvent:
        kind = EventKind(kind)
        if kind is EventKind.HEARTBEAT:
            raise InvalidArgument("heartbeats are sent by the publisher itself")
        self.seq += 1
        ev = BlockEvent(
            kind,
            self.publisher_id,
            self.epoch,
            self.seq,
            self.region,
            self.node,
            tenant,
            tuple(str(b) for b in blocks),
            src_region,
            self.load,
            self.clock.now_ns(),
        )
        if len(self._outbox) >= self.outbox_limit:
            self._outbox.popleft()
            self.dropped += 1
        self._outbox.append(ev)
        self._wake.set()
        return ev

    def set_load(self, load: float) -> None:
        """Current load (e.g. running requests); carried by the next event or heartbeat."""
        self.load = float(load)

    @property
    def pending(self) -> int:
        return len(self._outbox)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout_s: float = 5.0) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout_s)

    async def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until everything queued so far has been handed to the broker (False: timeout)."""
        for _ in range(max(1, int(timeout_s / 0.005))):
            if not self._outbox:
                return True
            if self.failure is not None:
                return False
            await asyncio.sleep(0.005)
        return not self._outbox

    async def start(self) -> EventPublisher:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"k2-events-pub-{self.publisher_id}"
            )
        return self

    async def close(self, *, flush_timeout_s: float = 1.0) -> None:
        if self._task is None:
            return
        if self._connected.is_set():
            await self.flush(flush_timeout_s)
        task, self._task = self._task, None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def __aenter__(self) -> EventPublisher:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the background task --------------------------------------------------------------------

    async def _run(self) -> None:
        policy = self.reconnect
        backoff = policy.initial_backoff_s
        failures = 0
        while failures < policy.max_consecutive_failures:
            try:
                async with aiomqtt.Client(
                    self.address.host,
                    self.address.port,
                    identifier=f"k2-pub-{self.publisher_id}-{self.epoch:x}",
                    timeout=policy.connect_timeout_s,
                    clean_session=True,
                    **client_options(self.address, self.credentials),
                ) as client:
                    self.connects += 1
                    failures, backoff = 0, policy.initial_backoff_s
                    self._connected.set()
                    await self._pump(client)
            except aiomqtt.MqttError as e:
                failures += 1
                log.info("publisher %s: broker lost (%s); retry in %.2fs", self.node, e, backoff)
            finally:
                self._connected.clear()
            await asyncio.sleep(backoff * (0.5 + self._rng.random()))
            backoff = min(backoff * 2, policy.max_backoff_s)
        self.failure = ConnectionError(
            f"publisher {self.publisher_id}: broker {self.address.url} unreachable after "
            f"{failures} attempts"
        )

    async def _pump(self, client: aiomqtt.Client) -> None:
        """Send the outbox in order; an event leaves the outbox only once the broker took it
        (QoS 1 ack), so a connection lost mid-send re-sends it (consumers drop the duplicate)."""
        while True:
            for _ in range(len(self._outbox)):
                ev = self._outbox[0]
                await client.publish(
                    event_topic(ev.region, ev.kind, self.topic_prefix), encode_event(ev), qos=1
                )
                if self._outbox and self._outbox[0] is ev:
                    self._outbox.popleft()
                self.sent += 1
            if self._outbox:
                continue
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.heartbeat_s)
            except TimeoutError:
                hb = BlockEvent(
                    EventKind.HEARTBEAT,
                    self.publisher_id,
                    self.epoch,
                    self.seq,
                    self.region,
                    self.node,
                    load=self.load,
                    ts_ns=self.clock.now_ns(),
                )
                await client.publish(
                    event_topic(self.region, EventKind.HEARTBEAT, self.topic_prefix),
                    encode_event(hb),
                    qos=1,
                )


EventHandler = Callable[[BlockEvent], None]
ResyncHook = Callable[[ResyncRequest], Awaitable[None]]


class EventSubscriber:
    """Consumes block events and keeps the consumer's view exact (see the module docstring).

    `handler(event)` is called for each event in per-publisher order (heartbeats included, for
    their load). `resync(request)` must re-read the state of `request.node` from the store and
    replace the consumer's view of it; events it covers are then skipped. If the hook raises, the
    request is retried at the publisher's next event or heartbeat.
    """

    def __init__(
        self,
        broker_url: str,
        *,
        handler: EventHandler,
        resync: ResyncHook,
        regions: Sequence[str] | None = None,
        topic_prefix: str = DEFAULT_TOPIC_PREFIX,
        sequencer: EventSequencer | None = None,
        reconnect: ReconnectPolicy | None = None,
        client_id: str | None = None,
        rng: random.Random | None = None,
        credentials: MqttCredentials | None = None,
    ) -> None:
        """`credentials`: TLS and a login for a secured broker (kvtier/broker.py)."""
        self.address = parse_broker_url(broker_url)
        self.credentials = credentials
        self.handler = handler
        self.resync = resync
        wanted: Sequence[str | None] = list(regions) if regions else [None]
        self.topics = [subscription_topic(r, topic_prefix) for r in wanted]
        self.sequencer = sequencer or EventSequencer()
        self.reconnect = reconnect or ReconnectPolicy()
        self._rng = rng or random.Random()
        self.client_id = client_id or f"k2-sub-{self._rng.getrandbits(48):x}"
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self.bad_payloads = 0
        self.handler_errors = 0
        self.resync_failures = 0
        self.connects = 0
        self.failure: BaseException | None = None

    async def start(self) -> EventSubscriber:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"k2-events-sub-{self.client_id}"
            )
        return self

    async def wait_subscribed(self, timeout_s: float = 5.0) -> None:
        await asyncio.wait_for(self._subscribed.wait(), timeout_s)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> EventSubscriber:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def handle_payload(self, payload: bytes | bytearray | str) -> None:
        """Feed one raw payload through decoding, sequencing, the handler and resyncs (the
        network loop calls this; tests may call it directly)."""
        try:
            ev = decode_event(payload)
        except InvalidArgument as e:
            self.bad_payloads += 1
            log.warning("dropping a malformed event: %s", e)
            return
        await self._apply(self.sequencer.offer(ev))

    async def _apply(self, step: Step) -> None:
        # Bounded: each resync_done either delivers and stops, or asks for one more resync.
        for _ in range(4):
            for ev in step.deliver:
                try:
                    self.handler(ev)
                except Exception:
                    self.handler_errors += 1
                    log.exception("event handler failed on %s seq %d", ev.publisher, ev.seq)
                    self.sequencer.invalidate(ev.publisher)
            if step.resync is None:
                return
            req = step.resync
            try:
                await self.resync(req)
            except Exception:
                self.resync_failures += 1
                log.exception("resync of %s failed; retried at its next event", req.node)
                self.sequencer.resync_failed(req)
                return
            step = self.sequencer.resync_done(req)

    async def _run(self) -> None:
        policy = self.reconnect
        backoff = policy.initial_backoff_s
        failures = 0
        while failures < policy.max_consecutive_failures:
            try:
                async with aiomqtt.Client(
                    self.address.host,
                    self.address.port,
                    identifier=self.client_id,
                    timeout=policy.connect_timeout_s,
                    clean_session=True,
                    **client_options(self.address, self.credentials),
                ) as client:
                    for t in self.topics:
                        await client.subscribe(t, qos=1)
                    self.connects += 1
                    failures, backoff = 0, policy.initial_backoff_s
                    self._subscribed.set()
                    async for msg in client.messages:
                        payload = msg.payload
                        if isinstance(payload, bytes | bytearray | str):
                            await self.handle_payload(payload)
                        else:
                            self.bad_payloads += 1
            except aiomqtt.MqttError as e:
                failures += 1
                log.info("subscriber %s: broker lost (%s)", self.client_id, e)
            finally:
                self._subscribed.clear()
            await asyncio.sleep(backoff * (0.5 + self._rng.random()))
            backoff = min(backoff * 2, policy.max_backoff_s)
        self.failure = ConnectionError(
            f"subscriber {self.client_id}: broker {self.address.url} unreachable"
        )
