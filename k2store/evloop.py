"""An asyncio event loop whose timers fire when they are due, not up to a millisecond late.

Purpose
    asyncio's default loop on Linux waits in ``epoll_wait``, whose timeout is whole
    milliseconds: Python rounds a 0.5 ms wait up to 1 ms, and the loop wakes about 1.1 ms after
    a ``sleep(0.0005)``. Everything in K2 that waits less than a few milliseconds pays for that:
    the wide-area emulation's in-region hop (half of a 1 ms RTT each way, so an emulated
    in-region call took 2.2 ms instead of 1), a commit-wait of a few hundred microseconds, a
    timestamp batch's last 100 us. On node processes those waits made a local transaction
    several times slower than the design (and the simulator) says it is.

Mechanism
    `PreciseEpollSelector` keeps epoll for readiness (no limit on descriptor numbers, one
    registration per descriptor) and waits with ``select()`` on the epoll descriptor itself,
    whose timeout is in microseconds: the epoll descriptor becomes readable when any of its
    descriptors is ready, and a non-blocking ``epoll_wait`` then collects the events. Only the
    epoll descriptor is given to ``select()``, so FD_SETSIZE applies to it alone (it is created
    with the loop, among the first descriptors of the process); were it ever above the limit,
    the selector waits as plain epoll does.

Use
    `run(main())` in place of ``asyncio.run(main())``; `new_event_loop()` for a loop of one's own
    (a background thread's). Every entry point of K2 that runs a cluster node, a benchmark
    client or a client library loop uses them, so processes and their clients wait alike.
"""

from __future__ import annotations

import asyncio
import select
import selectors
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["PreciseEpollSelector", "new_event_loop", "run"]

T = TypeVar("T")

_FD_SETSIZE = 1024


if sys.platform == "linux":

    class PreciseEpollSelector(selectors.EpollSelector):
        """epoll for readiness, a microsecond timeout for the wait (see the module docstring)."""

        def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
            if timeout is not None and timeout > 0:
                fd = self.fileno()
                if fd < _FD_SETSIZE:
                    select.select([fd], [], [], timeout)  # EINTR is retried (PEP 475)
                    timeout = 0
            return super().select(timeout)

    def _selector() -> selectors.BaseSelector:
        return PreciseEpollSelector()

else:  # pragma: no cover - K2 runs on Linux; elsewhere the platform's default loop
    PreciseEpollSelector = selectors.DefaultSelector  # type: ignore[misc,assignment]

    def _selector() -> selectors.BaseSelector:
        return selectors.DefaultSelector()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop whose timers are precise to tens of microseconds."""
    return asyncio.SelectorEventLoop(_selector())


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on a loop from `new_event_loop`."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)
