"""Physical clock sources: the one seam through which K2 learns the time.

Nothing in K2 reads the OS clock except `truetime.sysclock.SystemClock`; everything else is
handed a `ClockSource`. Tests hand it a `ManualClock`, which moves only when told to, so every
timeout and commit-wait runs instantly and deterministically. The Jepsen nemesis and the
simulator wrap a clock in a `SkewedClock` to make it lie by a chosen offset and drift.

A clock source has two readings with different jobs:

- `now_ns()` is the wall clock: what timestamps are made of. It may be wrong by up to the
  source's error bound, may jump (an NTP step) and may go backwards.
- `monotonic_ns()` measures elapsed time on this machine: TTLs, deadlines and leases. It never
  goes backwards and is unaffected by wall-clock steps, but its rate can be off by the
  oscillator's drift, which is why TTL checks keep a safety margin.
"""

from __future__ import annotations

import asyncio
import math
from typing import Protocol, runtime_checkable

_PPM = 1_000_000


@runtime_checkable
class ClockSource(Protocol):
    """Where a node gets physical time. Implementations must be cheap to call."""

    def now_ns(self) -> int:
        """Wall-clock reading in ns since the epoch; may be skewed from true time."""
        ...

    def monotonic_ns(self) -> int:
        """Local elapsed-time reading in ns; never decreases. Only differences are meaningful."""
        ...

    def error_bound_ns(self) -> int | None:
        """The source's own bound on `|now_ns() - true time|`, or None if it has none.

        For the system clock this is the synchronisation daemon's maximum error as the kernel
        keeps it; None when the clock is unsynchronised or the bound cannot be read.
        """
        ...

    async def sleep_ns(self, ns: int) -> None:
        """Wait `ns` nanoseconds as this clock measures them (0 or less: just yield)."""
        ...


class ManualClock:
    """A clock that moves only when the test says so; true time in tests and simulations.

    `now_ns()` and `monotonic_ns()` start equal and move together when time goes forward
    (`advance`, `set` to a later value, `sleep_ns`). `set` to an earlier value models a wall-clock
    step backwards: like a real kernel, it leaves the monotonic reading where it was.

    `sleep_ns` advances the clock by the requested amount at once and then yields to the event
    loop once, so a task that commit-waits lets others run but never blocks on the wall clock.
    """

    DEFAULT_START_NS = 1_700_000_000_000_000_000

    def __init__(
        self, start_ns: int = DEFAULT_START_NS, *, error_bound_ns: int | None = None
    ) -> None:
        self._now = start_ns
        self._monotonic = start_ns
        self._error_bound: int | None = None
        self.set_error_bound_ns(error_bound_ns)

    def now_ns(self) -> int:
        return self._now

    def monotonic_ns(self) -> int:
        return self._monotonic

    def error_bound_ns(self) -> int | None:
        return self._error_bound

    def set_error_bound_ns(self, ns: int | None) -> None:
        """Set what `error_bound_ns()` reports (None: the source claims no bound)."""
        if ns is not None and ns < 0:
            raise ValueError(f"error bound must be >= 0 ns or None, got {ns}")
        self._error_bound = ns

    def set(self, ns: int) -> None:
        """Jump the wall clock to `ns`. Forward jumps count as elapsed time; backward do not."""
        if ns > self._now:
            self._monotonic += ns - self._now
        self._now = ns

    def advance(self, ns: int) -> None:
        """Let `ns` nanoseconds pass (both readings move). Use `set` to go backwards."""
        if ns < 0:
            raise ValueError(f"advance needs ns >= 0 (use set() to step back), got {ns}")
        self._now += ns
        self._monotonic += ns

    async def sleep_ns(self, ns: int) -> None:
        self.advance(max(ns, 0))
        await asyncio.sleep(0)


class SkewedClock:
    """A clock that lies: `base` plus an offset plus a drift, changeable while running.

    `now_ns() = base.now_ns() + offset_ns + drift_ppm * (base.now_ns() - anchor) / 1e6`, where
    `anchor` is the base reading when the offset or drift was last set. Setting the drift folds
    the skew accumulated so far into the offset, so the reading never jumps when only the rate
    changes; setting the offset fixes the skew to exactly that value from now on.

    Skew is a wall-clock error only: `monotonic_ns()` comes from the base unchanged. By default
    so does `error_bound_ns()`: that is the dangerous case the HAZARD notes are about, a clock that
    is wrong and does not know it. With `reported=True` the clock knows how wrong it is, as a
    synchronisation daemon that measured the offset would: `error_bound_ns()` is the base's bound
    (0 if it has none) plus `|skew_ns()|`, so TrueTime widens its intervals to cover the skew,
    and refuses to issue timestamps once that is beyond its bound (the Jepsen clock nemesis).
    """

    def __init__(
        self,
        base: ClockSource,
        offset_ns: int = 0,
        drift_ppm: float = 0.0,
        *,
        reported: bool = False,
    ) -> None:
        self.base = base
        self._offset = offset_ns
        self._drift_ppm = drift_ppm
        self._anchor = base.now_ns()
        self.reported = reported
        """Whether `error_bound_ns()` includes the skew (see the class docstring)."""

    @property
    def offset_ns(self) -> int:
        """The offset as last set (or as folded in by `set_drift_ppm`); see `skew_ns` for now."""
        return self._offset

    @property
    def drift_ppm(self) -> float:
        return self._drift_ppm

    def set_offset(self, offset_ns: int) -> None:
        """Make the reading exactly `base + offset_ns` now; drift accrues afresh from here."""
        self._anchor = self.base.now_ns()
        self._offset = offset_ns

    def set_drift_ppm(self, drift_ppm: float) -> None:
        """Change the rate error from now on, without a jump in the reading."""
        base_now = self.base.now_ns()
        self._offset += self._drift_term(base_now)
        self._anchor = base_now
        self._drift_ppm = drift_ppm

    def skew_ns(self) -> int:
        """How far this clock is from its base right now: `now_ns() - base.now_ns()`."""
        base_now = self.base.now_ns()
        return self._offset + self._drift_term(base_now)

    def now_ns(self) -> int:
        base_now = self.base.now_ns()
        return base_now + self._offset + self._drift_term(base_now)

    def monotonic_ns(self) -> int:
        return self.base.monotonic_ns()

    def error_bound_ns(self) -> int | None:
        bound = self.base.error_bound_ns()
        if not self.reported:
            return bound
        # HAZARD: the base's own error is not known when it reports no bound; then this vouches
        # for |skew| alone and TrueTime's epsilon must cover the base's error. On one machine
        # (a loopback cluster, where the base is true time) that error is 0.
        skew = abs(self.skew_ns())
        if bound is None:
            return skew or None
        return bound + skew

    async def sleep_ns(self, ns: int) -> None:
        """Sleep until this clock's reading has moved `ns` (at the current drift).

        If the clock is stopped or running backwards (drift <= -1e6 ppm) no base duration will
        do; it sleeps `ns` of base time and leaves the caller to loop, as a caller waiting for a
        reading must anyway (the drift may change mid-sleep).
        """
        rate = _PPM + self._drift_ppm
        base_ns = math.ceil(ns * _PPM / rate) if ns > 0 and rate > 0 else ns
        await self.base.sleep_ns(base_ns)

    def _drift_term(self, base_now: int) -> int:
        return round(self._drift_ppm * (base_now - self._anchor) / _PPM)
