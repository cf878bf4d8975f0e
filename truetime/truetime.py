"""TrueTime: the clock reading turned into an interval that contains true time.

`TrueTime.now()` reads the physical clock once and widens it by the uncertainty: the larger of
the configured epsilon and the clock source's own error bound. Callers never compare raw clock
readings; they ask `after(t)` ("t has certainly passed everywhere") and `before(t)` ("t has
certainly not arrived anywhere") and commit-wait with `wait_until_after(t)`.

The node refuses to issue timestamps when the uncertainty exceeds `max_uncertainty_ns`
(`check()` raises `UncertaintyExceeded`): past that point the intervals are too wide to be
useful and may well be wrong, so stopping is safer than serving.
"""

from __future__ import annotations

from truetime.clock import ClockSource
from truetime.errors import UncertaintyExceeded
from truetime.interval import Timestamp, TTInterval


class TrueTime:
    """Interval clock over a `ClockSource`.

    `epsilon_ns` is the configured uncertainty floor: what the deployment promises about its
    clock error when the source reports nothing (or too little). `max_uncertainty_ns` is the
    widest uncertainty at which the node still issues timestamps. A configuration with
    `epsilon_ns > max_uncertainty_ns` is accepted but never issues a timestamp.

    `unsafe_ignore_clock_bound` BREAKS real-time order on purpose, to prove the Jepsen checkers
    catch a clock beyond its bound: the uncertainty is `epsilon_ns` whatever the source reports,
    so a node whose clock is known to be far off keeps issuing timestamps as if it were not
    (the cluster setting of the same name; refused unless K2_ALLOW_UNSAFE_SETTINGS=1).
    """

    def __init__(
        self,
        clock: ClockSource,
        epsilon_ns: int,
        max_uncertainty_ns: int,
        *,
        unsafe_ignore_clock_bound: bool = False,
    ) -> None:
        if epsilon_ns < 0:
            raise ValueError(f"epsilon_ns must be >= 0, got {epsilon_ns}")
        if max_uncertainty_ns < 0:
            raise ValueError(f"max_uncertainty_ns must be >= 0, got {max_uncertainty_ns}")
        self.clock = clock
        self.epsilon_ns = epsilon_ns
        self.max_uncertainty_ns = max_uncertainty_ns
        self.unsafe_ignore_clock_bound = unsafe_ignore_clock_bound

    def uncertainty_ns(self) -> int:
        """Half-width of `now()`: max(configured epsilon, the source's error bound)."""
        # HAZARD: every guarantee in K2 that mentions real time rests on this number being at
        # least the clock's real error. If the real error exceeds it, now() can miss true time,
        # after()/before() can answer wrongly, commit-wait ends early and a transaction that
        # starts after another committed can get a smaller timestamp (stale reads, lost
        # real-time order).
        if self.unsafe_ignore_clock_bound:
            return self.epsilon_ns  # broken on purpose: see the class docstring
        reported = self.clock.error_bound_ns()
        return max(self.epsilon_ns, reported or 0)

    def now(self) -> TTInterval:
        """`[t - u, t + u]` for one clock reading `t`; never raises, whatever `u` is.

        Callers that will turn the reading into a timestamp use `checked_now()` instead.
        """
        u = self.uncertainty_ns()
        t = self.clock.now_ns()
        return TTInterval(t - u, t + u)

    def checked_now(self) -> TTInterval:
        """`now()`, but raise `UncertaintyExceeded` if its uncertainty is above the bound.

        Uses one uncertainty reading for both the check and the interval, so the interval
        returned is one that passed the check.
        """
        u = self.uncertainty_ns()
        if u > self.max_uncertainty_ns:
            raise UncertaintyExceeded(u, self.max_uncertainty_ns)
        t = self.clock.now_ns()
        return TTInterval(t - u, t + u)

    def check(self) -> None:
        """Raise `UncertaintyExceeded` if this node must not issue timestamps right now."""
        u = self.uncertainty_ns()
        if u > self.max_uncertainty_ns:
            raise UncertaintyExceeded(u, self.max_uncertainty_ns)

    def after(self, t: Timestamp) -> bool:
        """True if `t` has certainly passed: `now().earliest > t`."""
        # HAZARD: if the clock is ahead of true time by more than the uncertainty, this says t
        # has passed while it has not; a commit-wait relying on it acknowledges too early.
        return self.now().earliest > t

    def before(self, t: Timestamp) -> bool:
        """True if `t` has certainly not arrived: `now().latest < t`."""
        # HAZARD: if the clock is behind true time by more than the uncertainty, this says t is
        # still in the future after it has passed (e.g. a lease believed still valid).
        return self.now().latest < t

    def wait_needed_ns(self, t: Timestamp) -> int:
        """How far the clock must advance from this reading for `after(t)` to hold; 0 if it does.

        Changes nothing. It is an estimate at the current uncertainty: if the uncertainty grows
        while waiting, more wait is needed, which `wait_until_after` handles by looping.
        """
        earliest = self.now().earliest
        return 0 if earliest > t else t - earliest + 1

    async def wait_until_after(self, t: Timestamp) -> None:
        """Commit-wait: return once `after(t)` holds, sleeping on this clock meanwhile.

        Loops because one sleep may not be enough: a slow or stepped-back clock, a growing
        uncertainty or a short sleep all leave `after(t)` still false. Each round sleeps exactly
        the remaining need, so on a clock that advances (a `ManualClock` advances by the sleep)
        it terminates. Cancellation is safe: nothing is held across the sleep.
        """
        # HAZARD: returns once the earliest possible true time is past t. If the real clock
        # error exceeds the uncertainty, true time may still be <= t here, and acknowledging a
        # commit at t now lets a later transaction be ordered before it.
        while (needed := self.wait_needed_ns(t)) > 0:
            await self.clock.sleep_ns(needed)
