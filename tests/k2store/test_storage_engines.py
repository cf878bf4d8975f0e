"""The `VersionedStore` contract, case by case, on both engines."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from k2store.memengine import MemoryEngine
from k2store.rocksengine import RocksEngine
from txn.readmarks import ReadMarks
from txn.storage import (
    MAX_TS,
    BelowRetentionHorizon,
    GcStats,
    Intent,
    Mutation,
    PutIntent,
    PutMeta,
    PutVersion,
    ResolveIntent,
    StorageError,
    Version,
    VersionedStore,
)


@pytest.fixture(params=["memory", "rocks"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VersionedStore]:
    store: VersionedStore = (
        MemoryEngine() if request.param == "memory" else RocksEngine(tmp_path / "db")
    )
    yield store
    store.close()


def intent(txn: bytes, ts: int, value: bytes | None = b"v") -> Intent:
    return Intent(txn_id=txn, ts=ts, value=value, record_key=b"rec")


def snapshot(store: VersionedStore) -> tuple[object, ...]:
    keys = [b"a", b"b", b"c"]
    return (
        [store.versions(k) for k in keys],
        store.scan_intents(b"", None),
        store.get_meta(b"m"),
        store.horizon,
    )


# -- reads ---------------------------------------------------------------------------------------


def test_get_returns_newest_version_at_or_below_ts(engine: VersionedStore) -> None:
    engine.apply([PutVersion(b"k", 10, b"ten"), PutVersion(b"k", 20, None)])
    engine.apply([PutVersion(b"k", 30, b"thirty")])
    assert engine.get(b"k", 9) is None
    assert engine.get(b"k", 10) == Version(10, b"ten")
    assert engine.get(b"k", 19) == Version(10, b"ten")
    assert engine.get(b"k", 25) == Version(20, None)  # tombstones come back as such
    assert engine.get(b"k", MAX_TS) == Version(30, b"thirty")
    assert engine.get(b"other", 100) is None
    assert engine.latest_version(b"k") == Version(30, b"thirty")
    assert engine.versions(b"k") == [Version(30, b"thirty"), Version(20, None), Version(10, b"ten")]


def test_get_ignores_intents(engine: VersionedStore) -> None:
    engine.apply([PutVersion(b"k", 5, b"old"), PutIntent(b"k", intent(b"t1", 8, b"new"))])
    assert engine.get(b"k", 100) == Version(5, b"old")
    assert engine.get_intent(b"k") == intent(b"t1", 8, b"new")


def test_empty_value_is_not_a_tombstone(engine: VersionedStore) -> None:
    engine.apply([PutVersion(b"k", 5, b"")])
    assert engine.get(b"k", 5) == Version(5, b"")
    assert engine.scan(b"", None, 5) == [(b"k", Version(5, b""))]


def test_scan_skips_tombstones_and_respects_bounds_and_limit(engine: VersionedStore) -> None:
    engine.apply(
        [
            PutVersion(b"a", 1, b"a1"),
            PutVersion(b"b", 1, b"b1"),
            PutVersion(b"b", 3, None),
            PutVersion(b"c", 4, b"c4"),
            PutVersion(b"d", 1, b"d1"),
        ]
    )
    assert engine.scan(b"", None, 2) == [
        (b"a", Version(1, b"a1")),
        (b"b", Version(1, b"b1")),
        (b"d", Version(1, b"d1")),
    ]
    assert engine.scan(b"", None, 5) == [
        (b"a", Version(1, b"a1")),
        (b"c", Version(4, b"c4")),
        (b"d", Version(1, b"d1")),
    ]
    assert engine.scan(b"b", b"d", 5) == [(b"c", Version(4, b"c4"))]
    # The limit counts live rows: the tombstoned b does not use it up.
    assert engine.scan(b"", None, 5, limit=2) == [
        (b"a", Version(1, b"a1")),
        (b"c", Version(4, b"c4")),
    ]
    assert engine.scan(b"", None, 5, limit=0) == []
    assert engine.scan(b"d", b"a", 5) == []
    assert engine.scan(b"c", b"c", 5) == []


# -- batches -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        PutIntent(b"b", intent(b"t2", 9)),  # another txn's intent is there
        PutVersion(b"c", 0, b"x"),  # timestamps start at 1
        PutVersion(b"c", MAX_TS + 1, b"x"),  # and fit in 8 bytes
        ResolveIntent(b"b", b"t1", -5),
        PutIntent(b"c", Intent(b"t3", 0, b"x", b"rec")),
        PutMeta(b"m", "not bytes"),  # type: ignore[arg-type]
    ],
    ids=["foreign-intent", "ts-zero", "ts-too-big", "bad-commit-ts", "intent-ts-zero", "meta"],
)
def test_a_batch_with_one_bad_mutation_changes_nothing(
    engine: VersionedStore, bad: Mutation
) -> None:
    engine.apply(
        [PutVersion(b"a", 1, b"a1"), PutIntent(b"b", intent(b"t1", 2)), PutMeta(b"m", b"0")]
    )
    before = snapshot(engine)
    batch: list[Mutation] = [
        PutVersion(b"a", 5, b"a5"),
        ResolveIntent(b"b", b"t1", None) if isinstance(bad, ResolveIntent) else PutMeta(b"m", b"1"),
        PutVersion(b"c", 5, b"c5"),
        bad,
    ]
    with pytest.raises(StorageError, match="nothing applied"):
        engine.apply(batch)
    assert snapshot(engine) == before


def test_batch_mutations_see_the_ones_before_them(engine: VersionedStore) -> None:
    engine.apply([PutIntent(b"k", intent(b"t1", 5, b"one"))])
    # Resolve t1 and let t2 write the same key, in one batch.
    engine.apply([ResolveIntent(b"k", b"t1", 6), PutIntent(b"k", intent(b"t2", 7, b"two"))])
    assert engine.get(b"k", 6) == Version(6, b"one")
    assert engine.get_intent(b"k") == intent(b"t2", 7, b"two")
    # The same key written twice at one ts in one batch: the later write wins.
    engine.apply([PutVersion(b"j", 3, b"first"), PutVersion(b"j", 3, b"second")])
    assert engine.versions(b"j") == [Version(3, b"second")]


def test_put_intent_replaces_own_intent(engine: VersionedStore) -> None:
    engine.apply([PutIntent(b"k", intent(b"t1", 5, b"one"))])
    engine.apply([PutIntent(b"k", intent(b"t1", 9, None))])
    assert engine.get_intent(b"k") == intent(b"t1", 9, None)


def test_resolution_commits_aborts_and_is_idempotent(engine: VersionedStore) -> None:
    engine.apply(
        [
            PutIntent(b"a", intent(b"t1", 5, b"va")),
            PutIntent(b"b", intent(b"t1", 5, None)),
            PutIntent(b"c", intent(b"t1", 5, b"vc")),
        ]
    )
    commit = [ResolveIntent(b"a", b"t1", 7), ResolveIntent(b"b", b"t1", 7)]
    engine.apply([*commit, ResolveIntent(b"c", b"t1", None)])
    assert engine.get(b"a", 7) == Version(7, b"va")
    assert engine.get(b"b", 7) == Version(7, None)  # a provisional delete commits a tombstone
    assert engine.versions(b"c") == []
    assert engine.scan_intents(b"", None) == []
    engine.apply(commit)  # a retried resolution changes nothing
    engine.apply([PutIntent(b"a", intent(b"t2", 9))])
    engine.apply([ResolveIntent(b"a", b"t1", 7)])  # another txn's intent is left alone
    assert engine.get_intent(b"a") == intent(b"t2", 9)
    assert engine.versions(b"a") == [Version(7, b"va")]


def test_scan_intents_in_key_order_within_bounds(engine: VersionedStore) -> None:
    engine.apply([PutIntent(k, intent(b"t", 3)) for k in (b"c", b"a", b"b\x00", b"b")])
    assert [k for k, _ in engine.scan_intents(b"", None)] == [b"a", b"b", b"b\x00", b"c"]
    assert [k for k, _ in engine.scan_intents(b"b", b"c")] == [b"b", b"b\x00"]
    assert engine.scan_intents(b"c", b"a") == []


def test_meta_set_and_delete(engine: VersionedStore) -> None:
    engine.apply([PutMeta(b"apply-index", b"\x00\x07")])
    assert engine.get_meta(b"apply-index") == b"\x00\x07"
    engine.apply([PutMeta(b"apply-index", None)])
    assert engine.get_meta(b"apply-index") is None


def test_empty_batch_is_fine(engine: VersionedStore) -> None:
    engine.apply([])
    engine.apply([ResolveIntent(b"nothing", b"t", 5)])
    assert snapshot(engine) == ([[], [], []], [], None, 0)


# -- retention -------------------------------------------------------------------------------


def test_gc_keeps_what_reads_at_or_above_the_horizon_see(engine: VersionedStore) -> None:
    engine.apply(
        [
            PutVersion(b"a", 1, b"a1"),
            PutVersion(b"a", 5, b"a5"),
            PutVersion(b"a", 10, b"a10"),  # exactly at the horizon: kept
            PutVersion(b"a", 12, b"a12"),
            PutVersion(b"b", 2, b"b2"),
            PutVersion(b"b", 4, None),  # newest below the horizon is a tombstone: both go
            PutVersion(b"c", 3, b"c3"),  # the only version: kept
            PutIntent(b"d", intent(b"t", 1)),
        ]
    )
    stats = engine.gc(10)
    assert stats == GcStats(versions_removed=3, keys_scanned=3)
    assert engine.horizon == 10
    # The contract keeps the newest version below the horizon even when one sits exactly at
    # it (a5 here), and drops everything older.
    assert engine.versions(b"a") == [Version(12, b"a12"), Version(10, b"a10"), Version(5, b"a5")]
    assert engine.versions(b"b") == []
    assert engine.versions(b"c") == [Version(3, b"c3")]
    assert engine.get(b"c", 10) == Version(3, b"c3")
    assert engine.get_intent(b"d") == intent(b"t", 1)  # intents are not GC's business
    assert engine.scan(b"", None, 10) == [(b"a", Version(10, b"a10")), (b"c", Version(3, b"c3"))]


def test_read_below_horizon_is_refused_with_a_clear_error(engine: VersionedStore) -> None:
    engine.apply([PutVersion(b"k", 1, b"v")])
    engine.gc(50)
    with pytest.raises(BelowRetentionHorizon) as info:
        engine.get(b"k", 49)
    assert (info.value.key, info.value.ts, info.value.horizon) == (b"k", 49, 50)
    message = str(info.value)
    assert "b'k'" in message and "49" in message and "50" in message
    assert "garbage-collected" in message
    with pytest.raises(BelowRetentionHorizon):
        engine.scan(b"", None, 10)
    assert engine.get(b"k", 50) == Version(1, b"v")


def test_gc_never_lowers_the_horizon(engine: VersionedStore) -> None:
    engine.apply([PutVersion(b"k", 1, b"v1"), PutVersion(b"k", 2, b"v2")])
    assert engine.gc(20) == GcStats(1, 1)
    assert engine.gc(5) == GcStats(0, 0)
    assert engine.horizon == 20
    with pytest.raises(StorageError):
        engine.gc(-1)


# -- lifetime ------------------------------------------------------------------------------------


def test_closed_engine_refuses_calls(engine: VersionedStore) -> None:
    engine.close()
    engine.close()  # idempotent
    with pytest.raises(StorageError, match="closed"):
        engine.get(b"k", 1)
    with pytest.raises(StorageError, match="closed"):
        engine.apply([PutVersion(b"k", 1, b"v")])


def test_context_manager_closes(tmp_path: Path) -> None:
    with RocksEngine(tmp_path / "db") as store:
        store.apply([PutVersion(b"k", 1, b"v")])
    with RocksEngine(tmp_path / "db", create=False) as store:  # the lock was released
        assert store.get(b"k", 1) == Version(1, b"v")


def test_read_marks_are_per_engine_and_injectable() -> None:
    marks = ReadMarks(max_entries=10)
    store = MemoryEngine(read_marks=marks)
    assert store.read_marks is marks
    assert MemoryEngine().read_marks is not MemoryEngine().read_marks


def test_key_count_estimate(engine: VersionedStore) -> None:
    assert engine.key_count_estimate() >= 0
    engine.apply([PutVersion(b"k%d" % i, 1, b"v") for i in range(20)])
    assert engine.key_count_estimate() > 0
