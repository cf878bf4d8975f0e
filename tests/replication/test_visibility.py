"""The region's visible timestamp and the visibility-delay histograms (replication/visibility)."""

from __future__ import annotations

import random

import pytest

from replication.log import KIND_SEAL, KIND_WRITES, LogEntry, decode_entry, encode_entry
from replication.visibility import Histogram, Visibility


def test_visible_ts_is_the_minimum_seal_over_every_shard() -> None:
    v = Visibility("eu-west", [0, 1, 2])
    assert v.visible_ts() == 0
    v.set_seal(0, 300)
    v.set_seal(1, 200)
    assert v.visible_ts() == 0  # shard 2 has sealed nothing yet
    v.set_seal(2, 250)
    assert v.visible_ts() == 200
    v.set_seal(1, 100)  # seals never move back
    assert v.visible_ts() == 200


def test_delay_is_measured_when_the_visible_ts_covers_an_entry() -> None:
    v = Visibility("eu-west", [0, 1])
    v.observe(max_ts=150, appended_ns=1_000_000_000, home_region="us-east")
    v.set_seal(0, 200)
    v.advance(now_ns=1_050_000_000)
    assert "us-east" not in v.delays  # shard 1 holds the region back
    v.set_seal(1, 160)
    v.advance(now_ns=1_240_000_000)
    h = v.delays["us-east"]
    assert h.count == 1 and h.quantile(0.5) == pytest.approx(240, rel=0.05)


def test_histogram_quantiles_are_within_the_bucket_resolution() -> None:
    rng = random.Random(4)
    values = [rng.uniform(1, 1000) for _ in range(5000)]
    h = Histogram()
    for x in values:
        h.add(x)
    values.sort()
    for q in (0.5, 0.9, 0.99):
        exact = values[int(q * (len(values) - 1))]
        assert h.quantile(q) == pytest.approx(exact, rel=0.05)
    assert h.max_ms == max(values) and h.count == len(values)
    other = Histogram()
    other.add(5000)
    h.merge(other)
    assert h.quantile(1.0) == 5000


def test_log_entries_round_trip_and_malformed_ones_are_refused() -> None:
    e = LogEntry(7, KIND_WRITES, 123, ((b"k", 5, b"v"), (b"\x00", 6, None)))
    assert decode_entry(encode_entry(e)) == e
    s = LogEntry(8, KIND_SEAL, 9, (), 500)
    assert decode_entry(encode_entry(s)) == s
    raw = encode_entry(e)
    for bad in (raw[:-1], raw + b"x", b"\x09" + raw[1:]):
        with pytest.raises(ValueError):
            decode_entry(bad)
