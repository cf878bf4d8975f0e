"""The d2PL-TTC lock table: key locks, range locks against phantoms, wound-wait."""

from __future__ import annotations

from txn.locks import Blocked, Granted, LockTable, Mode

OLD, YOUNG = b"old", b"young"


def test_shared_locks_share_and_exclusive_waits_for_them() -> None:
    t = LockTable()
    assert isinstance(t.acquire(OLD, 1, b"k", Mode.SHARED), Granted)
    assert isinstance(t.acquire(YOUNG, 2, b"k", Mode.SHARED), Granted)
    got = t.acquire(YOUNG, 2, b"k", Mode.EXCLUSIVE)
    assert got == Blocked(frozenset({OLD}), frozenset())  # younger waits, wounds nobody


def test_an_older_writer_wounds_a_younger_unprepared_holder_but_not_a_prepared_one() -> None:
    t = LockTable()
    t.acquire(YOUNG, 2, b"k", Mode.SHARED)
    assert t.acquire(OLD, 1, b"k", Mode.EXCLUSIVE) == Blocked(
        frozenset({YOUNG}), frozenset({YOUNG})
    )
    t.prepared.add(YOUNG)
    assert t.acquire(OLD, 1, b"k", Mode.EXCLUSIVE) == Blocked(frozenset({YOUNG}), frozenset())


def test_a_range_lock_blocks_writers_of_keys_that_do_not_exist_yet() -> None:
    t = LockTable()
    assert isinstance(t.acquire_range(OLD, 1, b"a", b"m"), Granted)
    assert t.acquire(YOUNG, 2, b"new", Mode.EXCLUSIVE) == Granted()  # outside [a, m)
    assert t.acquire(YOUNG, 2, b"b", Mode.EXCLUSIVE) == Blocked(frozenset({OLD}), frozenset())
    assert t.holders(b"b") == (frozenset(), None)  # the failed request left no entry
    assert isinstance(t.acquire(OLD, 1, b"c", Mode.EXCLUSIVE), Granted)  # own range: no conflict
    t.release(OLD)
    assert isinstance(t.acquire(YOUNG, 2, b"b", Mode.EXCLUSIVE), Granted)


def test_a_range_request_waits_for_or_wounds_writers_inside_it() -> None:
    t = LockTable()
    t.acquire(YOUNG, 2, b"f", Mode.EXCLUSIVE)
    assert t.acquire_range(OLD, 1, b"a", None) == Blocked(frozenset({YOUNG}), frozenset({YOUNG}))
    assert t.acquire_range(OLD, 1, b"g", None) == Granted()
    t2 = LockTable()
    t2.acquire(OLD, 1, b"f", Mode.EXCLUSIVE)
    assert t2.acquire_range(YOUNG, 2, b"a", b"z") == Blocked(frozenset({OLD}), frozenset())
