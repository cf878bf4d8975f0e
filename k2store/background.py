"""Stopping a node's background tasks for certain.

Python 3.11's `asyncio.wait_for` can swallow a cancellation that arrives as the awaited thing
completes (fixed in 3.12), so a loop that sleeps through `wait_for` may live through one
`cancel()` and a plain `await task` after it then waits for ever: a node whose `stop()` never
returns. `stop_tasks` cancels again until every task has finished, within a bound.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

__all__ = ["stop_tasks"]

log = logging.getLogger("k2.background")


async def stop_tasks(tasks: Iterable[asyncio.Future[Any]], *, rounds: int = 20) -> None:
    """Cancel `tasks` and wait until they are done, cancelling again every 0.25 s (at most
    `rounds` times); a task still running after that is logged and left behind."""
    pending = {t for t in tasks if not t.done()}
    for _ in range(rounds):
        if not pending:
            break
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.25)
    for t in pending:
        log.error("background task %r did not stop", t)
