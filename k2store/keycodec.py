"""Order-preserving byte encodings for the RocksDB engine.

Layout: one RocksDB key space, split by a one-byte prefix.

    b"v" + escape(user_key) + inverted_ts(ts)  ->  encode_value(value)    committed versions
    b"i" + user_key                             ->  encode_intent(intent)  write intents
    b"m" + name                                 ->  value                  caller metadata
    b"s" + name                                 ->  value                  engine state (horizon,
                                                                           format version)

Why these encodings
    RocksDB orders keys bytewise. For the version space we need (a) all versions of one key next
    to each other, (b) keys in user-key order, (c) within a key, newest first, so that "the newest
    version at or below ts" is a single seek to `version_key(key, ts)`.

    - `escape` maps 0x00 to 0x00 0xFF and appends the terminator 0x00 0x01. The result is
      prefix-free (0x00 0x01 occurs only at the end) and order-preserving: at the first byte where
      two keys differ the escaped forms differ the same way, and a key that is a proper prefix of
      another ends in 0x00 0x01, which sorts below whatever the longer key continues with (a
      non-zero byte, or 0x00 0xFF). Without the escape, the versions of b"a" would interleave with
      those of b"a\\x00...".
    - `inverted_ts(ts)` is `MAX_TS - ts` in 8 big-endian bytes: larger ts, smaller bytes.

    Intents need no escape: there is at most one per key, so `b"i" + key` sorts by key already.

Values carry a one-byte tag so that a tombstone (no value) differs from an empty value.

Failure modes
    Decoders raise `ValueError` on bytes they did not produce (a corrupt or foreign database);
    the engine turns that into `StorageError`.
"""

from __future__ import annotations

import struct

from txn.storage import MAX_TS, Intent

__all__ = [
    "INTENT_PREFIX",
    "META_PREFIX",
    "STATE_PREFIX",
    "VERSION_PREFIX",
    "decode_intent",
    "decode_value",
    "decode_version_key",
    "encode_intent",
    "encode_value",
    "escape",
    "intent_key",
    "inverted_ts",
    "meta_key",
    "state_key",
    "unescape",
    "version_key",
    "version_key_prefix",
    "version_key_successor",
    "version_ts",
]

VERSION_PREFIX = b"v"
INTENT_PREFIX = b"i"
META_PREFIX = b"m"
STATE_PREFIX = b"s"

_TERMINATOR = b"\x00\x01"
_TS_LEN = 8
_TAG_TOMBSTONE = 0x00
_TAG_VALUE = 0x01
_INTENT_HEADER = struct.Struct(">QII")  # ts, len(txn_id), len(record_key)


def escape(key: bytes) -> bytes:
    """Prefix-free, order-preserving form of `key` (see the module overview)."""
    return key.replace(b"\x00", b"\x00\xff") + _TERMINATOR


def unescape(escaped: bytes) -> bytes:
    """Inverse of `escape`. Raises ValueError if `escaped` is not an escaped key."""
    if not escaped.endswith(_TERMINATOR):
        raise ValueError(f"escaped key {escaped!r} lacks the terminator")
    body = escaped[:-2]
    key = body.replace(b"\x00\xff", b"\x00")
    # Every 0x00 in the body must have been followed by 0xFF; re-escaping checks that cheaply.
    if key.replace(b"\x00", b"\x00\xff") != body:
        raise ValueError(f"escaped key {escaped!r} has a bare 0x00 byte")
    return key


def inverted_ts(ts: int) -> bytes:
    """8 big-endian bytes that sort in *descending* ts order."""
    return (MAX_TS - ts).to_bytes(_TS_LEN, "big")


def version_key_prefix(key: bytes) -> bytes:
    """The common prefix of every version key of `key` (and of no other key's)."""
    return VERSION_PREFIX + escape(key)


def version_key(key: bytes, ts: int) -> bytes:
    """RocksDB key of the version of `key` at `ts`; seeking to it lands on the newest version
    of `key` with a timestamp <= ts, if `key` has one."""
    return VERSION_PREFIX + escape(key) + inverted_ts(ts)


def version_key_successor(prefix: bytes) -> bytes:
    """Smallest RocksDB key above every version key with `prefix` (from `version_key_prefix`).

    The prefix ends in the terminator 0x00 0x01; 0x00 0x02 is above every version of this key and
    at or below the first version of the next key (whose escape continues with a byte >= 0x01
    where this one terminated, or with 0x00 0xFF)."""
    return prefix[:-1] + b"\x02"


def version_ts(encoded: bytes) -> int:
    """The timestamp of a version key, without decoding the user key."""
    return MAX_TS - int.from_bytes(encoded[-_TS_LEN:], "big")


def decode_version_key(encoded: bytes) -> tuple[bytes, int]:
    """`(user_key, ts)` of a version key. Raises ValueError if it is not one."""
    if not encoded.startswith(VERSION_PREFIX) or len(encoded) < 1 + len(_TERMINATOR) + _TS_LEN:
        raise ValueError(f"{encoded!r} is not a version key")
    return unescape(encoded[1:-_TS_LEN]), version_ts(encoded)


def intent_key(key: bytes) -> bytes:
    return INTENT_PREFIX + key


def meta_key(name: bytes) -> bytes:
    return META_PREFIX + name


def state_key(name: bytes) -> bytes:
    return STATE_PREFIX + name


def encode_value(value: bytes | None) -> bytes:
    """A committed version's value with its tag: one byte 0x00 for a tombstone, else 0x01 + value."""
    if value is None:
        return b"\x00"
    return b"\x01" + value


def decode_value(encoded: bytes) -> bytes | None:
    """Inverse of `encode_value`. Raises ValueError on an unknown tag."""
    if not encoded:
        raise ValueError("empty encoded value")
    tag = encoded[0]
    if tag == _TAG_VALUE:
        return encoded[1:]
    if tag == _TAG_TOMBSTONE and len(encoded) == 1:
        return None
    raise ValueError(f"bad value tag {tag:#x} (length {len(encoded)})")


def encode_intent(intent: Intent) -> bytes:
    """`ts | len(txn_id) | len(record_key) | txn_id | record_key | tagged value`."""
    return (
        _INTENT_HEADER.pack(intent.ts, len(intent.txn_id), len(intent.record_key))
        + intent.txn_id
        + intent.record_key
        + encode_value(intent.value)
    )


def decode_intent(encoded: bytes) -> Intent:
    """Inverse of `encode_intent`. Raises ValueError on malformed bytes."""
    header = _INTENT_HEADER.size
    if len(encoded) < header + 1:
        raise ValueError(f"encoded intent too short ({len(encoded)} bytes)")
    ts, txn_len, record_len = _INTENT_HEADER.unpack_from(encoded)
    value_at = header + txn_len + record_len
    if value_at >= len(encoded):
        raise ValueError("encoded intent truncated")
    txn_id = encoded[header : header + txn_len]
    record_key = encoded[header + txn_len : value_at]
    return Intent(
        txn_id=txn_id, ts=ts, value=decode_value(encoded[value_at:]), record_key=record_key
    )
