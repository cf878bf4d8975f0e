"""Has a file changed since we last looked? For the run-time control files every process polls
(``net.toml`` for the link emulation, ``clock.toml`` for clock skew).

A change is a different inode, mtime or size, or the file appearing or going away; replacing a
file atomically (write beside it, then rename) always counts. Polling `changed()` costs one
`stat`, so a process can afford it every ~0.1 s.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["FileWatch"]


class FileWatch:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        """(inode, mtime ns, size) at the last look; None: there was no file."""

    def changed(self) -> bool:
        """True if the file changed since the last call (the first call: if it exists)."""
        try:
            st = os.stat(self.path)
            now: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            now = None
        if now == self._seen:
            return False
        self._seen = now
        return True
