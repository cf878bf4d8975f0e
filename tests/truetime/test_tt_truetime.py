"""TrueTime: intervals, after/before, the uncertainty bound and commit-wait."""

from __future__ import annotations

import asyncio
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from truetime import (
    ManualClock,
    SkewedClock,
    TrueTime,
    TrueTimeError,
    TTInterval,
    UncertaintyExceeded,
)

EPS = 400_000
MAX_U = 1_000_000


def make(start: int = 10**18) -> tuple[ManualClock, TrueTime]:
    clock = ManualClock(start)
    return clock, TrueTime(clock, epsilon_ns=EPS, max_uncertainty_ns=MAX_U)


def test_uncertainty_is_the_larger_of_epsilon_and_the_source_bound() -> None:
    clock, tt = make()
    assert tt.uncertainty_ns() == EPS
    clock.set_error_bound_ns(EPS - 1)
    assert tt.uncertainty_ns() == EPS
    clock.set_error_bound_ns(EPS + 1)
    assert tt.uncertainty_ns() == EPS + 1
    clock.set_error_bound_ns(0)
    assert tt.uncertainty_ns() == EPS


def test_now_is_centred_on_the_reading() -> None:
    clock, tt = make(5 * 10**18)
    assert tt.now() == TTInterval(5 * 10**18 - EPS, 5 * 10**18 + EPS)
    assert tt.clock is clock


def test_now_does_not_raise_above_the_bound() -> None:
    clock, tt = make()
    clock.set_error_bound_ns(MAX_U * 10)
    assert tt.now().width == 2 * MAX_U * 10
    with pytest.raises(UncertaintyExceeded):
        tt.checked_now()


def test_after_and_before_at_the_edges() -> None:
    _clock, tt = make(10**18)
    earliest, latest = 10**18 - EPS, 10**18 + EPS
    assert not tt.after(earliest)
    assert tt.after(earliest - 1)
    assert not tt.before(latest)
    assert tt.before(latest + 1)
    # Inside the interval neither is certain.
    assert not tt.after(10**18) and not tt.before(10**18)


def test_check_raises_a_retryable_error_naming_both_numbers() -> None:
    clock, tt = make()
    tt.check()
    clock.set_error_bound_ns(1_500_000)
    with pytest.raises(UncertaintyExceeded) as info:
        tt.check()
    err = info.value
    assert isinstance(err, TrueTimeError)
    assert err.retryable
    assert (err.uncertainty_ns, err.bound_ns) == (1_500_000, MAX_U)
    assert "1500.000 us" in str(err)
    assert "1000.000 us" in str(err)
    assert "refuses to issue timestamps" in str(err)
    clone = pickle.loads(pickle.dumps(err))
    assert (clone.uncertainty_ns, clone.bound_ns, str(clone)) == (1_500_000, MAX_U, str(err))


def test_uncertainty_equal_to_the_bound_is_accepted() -> None:
    clock, tt = make()
    clock.set_error_bound_ns(MAX_U)
    tt.check()
    assert tt.checked_now().width == 2 * MAX_U


def test_epsilon_above_the_bound_never_issues() -> None:
    tt = TrueTime(ManualClock(), epsilon_ns=2, max_uncertainty_ns=1)
    with pytest.raises(UncertaintyExceeded):
        tt.check()


@pytest.mark.parametrize(("eps", "bound"), [(-1, 0), (0, -1)])
def test_rejects_negative_configuration(eps: int, bound: int) -> None:
    with pytest.raises(ValueError):
        TrueTime(ManualClock(), epsilon_ns=eps, max_uncertainty_ns=bound)


def test_wait_needed_is_exact_and_pure() -> None:
    clock, tt = make(10**18)
    t = 10**18 + 1_000
    needed = tt.wait_needed_ns(t)
    assert needed == 1_000 + EPS + 1
    assert clock.now_ns() == 10**18  # asking does not move the clock
    clock.advance(needed - 1)
    assert not tt.after(t)
    clock.advance(1)
    assert tt.after(t)
    assert tt.wait_needed_ns(t) == 0


def test_wait_until_after_sleeps_exactly_what_is_needed() -> None:
    clock, tt = make(10**18)
    t = 10**18 + 5_000
    asyncio.run(tt.wait_until_after(t))
    assert tt.after(t)
    assert clock.now_ns() == t + EPS + 1


def test_wait_until_after_returns_at_once_for_a_past_timestamp() -> None:
    clock, tt = make(10**18)
    asyncio.run(tt.wait_until_after(10**18 - EPS - 1))
    assert clock.now_ns() == 10**18


class _LazyClock(ManualClock):
    """A clock whose sleeps come back early: the waiter must loop."""

    def __init__(self) -> None:
        super().__init__(0)
        self.sleeps = 0

    async def sleep_ns(self, ns: int) -> None:
        self.sleeps += 1
        await super().sleep_ns(ns // 3 + 1)


def test_wait_until_after_loops_until_certain() -> None:
    clock = _LazyClock()
    tt = TrueTime(clock, epsilon_ns=EPS, max_uncertainty_ns=MAX_U)
    asyncio.run(tt.wait_until_after(10_000_000))
    assert tt.after(10_000_000)
    assert clock.sleeps > 1


def test_wait_until_after_survives_a_step_back_and_growing_uncertainty() -> None:
    base = ManualClock(10**18)
    skewed = SkewedClock(base)
    tt = TrueTime(skewed, epsilon_ns=EPS, max_uncertainty_ns=MAX_U)
    target = 10**18 + 2_000_000

    first_sleep = tt.wait_needed_ns(target)

    async def nemesis() -> None:
        # Runs while the waiter is inside its first sleep (gather starts the waiter first).
        skewed.set_offset(-1_000_000)
        base.set_error_bound_ns(EPS * 2)

    async def main() -> None:
        await asyncio.gather(tt.wait_until_after(target), nemesis())

    asyncio.run(main())
    assert tt.after(target)
    assert base.now_ns() > 10**18 + first_sleep  # it needed more than the first sleep


@given(
    true_now=st.integers(min_value=0, max_value=4 * 10**18),
    skew=st.integers(min_value=-EPS, max_value=EPS),
    t=st.integers(min_value=0, max_value=4 * 10**18),
)
def test_skew_within_epsilon_keeps_every_answer_true(true_now: int, skew: int, t: int) -> None:
    true_clock = ManualClock(true_now)
    tt = TrueTime(SkewedClock(true_clock, offset_ns=skew), EPS, MAX_U)
    assert tt.now().contains(true_now)
    if tt.after(t):
        assert true_now > t
    if tt.before(t):
        assert true_now < t


def test_skew_beyond_epsilon_makes_after_lie() -> None:
    # The HAZARD on TrueTime.after is real: a clock ahead by more than epsilon claims a time
    # has passed when it has not.
    true_clock = ManualClock(10**18)
    tt = TrueTime(SkewedClock(true_clock, offset_ns=3 * EPS), EPS, MAX_U)
    t = 10**18 + EPS
    assert tt.after(t)
    assert true_clock.now_ns() <= t
