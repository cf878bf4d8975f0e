"""The RocksDB key and value encodings: order preservation and round trips."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from k2store import keycodec as kc
from txn.storage import MAX_TS, Intent

# Bytes biased towards 0x00, 0x01, 0x02 and 0xFF: the escape and terminator bytes.
user_keys = st.lists(
    st.one_of(st.sampled_from([0x00, 0x01, 0x02, 0xFF]), st.integers(0, 255)), max_size=6
).map(bytes)
timestamps = st.one_of(st.integers(1, 50), st.integers(1, MAX_TS), st.just(MAX_TS))
values = st.one_of(st.none(), st.binary(max_size=8))

SETTINGS = settings(max_examples=150, derandomize=True)


@SETTINGS
@given(st.lists(st.tuples(user_keys, timestamps), min_size=2, max_size=12))
def test_version_keys_sort_by_key_then_newest_first(entries: list[tuple[bytes, int]]) -> None:
    by_encoding = sorted(entries, key=lambda e: kc.version_key(*e))
    by_meaning = sorted(entries, key=lambda e: (e[0], -e[1]))
    assert by_encoding == by_meaning


@SETTINGS
@given(user_keys, timestamps)
def test_version_key_round_trips(key: bytes, ts: int) -> None:
    encoded = kc.version_key(key, ts)
    assert kc.decode_version_key(encoded) == (key, ts)
    assert kc.version_ts(encoded) == ts
    assert encoded.startswith(kc.version_key_prefix(key))


@SETTINGS
@given(user_keys, user_keys, timestamps, timestamps)
def test_successor_separates_one_key_from_every_later_key(
    a: bytes, b: bytes, ts_a: int, ts_b: int
) -> None:
    successor = kc.version_key_successor(kc.version_key_prefix(a))
    assert kc.version_key(a, ts_a) < successor
    if b > a:
        assert successor <= kc.version_key(b, ts_b)
    if b != a:
        # Prefix-free: no other key's versions share a's prefix.
        assert not kc.version_key(b, ts_b).startswith(kc.version_key_prefix(a))


@SETTINGS
@given(user_keys, user_keys)
def test_escape_preserves_order_and_round_trips(a: bytes, b: bytes) -> None:
    assert (kc.escape(a) < kc.escape(b)) == (a < b)
    assert kc.unescape(kc.escape(a)) == a


def test_escape_keeps_prefixes_apart() -> None:
    # Without the escape, b"a" + ts would interleave with b"a\x00" + ts.
    assert kc.version_key(b"a", 1) < kc.version_key(b"a\x00", MAX_TS)
    assert kc.version_key(b"a\x00", 1) < kc.version_key(b"a\x00\x00", MAX_TS)
    assert kc.version_key(b"a\x00\xff", 1) < kc.version_key(b"a\x01", MAX_TS)


@pytest.mark.parametrize("bad", [b"", b"a", b"a\x00\x02", b"a\x00b\x00\x01"])
def test_unescape_rejects_foreign_bytes(bad: bytes) -> None:
    with pytest.raises(ValueError):
        kc.unescape(bad)


@SETTINGS
@given(values)
def test_value_round_trips_and_tombstone_differs_from_empty(value: bytes | None) -> None:
    assert kc.decode_value(kc.encode_value(value)) == value
    assert kc.encode_value(None) != kc.encode_value(b"")


@pytest.mark.parametrize("bad", [b"", b"\x02x", b"\x00x"])
def test_decode_value_rejects_unknown_tags(bad: bytes) -> None:
    with pytest.raises(ValueError):
        kc.decode_value(bad)


@SETTINGS
@given(
    st.builds(
        Intent,
        txn_id=st.binary(max_size=20),
        ts=timestamps,
        value=values,
        record_key=st.binary(max_size=20),
    )
)
def test_intent_round_trips(intent: Intent) -> None:
    assert kc.decode_intent(kc.encode_intent(intent)) == intent


def test_decode_intent_rejects_truncation() -> None:
    encoded = kc.encode_intent(Intent(b"txn", 5, b"value", b"record"))
    for cut in (0, 5, 16, len(encoded) - len(b"\x01value")):
        with pytest.raises(ValueError):
            kc.decode_intent(encoded[:cut])


def test_key_spaces_do_not_overlap() -> None:
    prefixes = {kc.VERSION_PREFIX, kc.INTENT_PREFIX, kc.META_PREFIX, kc.STATE_PREFIX}
    assert len(prefixes) == 4
    assert all(len(p) == 1 for p in prefixes)
    assert kc.intent_key(b"k").startswith(kc.INTENT_PREFIX)
    assert kc.meta_key(b"k").startswith(kc.META_PREFIX)
    assert kc.state_key(b"k").startswith(kc.STATE_PREFIX)
