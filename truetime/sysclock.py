"""The operating system's clock: the only place in K2 that reads it.

Keeping one reader means a test can swap in a `ManualClock` and know nothing else is looking at
the wall, and a reviewer has one file to check for clock handling (a test enforces this).

The error bound comes from the kernel's NTP state, read with `adjtimex(2)` in read-only mode
(`modes = 0`, no privileges needed). chronyd and ntpd keep `maxerror` there: a bound, in
microseconds, on the clock's distance from the reference, grown by the kernel at 500 ppm per
second between daemon updates. When the kernel says the clock is unsynchronised, or anything
about the read fails, the bound is None and TrueTime falls back to its configured epsilon.
"""

from __future__ import annotations

import asyncio
import ctypes
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

STA_UNSYNC = 0x0040
"""`timex.status` bit: the clock is not synchronised; `maxerror` means nothing."""

TIME_ERROR = 5
"""`adjtimex` return value for a clock in error (unsynchronised); -1 is a failed call."""

KERNEL_MAXERROR_GROWTH_PPM = 500
"""How fast the kernel grows `maxerror` between daemon updates (its MAXFREQ, 500 us per s)."""


class _Timeval(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long))


class _Timex(ctypes.Structure):
    """`struct timex` as glibc and musl lay it out on 64-bit Linux (x86_64, aarch64).

    Every field the kernel defines is present, in order, so offsets match the C struct; the
    trailing reserved ints make the size 208 bytes, the size the kernel copies in and out.
    """

    _fields_ = (
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time", _Timeval),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_reserved", ctypes.c_int * 11),
    )


_TIMEX_SIZE_64BIT_LINUX = 208


@dataclass(frozen=True, slots=True)
class KernelClockState:
    """The part of the kernel's NTP state that the error bound is derived from."""

    clock_state: int
    """`adjtimex` return value: TIME_OK (0) .. TIME_ERROR (5), or -1 if the call failed."""
    status: int
    """`timex.status`, the STA_* bits."""
    maxerror_us: int
    """`timex.maxerror`: bound on the clock error in microseconds (always us, even with
    STA_NANO)."""


def _load_adjtimex() -> Callable[[_Timex], int] | None:
    """Find `adjtimex` in the C library already loaded into this process; None if unusable.

    Only 64-bit Linux is supported: elsewhere the struct layout differs (or the call does not
    exist), and a wrong layout would read garbage as a bound, which is worse than no bound.
    """
    if not sys.platform.startswith("linux") or ctypes.sizeof(ctypes.c_long) != 8:
        return None
    if ctypes.sizeof(_Timex) != _TIMEX_SIZE_64BIT_LINUX:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.adjtimex
    except (OSError, AttributeError):
        return None
    func.argtypes = (ctypes.POINTER(_Timex),)
    func.restype = ctypes.c_int

    def call(buf: _Timex) -> int:
        return int(func(ctypes.byref(buf)))

    return call


_adjtimex = _load_adjtimex()


def read_kernel_clock_state() -> KernelClockState | None:
    """Read the kernel's NTP state without changing it; None if it cannot be read."""
    if _adjtimex is None:
        return None
    tx = _Timex()
    tx.modes = 0  # read only: adjtimex changes nothing when no mode bit is set
    try:
        clock_state = _adjtimex(tx)
    except OSError:
        return None
    return KernelClockState(clock_state=clock_state, status=tx.status, maxerror_us=tx.maxerror)


def kernel_error_bound_ns(state: KernelClockState | None) -> int | None:
    """The error bound the kernel state vouches for, in ns; None when it vouches for nothing."""
    if state is None or state.clock_state < 0 or state.clock_state == TIME_ERROR:
        return None
    if state.status & STA_UNSYNC or state.maxerror_us < 0:
        return None
    return state.maxerror_us * 1000


class SystemClock:
    """The host's clock: `CLOCK_REALTIME` for `now_ns`, `CLOCK_MONOTONIC` for elapsed time.

    `read_kernel_state` is the hook that reads the kernel's NTP state (tests replace it).
    `error_bound_cache_ns` lets a hot path skip the syscall: a cached bound is served grown by
    the kernel's own growth rate for its age, so it is never smaller than a fresh read would be
    unless the daemon's next update shrinks it.
    """

    def __init__(
        self,
        *,
        read_kernel_state: Callable[[], KernelClockState | None] = read_kernel_clock_state,
        error_bound_cache_ns: int = 1_000_000,
    ) -> None:
        if error_bound_cache_ns < 0:
            raise ValueError(f"error_bound_cache_ns must be >= 0, got {error_bound_cache_ns}")
        self._read_kernel_state = read_kernel_state
        self._cache_ns = error_bound_cache_ns
        self._cached_at: int | None = None
        self._cached_bound: int | None = None

    def now_ns(self) -> int:
        return time.time_ns()

    def monotonic_ns(self) -> int:
        return time.monotonic_ns()

    def error_bound_ns(self) -> int | None:
        # HAZARD: this is the sync daemon's own estimate. If it underestimates (a wrong or
        # malicious reference server, a daemon that never marks the clock unsynchronised), every
        # TrueTime interval built on it is too narrow: commit-wait ends early and timestamps can
        # fall below true time, breaking real-time order. The configured epsilon is a floor
        # under this value for that reason; set it to what the deployment can really promise.
        now = time.monotonic_ns()
        if self._cached_at is not None and now - self._cached_at < self._cache_ns:
            if self._cached_bound is None:
                return None
            age = now - self._cached_at
            return self._cached_bound + math.ceil(age * KERNEL_MAXERROR_GROWTH_PPM / 1_000_000)
        try:
            bound = kernel_error_bound_ns(self._read_kernel_state())
        except Exception:
            # Any failure means "no bound": TrueTime then relies on the configured epsilon.
            bound = None
        self._cached_at = now
        self._cached_bound = bound
        return bound

    async def sleep_ns(self, ns: int) -> None:
        await asyncio.sleep(max(ns, 0) / 1e9)
