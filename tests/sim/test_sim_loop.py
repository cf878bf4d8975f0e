"""The virtual-time loop: time jumps instead of waiting, deadlocks and real I/O are refused."""

from __future__ import annotations

import asyncio

import pytest

from k2store.sim import (
    SIM_EPOCH_NS,
    SimEventLoop,
    SimulationDeadlock,
    SimulationError,
    VirtualClock,
    current_sim_loop,
    run_simulation,
)
from truetime import SkewedClock, TrueTime


def test_sleep_jumps_virtual_time() -> None:
    async def main() -> tuple[float, float]:
        loop = current_sim_loop()
        start = loop.time()
        await asyncio.sleep(3600)
        return start, loop.time()

    assert run_simulation(main, seed=0) == (0.0, 3600.0)


def test_timers_fire_in_deadline_order_then_fifo() -> None:
    async def main() -> list[tuple[str, float]]:
        loop = current_sim_loop()
        seen: list[tuple[str, float]] = []

        async def after(name: str, delay: float) -> None:
            await asyncio.sleep(delay)
            seen.append((name, loop.time()))

        await asyncio.gather(after("c", 0.3), after("a", 0.1), after("b1", 0.2), after("b2", 0.2))
        return seen

    assert run_simulation(main, seed=0) == [("a", 0.1), ("b1", 0.2), ("b2", 0.2), ("c", 0.3)]


def test_timeouts_are_virtual() -> None:
    async def main() -> float:
        loop = current_sim_loop()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(10):
                await loop.create_future()
        return loop.time()

    assert run_simulation(main, seed=0) == 10.0


def test_a_future_nobody_completes_is_a_deadlock() -> None:
    async def main() -> None:
        await current_sim_loop().create_future()

    with pytest.raises(SimulationDeadlock, match="deadlocked at virtual time"):
        run_simulation(main, seed=0)


def test_real_io_is_refused() -> None:
    async def main() -> None:
        loop = current_sim_loop()
        with pytest.raises(SimulationError, match="create_connection"):
            await loop.create_connection(asyncio.Protocol, "127.0.0.1", 1)
        with pytest.raises(SimulationError, match="run_in_executor"):
            loop.run_in_executor(None, print)
        with pytest.raises(SimulationError, match="getaddrinfo"):
            await loop.getaddrinfo("localhost", 80)

    run_simulation(main, seed=0)


def test_leftover_tasks_are_cancelled_and_the_loop_closed() -> None:
    cancelled: list[bool] = []
    loops: list[SimEventLoop] = []

    async def forever() -> None:
        try:
            await asyncio.sleep(1e9)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def main() -> int:
        loops.append(current_sim_loop())
        current_sim_loop().create_task(forever())
        await asyncio.sleep(0)
        return 7

    assert run_simulation(main, seed=0) == 7
    assert cancelled == [True]
    assert loops[0].is_closed()


def test_outside_a_simulation_there_is_no_sim_loop() -> None:
    with pytest.raises(SimulationError, match="no simulation is running"):
        current_sim_loop()


def test_virtual_clock_is_a_truetime_source() -> None:
    async def main() -> tuple[int, int, int, bool]:
        loop = current_sim_loop()
        clock = VirtualClock(loop)
        skewed = SkewedClock(clock, offset_ns=250_000)
        tt = TrueTime(skewed, 400_000, 5_000_000)
        t0 = clock.now_ns()
        await clock.sleep_ns(1_500_000)
        t1 = clock.now_ns()
        target = skewed.now_ns() + 10_000_000
        await tt.wait_until_after(target)
        return t0, t1, clock.monotonic_ns(), tt.after(target)

    t0, t1, mono, after = run_simulation(main, seed=0)
    assert t0 == SIM_EPOCH_NS
    assert t1 == SIM_EPOCH_NS + 1_500_000
    assert mono > t1
    assert after
