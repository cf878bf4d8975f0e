"""Property tests for K2-TB across random schedules of clocks, oracles and coordinators.

True time is a `ManualClock`; every node sees it through its own `SkewedClock`. While every
skew stays within epsilon, the properties must hold for any schedule hypothesis can find.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from truetime import (
    STEP_GRANULARITY,
    BatchClient,
    ManualClock,
    SkewedClock,
    TimestampBatch,
    TimestampOracle,
    TrueTime,
)

EPS = 400_000
MAX_U = 1_000_000
TTL = 2_000_000
N_ORACLES = 3
N_COORDINATORS = 3


@dataclass(frozen=True)
class Advance:
    ns: int


@dataclass(frozen=True)
class Reskew:
    node: int  # 0..N_ORACLES-1 are oracles, the rest coordinators
    offset_ns: int


@dataclass(frozen=True)
class Request:
    oracle: int
    coordinator: int
    count: int
    delay_ns: int  # request in flight before the oracle serves it
    use_after_ns: int  # when the coordinator uses the batch, from the send (>= delay)


requests = st.builds(
    lambda o, c, n, a, b: Request(o, c, n, min(a, b), max(a, b)),
    st.integers(0, N_ORACLES - 1),
    st.integers(0, N_COORDINATORS - 1),
    st.integers(1, 20),
    st.integers(0, TTL),
    st.integers(0, TTL),
)
schedule_a = st.lists(
    st.one_of(
        st.builds(Advance, st.integers(0, 5 * TTL)),
        st.builds(Reskew, st.integers(0, N_ORACLES + N_COORDINATORS - 1), st.integers(-EPS, EPS)),
        requests,
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(schedule_a)
def test_timestamps_unique_and_never_below_true_time_within_bound(
    schedule: list[Advance | Reskew | Request],
) -> None:
    true_clock = ManualClock()
    clocks = [SkewedClock(true_clock) for _ in range(N_ORACLES + N_COORDINATORS)]
    oracles = [
        TimestampOracle(i, TrueTime(clocks[i], EPS, MAX_U), ttl_ns=TTL) for i in range(N_ORACLES)
    ]
    coordinator_tt = [TrueTime(clocks[N_ORACLES + i], EPS, MAX_U) for i in range(N_COORDINATORS)]
    seen: set[int] = set()
    for step in schedule:
        if isinstance(step, Advance):
            true_clock.advance(step.ns)
        elif isinstance(step, Reskew):
            clocks[step.node].set_offset(step.offset_ns)
        else:
            oracle = oracles[step.oracle]
            coordinator = coordinator_tt[step.coordinator]
            sent_at = true_clock.now_ns()
            true_clock.advance(step.delay_ns)
            batch = oracle.issue(oracle.register(f"c{step.coordinator}"), step.count)
            assert oracle.truetime.now().contains(true_clock.now_ns())
            # Any use within the TTL from the send is covered: the whole batch lies above.
            assert batch.first >= sent_at + TTL
            true_clock.advance(step.use_after_ns - step.delay_ns)
            true_now = true_clock.now_ns()
            for i in range(batch.count):
                ts = batch.timestamp(i)
                assert coordinator.now().earliest <= true_now <= ts
                assert ts not in seen
                seen.add(ts)


@dataclass(frozen=True)
class Step:
    delta_ns: int  # the oracle's clock jumps by this, either way


@dataclass(frozen=True)
class Issue:
    slot: int
    count: int


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.builds(Step, st.integers(-20 * TTL, 20 * TTL)),
            st.builds(Issue, st.integers(0, 3), st.integers(1, 50)),
        ),
        max_size=50,
    ),
    st.sampled_from([STEP_GRANULARITY, 2 * STEP_GRANULARITY, 5 * STEP_GRANULARITY]),
)
def test_slot_batches_never_overlap_even_when_the_clock_steps_back(
    schedule: list[Step | Issue], step_ns: int
) -> None:
    clock = ManualClock()
    oracle = TimestampOracle(
        2, TrueTime(clock, EPS, MAX_U), ttl_ns=TTL, step_ns=step_ns, max_batch=50
    )
    last_by_slot: dict[int, TimestampBatch] = {}
    seen: set[int] = set()
    for op in schedule:
        if isinstance(op, Step):
            clock.set(clock.now_ns() + op.delta_ns)
            continue
        batch = oracle.issue(op.slot, op.count)
        previous = last_by_slot.get(op.slot)
        if previous is not None:
            assert batch.first > previous.last
        last_by_slot[op.slot] = batch
        for i in range(batch.count):
            ts = batch.timestamp(i)
            assert ts % STEP_GRANULARITY == 2 * 256 + op.slot
            assert ts not in seen
            seen.add(ts)


@dataclass(frozen=True)
class Burst:
    callers: int


@dataclass(frozen=True)
class Expire:
    pass


schedule_c = st.lists(
    st.one_of(
        st.builds(Burst, st.integers(1, 12)),
        st.builds(Advance, st.integers(0, TTL // 2)),
        st.builds(Reskew, st.just(0), st.integers(-EPS, EPS)),
        st.just(Expire()),
    ),
    max_size=30,
)


@settings(max_examples=150, deadline=None)
@given(schedule_c, st.integers(1, 8), st.integers(0, TTL // 4))
def test_batch_client_increasing_refetching_and_sharing(
    schedule: list[Burst | Advance | Reskew | Expire], batch_size: int, delay_ns: int
) -> None:
    true_clock = ManualClock()
    oracle_clock = SkewedClock(true_clock)
    oracle = TimestampOracle(0, TrueTime(oracle_clock, EPS, MAX_U), ttl_ns=TTL)
    in_flight = 0
    max_in_flight = 0

    async def fetch(count: int) -> TimestampBatch:
        nonlocal in_flight, max_in_flight
        in_flight += 1
        max_in_flight = max(max_in_flight, in_flight)
        try:
            await true_clock.sleep_ns(delay_ns)
            return oracle.issue(0, count)
        finally:
            in_flight -= 1

    client = BatchClient(fetch, true_clock, batch_size=batch_size)
    returned: list[int] = []

    async def take() -> None:
        ts = await client.next_timestamp()
        assert ts >= true_clock.now_ns()  # never below true time at hand-out
        returned.append(ts)

    async def run() -> None:
        for op in schedule:
            if isinstance(op, Burst):
                fetched = client.stats.batches_fetched
                await asyncio.gather(*(take() for _ in range(op.callers)))
                # Shared fetches: never more than one request per batch's worth of callers.
                assert client.stats.batches_fetched - fetched <= -(-op.callers // batch_size) + 1
            elif isinstance(op, Advance):
                true_clock.advance(op.ns)
            elif isinstance(op, Reskew):
                oracle_clock.set_offset(op.offset_ns)
            else:
                true_clock.advance(TTL)
                fetched = client.stats.batches_fetched
                await take()
                assert client.stats.batches_fetched == fetched + 1  # a stale batch is never used

    asyncio.run(run())
    assert returned == sorted(set(returned))
    assert max_in_flight <= 1
    assert client.stats.timestamps_issued == len(returned)
