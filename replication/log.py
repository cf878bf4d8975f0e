"""The shard's replication log: committed versions and seals, in the order the leader made them.

Purpose
    Every shard leader keeps an ordered log of what became committed in its store (the versions a
    batch wrote, whether by a single-key write or by resolving a committed transaction's intents)
    and of its K2-VCR seals. Replicas in other regions apply the log in order, so a replica that
    has applied SEAL(t) holds every version with `ts <= t` its leader will ever hold.

Data flow
    ``LoggedStore`` wraps the leader's engine. Its `apply` validates the batch with the engines'
    own `plan_batch`, and when the batch produces committed versions it appends one `LogEntry`
    (the versions) to the log *in the same atomic batch* as the versions themselves: an entry is
    durable exactly when its writes are, and a crash cannot leave one without the other. Seals go
    through `append_seal`. The log lives in the engine's metadata space (``repl/log/<lsn>``), so
    both engines keep it without knowing what it is, and `truncate` drops a prefix that every
    replica has acknowledged.

Invariants
    - LSNs are dense: 1, 2, 3, ... `first_lsn` .. `next_lsn - 1` are present.
    - An entry is appended in the batch that makes its versions visible at the leader.
    - Aborted intents never enter the log: a transaction's outcome reaches a replica as the
      versions its commit produced, or not at all.
    - Writes at or below `sealed_ts` are refused (`SealedWrite`): a version there would reach
      replicas after the seal that promised it could not exist. Callers refuse writes at or
      below `closed_ts` (>= sealed_ts) earlier, as a retryable abort (rule sealed), except from
      transactions the seal is waiting for; reaching `apply` with one is a bug that must not
      corrupt a replica.

No I/O other than the wrapped store; time comes from the `now_ns` callable (the node's TrueTime
latest), recorded in each entry so replicas can measure visibility delay.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from txn.storage import (
    GcStats,
    Intent,
    Mutation,
    PutIntent,
    PutMeta,
    PutVersion,
    StorageError,
    Version,
    VersionedStore,
    plan_batch,
)

__all__ = [
    "LogEntry",
    "LoggedStore",
    "SealedWrite",
    "decode_entry",
    "encode_entry",
]

LOG_PREFIX = b"repl/log/"
NEXT_LSN = b"repl/next-lsn"
FIRST_LSN = b"repl/first-lsn"
SEALED = b"repl/sealed"

KIND_WRITES = 1
KIND_SEAL = 2

_HEAD = struct.Struct(">BQQQI")  # kind, lsn, appended_ns, seal_ts, count
_VER = struct.Struct(">IQB")  # key length, ts, has value


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One log record. `versions` for a WRITES entry; `seal_ts` for a SEAL entry."""

    lsn: int
    kind: int
    appended_ns: int
    """The leader's TrueTime latest when it appended the entry (for visibility delay)."""
    versions: tuple[tuple[bytes, int, bytes | None], ...] = ()
    seal_ts: int = 0

    @property
    def max_ts(self) -> int:
        return max((ts for _, ts, _ in self.versions), default=self.seal_ts)


def encode_entry(e: LogEntry) -> bytes:
    parts = [_HEAD.pack(e.kind, e.lsn, e.appended_ns, e.seal_ts, len(e.versions))]
    for key, ts, value in e.versions:
        parts.append(_VER.pack(len(key), ts, value is not None))
        parts.append(key)
        if value is not None:
            parts.append(struct.pack(">I", len(value)))
            parts.append(value)
    return b"".join(parts)


def decode_entry(data: bytes) -> LogEntry:
    """Inverse of `encode_entry`. Raises ValueError on a truncated or malformed record."""
    try:
        kind, lsn, appended, seal_ts, count = _HEAD.unpack_from(data, 0)
        pos = _HEAD.size
        versions = []
        for _ in range(count):
            klen, ts, has = _VER.unpack_from(data, pos)
            pos += _VER.size
            key = data[pos : pos + klen]
            pos += klen
            value = None
            if has:
                (vlen,) = struct.unpack_from(">I", data, pos)
                pos += 4
                value = data[pos : pos + vlen]
                pos += vlen
            versions.append((bytes(key), ts, None if value is None else bytes(value)))
    except struct.error as e:
        raise ValueError(f"malformed replication log entry: {e}") from None
    if pos != len(data) or kind not in (KIND_WRITES, KIND_SEAL):
        raise ValueError("malformed replication log entry: bad kind or trailing bytes")
    return LogEntry(lsn, kind, appended, tuple(versions), seal_ts)


def _lsn_name(lsn: int) -> bytes:
    return LOG_PREFIX + lsn.to_bytes(8, "big")


def _int(raw: bytes | None, default: int) -> int:
    return default if raw is None else int.from_bytes(raw, "big")


class SealedWrite(StorageError):
    """A write at or below the closed timestamp reached the store (a caller bug; see module)."""


class LoggedStore(VersionedStore):
    """A `VersionedStore` that logs every committed version it stores (see the module doc)."""

    def __init__(self, inner: VersionedStore, now_ns: Callable[[], int]) -> None:
        self.inner = inner
        self.read_marks = inner.read_marks
        self._now_ns = now_ns
        self.next_lsn = _int(inner.get_meta(NEXT_LSN), 1)
        self.first_lsn = _int(inner.get_meta(FIRST_LSN), 1)
        self.sealed_ts = _int(inner.get_meta(SEALED), 0)
        """The newest seal in the log: every version <= it is logged before it."""
        self.closed_ts = self.sealed_ts
        """Writes at or below this are refused; >= sealed_ts (memory only: see check_open)."""
        self._intent_ts: dict[bytes, int] = {k: i.ts for k, i in inner.scan_intents(b"", None)}
        self.on_append: Callable[[LogEntry], None] | None = None
        """Called after every append, once it is durable (the driver wakes long-polling
        replicas and starts measuring the entry's visibility delay)."""

    # -- the log ------------------------------------------------------------------------------

    def oldest_intent_ts(self) -> int | None:
        return min(self._intent_ts.values(), default=None)

    def check_open(self, ts: int) -> bool:
        """Whether a write at `ts` may still be installed (it is above the closed timestamp)."""
        return ts > self.closed_ts

    def _append(
        self, kind: int, versions: Sequence[tuple[bytes, int, bytes | None]], seal_ts: int
    ) -> tuple[LogEntry, list[Mutation]]:
        entry = LogEntry(self.next_lsn, kind, self._now_ns(), tuple(versions), seal_ts)
        return entry, [
            PutMeta(_lsn_name(entry.lsn), encode_entry(entry)),
            PutMeta(NEXT_LSN, (entry.lsn + 1).to_bytes(8, "big")),
        ]

    def append_seal(self, seal_ts: int) -> None:
        """Log SEAL(seal_ts): the caller (the sealer) saw no intent at or below it."""
        if seal_ts <= self.sealed_ts:
            return
        if seal_ts > self.closed_ts:
            raise SealedWrite(f"seal {seal_ts} above the closed timestamp {self.closed_ts}")
        entry, batch = self._append(KIND_SEAL, (), seal_ts)
        batch.append(PutMeta(SEALED, seal_ts.to_bytes(8, "big")))
        # Durable before any replica can read it: a seal, once shipped, must never be undone.
        self.inner.apply(batch, sync=True)
        self.next_lsn += 1
        self.sealed_ts = seal_ts
        if self.on_append is not None:
            self.on_append(entry)

    def read_log(self, from_lsn: int, max_entries: int, max_bytes: int = 4 << 20) -> list[LogEntry]:
        """Entries from `from_lsn` on (at most `max_entries`, about `max_bytes`). The caller
        checks `from_lsn >= first_lsn` first: below it the log was truncated."""
        return [decode_entry(raw) for raw in self.read_log_raw(from_lsn, max_entries, max_bytes)]

    def read_log_raw(
        self, from_lsn: int, max_entries: int, max_bytes: int = 4 << 20
    ) -> list[bytes]:
        """As `read_log`, still encoded (what the wire carries)."""
        out: list[bytes] = []
        size = 0
        lsn = max(from_lsn, self.first_lsn)
        while lsn < self.next_lsn and len(out) < max_entries and size < max_bytes:
            raw = self.inner.get_meta(_lsn_name(lsn))
            if raw is None:
                raise StorageError(f"replication log entry {lsn} is missing")
            out.append(raw)
            size += len(raw)
            lsn += 1
        return out

    def truncate(self, before_lsn: int) -> int:
        """Drop entries below `before_lsn` (never beyond the end). Returns how many went."""
        before_lsn = min(before_lsn, self.next_lsn)
        if before_lsn <= self.first_lsn:
            return 0
        batch: list[Mutation] = [
            PutMeta(_lsn_name(n), None) for n in range(self.first_lsn, before_lsn)
        ]
        batch.append(PutMeta(FIRST_LSN, before_lsn.to_bytes(8, "big")))
        self.inner.apply(batch, sync=False)
        dropped = before_lsn - self.first_lsn
        self.first_lsn = before_lsn
        return dropped

    # -- VersionedStore ------------------------------------------------------------------------

    def apply(self, mutations: Sequence[Mutation], *, sync: bool = True) -> None:
        for m in mutations:
            if isinstance(m, PutVersion):
                key, ts = m.key, m.ts
            elif isinstance(m, PutIntent):
                key, ts = m.key, m.intent.ts
            else:
                continue
            if ts <= self.sealed_ts:
                raise SealedWrite(
                    f"write of key {key[:64]!r} at ts {ts} is at or below the seal "
                    f"{self.sealed_ts}; the caller should have aborted it by rule sealed"
                )
        plan = plan_batch(mutations, self.inner.get_intent)
        batch = list(mutations)
        entry = None
        if plan.versions:
            entry, log = self._append(KIND_WRITES, plan.versions, 0)
            batch += log
        self.inner.apply(batch, sync=sync)
        for key, intent in plan.intents.items():
            if intent is None:
                self._intent_ts.pop(key, None)
            else:
                self._intent_ts[key] = intent.ts
        if entry is not None:
            self.next_lsn += 1
            if self.on_append is not None:
                self.on_append(entry)

    def get(self, key: bytes, ts: int) -> Version | None:
        return self.inner.get(key, ts)

    def get_intent(self, key: bytes) -> Intent | None:
        return self.inner.get_intent(key)

    def latest_version(self, key: bytes) -> Version | None:
        return self.inner.latest_version(key)

    def versions(self, key: bytes) -> list[Version]:
        return self.inner.versions(key)

    def scan(
        self, start: bytes, end: bytes | None, ts: int, limit: int | None = None
    ) -> list[tuple[bytes, Version]]:
        return self.inner.scan(start, end, ts, limit)

    def scan_versions(
        self, start: bytes, end: bytes | None, max_keys: int
    ) -> list[tuple[bytes, list[Version]]]:
        return self.inner.scan_versions(start, end, max_keys)

    def scan_intents(self, start: bytes, end: bytes | None) -> list[tuple[bytes, Intent]]:
        return self.inner.scan_intents(start, end)

    def get_meta(self, name: bytes) -> bytes | None:
        return self.inner.get_meta(name)

    @property
    def horizon(self) -> int:
        return self.inner.horizon

    def gc(self, horizon: int) -> GcStats:
        return self.inner.gc(horizon)

    def close(self) -> None:
        self.inner.close()

    def key_count_estimate(self) -> int:
        return self.inner.key_count_estimate()
