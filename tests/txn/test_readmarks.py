"""Read marks: exact against a naive list when nothing is evicted, conservative when it is."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from txn.readmarks import ReadMarks

ALPHABET = [b"", b"\x00", b"a", b"a\x00", b"a\xff", b"ab", b"b", b"ba", b"c", b"\xff"]
# Probe keys include ones no operation names, between and beyond the alphabet.
PROBES = sorted({*ALPHABET, b"0", b"a\x00\x00", b"aa", b"bb", b"d", b"\xff\xff"})

keys = st.sampled_from(ALPHABET)
marks = st.integers(1, 30)
operations = st.one_of(
    st.tuples(st.just("key"), keys, st.none(), marks),
    st.tuples(st.just("range"), keys, st.one_of(st.none(), keys), marks),
    st.tuples(st.just("floor"), st.just(b""), st.none(), st.integers(0, 12)),
)
Operation = tuple[str, bytes, bytes | None, int]


@dataclass
class NaiveMarks:
    """Every recorded read, kept verbatim; get() is a linear search."""

    floor: int = 0
    reads: list[tuple[bytes, bytes | None, int]] = field(default_factory=list)

    def apply(self, op: Operation) -> None:
        kind, start, end, ts = op
        if kind == "key":
            self.reads.append((start, start + b"\x00", ts))  # [k, k+0x00) is exactly {k}
        elif kind == "range":
            self.reads.append((start, end, ts))
        else:
            self.floor = max(self.floor, ts)

    def get(self, key: bytes) -> int:
        covering = [
            ts for start, end, ts in self.reads if start <= key and (end is None or key < end)
        ]
        return max([self.floor, *covering])


def run(rm: ReadMarks, ops: list[Operation]) -> NaiveMarks:
    naive = NaiveMarks()
    for op in ops:
        kind, start, end, ts = op
        if kind == "key":
            rm.raise_key(start, ts)
        elif kind == "range":
            rm.raise_range(start, end, ts)
        else:
            rm.raise_floor(ts)
        naive.apply(op)
    return naive


def check_shape(rm: ReadMarks) -> None:
    """Ranges sorted, disjoint, non-empty, above the floor, and merged where they could be."""
    ranges = rm.ranges()
    for start, end, mark in ranges:
        assert end is None or start < end
        assert mark > rm.floor
    for (_, end_a, mark_a), (start_b, _, mark_b) in itertools.pairwise(ranges):
        assert end_a is not None and end_a <= start_b
        assert not (end_a == start_b and mark_a == mark_b), "adjacent equal marks not merged"


@settings(max_examples=250, derandomize=True)
@given(st.lists(operations, max_size=25))
def test_exact_when_nothing_is_evicted(ops: list[Operation]) -> None:
    rm = ReadMarks(max_entries=1000)
    naive = run(rm, ops)
    for key in PROBES:
        assert rm.get(key) == naive.get(key), key
    assert rm.floor == naive.floor
    check_shape(rm)


@settings(max_examples=250, derandomize=True)
@given(st.lists(operations, max_size=25), st.integers(1, 4))
def test_conservative_and_bounded_under_eviction(ops: list[Operation], cap: int) -> None:
    rm = ReadMarks(max_entries=cap)
    naive = run(rm, ops)
    for key in PROBES:
        # Never lower than the truth (a missed conflict); higher is only a spurious abort.
        assert rm.get(key) >= naive.get(key), key
    assert len(rm) <= cap
    # The floor only ever takes marks that were recorded.
    assert rm.floor <= max([naive.floor, *(ts for _, _, ts in naive.reads)])
    check_shape(rm)


def test_unknown_key_has_no_mark() -> None:
    assert ReadMarks().get(b"never read") == 0


def test_range_covers_keys_not_yet_written() -> None:
    rm = ReadMarks()
    rm.raise_range(b"user/", b"user0", 50)  # a scan of the prefix "user/"
    assert rm.get(b"user/new-row") == 50  # a phantom insert must see the scan's mark
    assert rm.get(b"user0") == 0
    assert rm.get(b"user") == 0


def test_unbounded_range_and_empty_range() -> None:
    rm = ReadMarks()
    rm.raise_range(b"m", None, 7)
    rm.raise_range(b"z", b"a", 99)  # end before start: no keys, no mark
    rm.raise_range(b"q", b"q", 99)
    assert rm.get(b"\xff\xff\xff") == 7
    assert rm.get(b"l") == 0
    assert rm.ranges() == [(b"m", None, 7)]


def test_overlapping_ranges_take_the_maximum_and_merge() -> None:
    rm = ReadMarks()
    rm.raise_range(b"b", b"f", 10)
    rm.raise_range(b"d", b"h", 5)
    assert rm.ranges() == [(b"b", b"f", 10), (b"f", b"h", 5)]
    rm.raise_range(b"a", b"z", 10)
    assert rm.ranges() == [(b"a", b"z", 10)]


def test_eviction_raises_the_floor_to_the_highest_evicted_mark() -> None:
    rm = ReadMarks(max_entries=4)
    for i, key in enumerate([b"a", b"b", b"c", b"d"], start=1):
        rm.raise_key(key, i * 10)  # marks 10, 20, 30, 40
    assert rm.floor == 0 and len(rm) == 4
    rm.raise_key(b"e", 50)  # one over the cap: evict down to 3/4 of it
    assert len(rm) <= 3
    assert rm.floor == 20  # a and b went; the floor covers them at their own marks or above
    assert rm.get(b"a") == 20 and rm.get(b"b") == 20
    assert rm.get(b"c") == 30 and rm.get(b"e") == 50
    assert rm.get(b"never read") == 20  # the price: conservative for every other key


def test_raise_floor_never_lowers_and_drops_covered_entries() -> None:
    rm = ReadMarks()
    rm.raise_key(b"a", 5)
    rm.raise_range(b"b", b"c", 8)
    rm.raise_key(b"z", 20)
    rm.raise_floor(10)  # e.g. on restart, to now().latest
    assert rm.floor == 10 and len(rm) == 1
    assert rm.get(b"a") == 10 and rm.get(b"z") == 20
    rm.raise_floor(3)
    assert rm.floor == 10
    rm.raise_key(b"q", 9)  # below the floor: already covered, nothing stored
    assert len(rm) == 1


def test_many_disjoint_ranges_are_looked_up_by_bisection() -> None:
    rm = ReadMarks(max_entries=50_000)
    for i in range(10_000):
        rm.raise_range(b"k%05d" % (2 * i), b"k%05d" % (2 * i + 1), i + 1)
    assert len(rm) == 10_000
    for i in range(0, 10_000, 997):
        assert rm.get(b"k%05d" % (2 * i)) == i + 1
        assert rm.get(b"k%05d" % (2 * i + 1)) == 0  # the gap between two ranges


def test_max_entries_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        ReadMarks(max_entries=0)
