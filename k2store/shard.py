"""The shard leader's rules for single-shard reads and writes, free of I/O.

A `ShardLeader` owns one shard's `VersionedStore` and decides, for a request that already carries
its timestamp, what to read or whether a write may be installed. It never reads a clock, sleeps or
touches the network: the node (k2store/node.py) picks timestamps from its region's K2-TB batch,
calls in here, and performs the commit-wait. The same object runs inside the deterministic
simulator against a memory engine.

Rules (MVTO; the transactional versions with intents come in txn/):

- read(key, ts): the newest committed version at or below ts; then the key's read mark is raised
  to ts, so no write below ts can land later and change what this read saw.
- write(key, value, ts): aborted (WriteTooOld, retryable) when a read at or above ts already
  happened (rule "read-mark") or when a committed version at or above ts exists (rule
  "newer-version"); aborted when another transaction holds an intent on the key (rule "intent").
  Otherwise the version is installed durably (fsynced) before this returns.
- scan(start, end, ts, limit): like read for every key in range; the range mark covers the keys
  not returned too (phantom protection), up to where the scan stopped.

Every request is checked against the shard's key range (NotLeader otherwise) and the size limits
(KeyTooLarge / ValueTooLarge) before anything changes.
"""

from __future__ import annotations

from dataclasses import dataclass

from k2store.cluster import ShardConfig
from k2store.errors import (
    BelowHorizon,
    InvalidArgument,
    KeyTooLarge,
    NotLeader,
    ValueTooLarge,
    WriteTooOld,
)
from truetime import format_ts
from txn.storage import BelowRetentionHorizon, PutVersion, Version, VersionedStore


@dataclass(frozen=True, slots=True)
class Limits:
    max_key_bytes: int = 4096
    max_value_bytes: int = 64 * 1024 * 1024


@dataclass(slots=True)
class ShardCounters:
    reads: int = 0
    writes: int = 0
    aborts: int = 0
    restamps: int = 0
    """Requests restamped here instead of aborted (TxnSettings.restamp): not in `aborts`."""


@dataclass(frozen=True, slots=True)
class ScanPage:
    items: list[tuple[bytes, Version]]
    more: bool
    resume_key: bytes


class ShardLeader:
    def __init__(
        self, shard: ShardConfig, store: VersionedStore, limits: Limits, *, hashed: bool = False
    ) -> None:
        self.shard = shard
        self.store = store
        self.limits = limits
        self.counters = ShardCounters()
        self._hashed = hashed
        """Under hash partitioning the node routes by hash; range bounds do not apply."""

    # -- validation ---------------------------------------------------------------------------

    def check_key(self, key: bytes) -> None:
        if len(key) > self.limits.max_key_bytes:
            raise KeyTooLarge(
                f"key of {len(key)} bytes exceeds the limit of {self.limits.max_key_bytes} bytes"
            )
        if not self._hashed and not self.shard.contains(key):
            raise NotLeader(f"key {key[:64]!r} is not in shard {self.shard.id}")

    def check_value(self, key: bytes, value: bytes) -> None:
        if len(value) > self.limits.max_value_bytes:
            raise ValueTooLarge(
                f"value of {len(value)} bytes for key {key[:64]!r} exceeds the limit of "
                f"{self.limits.max_value_bytes} bytes"
            )

    # -- operations ---------------------------------------------------------------------------

    def _refuse_under_intent(self, key: bytes, intent_ts: int, txn_id: bytes, ts: int) -> None:
        self.counters.aborts += 1
        raise WriteTooOld(
            f"read of key {key[:64]!r} at {format_ts(ts)} aborted by rule intent: "
            f"transaction {txn_id.hex()} holds an intent at {format_ts(intent_ts)}"
        )

    def read(self, key: bytes, ts: int) -> Version | None:
        """A non-transactional read. It cannot wait, so it refuses (retryable) when a pending
        intent at or below ts could still commit under it (transactions wait instead)."""
        self.check_key(key)
        intent = self.store.get_intent(key)
        if intent is not None and intent.ts <= ts:
            self._refuse_under_intent(key, intent.ts, intent.txn_id, ts)
        try:
            v = self.store.get(key, ts)
        except BelowRetentionHorizon as e:
            raise BelowHorizon(str(e)) from None
        self.store.read_marks.raise_key(key, ts)
        self.counters.reads += 1
        return v

    def write(self, key: bytes, value: bytes | None, ts: int) -> None:
        """Install a committed version at ts (None deletes); durable before returning."""
        self.check_key(key)
        if value is not None:
            self.check_value(key, value)
        mark = self.store.read_marks.get(key)
        if mark >= ts:
            self.counters.aborts += 1
            raise WriteTooOld(
                f"write of key {key[:64]!r} at {format_ts(ts)} aborted by rule read-mark: "
                f"it was already read at {format_ts(mark)}"
            )
        latest = self.store.latest_version(key)
        if latest is not None and latest.ts >= ts:
            self.counters.aborts += 1
            raise WriteTooOld(
                f"write of key {key[:64]!r} at {format_ts(ts)} aborted by rule newer-version: "
                f"a version at {format_ts(latest.ts)} exists"
            )
        intent = self.store.get_intent(key)
        if intent is not None:
            self.counters.aborts += 1
            raise WriteTooOld(
                f"write of key {key[:64]!r} at {format_ts(ts)} aborted by rule intent: "
                f"transaction {intent.txn_id.hex()} holds an intent at {format_ts(intent.ts)}"
            )
        self.store.apply([PutVersion(key, ts, value)], sync=True)
        self.counters.writes += 1

    def scan(self, start: bytes, end: bytes | None, ts: int, limit: int) -> ScanPage:
        if limit <= 0:
            raise InvalidArgument(f"scan limit must be positive, got {limit}")
        if len(start) > self.limits.max_key_bytes or (
            end is not None and len(end) > self.limits.max_key_bytes
        ):
            raise KeyTooLarge(
                f"scan bound exceeds the key limit of {self.limits.max_key_bytes} bytes"
            )
        if end is not None and end <= start:
            raise InvalidArgument(f"scan end {end[:64]!r} must sort after start {start[:64]!r}")
        lo, hi = start, end
        if not self._hashed:
            if not self.shard.contains(start):
                raise NotLeader(f"scan start {start[:64]!r} is not in shard {self.shard.id}")
            if self.shard.end is not None and (hi is None or hi > self.shard.end):
                hi = self.shard.end
        for key, intent in self.store.scan_intents(lo, hi):
            if intent.ts <= ts:
                self._refuse_under_intent(key, intent.ts, intent.txn_id, ts)
        try:
            rows = self.store.scan(lo, hi, ts, limit + 1)
        except BelowRetentionHorizon as e:
            raise BelowHorizon(str(e)) from None
        more = len(rows) > limit
        rows = rows[:limit]
        # Mark what this scan covered: up to its end, or through the last key it returned.
        mark_end = rows[-1][0] + b"\x00" if more else hi
        self.store.read_marks.raise_range(lo, mark_end, ts)
        self.counters.reads += 1
        return ScanPage(items=rows, more=more, resume_key=(mark_end or b"") if more else b"")
