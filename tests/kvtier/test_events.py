"""Block events: payloads, the sequencer's ordering / duplicate / gap rules, and real round trips
through the embedded amqtt broker (and mosquitto when it is installed)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest
from mosquitto_env import SKIP_REASON, free_port, mosquitto_exe, running_mosquitto

from k2store.errors import InvalidArgument
from kvtier.broker import EmbeddedBroker, parse_broker_url
from kvtier.events import (
    BlockEvent,
    EventKind,
    EventPublisher,
    EventSequencer,
    EventSubscriber,
    ReconnectPolicy,
    ResyncRequest,
    decode_event,
    encode_event,
    event_topic,
    subscription_topic,
)
from truetime import ManualClock

FAST = ReconnectPolicy(initial_backoff_s=0.01, max_backoff_s=0.05, max_consecutive_failures=200)


def ev(
    seq: int, *, pub: str = "bs-1", epoch: int = 7, kind: EventKind = EventKind.STORED
) -> BlockEvent:
    return BlockEvent(kind, pub, epoch, seq, "us-east", pub, "acme", (f"h{seq}",))


def hb(seq: int, *, pub: str = "bs-1", epoch: int = 7) -> BlockEvent:
    return BlockEvent(EventKind.HEARTBEAT, pub, epoch, seq, "us-east", pub)


# -- payloads and topics --------------------------------------------------------------------------


def test_payload_round_trip_and_topics() -> None:
    e = BlockEvent(
        EventKind.REPLICATED, "p", 1, 3, "eu-west", "bs-eu", "t", ("aa", "bb"), "us-east", 2.5, 9
    )
    assert decode_event(encode_event(e)) == e
    assert event_topic("eu-west", "replicated") == "k2/kv/eu-west/replicated"
    assert subscription_topic() == "k2/kv/+/+"
    assert subscription_topic("us-east") == "k2/kv/us-east/+"
    for bad in [b"nope", b"[]", b'{"v": 2}', b'{"v": 1, "kind": "stored"}', b'{"v":1,"kind":"x"}']:
        with pytest.raises(InvalidArgument):
            decode_event(bad)
    with pytest.raises(InvalidArgument, match="seq 0"):
        decode_event(encode_event(ev(1)).replace(b'"seq":1', b'"seq":0'))


def test_broker_urls() -> None:
    assert parse_broker_url("mqtt://127.0.0.1:1884").port == 1884
    assert parse_broker_url("tcp://localhost").port == 1883
    assert parse_broker_url("127.0.0.1:5").url == "mqtt://127.0.0.1:5"
    for bad in ["http://x:1", "mqtt://", "mqtt://h:notaport"]:
        with pytest.raises(InvalidArgument):
            parse_broker_url(bad)


# -- the sequencer (no I/O) -----------------------------------------------------------------------


def seqs(events: tuple[BlockEvent, ...]) -> list[int]:
    return [e.seq for e in events]


def test_in_order_events_deliver_and_duplicates_are_dropped() -> None:
    s = EventSequencer()
    assert seqs(s.offer(ev(1)).deliver) == [1]
    assert seqs(s.offer(ev(2)).deliver) == [2]
    dup = s.offer(ev(2))
    assert dup.duplicate and not dup.deliver and dup.resync is None
    assert s.offer(ev(1)).duplicate
    assert (s.stats.delivered, s.stats.duplicates, s.stats.gaps) == (2, 2, 0)


def test_reordered_events_are_held_then_delivered_in_order() -> None:
    s = EventSequencer(reorder_window=4)
    s.offer(ev(1))
    assert s.offer(ev(3)).deliver == ()
    assert s.offer(ev(3)).duplicate  # a duplicate of a held event
    assert seqs(s.offer(ev(2)).deliver) == [2, 3]
    assert s.stats.reordered == 1 and s.stats.gaps == 0


def test_a_gap_past_the_window_resyncs_and_the_store_covers_what_came_before() -> None:
    s = EventSequencer(reorder_window=2)
    s.offer(ev(1))
    s.offer(ev(3))
    s.offer(ev(4))
    step = s.offer(ev(5))  # 3 held past the hole at 2: a gap
    assert step.resync is not None and step.resync.upto_seq == 5
    assert step.resync.node == "bs-1" and "held past a hole" in step.resync.reason
    assert s.offer(ev(6)).deliver == ()  # held while resyncing
    done = s.resync_done(step.resync)
    assert seqs(done.deliver) == [6]  # 3..5 are covered by the store's snapshot
    assert s.offer(ev(2)).duplicate  # the lost event, arriving late, is not applied
    assert seqs(s.offer(ev(7)).deliver) == [7]
    assert (s.stats.gaps, s.stats.resyncs) == (1, 1)


def test_heartbeats_reveal_a_lost_last_event() -> None:
    s = EventSequencer()
    s.offer(ev(1))
    # Event 2 is lost; the publisher goes quiet. One heartbeat may race event 2 on its topic...
    first = s.offer(hb(2))
    assert first.resync is None and seqs(first.deliver) == [2]  # heartbeats pass through
    # ...a second heartbeat with 2 still missing is a gap.
    second = s.offer(hb(2))
    assert second.resync is not None and second.resync.upto_seq == 2
    s.resync_done(second.resync)
    assert seqs(s.offer(ev(3)).deliver) == [3]
    # Caught up: heartbeats stay quiet.
    assert s.offer(hb(3)).resync is None and s.offer(hb(3)).resync is None


def test_unknown_publisher_mid_stream_and_new_epochs_resync() -> None:
    s = EventSequencer()
    late = s.offer(ev(40))  # first heard of at seq 40: history missed
    assert late.resync is not None and late.resync.upto_seq == 40 and not late.deliver
    assert seqs(s.resync_done(late.resync).deliver) == []
    assert seqs(s.offer(ev(41)).deliver) == [41]
    restarted = s.offer(ev(1, epoch=8))  # the publisher restarted
    assert restarted.resync is not None and "new epoch" in restarted.resync.reason
    s.resync_done(restarted.resync)
    assert seqs(s.offer(ev(2, epoch=8)).deliver) == [2]
    assert s.offer(ev(42, epoch=7)).duplicate  # a straggler of the old epoch
    assert s.stats.stale_epoch == 1
    # Publishers are independent; a new one starting at 1 needs no resync.
    assert seqs(s.offer(ev(1, pub="bs-2")).deliver) == [1]


def test_a_failed_resync_is_asked_again() -> None:
    s = EventSequencer(reorder_window=0)
    s.offer(ev(1))
    req = s.offer(ev(3)).resync
    assert req is not None
    s.resync_failed(req)
    again = s.offer(ev(4))
    assert again.resync is not None and again.resync.upto_seq == 4
    assert seqs(s.resync_done(again.resync).deliver) == []
    assert s.check_gaps() == []
    # An idle driver can force an open hole to count as a gap.
    s2 = EventSequencer(reorder_window=4)
    s2.offer(ev(1))
    s2.offer(ev(3))
    (forced,) = s2.check_gaps()
    assert forced.upto_seq == 3 and s2.check_gaps() == []


# -- real brokers ---------------------------------------------------------------------------------


async def collect(url: str, topic: str, n: int, ready: asyncio.Event) -> list[tuple[str, bytes]]:
    addr = parse_broker_url(url)
    got: list[tuple[str, bytes]] = []
    async with aiomqtt.Client(addr.host, addr.port, identifier="standalone-sub") as c:
        await c.subscribe(topic, qos=1)
        ready.set()
        async for m in c.messages:
            assert isinstance(m.payload, bytes)
            got.append((str(m.topic), m.payload))
            if len(got) == n:
                break
    return got


async def round_trip(url: str) -> None:
    ready = asyncio.Event()
    sub = asyncio.create_task(collect(url, "k2/kv/+/+", 6, ready))
    await asyncio.wait_for(ready.wait(), 5)
    clock = ManualClock()
    async with EventPublisher(
        url, region="us-east", node="bs-us-east-1", clock=clock, heartbeat_s=None, epoch=5
    ) as pub:
        await pub.wait_connected()
        for i in range(4):
            pub.publish(EventKind.STORED, [f"{i:02x}" * 4], tenant="acme")
        pub.publish(EventKind.EVICTED, ["00000000"], tenant="acme")
        pub.publish(EventKind.REPLICATED, ["01010101"], tenant="acme", src_region="eu-west")
        assert await pub.flush()
    got = await asyncio.wait_for(sub, 5)
    events = [decode_event(p) for _, p in got]
    assert [e.seq for e in events] == [1, 2, 3, 4, 5, 6]
    assert {e.epoch for e in events} == {5}
    assert [t for t, _ in got][-2:] == ["k2/kv/us-east/evicted", "k2/kv/us-east/replicated"]
    assert events[-1].src_region == "eu-west" and events[0].blocks == ("00000000",)


def test_round_trip_through_the_embedded_broker() -> None:
    async def body() -> None:
        async with EmbeddedBroker() as broker:
            assert broker.url.startswith("mqtt://127.0.0.1:")
            await round_trip(broker.url)
        with pytest.raises(RuntimeError, match="not running"):
            _ = broker.url

    asyncio.run(body())


def test_subscriber_applies_in_order_and_resyncs_after_broker_loss() -> None:
    asyncio.run(subscriber_across_broker_loss())


async def subscriber_across_broker_loss() -> None:
    applied: list[int] = []
    resyncs: list[ResyncRequest] = []

    async def resync(req: ResyncRequest) -> None:
        resyncs.append(req)

    b = await EmbeddedBroker().start()
    port = b.port
    assert port is not None
    sub = EventSubscriber(
        b.url,
        handler=lambda e: applied.append(e.seq) if e.kind is not EventKind.HEARTBEAT else None,
        resync=resync,
        reconnect=FAST,
        rng=random.Random(1),
    )
    pub = EventPublisher(
        b.url,
        region="us-east",
        node="bs-1",
        clock=ManualClock(),
        reconnect=FAST,
        epoch=9,
        heartbeat_s=0.05,
        rng=random.Random(2),
    )
    try:
        await sub.start()
        await sub.wait_subscribed()
        await pub.start()
        await pub.wait_connected()
        for _ in range(3):
            pub.publish("stored", ["aa"])
        assert await pub.flush()
        for _ in range(100):
            if len(applied) == 3:
                break
            await asyncio.sleep(0.01)
        assert applied == [1, 2, 3]
        # The broker goes away. Events published meanwhile overflow the outbox (limit 2): their
        # numbers are spent, so the subscriber must see a gap, not silence.
        pub.outbox_limit = 2
        await b.stop()
        for _ in range(100):
            if not pub.connected:
                break
            await asyncio.sleep(0.01)
        for _ in range(5):
            pub.publish("stored", ["bb"])  # seq 4..8; 4..6 are dropped
        assert pub.dropped == 3
        b2 = await EmbeddedBroker(port=port).start()
        try:
            await pub.wait_connected(5)
            await sub.wait_subscribed(5)
            assert await pub.flush()
            # 7 and 8 arrive past the hole; heartbeats show it stays open: resync, which covers
            # everything up to 8. What comes next is applied normally.
            for _ in range(300):
                if resyncs:
                    break
                await asyncio.sleep(0.01)
            pub.publish("evicted", ["aa"])  # seq 9
            assert await pub.flush()
            for _ in range(300):
                if applied[-1:] == [9]:
                    break
                await asyncio.sleep(0.01)
        finally:
            await pub.close()
            await sub.close()
            await b2.stop()
    finally:
        await pub.close()
        await sub.close()
        await b.stop()
    assert resyncs, "a gap after the broker came back must resync"
    assert applied[:3] == [1, 2, 3] and applied[-1] == 9
    assert applied == sorted(applied) and len(applied) == len(set(applied))
    assert not set(applied) & {4, 5, 6}
    assert resyncs[0].upto_seq >= 7 and resyncs[0].node == "bs-1"
    assert pub.connects >= 2 and sub.connects >= 2


def test_malformed_payloads_are_counted_not_fatal() -> None:
    applied: list[BlockEvent] = []

    async def resync(req: ResyncRequest) -> None:
        raise AssertionError("no resync expected")

    async def body() -> None:
        sub = EventSubscriber("mqtt://127.0.0.1:1", handler=applied.append, resync=resync)
        await sub.handle_payload(b"garbage")
        await sub.handle_payload(encode_event(ev(1)))
        assert sub.bad_payloads == 1 and [e.seq for e in applied] == [1]

    asyncio.run(body())


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[str]:
    exe = mosquitto_exe()
    if exe is None:
        pytest.skip(SKIP_REASON)
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    with running_mosquitto(exe, conf, port):
        yield f"mqtt://127.0.0.1:{port}"


@pytest.mark.slow
def test_round_trip_through_mosquitto(mosquitto: str) -> None:
    asyncio.run(round_trip(mosquitto))


def test_a_failing_handler_or_resync_hook_leads_to_a_fresh_resync() -> None:
    applied: list[int] = []
    calls: list[ResyncRequest] = []

    def handler(e: BlockEvent) -> None:
        if e.seq == 2:
            raise RuntimeError("consumer bug")
        applied.append(e.seq)

    async def resync(req: ResyncRequest) -> None:
        calls.append(req)
        if len(calls) == 1:
            raise ConnectionError("store unreachable")

    async def body() -> EventSubscriber:
        sub = EventSubscriber("mqtt://127.0.0.1:1", handler=handler, resync=resync)
        for i in (1, 2, 3, 4, 5):
            await sub.handle_payload(encode_event(ev(i)))
        return sub

    sub = asyncio.run(body())
    # 2 failed in the handler: 3 asks for a resync, which fails; 4 asks again and succeeds
    # (covering 1..4); 5 is applied normally.
    assert [c.upto_seq for c in calls] == [3, 4]
    assert applied == [1, 5]
    assert (sub.handler_errors, sub.resync_failures) == (1, 1)


def test_kvtier_exports_are_importable() -> None:
    import kvtier

    for name in kvtier.__all__:
        assert getattr(kvtier, name) is not None, name
