"""DurableCeiling: once `cover(t)` returns, the file holds a value >= t, even with writes run
ahead in the worker thread; steady use waits for almost no fsync of its own. DurableSlots: the
oracle's slot assignments survive a restart, and a damaged file is refused, not reset."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from k2store.datadir import DurableCeiling, DurableSlots
from k2store.errors import DataDirLockedError

STEP = 1000


def on_disk(path: Path) -> int:
    return int(path.read_text().strip())


def test_crossing_the_ceiling_writes_at_once_and_approaching_it_writes_ahead(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.ceiling"
    c = DurableCeiling(path, STEP)
    assert c.value == 0
    c.cover(10)  # passes the (empty) ceiling: written before returning
    assert on_disk(path) == c.value == 10 + STEP and c.sync_writes == 1
    c.cover(100)  # far below: nothing to do
    assert c.writes == 1
    c.cover(10 + STEP - 100)  # within half a step of it: extended in the worker
    c.close()
    assert on_disk(path) == c.value == 10 + 2 * STEP
    assert c.writes == 2 and c.sync_writes == 1
    for t in range(0, 10 * STEP, 37):  # steady use, closing on the ceiling from below
        c.cover(t)
        assert on_disk(path) >= t
    c.close()
    # (How many of those writes ran ahead depends on how fast the worker's fsyncs are next to
    # this loop; that each return was durable does not.)
    assert DurableCeiling(path, STEP).value == on_disk(path)  # what a restart reads


def test_every_return_is_durable_under_concurrent_callers(tmp_path: Path) -> None:
    path = tmp_path / "c.ceiling"
    c = DurableCeiling(path, STEP)
    bad: list[tuple[int, int]] = []

    def use(offset: int) -> None:
        for i in range(300):
            t = i * 97 + offset
            c.cover(t)
            got = on_disk(path)
            if got < t:
                bad.append((t, got))

    threads = [threading.Thread(target=use, args=(k * 13,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    c.close()
    assert bad == []
    assert c.value == on_disk(path) >= 299 * 97


def test_slot_assignments_survive_a_restart_and_a_damaged_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "oracle.slots"
    book = DurableSlots(path)
    assert book.slots == {}
    book.record({"a": 0, "a/future": 1})
    book.record({"a": 0, "a/future": 1})  # unchanged: not written again
    assert book.writes == 1
    assert DurableSlots(path).slots == {"a": 0, "a/future": 1}  # what a restart reads
    # The oracle's ceiling and its slots are written from different threads: their temporary
    # files must differ (oracle.tmp here stands for the ceiling's, in the middle of a write).
    (tmp_path / "oracle.tmp").mkdir()
    DurableCeiling(tmp_path / "oracle.ceiling", STEP).cover(5)
    book.record({"a": 0, "a/future": 1, "b": 2})
    assert DurableSlots(path).slots["b"] == 2
    for damaged in ("{not json", '["a", 0]', '{"a": "zero"}'):
        path.write_text(damaged)
        with pytest.raises(DataDirLockedError, match="not silently reset"):
            DurableSlots(path)
