"""Clock skew for the Jepsen clock nemesis: the reported SkewedClock, the clock.toml format, and
TrueTime's refusal (or, with the unsafe setting, its lack of one)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from truetime import ClockSkew, ManualClock, SkewedClock, TrueTime, UncertaintyExceeded
from truetime.skew import (
    apply_skew,
    clock_skews_to_toml,
    parse_clock_skews,
    read_clock_skews,
    skew_for,
    write_clock_skews,
)

MS = 1_000_000
EPS = 400_000
BOUND = 5 * MS


def test_an_unreported_skew_leaves_the_bound_alone() -> None:
    base = ManualClock()
    clock = SkewedClock(base, offset_ns=50 * MS)
    assert clock.error_bound_ns() is None
    base.set_error_bound_ns(1_000)
    assert clock.error_bound_ns() == 1_000


def test_a_reported_skew_is_added_to_the_bound() -> None:
    base = ManualClock()
    clock = SkewedClock(base, reported=True)
    assert clock.error_bound_ns() is None  # no skew, no base bound: nothing to vouch for
    clock.set_offset(-3 * MS)
    assert clock.error_bound_ns() == 3 * MS
    base.set_error_bound_ns(1_000)
    assert clock.error_bound_ns() == 3 * MS + 1_000


def test_a_reported_drift_grows_the_bound_with_the_skew() -> None:
    base = ManualClock()
    clock = SkewedClock(base, reported=True)
    clock.set_drift_ppm(1_000.0)  # 1 ms per second
    base.advance(2_000 * MS)
    assert clock.skew_ns() == 2 * MS
    assert clock.error_bound_ns() == 2 * MS


def test_truetime_widens_within_the_bound_and_refuses_beyond_it() -> None:
    base = ManualClock()
    clock = SkewedClock(base, reported=True)
    tt = TrueTime(clock, EPS, BOUND)
    clock.set_offset(100_000)  # within epsilon: nothing changes
    assert tt.uncertainty_ns() == EPS
    clock.set_offset(-4 * MS)  # within the bound: wider, still serving, still true
    assert tt.uncertainty_ns() == 4 * MS
    now = tt.checked_now()
    assert now.earliest <= base.now_ns() <= now.latest
    clock.set_offset(20 * MS)  # beyond: refused
    with pytest.raises(UncertaintyExceeded):
        tt.check()
    with pytest.raises(UncertaintyExceeded):
        tt.checked_now()
    clock.set_offset(0)
    tt.check()


def test_ignoring_the_clock_bound_serves_a_wrong_interval() -> None:
    base = ManualClock()
    clock = SkewedClock(base, offset_ns=-20 * MS, reported=True)
    tt = TrueTime(clock, EPS, BOUND, unsafe_ignore_clock_bound=True)
    tt.check()  # no refusal
    now = tt.checked_now()
    assert tt.uncertainty_ns() == EPS
    assert now.latest < base.now_ns(), "the interval misses true time: that is the point"


def test_the_file_round_trips() -> None:
    skews = {
        "eu-west-1": ClockSkew(-250 * MS),
        "us-east": ClockSkew(3 * MS, 150.0),
        "ap-southeast-1": ClockSkew(),  # no skew: left out of the file
    }
    text = clock_skews_to_toml(skews)
    back = parse_clock_skews(tomllib.loads(text))
    assert back == {k: v for k, v in skews.items() if not v.is_zero()}


def test_offsets_in_ms_and_ns_add_up() -> None:
    raw = tomllib.loads("[skew.a]\noffset_ms = 1.5\noffset_ns = 7\ndrift_ppm = -2\n")
    assert parse_clock_skews(raw) == {"a": ClockSkew(1_500_007, -2.0)}


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("[other]\nx = 1\n", "other"),
        ("[skew.a]\noffset_s = 1\n", "skew.a.offset_s"),
        ("[skew.a]\noffset_ms = true\n", "skew.a.offset_ms"),
        ("[skew.a]\noffset_ns = 1.5\n", "skew.a.offset_ns"),
        ("[skew.a]\ndrift_ppm = 1e9\n", "skew.a.drift_ppm"),
        ("skew = 3\n", "skew"),
    ],
)
def test_bad_files_name_the_field(text: str, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        parse_clock_skews(tomllib.loads(text))


def test_a_node_entry_wins_over_its_region() -> None:
    skews = {"eu-west": ClockSkew(1), "eu-west-1": ClockSkew(2)}
    assert skew_for(skews, "eu-west-1", "eu-west") == ClockSkew(2)
    assert skew_for(skews, "eu-west-2", "eu-west") == ClockSkew(1)
    assert skew_for(skews, "us-east-1", "us-east") == ClockSkew()


def test_apply_sets_the_offset_now_and_drifts_from_here() -> None:
    base = ManualClock()
    clock = SkewedClock(base, offset_ns=9 * MS, drift_ppm=500.0)
    base.advance(1_000 * MS)
    apply_skew(clock, ClockSkew(-MS, 1_000.0))
    assert clock.skew_ns() == -MS
    base.advance(1_000 * MS)
    assert clock.skew_ns() == 0


def test_write_then_read_and_an_empty_write_removes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "clock.toml"
    assert read_clock_skews(path) == {}
    write_clock_skews(path, {"n1": ClockSkew(5)})
    assert read_clock_skews(path) == {"n1": ClockSkew(5)}
    write_clock_skews(path, {"n1": ClockSkew()})
    assert not path.exists()
    path.write_text("not = [toml")
    with pytest.raises(ValueError, match=r"clock\.toml"):
        read_clock_skews(path)
