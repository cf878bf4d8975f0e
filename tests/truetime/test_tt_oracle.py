"""TimestampOracle and TimestampBatch: the K2-TB rules, one test per rule."""

from __future__ import annotations

from typing import Any

import pytest

from truetime import (
    MAX_ORACLES,
    MAX_SLOTS_PER_ORACLE,
    SLOT_BITS,
    STEP_GRANULARITY,
    ManualClock,
    SkewedClock,
    SlotsExhausted,
    TimestampBatch,
    TimestampOracle,
    TrueTime,
    TrueTimeError,
    UncertaintyExceeded,
    timestamp_origin,
)

EPS = 400_000
MAX_U = 1_000_000
TTL = 2_000_000
START = 1_700_000_000_000_000_000


def make_oracle(
    oracle_id: int = 0, start: int = START, **kwargs: Any
) -> tuple[ManualClock, TimestampOracle]:
    clock = ManualClock(start)
    tt = TrueTime(clock, epsilon_ns=EPS, max_uncertainty_ns=MAX_U)
    return clock, TimestampOracle(oracle_id, tt, ttl_ns=TTL, **kwargs)


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def test_slot_bits_cover_every_oracle_and_slot() -> None:
    assert MAX_ORACLES * MAX_SLOTS_PER_ORACLE == 1 << SLOT_BITS == STEP_GRANULARITY


@pytest.mark.parametrize("start", [START, START + 1, START + 4095, START + 12_345_678])
@pytest.mark.parametrize("step", [4096, 3 * 4096])
def test_base_is_latest_plus_ttl_rounded_up_to_the_step(start: int, step: int) -> None:
    _clock, oracle = make_oracle(start=start, step_ns=step)
    batch = oracle.issue(0, 5)
    latest = start + EPS
    assert batch.issued_latest == latest
    assert batch.base == round_up(latest + TTL, step)
    assert batch.base % step == 0
    assert batch.base - (latest + TTL) < step
    assert (batch.step, batch.count, batch.ttl_ns) == (step, 5, TTL)


@pytest.mark.parametrize("asked,got", [(500_000, 500_000), (TTL, TTL), (5 * TTL, TTL)])
def test_a_batch_may_ask_for_a_shorter_lifetime_never_a_longer_one(asked: int, got: int) -> None:
    """A coordinator on the oracle's node asks for a short batch: it leads true time by less.
    Never longer than the oracle's: the lifetime is what the batch invariant rests on."""
    clock, oracle = make_oracle()
    step = oracle.step_ns
    batch = oracle.issue(0, 3, ttl_ns=asked)
    latest = START + EPS
    assert batch.ttl_ns == got
    assert batch.base == round_up(latest + got, step)
    # Still above every earlier batch of the slot, whatever the lifetimes.
    long = oracle.issue(1, 3)
    clock.advance(1)
    short = oracle.issue(1, 3, ttl_ns=1)
    assert short.base > long.last


def test_timestamps_are_spaced_by_step_and_carry_their_origin() -> None:
    _clock, oracle = make_oracle(oracle_id=5)
    slot = 7
    batch = oracle.issue(slot, 4)
    stamps = [batch.timestamp(i) for i in range(4)]
    assert stamps == [batch.base + i * batch.step + 5 * 256 + 7 for i in range(4)]
    assert all(timestamp_origin(ts) == (5, 7) for ts in stamps)
    assert all(ts & 0xFFF == 5 * 256 + 7 for ts in stamps)
    assert (batch.first, batch.last) == (stamps[0], stamps[-1])
    for bad in (-1, 4):
        with pytest.raises(IndexError):
            batch.timestamp(bad)


def test_same_instant_different_oracles_and_slots_never_collide() -> None:
    stamps: set[int] = set()
    total = 0
    for oracle_id in range(MAX_ORACLES):
        _, oracle = make_oracle(oracle_id=oracle_id)
        for slot in (0, 1, MAX_SLOTS_PER_ORACLE - 1):
            batch = oracle.issue(slot, 3)
            stamps.update(batch.timestamp(i) for i in range(3))
            total += 3
    assert len(stamps) == total


def test_slot_batches_never_overlap_when_the_clock_goes_back() -> None:
    clock, oracle = make_oracle()
    first = oracle.issue(3, 100)
    clock.set(START - 10 * TTL)  # NTP step backwards
    second = oracle.issue(3, 100)
    assert second.first > first.last
    assert second.first == first.last + first.step  # no gap either: the next free base
    other = oracle.issue(4, 1)  # other slots are not held back by slot 3's history
    assert other.base < first.base


def test_slot_batches_follow_the_clock_when_it_moves_on() -> None:
    clock, oracle = make_oracle()
    first = oracle.issue(0, 2)
    clock.advance(10 * TTL)
    second = oracle.issue(0, 2)
    assert second.base == round_up(clock.now_ns() + EPS + TTL, STEP_GRANULARITY)
    assert second.first > first.last


def test_refuses_while_the_reported_error_exceeds_the_bound() -> None:
    clock, oracle = make_oracle()
    clock.set_error_bound_ns(MAX_U + 1)
    for expected in (1, 2):
        with pytest.raises(UncertaintyExceeded) as info:
            oracle.issue(0, 1)
        assert oracle.refusals == expected
    assert info.value.retryable
    assert info.value.uncertainty_ns == MAX_U + 1
    assert oracle.batches_issued == 0
    clock.set_error_bound_ns(MAX_U)  # back within the bound: serving again
    batch = oracle.issue(0, 1)
    assert batch.issued_latest == START + MAX_U
    assert oracle.refusals == 2


@pytest.mark.parametrize("count", [0, -1, 11])
def test_count_is_validated(count: int) -> None:
    _, oracle = make_oracle(max_batch=10)
    with pytest.raises(ValueError, match="count"):
        oracle.issue(0, count)
    assert oracle.batches_issued == 0
    assert oracle.refusals == 0


def test_max_batch_is_allowed() -> None:
    _, oracle = make_oracle(max_batch=10)
    assert oracle.issue(0, 10).count == 10


@pytest.mark.parametrize("slot", [-1, MAX_SLOTS_PER_ORACLE])
def test_slot_is_validated(slot: int) -> None:
    _, oracle = make_oracle()
    with pytest.raises(ValueError, match="slot"):
        oracle.issue(slot, 1)


def test_register_is_stable_and_runs_out() -> None:
    _, oracle = make_oracle()
    slots = [oracle.register(f"coord-{i}") for i in range(MAX_SLOTS_PER_ORACLE)]
    assert sorted(slots) == list(range(MAX_SLOTS_PER_ORACLE))
    assert oracle.register("coord-17") == slots[17]
    with pytest.raises(SlotsExhausted, match="coord-new") as info:
        oracle.register("coord-new")
    assert isinstance(info.value, TrueTimeError)
    assert not info.value.retryable


def test_metrics_count_batches_and_timestamps() -> None:
    _, oracle = make_oracle()
    oracle.issue(0, 3)
    oracle.issue(1, 4)
    assert (oracle.batches_issued, oracle.timestamps_issued) == (2, 7)


def test_resume_after_keeps_a_restarted_oracle_above_its_high_water() -> None:
    _clock, oracle = make_oracle()
    big = oracle.issue(0, 10_000)  # ends about 41 ms in the future
    assert oracle.high_water == big.last
    restarted = TimestampOracle(0, oracle.truetime, ttl_ns=TTL, resume_after=oracle.high_water)
    for slot in (0, 1):
        assert restarted.issue(slot, 1).first > big.last
    fresh = TimestampOracle(0, oracle.truetime, ttl_ns=TTL)
    assert fresh.high_water is None


def test_a_restarted_oracle_keeps_each_coordinators_slot_whatever_order_they_ask_in() -> None:
    _, oracle = make_oracle()
    first = {name: oracle.register(name) for name in ("a", "a/future", "b", "b/client")}
    restarted = TimestampOracle(0, oracle.truetime, ttl_ns=TTL, slots=oracle.slots)
    # After the restart b asks first: without the old assignments it would get a's slot, and
    # its client timestamps could repeat one of a's future timestamps (both above the bases).
    for name in ("b/client", "b", "a/future", "a"):
        assert restarted.register(name) == first[name]
    newcomer = restarted.register("c")
    assert newcomer not in first.values()
    assert restarted.slots == {**first, "c": newcomer}
    assert "d" not in restarted.slots and restarted.slots["c"] == newcomer


def test_a_freed_gap_in_restored_slots_is_reused_and_bad_restored_slots_are_refused() -> None:
    _, oracle = make_oracle(slots={"x": 0, "y": 2})
    assert oracle.register("z") == 1  # the lowest free, not len(slots)
    assert oracle.register("w") == 3
    with pytest.raises(ValueError, match="twice"):
        make_oracle(slots={"x": 4, "y": 4})
    with pytest.raises(ValueError, match="slot of 'x'"):
        make_oracle(slots={"x": MAX_SLOTS_PER_ORACLE})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"oracle_id": -1},
        {"oracle_id": MAX_ORACLES},
        {"ttl_ns": 0},
        {"step_ns": 0},
        {"step_ns": 4095},
        {"step_ns": 4096 + 1},
        {"max_batch": 0},
    ],
)
def test_oracle_configuration_is_validated(kwargs: dict[str, int]) -> None:
    tt = TrueTime(ManualClock(), epsilon_ns=EPS, max_uncertainty_ns=MAX_U)
    args = {"oracle_id": 0, "ttl_ns": TTL} | kwargs
    with pytest.raises(ValueError):
        TimestampOracle(truetime=tt, **args)


@pytest.mark.parametrize(
    "field",
    [
        {"oracle_id": MAX_ORACLES},
        {"slot": -1},
        {"base": 4096 + 1},
        {"step": 100},
        {"count": 0},
        {"ttl_ns": -1},
    ],
)
def test_batch_rebuilt_from_the_wire_is_validated(field: dict[str, int]) -> None:
    good = {
        "oracle_id": 1,
        "slot": 2,
        "base": 4096 * 1000,
        "step": 4096,
        "count": 3,
        "ttl_ns": TTL,
        "issued_latest": 0,
    }
    TimestampBatch(**good)
    with pytest.raises(ValueError):
        TimestampBatch(**(good | field))


def test_index_after() -> None:
    batch = TimestampBatch(
        oracle_id=0, slot=1, base=4096, step=4096, count=3, ttl_ns=TTL, issued_latest=0
    )
    assert [batch.index_after(t) for t in (0, 4097, 4098, 8193, 12289, 10**9)] == [
        0,
        1,
        1,
        2,
        3,
        3,
    ]


def test_invariant_holds_at_the_edge_of_the_bound_and_fails_beyond_it() -> None:
    # A coordinator asks at true time r and uses the batch at r + ttl, the last moment allowed.
    # With the oracle's clock behind by exactly epsilon the timestamps still cover true time;
    # behind by more (plus the rounding slack of one step) they fall below it: the HAZARD on
    # TimestampOracle.issue is real, and it is why the oracle refuses beyond the bound.
    for skew, holds in ((-EPS, True), (-(EPS + 2 * STEP_GRANULARITY), False)):
        true_clock = ManualClock(START)
        oracle_clock = SkewedClock(true_clock, offset_ns=skew)
        oracle = TimestampOracle(0, TrueTime(oracle_clock, EPS, MAX_U), ttl_ns=TTL)
        requested_at = true_clock.now_ns()
        batch = oracle.issue(0, 1)
        true_clock.advance(TTL)
        assert true_clock.now_ns() == requested_at + TTL
        assert (true_clock.now_ns() <= batch.first) is holds
