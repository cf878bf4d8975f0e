"""TTInterval: validation, width and inclusive containment."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from truetime import TTInterval


def test_width_and_inclusive_contains() -> None:
    iv = TTInterval(100, 150)
    assert iv.width == 50
    assert iv.contains(100)
    assert iv.contains(150)
    assert not iv.contains(99)
    assert not iv.contains(151)


def test_point_interval_is_allowed() -> None:
    iv = TTInterval(7, 7)
    assert iv.width == 0
    assert iv.contains(7)


def test_rejects_earliest_after_latest() -> None:
    with pytest.raises(ValueError, match="earliest <= latest"):
        TTInterval(2, 1)


def test_is_immutable() -> None:
    iv = TTInterval(1, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        iv.earliest = 0  # type: ignore[misc]


@given(st.integers(), st.integers(min_value=0, max_value=10**12), st.integers())
def test_contains_matches_bounds(earliest: int, width: int, t: int) -> None:
    iv = TTInterval(earliest, earliest + width)
    assert iv.width == width
    assert iv.contains(t) == (earliest <= t <= earliest + width)
