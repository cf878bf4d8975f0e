"""The shard leader's single-key MVTO rules, on the memory engine (no I/O, no clock)."""

from __future__ import annotations

import pytest

from k2store.cluster import ShardConfig
from k2store.errors import (
    BelowHorizon,
    InvalidArgument,
    KeyTooLarge,
    NotLeader,
    ValueTooLarge,
    WriteTooOld,
)
from k2store.memengine import MemoryEngine
from k2store.shard import Limits, ShardLeader
from txn.storage import Intent, PutIntent

T = 1_700_000_000_000_000_000


def leader(start: bytes = b"a", end: bytes | None = b"m") -> ShardLeader:
    return ShardLeader(ShardConfig(7, start, end, "us-east", "n1"), MemoryEngine(), Limits(16, 32))


def test_read_your_write_and_versions() -> None:
    s = leader()
    s.write(b"b", b"1", T + 10)
    s.write(b"b", b"2", T + 20)
    assert s.read(b"b", T + 15).value == b"1"  # type: ignore[union-attr]
    assert s.read(b"b", T + 25).value == b"2"  # type: ignore[union-attr]
    assert s.read(b"b", T + 5) is None


def test_write_below_a_read_is_aborted_by_read_mark() -> None:
    s = leader()
    s.read(b"b", T + 100)
    with pytest.raises(WriteTooOld, match="read-mark"):
        s.write(b"b", b"x", T + 50)
    with pytest.raises(WriteTooOld, match="read-mark"):
        s.write(b"b", b"x", T + 100)  # a read AT ts also forbids the write at ts
    s.write(b"b", b"x", T + 101)
    assert s.counters.aborts == 2


def test_write_below_a_newer_version_is_aborted() -> None:
    s = leader()
    s.write(b"b", b"new", T + 100)
    with pytest.raises(WriteTooOld, match="newer-version"):
        s.write(b"b", b"old", T + 90)
    assert s.read(b"b", T + 200).value == b"new"  # type: ignore[union-attr]


def test_write_over_a_foreign_intent_is_aborted() -> None:
    s = leader()
    s.store.apply([PutIntent(b"b", Intent(b"tx1", T + 5, b"v", b"b"))])
    with pytest.raises(WriteTooOld, match="intent"):
        s.write(b"b", b"x", T + 10)


def test_scan_marks_the_range_it_covered_including_absent_keys() -> None:
    s = leader()
    for k in [b"b", b"d", b"f"]:
        s.write(k, k, T + 1)
    page = s.scan(b"a", None, T + 10, limit=10)
    assert [k for k, _ in page.items] == [b"b", b"d", b"f"] and not page.more
    with pytest.raises(WriteTooOld):
        s.write(b"c", b"phantom", T + 5)  # never existed, but the scan covered it
    with pytest.raises(WriteTooOld):
        s.write(b"l", b"phantom", T + 5)  # up to the shard's end


def test_scan_pagination_marks_only_what_was_returned() -> None:
    s = leader()
    for k in [b"b", b"d", b"f"]:
        s.write(k, k, T + 1)
    page = s.scan(b"a", None, T + 10, limit=2)
    assert [k for k, _ in page.items] == [b"b", b"d"] and page.more
    assert page.resume_key == b"d\x00"
    s.write(b"e", b"after", T + 5)  # beyond the page: not marked
    with pytest.raises(WriteTooOld):
        s.write(b"c", b"inside", T + 5)
    rest = s.scan(page.resume_key, None, T + 10, limit=2)
    assert [k for k, _ in rest.items] == [b"e", b"f"]


def test_deletes_hide_keys_from_reads_and_scans() -> None:
    s = leader()
    s.write(b"b", b"1", T + 1)
    s.write(b"b", None, T + 2)
    v = s.read(b"b", T + 3)
    assert v is not None and v.value is None
    assert s.scan(b"a", None, T + 3, 10).items == []


def test_bad_input_changes_nothing() -> None:
    s = leader()
    with pytest.raises(KeyTooLarge):
        s.write(b"b" * 17, b"v", T)
    with pytest.raises(ValueTooLarge):
        s.write(b"b", b"v" * 33, T)
    with pytest.raises(NotLeader):
        s.write(b"z", b"v", T)
    with pytest.raises(NotLeader):
        s.read(b"0", T)
    with pytest.raises(InvalidArgument):
        s.scan(b"c", b"b", T, 10)
    with pytest.raises(InvalidArgument):
        s.scan(b"b", None, T, 0)
    assert s.store.versions(b"b") == []
    assert s.counters.writes == 0


def test_read_below_the_horizon_is_a_clear_error() -> None:
    s = leader()
    s.write(b"b", b"1", T + 1)
    s.write(b"b", b"2", T + 10)
    s.store.gc(T + 5)
    with pytest.raises(BelowHorizon):
        s.read(b"b", T + 2)
    assert s.read(b"b", T + 6).value == b"1"  # type: ignore[union-attr]
