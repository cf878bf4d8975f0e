"""BatchClient: ordering, TTL from the send, shared fetches and failure handling."""

from __future__ import annotations

import asyncio

import pytest

from truetime import (
    BatchClient,
    BatchExpired,
    ManualClock,
    OracleUnavailable,
    SkewedClock,
    TimestampBatch,
    TimestampOracle,
    TrueTime,
)

EPS = 400_000
TTL = 2_000_000
MARGIN = 100_000


class FakeOracle:
    """An oracle behind a pretend network: each fetch takes `delay_ns` on the shared clock."""

    def __init__(self, clock: ManualClock, oracle_id: int = 0, delay_ns: int = 10_000) -> None:
        self.clock = clock
        self.skewed = SkewedClock(clock)
        self.oracle = TimestampOracle(oracle_id, TrueTime(self.skewed, EPS, 2 * EPS), ttl_ns=TTL)
        self.delay_ns = delay_ns
        self.calls: list[int] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.gate: asyncio.Event | None = None
        self.fail_next: Exception | None = None

    async def fetch(self, count: int) -> TimestampBatch:
        self.calls.append(count)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            await self.clock.sleep_ns(self.delay_ns)
            if self.fail_next is not None:
                err, self.fail_next = self.fail_next, None
                raise err
            return self.oracle.issue(0, count)
        finally:
            self.in_flight -= 1


def make(
    batch_size: int = 4, delay_ns: int = 10_000
) -> tuple[ManualClock, FakeOracle, BatchClient]:
    clock = ManualClock()
    fake = FakeOracle(clock, delay_ns=delay_ns)
    client = BatchClient(fake.fetch, clock, batch_size=batch_size, safety_margin_ns=MARGIN)
    return clock, fake, client


def test_hands_out_a_batch_in_order_then_refills() -> None:
    _clock, fake, client = make(batch_size=3)

    async def main() -> list[int]:
        return [await client.next_timestamp() for _ in range(7)]

    stamps = asyncio.run(main())
    assert fake.calls == [3, 3, 3]
    assert stamps == sorted(set(stamps))
    assert stamps[1] - stamps[0] == 4096
    assert client.stats.batches_fetched == 3
    assert client.stats.timestamps_issued == 7
    assert client.stats.batches_expired_unused == 0


def test_ttl_runs_from_the_send_not_the_arrival() -> None:
    delay = 300_000
    clock, _fake, client = make(batch_size=100, delay_ns=delay)

    async def main() -> None:
        sent = clock.monotonic_ns()
        await client.next_timestamp()
        assert clock.monotonic_ns() == sent + delay
        clock.set(clock.now_ns() + (TTL - MARGIN - delay - 1))  # last usable nanosecond
        await client.next_timestamp()
        assert client.stats.batches_fetched == 1
        clock.advance(1)  # usable TTL measured from the send has now passed
        await client.next_timestamp()
        assert client.stats.batches_fetched == 2
        assert client.stats.batches_expired_unused == 1

    asyncio.run(main())


def test_every_timestamp_covers_true_time_when_returned() -> None:
    clock, _fake, client = make(batch_size=50)

    async def main() -> None:
        for _ in range(200):
            ts = await client.next_timestamp()
            assert ts >= clock.now_ns()
            clock.advance(47_000)  # 50 of these outlast the usable TTL

    asyncio.run(main())
    assert client.stats.batches_expired_unused > 0


def test_batches_that_keep_arriving_stale_raise_batch_expired() -> None:
    _clock, fake, client = make(delay_ns=TTL - MARGIN)

    async def main() -> None:
        with pytest.raises(BatchExpired, match="arrived stale") as info:
            await client.next_timestamp()
        assert info.value.retryable
        # The first stale batch and every retry's.
        assert client.stats.batches_expired_unused == 1 + client.stale_retries
        fake.delay_ns = 1_000
        await client.next_timestamp()  # the next call fetches afresh

    asyncio.run(main())
    assert len(fake.calls) == 2 + client.stale_retries


def test_one_slow_round_trip_is_retried_within_the_call() -> None:
    clock, fake, client = make(delay_ns=TTL - MARGIN)
    delays = iter([TTL - MARGIN, TTL, 1_000])

    async def slow_then_fast(count: int) -> TimestampBatch:
        fake.delay_ns = next(delays)
        return await fake.fetch(count)

    client._fetch = slow_then_fast

    async def main() -> None:
        ts = await client.next_timestamp()
        assert ts >= clock.now_ns()  # the fresh batch's timestamp covers true time

    asyncio.run(main())
    assert len(fake.calls) == 3 and client.stats.batches_expired_unused == 2


def test_concurrent_callers_share_one_fetch() -> None:
    _clock, fake, client = make(batch_size=16)

    async def main() -> list[int]:
        fake.gate = asyncio.Event()
        returned: list[int] = []

        async def take() -> None:
            returned.append(await client.next_timestamp())

        tasks = [asyncio.create_task(take()) for _ in range(10)]
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(fake.calls) == 1  # ten callers, one request
        fake.gate.set()
        await asyncio.gather(*tasks)
        return returned

    returned = asyncio.run(main())
    assert len(fake.calls) == 1
    assert returned == sorted(set(returned))


def test_callers_beyond_one_batch_wait_for_the_next_single_fetch() -> None:
    _clock, fake, client = make(batch_size=3)

    async def main() -> list[int]:
        returned: list[int] = []

        async def take() -> None:
            returned.append(await client.next_timestamp())

        await asyncio.gather(*(take() for _ in range(10)))
        return returned

    returned = asyncio.run(main())
    assert len(fake.calls) == 4
    assert fake.max_in_flight == 1
    assert returned == sorted(set(returned))


def test_fetch_failure_reaches_every_waiter_and_the_next_call_retries() -> None:
    _clock, fake, client = make()

    async def main() -> None:
        fake.fail_next = OracleUnavailable("oracle 0 unreachable")
        results = await asyncio.gather(
            *(client.next_timestamp() for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, OracleUnavailable) for r in results)
        assert len(fake.calls) == 1
        await client.next_timestamp()

    asyncio.run(main())
    assert len(fake.calls) == 2


def test_a_cancelled_waiter_does_not_cancel_the_shared_fetch() -> None:
    _clock, fake, client = make()

    async def main() -> None:
        fake.gate = asyncio.Event()
        first = asyncio.create_task(client.next_timestamp())
        second = asyncio.create_task(client.next_timestamp())
        await asyncio.sleep(0)
        first.cancel()
        await asyncio.sleep(0)
        fake.gate.set()
        assert await second > 0
        assert first.cancelled()

    asyncio.run(main())
    assert len(fake.calls) == 1


def test_a_failed_fetch_nobody_awaits_is_not_reported() -> None:
    # With filterwarnings=error and the loop's exception handler, an unretrieved task
    # exception would surface; the client retrieves it itself.
    _clock, fake, client = make()
    reported: list[object] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: reported.append(ctx))
        fake.gate = asyncio.Event()
        fake.fail_next = OracleUnavailable("down")
        waiter = asyncio.create_task(client.next_timestamp())
        await asyncio.sleep(0)
        waiter.cancel()
        fake.gate.set()
        for _ in range(5):
            await asyncio.sleep(0)

    asyncio.run(main())
    assert reported == []


def test_strictly_increasing_across_an_oracle_failover_to_a_slower_clock() -> None:
    clock = ManualClock()
    primary = FakeOracle(clock, oracle_id=1)
    standby = FakeOracle(clock, oracle_id=0)
    standby.skewed.set_offset(-EPS)  # behind, but within the bound
    current = [primary]

    async def fetch(count: int) -> TimestampBatch:
        return await current[0].fetch(count)

    client = BatchClient(fetch, clock, batch_size=8, safety_margin_ns=MARGIN)

    async def main() -> list[int]:
        out = [await client.next_timestamp() for _ in range(3)]
        current[0] = standby
        # 5 left in the primary's batch, then the standby's, whose first ones are too low.
        out += [await client.next_timestamp() for _ in range(9)]
        return out

    stamps = asyncio.run(main())
    assert stamps == sorted(set(stamps))
    assert client.stats.timestamps_skipped > 0


@pytest.mark.parametrize(("size", "margin"), [(0, 0), (1, -1)])
def test_configuration_is_validated(size: int, margin: int) -> None:
    async def fetch(count: int) -> TimestampBatch:
        raise AssertionError("not called")

    with pytest.raises(ValueError):
        BatchClient(fetch, ManualClock(), batch_size=size, safety_margin_ns=margin)


async def _no_fetch(count: int) -> TimestampBatch:
    raise AssertionError("a coordinator on the oracle's node issues in-line")


def _local_client(ttl_ns: int, batch_size: int = 256) -> tuple[ManualClock, BatchClient]:
    """A coordinator on the oracle's node: batches issued in-line with a short lifetime."""
    clock = ManualClock()
    oracle = TimestampOracle(0, TrueTime(clock, EPS, 2 * EPS), ttl_ns=TTL)
    client = BatchClient(
        _no_fetch,
        clock,
        batch_size=batch_size,
        safety_margin_ns=MARGIN,
        fetch_now=lambda n: oracle.issue(0, n, ttl_ns=ttl_ns),
    )
    return clock, client


def test_refetching_at_expiry_keeps_the_lead_over_true_time_bounded() -> None:
    """A slot's next batch starts past the previous one's end, used or not. After the first
    batch (256 timestamps, 1.05 ms of them) the client asks only for what spans half the
    300 us lifetime less the margin, so the first batch's lead is soon gone; asking for 256
    every time, each refetch at expiry would push the timestamps 0.85 ms further ahead of true
    time, and every commit-wait with them."""
    ttl = 300_000
    clock, client = _local_client(ttl)

    async def main() -> list[int]:
        leads = []
        for _ in range(2_000):  # 100 ms: a timestamp every 50 us, four or five per batch
            ts = await client.next_timestamp()
            assert ts >= clock.now_ns()
            leads.append(ts - clock.now_ns())
            clock.advance(50_000)
        return leads

    leads = asyncio.run(main())
    assert client.stats.batches_fetched >= 400
    first_batch = 256 * 4096  # may lead by its whole span, once
    assert max(leads) <= EPS + ttl + first_batch
    assert max(leads[100:]) <= EPS + ttl + 2 * 4096


def test_fetch_now_issues_in_line_so_a_short_batch_cannot_lapse_on_its_way() -> None:
    clock, client = _local_client(MARGIN + 1)
    stamps = []
    for _ in range(3):
        call = client.next_timestamp()
        with pytest.raises(StopIteration) as done:  # finished without ever yielding
            call.send(None)
        stamps.append(done.value.value)
        clock.advance(1)  # the batch (usable for 1 ns) is now stale: the next call issues again
    assert stamps == sorted(set(stamps))
    assert client.stats.batches_fetched == 3


def test_fetch_now_with_a_lifetime_inside_the_safety_margin_is_refused() -> None:
    _clock, client = _local_client(MARGIN)
    with pytest.raises(BatchExpired, match="safety margin"):
        asyncio.run(client.next_timestamp())


def test_an_issue_that_outlasts_its_lifetime_is_issued_again() -> None:
    """The first issue after a start waits for an fsync of the oracle's durable ceiling, which
    can take longer than a 200 us lifetime; the next one finds the ceiling ahead."""
    clock = ManualClock()
    oracle = TimestampOracle(0, TrueTime(clock, EPS, 2 * EPS), ttl_ns=TTL)
    ttl = 200_000
    slow = [3_000_000]  # the durations of the coming issues' fsyncs, in order

    def issue(count: int) -> TimestampBatch:
        batch = oracle.issue(0, count, ttl_ns=ttl)
        clock.advance(slow.pop(0) if slow else 0)
        return batch

    client = BatchClient(_no_fetch, clock, safety_margin_ns=MARGIN, fetch_now=issue)
    ts = asyncio.run(client.next_timestamp())
    assert ts >= clock.now_ns()
    assert client.stats.batches_fetched == 2
    assert client.stats.batches_expired_unused == 1
    # Slow every time: refused after the retries, saying why.
    slow.extend([3_000_000] * (client.stale_retries + 1))
    clock.advance(ttl)
    with pytest.raises(BatchExpired, match="arrived stale"):
        asyncio.run(client.next_timestamp())
