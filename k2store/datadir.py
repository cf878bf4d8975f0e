"""Exclusive ownership of a node's data directory.

A node takes an advisory lock (``flock``) on ``<data_dir>/LOCK.k2`` before it opens any engine, and
holds it until it exits; the kernel drops it when the process dies, even by kill -9, so a restart
after a crash never finds a stale lock. A second process that tries the same directory gets
`DataDirLockedError` naming the holder's pid, before it has touched anything.
"""

from __future__ import annotations

import fcntl
import os
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


class DurableCeiling:
    """A number that only grows and survives crashes, written ahead of use in coarse steps.

    Used for what a restarted node must stay above although it was never logged item by item:
    the oracle's issued timestamps and the shard reads' timestamps (whose read marks live in
    memory). `cover(t)` returns once the persisted value is >= t; it fsyncs only when t passes the
    recorded ceiling, and then records t + step, so steady use costs one small write per step.
    """

    def __init__(self, path: Path, step: int) -> None:
        self.path = path
        self.step = step
        self.writes = 0
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
        if t < self.value:
            return
        ceiling = t + self.step
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(f"{ceiling}\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)
        self.value = ceiling
        self.writes += 1
