"""The one thread that runs a process's torch work.

Purpose
    torch on this CPU parallelizes each operator over an OpenMP thread team (libgomp), and
    libgomp keeps one team per thread that has ever run a parallel operator. Once there are more
    OpenMP threads than cores (two teams of two on two cores), libgomp stops letting a team's
    workers spin between operators: they sleep and must be woken for each of the few hundred
    operators of a forward pass. Measured here: a 16-token suffix over a 2,048-token cache takes
    88 ms when one thread has ever run torch, and 118 ms, for good, once a second thread has
    (a 512x512 matmul on the main thread is enough).

    So every parallel torch call of a serving process goes to this one thread: model loading
    (`kvtier.models.load_model`), and every engine's forward passes, cache building, sampling
    and exports (`kvtier.engine.Engine`). The event loop thread keeps to I/O.

Use
    `executor()` for asyncio (`loop.run_in_executor(executor(), fn, *args)`), `run(fn, *args)`
    from synchronous code (it runs fn inline when already on the thread).
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from typing import TypeVar

__all__ = ["THREAD_NAME", "executor", "on_torch_thread", "run"]

T = TypeVar("T")
THREAD_NAME = "k2-torch"
_lock = threading.Lock()
_executor: concurrent.futures.ThreadPoolExecutor | None = None
_ident: list[int] = []


def _mark() -> None:
    _ident.append(threading.get_ident())


def executor() -> concurrent.futures.ThreadPoolExecutor:
    """The process's torch thread (started on first use; it lives as long as the process)."""
    global _executor
    with _lock:
        if _executor is None:
            _executor = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix=THREAD_NAME, initializer=_mark
            )
        return _executor


def on_torch_thread() -> bool:
    return threading.get_ident() in _ident


def run(fn: Callable[..., T], *args: object) -> T:
    """fn(*args) on the torch thread, waiting for it (inline when already there)."""
    if on_torch_thread():
        return fn(*args)
    return executor().submit(fn, *args).result()
