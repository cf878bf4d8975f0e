"""k2store.evloop: waits are handed to select() in microseconds, readiness still comes from epoll."""

from __future__ import annotations

import asyncio
import select
import selectors
import socket
from typing import Any

import pytest

from k2store import evloop


def test_a_sub_millisecond_wait_reaches_the_kernel_unrounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """epoll takes whole milliseconds (Python rounds 0.3 ms up to 1 ms); the selector must pass
    the 0.3 ms on as it is and then collect events without waiting again."""
    waits: list[float] = []
    polls: list[float | None] = []
    real_select = select.select

    def recording_select(r: Any, w: Any, x: Any, timeout: float) -> Any:
        waits.append(timeout)
        return real_select(r, w, x, 0)

    real_poll = selectors.EpollSelector.select

    def recording_poll(self: selectors.EpollSelector, timeout: float | None = None) -> Any:
        polls.append(timeout)
        return real_poll(self, timeout)

    monkeypatch.setattr(select, "select", recording_select)
    monkeypatch.setattr(selectors.EpollSelector, "select", recording_poll)
    sel = evloop.PreciseEpollSelector()
    try:
        assert sel.select(0.0003) == []
        assert waits == [0.0003]
        assert polls == [0]
        # No timeout (wait forever) and a zero timeout go to epoll unchanged.
        waits.clear(), polls.clear()
        sel.select(0)
        assert waits == [] and polls == [0]
    finally:
        sel.close()


def test_ready_descriptors_are_reported_after_the_precise_wait() -> None:
    a, b = socket.socketpair()
    sel = evloop.PreciseEpollSelector()
    try:
        sel.register(a, selectors.EVENT_READ, "a")
        assert sel.select(0.0002) == []
        b.send(b"x")
        events = sel.select(5.0)  # returns at once: a is readable
        assert [(key.data, mask) for key, mask in events] == [("a", selectors.EVENT_READ)]
    finally:
        sel.close()
        a.close()
        b.close()


def test_run_uses_the_precise_selector_and_returns_the_result() -> None:
    async def main() -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0.0001)
        return type(loop._selector).__name__, 7  # type: ignore[attr-defined]

    assert evloop.run(main()) == ("PreciseEpollSelector", 7)
    loop = evloop.new_event_loop()
    try:
        assert loop.run_until_complete(asyncio.sleep(0, result=3)) == 3
    finally:
        loop.close()
