"""A virtual-time asyncio event loop, and the clock that reads it.

Purpose
    Run a whole K2 cluster in one process without ever waiting on the wall clock. `SimEventLoop`
    is an ordinary asyncio loop (tasks, futures, `asyncio.sleep`, `asyncio.timeout` all work
    unchanged) whose `time()` is a virtual clock that starts at 0.0 and moves only when every
    runnable callback has run: then it jumps straight to the earliest timer. A 10 s RPC timeout
    or a 3 ms commit-wait therefore costs no wall time at all, only the Python work around it.

How it works
    `BaseEventLoop._run_once` asks its selector to wait `timeout` seconds for I/O (0 while
    callbacks are ready, the distance to the next timer otherwise, None when there is nothing at
    all). Our selector has no file descriptors; instead of blocking it advances virtual time by
    that timeout, after which the base loop finds the timer due and runs it. Time is held as an
    integer number of nanoseconds, so `VirtualClock.now_ns()` is exact and two runs never differ
    by a float rounding.

Determinism contract
    The loop itself has no source of randomness or of outside input: callbacks run in the order
    asyncio schedules them (FIFO for ready callbacks, by deadline and then insertion for timers).
    A program that takes its randomness only from generators seeded from `loop.seed`, and never
    iterates a set or dict whose order depends on hashing of ids or strings, produces the same
    event order on every run with the same seed. Threads, executors, sockets, pipes, signals and
    subprocesses would bring the outside world in, so the loop refuses them (`SimulationError`).

Failure modes
    - Nothing ready and no timer pending while the main coroutine is unfinished: nothing can
      ever happen again, so `select` raises `SimulationDeadlock` (naming the virtual time and the
      number of stuck tasks) instead of hanging forever.
    - Any attempt at real I/O raises `SimulationError` at the call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from typing import IO, Any, NoReturn, Protocol, TypeVar, TypeVarTuple, Unpack

__all__ = [
    "SIM_EPOCH_NS",
    "SimEventLoop",
    "SimulationDeadlock",
    "SimulationError",
    "VirtualClock",
    "current_sim_loop",
    "run_simulation",
]

T = TypeVar("T")
_Ts = TypeVarTuple("_Ts")


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


FileDescriptorLike = int | _HasFileno | IO[Any]

SIM_EPOCH_NS = 1_800_000_000_000_000_000
"""Wall-clock reading (ns since the Unix epoch) at virtual time 0.0: a fixed instant in 2027, so
timestamps look like real ones and are identical on every run."""

_NS_PER_S = 1_000_000_000


class SimulationError(RuntimeError):
    """The simulated program tried something the simulation cannot make deterministic."""


class SimulationDeadlock(SimulationError):
    """No callback is ready and no timer is pending, yet the run is not finished."""


class _VirtualSelector:
    """Stands in for the selector: never blocks, moves virtual time instead."""

    def __init__(self, loop: SimEventLoop) -> None:
        self._loop = loop

    def select(self, timeout: float | None) -> list[Any]:
        if timeout is None:
            # The base loop passes None only when nothing is ready and no timer exists: a real
            # loop would wait for I/O, but in the simulation there is none, so it is stuck.
            raise SimulationDeadlock(
                f"simulation deadlocked at virtual time {self._loop.time():.9f} s: no callback "
                f"is ready and no timer is pending, but {len(asyncio.all_tasks(self._loop))} "
                "task(s) are still waiting (a future nobody will complete?)"
            )
        if timeout > 0:
            # At least 1 ns, so a timer a fraction of a nanosecond away still makes progress
            # (timeout is a float difference; rounding it must never stall the loop).
            self._loop.advance_ns(max(1, round(timeout * _NS_PER_S)))
        return []

    def close(self) -> None:
        pass


class SimEventLoop(asyncio.BaseEventLoop):
    """An asyncio loop on virtual time. See the module docstring for the contract.

    `seed` is recorded for the program's own generators (`SimCluster`, `SimNetwork` derive theirs
    from it); the loop draws no random numbers itself.
    """

    def __init__(self, *, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed
        self._now_ns = 0
        self._selector = _VirtualSelector(self)
        # Timers due within 1 ns of now count as due: virtual time is whole nanoseconds.
        self._clock_resolution = 1e-9

    # -- virtual time --------------------------------------------------------------------------

    def time(self) -> float:
        return self._now_ns / _NS_PER_S

    def virtual_ns(self) -> int:
        """Virtual time in whole nanoseconds since the start of the run."""
        return self._now_ns

    def advance_ns(self, ns: int) -> None:
        """Move virtual time forward. Only the selector calls this during a run; calling it from
        a callback is allowed (timers then fire late, as on a paused machine) but never back."""
        if ns < 0:
            raise ValueError(f"virtual time cannot go backwards ({ns} ns)")
        self._now_ns += ns

    # -- hooks the base loop needs --------------------------------------------------------------

    def _process_events(self, event_list: list[Any]) -> None:
        # No file descriptors, so never any events.
        pass

    def _write_to_self(self) -> None:
        # Reached from call_soon_threadsafe: another thread wants to wake the loop. Threads run
        # on the wall clock, so their results would land at arbitrary virtual times.
        raise SimulationError("threads cannot schedule work on the simulation loop")

    # -- no real I/O ---------------------------------------------------------------------------

    def run_in_executor(
        self,
        executor: Executor | None,
        func: Callable[[Unpack[_Ts]], T],
        *args: *_Ts,
    ) -> asyncio.Future[T]:
        _refuse("run_in_executor (threads)")

    async def getaddrinfo(self, *args: Any, **kwargs: Any) -> NoReturn:
        _refuse("getaddrinfo (DNS)")

    async def create_connection(self, *args: Any, **kwargs: Any) -> NoReturn:
        _refuse("create_connection (sockets)")

    async def create_server(self, *args: Any, **kwargs: Any) -> NoReturn:
        _refuse("create_server (sockets)")

    async def create_datagram_endpoint(self, *args: Any, **kwargs: Any) -> NoReturn:
        _refuse("create_datagram_endpoint (sockets)")

    async def subprocess_exec(self, *args: Any, **kwargs: Any) -> NoReturn:
        _refuse("subprocess_exec")

    async def subprocess_shell(self, *args: Any, **kwargs: Any) -> NoReturn:
        _refuse("subprocess_shell")

    def add_reader(
        self, fd: FileDescriptorLike, callback: Callable[[Unpack[_Ts]], Any], *args: *_Ts
    ) -> None:
        _refuse("add_reader (file descriptors)")

    def add_writer(
        self, fd: FileDescriptorLike, callback: Callable[[Unpack[_Ts]], Any], *args: *_Ts
    ) -> None:
        _refuse("add_writer (file descriptors)")

    def add_signal_handler(
        self, sig: int, callback: Callable[[Unpack[_Ts]], object], *args: *_Ts
    ) -> None:
        _refuse("add_signal_handler (signals)")


def _refuse(what: str) -> NoReturn:
    raise SimulationError(
        f"{what} is not allowed in the simulation: it would make the run depend on the outside "
        "world; route it through SimNetwork or a virtual clock instead"
    )


def current_sim_loop() -> SimEventLoop:
    """The running `SimEventLoop`; `SimulationError` if called outside one."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        raise SimulationError("no simulation is running (use run_simulation)") from None
    if not isinstance(loop, SimEventLoop):
        raise SimulationError(
            f"the running loop is a {type(loop).__name__}, not a SimEventLoop (use run_simulation)"
        )
    return loop


class VirtualClock:
    """A `truetime.ClockSource` that reads the simulation loop's virtual time: true time.

    `now_ns() = epoch_ns + loop.virtual_ns()`; `monotonic_ns()` is the same reading (nothing in
    the simulation steps true time). It claims no error bound, so TrueTime uses the configured
    epsilon. Per-node clocks wrap it in a `truetime.SkewedClock` to lie by an offset and drift.
    """

    def __init__(self, loop: SimEventLoop, *, epoch_ns: int = SIM_EPOCH_NS) -> None:
        self._loop = loop
        self.epoch_ns = epoch_ns

    def now_ns(self) -> int:
        return self.epoch_ns + self._loop.virtual_ns()

    def monotonic_ns(self) -> int:
        return self.epoch_ns + self._loop.virtual_ns()

    def error_bound_ns(self) -> int | None:
        return None

    async def sleep_ns(self, ns: int) -> None:
        await asyncio.sleep(ns / _NS_PER_S if ns > 0 else 0)


_SHUTDOWN_ROUNDS = 20
"""Cancelling leftovers can wake timers that spawn more tasks; give up after this many rounds."""


def run_simulation(main_coro_factory: Callable[[], Coroutine[Any, Any, T]], *, seed: int) -> T:
    """Run `main_coro_factory()` to completion on a fresh `SimEventLoop` seeded with `seed`.

    The factory is called inside the loop, so it (and everything it builds) may use
    `current_sim_loop()`. When the main coroutine returns, every task still running (timers,
    in-flight handlers) is cancelled and awaited, and the loop is closed: nothing leaks into the
    next run. Same program + same seed -> same result and the same event order.
    """
    loop = SimEventLoop(seed=seed)
    try:

        async def main() -> T:
            return await main_coro_factory()

        return loop.run_until_complete(main())
    finally:
        try:
            _cancel_leftovers(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


def _cancel_leftovers(loop: SimEventLoop) -> None:
    for _ in range(_SHUTDOWN_ROUNDS):
        # all_tasks is a set ordered by object id; sort by name ("Task-<n>", a creation counter
        # for unnamed tasks) so cancellation order does not depend on memory addresses.
        tasks = sorted(asyncio.all_tasks(loop), key=_task_order)
        if not tasks:
            return
        for t in tasks:
            t.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    raise SimulationError(f"tasks kept spawning after {_SHUTDOWN_ROUNDS} rounds of cancellation")


def _task_order(task: asyncio.Task[Any]) -> tuple[int, str]:
    name = task.get_name()
    _, _, n = name.rpartition("-")
    return (int(n), name) if n.isdigit() else (-1, name)
