"""Exclusive ownership of a node's data directory.

A node takes an advisory lock (``flock``) on ``<data_dir>/LOCK.k2`` before it opens any engine, and
holds it until it exits; the kernel drops it when the process dies, even by kill -9, so a restart
after a crash never finds a stale lock. A second process that tries the same directory gets
`DataDirLockedError` naming the holder's pid, before it has touched anything.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import json
import os
import threading
from pathlib import Path

from k2store.errors import DataDirLockedError


class DataDirLock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        lock_file = self.path / "LOCK.k2"
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirLockedError(
                f"data directory {self.path} is locked by another process (pid {holder}); "
                "stop that node first or choose another data directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _replace_durably(path: Path, text: str) -> None:
    """Replace path's contents with text, fsynced: a crash leaves the old file or the new one.
    The temporary file is path's name plus ".tmp": `with_suffix` would give oracle.ceiling and
    oracle.slots the same one, written from two threads."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


class DurableCeiling:
    """A number that only grows and survives crashes, written ahead of use in coarse steps.

    Used for what a restarted node must stay above although it was never logged item by item:
    the oracle's issued timestamps, and the shard reads' timestamps (whose read marks live in
    memory) with the timestamps the node's coordinator made itself in its slots (future, client
    and restamp timestamps, which run ahead of the oracle's high water). `cover(t)` returns
    once the persisted value is >= t. When t passes the recorded ceiling it writes t + step and
    fsyncs, on the caller's thread; before that, once t comes within half a step of the ceiling,
    it extends the ceiling by a step in a worker thread, so steady use seldom waits for an fsync
    (on a node's event loop an fsync of a few ms delays the request that crossed the ceiling,
    and can make a fresh timestamp batch arrive stale).
    """

    def __init__(self, path: Path, step: int) -> None:
        self.path = path
        self.step = step
        self.writes = 0
        self.sync_writes = 0
        """Writes a `cover` call waited for (the rest ran ahead in the worker)."""
        self._lock = threading.Lock()  # guards value and _ahead
        self._write_lock = threading.Lock()  # one write of the file at a time
        self._ahead: concurrent.futures.Future[None] | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        try:
            self.value = int(path.read_text().strip() or 0)
        except FileNotFoundError:
            self.value = 0
        except ValueError:
            raise DataDirLockedError(
                f"{path} is corrupt; it guards timestamp order after restarts, so it is not "
                "silently reset: remove it only if the node never served"
            ) from None

    def cover(self, t: int) -> None:
        with self._lock:
            if t < self.value:
                if t >= self.value - self.step // 2 and self._ahead is None:
                    if self._pool is None:
                        self._pool = concurrent.futures.ThreadPoolExecutor(
                            1, thread_name_prefix="k2-ceiling"
                        )
                    self._ahead = self._pool.submit(self._write_ahead, self.value + self.step)
                return
        with self._write_lock:  # waits out a write ahead in flight, which may cover t
            if t < self.value:
                return
            self._write(t + self.step)
            self.sync_writes += 1

    def _write_ahead(self, ceiling: int) -> None:
        try:
            with self._write_lock:
                if ceiling > self.value:
                    self._write(ceiling)
        finally:
            with self._lock:
                self._ahead = None

    def _write(self, ceiling: int) -> None:
        """Persist ceiling (the caller holds _write_lock); the value rises only once durable."""
        _replace_durably(self.path, f"{ceiling}\n")
        with self._lock:
            self.value = max(self.value, ceiling)
            self.writes += 1

    def close(self) -> None:
        """Finish a write ahead in flight (the value on disk is then final)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class DurableSlots:
    """The oracle's coordinator slot assignments (name -> slot), kept across crashes.

    A coordinator makes timestamps of its own in its slot above the bases of the batches it
    was given (future timestamps, client timestamps, restamps: `Coordinator`), some of them
    beyond anything the oracle's ceiling covers; only its own memory keeps those unique. Were
    slots handed out afresh after an oracle restart, another coordinator could get that slot and
    repeat one of them exactly. `record` writes the whole map (small: at most 256 names) and
    fsyncs before returning, so an assignment is durable before the first batch of its slot
    leaves; it happens once per coordinator name, ever.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.writes = 0
        try:
            raw = json.loads(path.read_text() or "{}")
        except FileNotFoundError:
            raw = {}
        except ValueError:
            raise DataDirLockedError(
                f"{path} is corrupt; it keeps each coordinator's timestamp slot across "
                "restarts, so it is not silently reset: remove it only if the node never served"
            ) from None
        if not isinstance(raw, dict) or not all(
            isinstance(k, str) and type(v) is int for k, v in raw.items()
        ):
            raise DataDirLockedError(
                f"{path} does not hold a map of coordinator names to slots; it is not "
                "silently reset: remove it only if the node never served"
            )
        self.slots: dict[str, int] = dict(raw)

    def record(self, slots: dict[str, int]) -> None:
        """Persist `slots` (a superset of what is recorded) before returning."""
        if slots == self.slots:
            return
        _replace_durably(self.path, json.dumps(slots, sort_keys=True) + "\n")
        self.slots = dict(slots)
        self.writes += 1
