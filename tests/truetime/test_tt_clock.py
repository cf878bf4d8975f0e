"""ManualClock and SkewedClock: the injectable clocks tests and the nemesis rely on."""

from __future__ import annotations

import asyncio

import pytest

from truetime import ClockSource, ManualClock, SkewedClock, SystemClock

S = 1_000_000_000


def test_every_clock_satisfies_the_protocol() -> None:
    manual = ManualClock()
    for clock in (manual, SkewedClock(manual), SystemClock()):
        assert isinstance(clock, ClockSource)


def test_manual_clock_defaults() -> None:
    clock = ManualClock()
    assert clock.now_ns() == ManualClock.DEFAULT_START_NS == 1_700_000_000_000_000_000
    assert clock.monotonic_ns() == clock.now_ns()
    assert clock.error_bound_ns() is None
    assert ManualClock(5).now_ns() == 5


def test_manual_clock_advance_moves_both_readings() -> None:
    clock = ManualClock(1_000)
    clock.advance(250)
    assert clock.now_ns() == 1_250
    assert clock.monotonic_ns() == 1_250
    with pytest.raises(ValueError, match="set"):
        clock.advance(-1)


def test_manual_clock_step_back_leaves_monotonic_alone() -> None:
    clock = ManualClock(1_000)
    clock.set(5_000)
    assert (clock.now_ns(), clock.monotonic_ns()) == (5_000, 5_000)
    clock.set(2_000)
    assert (clock.now_ns(), clock.monotonic_ns()) == (2_000, 5_000)
    clock.set(3_000)  # forward again: elapsed time resumes
    assert (clock.now_ns(), clock.monotonic_ns()) == (3_000, 6_000)


def test_manual_clock_error_bound_is_settable() -> None:
    clock = ManualClock(error_bound_ns=10)
    assert clock.error_bound_ns() == 10
    clock.set_error_bound_ns(None)
    assert clock.error_bound_ns() is None
    with pytest.raises(ValueError):
        clock.set_error_bound_ns(-1)


def test_manual_sleep_advances_instantly_and_yields_once() -> None:
    clock = ManualClock(0)
    order: list[str] = []

    async def sleeper() -> None:
        await clock.sleep_ns(3 * S)
        order.append("sleeper woke")

    async def other() -> None:
        order.append("other ran")

    async def main() -> None:
        await asyncio.gather(sleeper(), other())

    asyncio.run(main())
    assert clock.now_ns() == 3 * S
    assert order == ["other ran", "sleeper woke"]


def test_manual_sleep_non_positive_does_not_move_the_clock() -> None:
    clock = ManualClock(10)
    asyncio.run(clock.sleep_ns(-5))
    asyncio.run(clock.sleep_ns(0))
    assert clock.now_ns() == 10


def test_skewed_offset_and_passthroughs() -> None:
    base = ManualClock(1_000_000, error_bound_ns=42)
    skewed = SkewedClock(base, offset_ns=-300)
    assert skewed.now_ns() == 999_700
    assert skewed.skew_ns() == -300
    assert skewed.monotonic_ns() == base.monotonic_ns()
    assert skewed.error_bound_ns() == 42
    base.advance(500)
    assert skewed.now_ns() == 1_000_200
    assert skewed.monotonic_ns() == 1_000_500


def test_skewed_drift_accumulates_with_elapsed_base_time() -> None:
    base = ManualClock(0)
    skewed = SkewedClock(base, offset_ns=10, drift_ppm=100.0)
    base.advance(S)
    assert skewed.now_ns() == S + 10 + 100_000
    # Skew never changes elapsed time.
    assert skewed.monotonic_ns() == S


def test_skewed_set_drift_does_not_jump() -> None:
    base = ManualClock(0)
    skewed = SkewedClock(base, drift_ppm=100.0)
    base.advance(S)
    before = skewed.now_ns()
    skewed.set_drift_ppm(-50.0)
    assert skewed.now_ns() == before
    assert skewed.offset_ns == 100_000
    assert skewed.drift_ppm == -50.0
    base.advance(S)
    assert skewed.now_ns() == 2 * S + 100_000 - 50_000


def test_skewed_set_offset_fixes_the_skew_now() -> None:
    base = ManualClock(0)
    skewed = SkewedClock(base, drift_ppm=1_000.0)
    base.advance(S)
    skewed.set_offset(0)
    assert skewed.now_ns() == base.now_ns()
    base.advance(S)
    assert skewed.skew_ns() == 1_000_000  # drift keeps running from the new anchor


@pytest.mark.parametrize("drift_ppm", [0.0, 250_000.0, -500_000.0])
def test_skewed_sleep_waits_on_its_own_reading(drift_ppm: float) -> None:
    base = ManualClock(0)
    skewed = SkewedClock(base, drift_ppm=drift_ppm)
    start = skewed.now_ns()
    asyncio.run(skewed.sleep_ns(S))
    assert skewed.now_ns() - start >= S
    assert skewed.now_ns() - start <= S + 1  # ceil rounding, not a second sleep


def test_skewed_sleep_on_a_stopped_clock_still_passes_base_time() -> None:
    base = ManualClock(0)
    skewed = SkewedClock(base, drift_ppm=-1_000_000.0)
    asyncio.run(skewed.sleep_ns(S))
    assert base.now_ns() == S
    assert skewed.now_ns() == 0
