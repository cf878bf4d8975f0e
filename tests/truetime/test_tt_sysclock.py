"""SystemClock: the kernel error bound and its failure paths.

The tests read the real clock only to check types and plausibility; they never sleep on it.
"""

from __future__ import annotations

import asyncio
import ctypes

import pytest

from truetime import SystemClock, sysclock
from truetime.sysclock import (
    STA_UNSYNC,
    TIME_ERROR,
    KernelClockState,
    kernel_error_bound_ns,
    read_kernel_clock_state,
)

TIME_OK = 0
STA_PLL = 0x0001


def test_timex_layout_matches_64bit_linux() -> None:
    # Offsets from <sys/timex.h> on x86_64 and aarch64 (LP64): a wrong layout would read
    # another field as maxerror.
    timex = sysclock._Timex
    assert ctypes.sizeof(timex) == 208
    assert timex.modes.offset == 0
    assert timex.maxerror.offset == 24
    assert timex.esterror.offset == 32
    assert timex.status.offset == 40
    assert timex.time.offset == 72
    assert timex.shift.offset == 112
    assert timex.tai.offset == 160


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (KernelClockState(TIME_OK, STA_PLL, 1_500), 1_500_000),
        (KernelClockState(1, 0, 0), 0),  # TIME_INS: leap second pending, still synchronised
        (KernelClockState(TIME_OK, STA_PLL | STA_UNSYNC, 1_500), None),
        (KernelClockState(TIME_ERROR, 0, 1_500), None),
        (KernelClockState(-1, 0, 1_500), None),
        (KernelClockState(TIME_OK, 0, -3), None),
        (None, None),
    ],
)
def test_kernel_error_bound(state: KernelClockState | None, expected: int | None) -> None:
    assert kernel_error_bound_ns(state) == expected


def test_error_bound_from_injected_kernel_state() -> None:
    clock = SystemClock(
        read_kernel_state=lambda: KernelClockState(TIME_OK, 0, 250), error_bound_cache_ns=0
    )
    assert clock.error_bound_ns() == 250_000


def test_error_bound_is_none_when_the_read_fails() -> None:
    def broken() -> KernelClockState | None:
        raise OSError("adjtimex: operation not permitted")

    assert SystemClock(read_kernel_state=broken).error_bound_ns() is None
    assert SystemClock(read_kernel_state=lambda: None).error_bound_ns() is None


def test_cached_bound_is_reused_and_never_shrinks() -> None:
    reads = 0

    def reader() -> KernelClockState:
        nonlocal reads
        reads += 1
        return KernelClockState(TIME_OK, 0, 100)

    clock = SystemClock(read_kernel_state=reader, error_bound_cache_ns=3_600 * 10**9)
    first = clock.error_bound_ns()
    second = clock.error_bound_ns()
    assert reads == 1
    assert first == 100_000
    assert second is not None and second >= first


def test_no_cache_reads_every_time() -> None:
    reads = 0

    def reader() -> KernelClockState:
        nonlocal reads
        reads += 1
        return KernelClockState(TIME_OK, 0, 1)

    clock = SystemClock(read_kernel_state=reader, error_bound_cache_ns=0)
    clock.error_bound_ns()
    clock.error_bound_ns()
    assert reads == 2


def test_rejects_negative_cache_window() -> None:
    with pytest.raises(ValueError):
        SystemClock(error_bound_cache_ns=-1)


def test_real_readings_are_plausible() -> None:
    clock = SystemClock()
    assert clock.now_ns() > 1_600_000_000 * 10**9  # after Sep 2020
    first = clock.monotonic_ns()
    assert clock.monotonic_ns() >= first
    bound = clock.error_bound_ns()
    assert bound is None or bound >= 0
    state = read_kernel_clock_state()
    assert state is None or isinstance(state, KernelClockState)


def test_real_sleep_of_zero_returns() -> None:
    asyncio.run(SystemClock().sleep_ns(0))
    asyncio.run(SystemClock().sleep_ns(-10))
