"""format_ts: ISO-8601 UTC with nanoseconds and the #oracle.slot origin."""

from __future__ import annotations

from truetime import ManualClock, TimestampOracle, TrueTime, format_ts


def test_formats_instant_and_origin() -> None:
    assert format_ts(1_700_000_000_000_004_866) == "2023-11-14T22:13:20.000004866Z#3.2"
    assert format_ts(0) == "1970-01-01T00:00:00.000000000Z#0.0"


def test_before_the_epoch_and_out_of_range() -> None:
    assert format_ts(-1) == "1969-12-31T23:59:59.999999999Z#15.255"
    assert format_ts(10**30) == "1000000000000000000000000000000#0.0"


def test_formats_an_issued_timestamp() -> None:
    oracle = TimestampOracle(9, TrueTime(ManualClock(), 0, 0))
    ts = oracle.issue(200, 1).first
    text = format_ts(ts)
    assert text.endswith("Z#9.200")
    assert text.startswith("2023-11-14T22:13:20.00")


def test_text_order_follows_timestamp_order_within_a_century() -> None:
    stamps = [1_700_000_000_000_000_000 + d for d in (0, 1, 4095, 4096, 10**9, 10**15)]
    assert sorted(stamps, key=format_ts) == stamps
