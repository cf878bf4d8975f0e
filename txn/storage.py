"""The versioned store: the storage contract every K2 engine implements.

Purpose
    A shard keeps, per user key, a history of committed versions ordered by commit timestamp, at
    most one write intent (the provisional write of a transaction that has not resolved yet) and
    engine metadata such as the replication apply index. The transaction protocols (`txn/`) and
    replication (`replication/`) see storage only through `VersionedStore`; the node binds it to
    `RocksEngine` (durable), the simulator and most tests to `MemoryEngine`. A property test holds
    the two against a model and each other, so they must agree on every result and every error.

Data flow
    Writers hand `apply` a batch of `Mutation`s (committed versions, intents, intent resolutions,
    metadata). The batch is validated in full against the current state *and* the effect of the
    mutations before it in the same batch (see `plan_batch`), then written as one atomic unit.
    Readers ask for the newest committed version at or below a timestamp (`get`, `scan`); intents
    are read separately (`get_intent`, `scan_intents`), because what a reader does on meeting an
    intent (wait, push, abort) is protocol policy, not storage.

Invariants
    - Atomicity: a batch is applied entirely or not at all. A batch that fails validation raises
      `StorageError` and changes nothing.
    - Durability: `apply(..., sync=True)` returns only after the batch is on stable storage
      ("durable before acknowledged"). With `sync=False` the batch survives a process crash but
      may be lost if the machine loses power; callers use that only for state they can rebuild.
    - At most one intent per key. Replacing an intent of a *different* transaction is a caller bug
      (the protocol must resolve the old one first) and is refused.
    - Retention: `gc(h)` raises the horizon to `h` and drops versions no read at `ts >= h` can see.
      A read below the horizon raises `BelowRetentionHorizon`; it never returns a history with
      holes in it. The horizon never moves down and is persisted no later than the first version
      it allows to be dropped.
    - Timestamps are ints in `[1, MAX_TS]` (nanoseconds since the epoch); the engines never read a
      clock. Keys, values and metadata are `bytes`.

Failure modes
    - `StorageError`: invalid batch (nothing changed), engine closed, or the engine below failed.
    - `BelowRetentionHorizon`: read timestamp under the horizon; the caller must read newer.
    - `DataDirLocked`: another process (or another engine in this process) has the data directory.

Read marks (the MVTO "highest timestamp that read this key") live beside the store in memory, in
`read_marks`; they are deliberately not persisted (see `txn.readmarks`).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from txn.readmarks import ReadMarks

__all__ = [
    "MAX_TS",
    "BatchPlan",
    "BelowRetentionHorizon",
    "DataDirLocked",
    "GcStats",
    "Intent",
    "Mutation",
    "PutIntent",
    "PutMeta",
    "PutVersion",
    "ResolveIntent",
    "StorageError",
    "Version",
    "VersionedStore",
    "check_gc_horizon",
    "plan_batch",
]

MAX_TS = 2**64 - 1
"""Largest storable timestamp: the RocksDB key encoding holds a timestamp in 8 bytes."""


@dataclass(frozen=True, slots=True)
class Version:
    """A committed version of a key. `value is None` is a deletion tombstone."""

    ts: int
    value: bytes | None


@dataclass(frozen=True, slots=True)
class Intent:
    """The provisional write of transaction `txn_id` at `ts` (`value None`: a provisional delete).

    `record_key` names the key whose shard holds the transaction record, so a reader that meets
    the intent knows where to ask whether the transaction committed.
    """

    txn_id: bytes
    ts: int
    value: bytes | None
    record_key: bytes


@dataclass(frozen=True, slots=True)
class PutVersion:
    """Write a committed version (`value None`: a tombstone). Rewriting the same `(key, ts)`
    replaces it, so replaying a replication log is harmless."""

    key: bytes
    ts: int
    value: bytes | None


@dataclass(frozen=True, slots=True)
class PutIntent:
    """Lay down `intent` on `key`, replacing an earlier intent of the same transaction.

    An intent of another transaction on the key makes the whole batch fail with `StorageError`.
    """

    key: bytes
    intent: Intent


@dataclass(frozen=True, slots=True)
class ResolveIntent:
    """Resolve `txn_id`'s intent on `key`: `commit_ts None` drops it (abort); otherwise the
    intent's value becomes a committed version at `commit_ts` and the intent goes away.

    A no-op when the key holds no intent of `txn_id`, so resolution may be retried freely.
    """

    key: bytes
    txn_id: bytes
    commit_ts: int | None


@dataclass(frozen=True, slots=True)
class PutMeta:
    """Set (or, with `value None`, delete) a small engine-level metadata entry."""

    name: bytes
    value: bytes | None


Mutation = PutVersion | PutIntent | ResolveIntent | PutMeta


@dataclass(frozen=True, slots=True)
class GcStats:
    """What one `gc` call did: versions dropped, and keys with versions it examined."""

    versions_removed: int
    keys_scanned: int


class StorageError(Exception):
    """The storage engine refused or failed an operation. For a refused batch, nothing changed."""


class BelowRetentionHorizon(StorageError):
    """A read asked for a timestamp below the retention horizon; its versions may be gone."""

    def __init__(self, key: bytes, ts: int, horizon: int) -> None:
        super().__init__(
            f"read of key {key!r} at ts {ts} is below the retention horizon {horizon}: "
            f"versions below the horizon were garbage-collected; read at ts >= {horizon}"
        )
        self.key = key
        self.ts = ts
        self.horizon = horizon


class DataDirLocked(StorageError):
    """The data directory is in use: RocksDB's LOCK file is held by someone else."""

    def __init__(self, path: str | os.PathLike[str], detail: str = "") -> None:
        message = (
            f"data directory {os.fspath(path)!r} is locked: another process (or another engine "
            f"in this process) holds the data directory; stop it or use another directory"
        )
        if detail:
            message += f" ({detail})"
        super().__init__(message)
        self.path = os.fspath(path)


# --------------------------------------------------------------------------------------------
# Batch validation, shared by both engines so that they cannot disagree on what a batch means.


@dataclass(slots=True)
class BatchPlan:
    """The net effect of a validated batch, ready for an engine to write in one unit.

    `versions` keeps batch order (a later write of the same `(key, ts)` wins); `intents` and
    `meta` hold the final state of each touched key or name (`None`: remove).
    """

    versions: list[tuple[bytes, int, bytes | None]] = field(default_factory=list)
    intents: dict[bytes, Intent | None] = field(default_factory=dict)
    meta: dict[bytes, bytes | None] = field(default_factory=dict)


def _bad(index: int, mutation: Mutation, rule: str) -> StorageError:
    return StorageError(f"batch refused, nothing applied: mutation {index} ({mutation!r}): {rule}")


def _valid_ts(ts: object) -> bool:
    return type(ts) is int and 1 <= ts <= MAX_TS


def _valid_value(value: object) -> bool:
    return value is None or isinstance(value, bytes)


def plan_batch(
    mutations: Sequence[Mutation], current_intent: Callable[[bytes], Intent | None]
) -> BatchPlan:
    """Validate `mutations` as if applied in order and return their net effect.

    `current_intent(key)` reads the engine's intent before the batch. Each mutation sees the
    effect of the ones before it (a batch may resolve one transaction's intent and then lay down
    another's on the same key). Raises `StorageError` naming the offending mutation and rule;
    nothing is written by this function, so a refused batch leaves the engine untouched.
    """
    plan = BatchPlan()
    intents = plan.intents
    for index, m in enumerate(mutations):
        if isinstance(m, PutVersion):
            if not isinstance(m.key, bytes):
                raise _bad(index, m, "key must be bytes")
            if not _valid_ts(m.ts):
                raise _bad(index, m, f"ts must be an int in [1, {MAX_TS}]")
            if not _valid_value(m.value):
                raise _bad(index, m, "value must be bytes or None")
            plan.versions.append((m.key, m.ts, m.value))
        elif isinstance(m, PutIntent):
            intent = m.intent
            if not isinstance(m.key, bytes):
                raise _bad(index, m, "key must be bytes")
            if not isinstance(intent, Intent):
                raise _bad(index, m, "intent must be an Intent")
            if not isinstance(intent.txn_id, bytes) or not isinstance(intent.record_key, bytes):
                raise _bad(index, m, "txn_id and record_key must be bytes")
            if not _valid_ts(intent.ts):
                raise _bad(index, m, f"intent ts must be an int in [1, {MAX_TS}]")
            if not _valid_value(intent.value):
                raise _bad(index, m, "intent value must be bytes or None")
            held = intents[m.key] if m.key in intents else current_intent(m.key)
            if held is not None and held.txn_id != intent.txn_id:
                raise _bad(
                    index,
                    m,
                    f"key {m.key!r} already holds an intent of txn {held.txn_id!r} at ts "
                    f"{held.ts}; it must be resolved before txn {intent.txn_id!r} may write",
                )
            intents[m.key] = intent
        elif isinstance(m, ResolveIntent):
            if not isinstance(m.key, bytes) or not isinstance(m.txn_id, bytes):
                raise _bad(index, m, "key and txn_id must be bytes")
            if m.commit_ts is not None and not _valid_ts(m.commit_ts):
                raise _bad(index, m, f"commit_ts must be None or an int in [1, {MAX_TS}]")
            held = intents[m.key] if m.key in intents else current_intent(m.key)
            if held is None or held.txn_id != m.txn_id:
                continue  # already resolved (a retry), or never written: idempotent no-op
            if m.commit_ts is not None:
                plan.versions.append((m.key, m.commit_ts, held.value))
            intents[m.key] = None
        elif isinstance(m, PutMeta):
            if not isinstance(m.name, bytes):
                raise _bad(index, m, "name must be bytes")
            if not _valid_value(m.value):
                raise _bad(index, m, "value must be bytes or None")
            plan.meta[m.name] = m.value
        else:
            raise _bad(index, m, f"unknown mutation type {type(m).__name__}")
    return plan


def check_gc_horizon(horizon: int) -> None:
    """Raise `StorageError` unless `horizon` is an int in `[0, MAX_TS]`."""
    if type(horizon) is not int or not 0 <= horizon <= MAX_TS:
        raise StorageError(f"gc horizon must be an int in [0, {MAX_TS}], got {horizon!r}")


# --------------------------------------------------------------------------------------------


class VersionedStore(ABC):
    """A multi-version key-value store; see the module overview for the contract.

    Methods raise `StorageError` once the store is closed. Implementations are not thread-safe:
    a shard drives its store from one thread (or one asyncio loop).
    """

    read_marks: ReadMarks
    """MVTO read marks of this store's keys: in memory only, lost on restart (see readmarks)."""

    @abstractmethod
    def get(self, key: bytes, ts: int) -> Version | None:
        """Newest committed version of `key` with `version.ts <= ts`, or None if there is none.

        A tombstone comes back as `Version(ts, None)`. Intents are not looked at. Raises
        `BelowRetentionHorizon` if `ts < horizon`.
        """

    @abstractmethod
    def get_intent(self, key: bytes) -> Intent | None:
        """The intent on `key`, if any."""

    @abstractmethod
    def latest_version(self, key: bytes) -> Version | None:
        """Newest committed version of `key` at any timestamp (tombstones included)."""

    @abstractmethod
    def versions(self, key: bytes) -> list[Version]:
        """Every retained committed version of `key`, newest first."""

    @abstractmethod
    def scan(
        self, start: bytes, end: bytes | None, ts: int, limit: int | None = None
    ) -> list[tuple[bytes, Version]]:
        """Live rows of keys in `[start, end)` (`end None`: unbounded) as of `ts`, in key order.

        Each row is the key's newest committed version with `version.ts <= ts`; keys whose such
        version is a tombstone, and keys with none, are skipped. At most `limit` rows come back
        (`None`: no limit). Raises `BelowRetentionHorizon` if `ts < horizon`.
        """

    @abstractmethod
    def scan_versions(
        self, start: bytes, end: bytes | None, max_keys: int
    ) -> list[tuple[bytes, list[Version]]]:
        """Every retained committed version (tombstones included, newest first) of the first
        `max_keys` keys with versions in `[start, end)`, in key order: what a replica snapshot
        copies. Not a read at a timestamp, so no horizon check and no read mark."""

    @abstractmethod
    def scan_intents(self, start: bytes, end: bytes | None) -> list[tuple[bytes, Intent]]:
        """Every intent on keys in `[start, end)` (`end None`: unbounded), in key order."""

    @abstractmethod
    def apply(self, mutations: Sequence[Mutation], *, sync: bool = True) -> None:
        """Apply `mutations` atomically: all of them or, on `StorageError`, none.

        With `sync=True` the batch is durable (its write-ahead log record fsynced) before this
        returns, so a caller may acknowledge it. If the write itself fails after validation the
        engine raises `StorageError`; whether the batch landed is then unknown and the caller
        must treat the store as failed.
        """

    @abstractmethod
    def get_meta(self, name: bytes) -> bytes | None:
        """The metadata entry `name`, or None."""

    @property
    @abstractmethod
    def horizon(self) -> int:
        """The retention horizon: reads below it are refused. 0 until the first `gc`; persisted."""

    @abstractmethod
    def gc(self, horizon: int) -> GcStats:
        """Raise the retention horizon to `horizon` and drop versions it makes unreachable.

        For each key, every version with `ts >= horizon` is kept, and so is the newest version
        below the horizon (the one a read at `horizon` sees) unless it is a tombstone. A
        `horizon` below the current one changes nothing and returns `GcStats(0, 0)`; an equal
        one collects again. Intents are untouched. The new horizon is durable before any version
        it releases is dropped, so a crash mid-way never exposes a read with missing versions.
        """

    @abstractmethod
    def close(self) -> None:
        """Release the engine (and its data directory lock). Idempotent."""

    @abstractmethod
    def key_count_estimate(self) -> int:
        """A cheap estimate of how many entries the store holds, for status pages."""

    def check_read_ts(self, key: bytes, ts: int) -> None:
        """Raise `BelowRetentionHorizon` if a read of `key` at `ts` is below the horizon."""
        horizon = self.horizon
        if ts < horizon:
            raise BelowRetentionHorizon(key, ts, horizon)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
