"""A virtual-time asyncio event loop, and the clock that reads it.

Purpose
    Run a whole K2 cluster in one process without ever waiting on the wall clock. `SimEventLoop`
    is an ordinary asyncio loop (tasks, futures, `asyncio.sleep`, `asyncio.timeout` all work
    unchanged) whose `time()` is a virtual clock that starts at 0.0 and moves only when every
    runnable callback has run: then it jumps straight to the earliest timer. A 10 s RPC timeout
    or a 3 ms commit-wait therefore costs no wall time at all, only the Python work around it.

How it works
    An iteration does what `BaseEventLoop._run_once` does with a selector: when no callback is
    ready, wait for I/O until the earliest timer. There is no I/O, so instead of blocking it
    advances virtual time straight to that timer, moves every timer now due to the ready queue
    and runs what is ready. Time is held as an integer number of nanoseconds, so
    `VirtualClock.now_ns()` is exact and two runs never differ by a float rounding.

    The simulator's speed is this loop's speed, so the iteration and the scheduling calls are
    lean versions of asyncio's (no debug mode, timers in a heap of tuples that compare in C,
    several iterations per call); their semantics are asyncio's.

Determinism contract
    The loop itself has no source of randomness or of outside input: callbacks run in the order
    they are scheduled (FIFO for ready callbacks; timers by deadline, then in the order they
    were set). A program that takes its randomness only from generators seeded from `loop.seed`,
    and never iterates a set or dict whose order depends on hashing of ids or strings, produces
    the same event order on every run with the same seed. Threads, executors, sockets, pipes,
    signals and subprocesses would bring the outside world in, so the loop refuses them
    (`SimulationError`).

Failure modes
    - Nothing ready and no timer pending while the main coroutine is unfinished: nothing can
      ever happen again, so the loop raises `SimulationDeadlock` (naming the virtual time and
      the number of stuck tasks) instead of hanging forever.
    - Any attempt at real I/O raises `SimulationError` at the call.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import heapq
from asyncio import events, format_helpers
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


_MAX_ADVANCE_S = 24 * 3600
"""The longest single jump of virtual time, as asyncio's longest select timeout: a timer further
away is reached in several jumps (nothing observable happens in between)."""
_MIN_SCHEDULED_TIMER_HANDLES = 100
_MIN_CANCELLED_TIMER_HANDLES_FRACTION = 0.5
"""When cancelled timers are more than this fraction of a heap of more than the count above,
the heap is rebuilt without them (asyncio's rule; cancelled RPC deadlines pile up otherwise)."""


def _init_handle(
    h: events.Handle,
    callback: Callable[..., object],
    args: tuple[Any, ...],
    loop: asyncio.AbstractEventLoop,
    context: contextvars.Context | None,
) -> None:
    """What `Handle.__init__` sets, less its debug-mode hooks (shared by `_Timer`, `_Ready`)."""
    h._context = context if context is not None else contextvars.copy_context()  # type: ignore[attr-defined]
    h._loop = loop  # type: ignore[attr-defined]
    h._callback = callback  # type: ignore[attr-defined]
    h._args = args
    h._cancelled = False
    h._repr = None  # type: ignore[attr-defined]
    h._source_traceback = None  # type: ignore[attr-defined]


class _Timer(events.TimerHandle):
    """A `TimerHandle` built without asyncio's debug hooks (the simulation never runs in debug
    mode: `SimEventLoop.set_debug` refuses), since one is built for every message and deadline."""

    __slots__ = ()
    _scheduled: bool  # TimerHandle's slot (typeshed leaves the private state out)

    def __init__(
        self,
        when: float,
        callback: Callable[..., object],
        args: tuple[Any, ...],
        loop: asyncio.AbstractEventLoop,
        context: contextvars.Context | None,
    ) -> None:
        _init_handle(self, callback, args, loop, context)
        self._when = when
        self._scheduled = True


class _Ready(events.Handle):
    """A `Handle` for `call_soon`, built without the debug hooks (see `_Timer`)."""

    __slots__ = ()

    def __init__(
        self,
        callback: Callable[..., object],
        args: tuple[Any, ...],
        loop: asyncio.AbstractEventLoop,
        context: contextvars.Context | None,
    ) -> None:
        _init_handle(self, callback, args, loop, context)


class SimEventLoop(asyncio.BaseEventLoop):
    """An asyncio loop on virtual time. See the module docstring for the contract.

    `seed` is recorded for the program's own generators (`SimCluster`, `SimNetwork` derive theirs
    from it); the loop draws no random numbers itself.

    Speed: the simulator's throughput is this loop's, so the hot methods (`call_soon`,
    `call_at`, `create_task` and the run loop itself) are lean versions of `BaseEventLoop`'s
    with the same semantics minus debug mode. Timers sit in a heap of `(when, seq, handle)`
    entries: tuples compare in C (`TimerHandle.__lt__` is Python), and `seq`, a counter, breaks
    ties between equal deadlines in the order the timers were set (asyncio leaves that order
    to the heap's shape).
    """

    # BaseEventLoop's private state that the fast paths use (typeshed leaves it out).
    _ready: collections.deque[events.Handle]
    _closed: bool
    _stopping: bool
    _task_factory: Any
    _timer_cancelled_count: int

    def __init__(self, *, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed
        self._now_ns = 0
        self._timer_seq = 0
        self._scheduled_entries: list[tuple[float, int, _Timer]] = []
        # Timers due within 1 ns of now count as due: virtual time is whole nanoseconds.
        self._clock_resolution = 1e-9

    # -- virtual time --------------------------------------------------------------------------

    def time(self) -> float:
        return self._now_ns / _NS_PER_S

    def virtual_ns(self) -> int:
        """Virtual time in whole nanoseconds since the start of the run."""
        return self._now_ns

    def advance_ns(self, ns: int) -> None:
        """Move virtual time forward. Only the run loop calls this during a run; calling it from
        a callback is allowed (timers then fire late, as on a paused machine) but never back."""
        if ns < 0:
            raise ValueError(f"virtual time cannot go backwards ({ns} ns)")
        self._now_ns += ns

    # -- scheduling (hot paths) ----------------------------------------------------------------

    def set_debug(self, enabled: bool) -> None:
        if enabled:
            raise SimulationError("asyncio debug mode is not supported by the simulation loop")
        super().set_debug(False)

    def call_soon(
        self,
        callback: Callable[[Unpack[_Ts]], object],
        *args: *_Ts,
        context: contextvars.Context | None = None,
    ) -> asyncio.Handle:
        if self._closed:
            raise RuntimeError("Event loop is closed")
        handle = _Ready(callback, args, self, context)
        self._ready.append(handle)
        return handle

    def call_at(
        self,
        when: float,
        callback: Callable[[Unpack[_Ts]], object],
        *args: *_Ts,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        if when is None:
            raise TypeError("when cannot be None")
        if self._closed:
            raise RuntimeError("Event loop is closed")
        timer = _Timer(when, callback, args, self, context)
        self._timer_seq += 1
        heapq.heappush(self._scheduled_entries, (when, self._timer_seq, timer))
        return timer

    def call_later(
        self,
        delay: float,
        callback: Callable[[Unpack[_Ts]], object],
        *args: *_Ts,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        if delay is None:
            raise TypeError("delay must not be None")
        return self.call_at(self._now_ns / _NS_PER_S + delay, callback, *args, context=context)

    def create_task(  # type: ignore[override]
        self,
        coro: Coroutine[Any, Any, T],
        *,
        name: str | None = None,
        context: contextvars.Context | None = None,
    ) -> asyncio.Task[T]:
        if self._task_factory is not None:
            return super().create_task(coro, name=name, context=context)
        if self._closed:
            raise RuntimeError("Event loop is closed")
        return asyncio.Task(coro, loop=self, name=name, context=context)

    def close(self) -> None:
        super().close()
        self._scheduled_entries.clear()

    def _run_once(self) -> None:
        """Run iterations of `BaseEventLoop._run_once` until the loop is asked to stop (the
        base class's `run_forever` calls this in a loop and checks `_stopping` after each one;
        doing that here saves a call per iteration). One iteration: drop cancelled timers, jump
        virtual time to the earliest timer if nothing is ready, move every timer due by now to
        the ready queue, run what was ready at that point (callbacks scheduled meanwhile wait for
        the next iteration)."""
        ready = self._ready
        heap = self._scheduled_entries
        heappop = heapq.heappop
        while True:
            count = len(heap)
            if (
                count > _MIN_SCHEDULED_TIMER_HANDLES
                and self._timer_cancelled_count / count > _MIN_CANCELLED_TIMER_HANDLES_FRACTION
            ):
                kept = []
                for entry in heap:
                    if entry[2]._cancelled:
                        entry[2]._scheduled = False
                    else:
                        kept.append(entry)
                heapq.heapify(kept)
                heap[:] = kept
                self._timer_cancelled_count = 0
            else:
                while heap and heap[0][2]._cancelled:
                    self._timer_cancelled_count -= 1
                    heappop(heap)[2]._scheduled = False
            if not ready and not self._stopping:
                if not heap:
                    self._deadlocked()
                timeout = heap[0][0] - self._now_ns / _NS_PER_S
                if timeout > 0:
                    # At least 1 ns, so a timer a fraction of a nanosecond away still makes
                    # progress (timeout is a float difference; rounding it must never stall).
                    self._now_ns += max(1, round(min(timeout, _MAX_ADVANCE_S) * _NS_PER_S))
            end_time = self._now_ns / _NS_PER_S + 1e-9
            while heap and heap[0][0] < end_time:
                timer = heappop(heap)[2]
                timer._scheduled = False
                ready.append(timer)
            for _ in range(len(ready)):
                handle = ready.popleft()
                if handle._cancelled:
                    continue
                try:
                    # Handle._run without its frame (typeshed leaves these slots out).
                    handle._context.run(handle._callback, *handle._args)  # type: ignore[attr-defined]
                except (SystemExit, KeyboardInterrupt):
                    raise
                except BaseException as exc:
                    self._callback_failed(handle, exc)
            if self._stopping:
                return

    def _callback_failed(self, handle: events.Handle, exc: BaseException) -> None:
        """What `Handle._run` does when a callback raises: report it, keep running."""
        callback = handle._callback  # type: ignore[attr-defined]
        cb = format_helpers._format_callback_source(callback, handle._args)
        self.call_exception_handler(
            {"message": f"Exception in callback {cb}", "exception": exc, "handle": handle}
        )

    def _deadlocked(self) -> NoReturn:
        # Nothing is ready and no timer exists: a real loop would wait for I/O, but in the
        # simulation there is none, so it is stuck.
        raise SimulationDeadlock(
            f"simulation deadlocked at virtual time {self.time():.9f} s: no callback "
            f"is ready and no timer is pending, but {len(asyncio.all_tasks(self))} "
            "task(s) are still waiting (a future nobody will complete?)"
        )

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
