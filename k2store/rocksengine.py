"""`RocksEngine`: the durable `VersionedStore`, on RocksDB through rocksdict.

This is the only module in the repository that imports rocksdict; everything else sees the
`VersionedStore` contract (`txn.storage`) and the key layout (`k2store.keycodec`).

How it uses RocksDB
    - One database, raw byte keys and values (`Options(raw_mode=True)`), key spaces separated by
      a one-byte prefix (see keycodec). One column family keeps a batch trivially atomic.
    - `apply` validates the batch first (`plan_batch`, reading current intents), then writes it
      as one `WriteBatch`. With `sync=True` the write-ahead log is fsynced before `write`
      returns, which is what "durable before acknowledged" rests on. Recovery after a crash is
      RocksDB's WAL replay on open: every batch whose `apply(sync=True)` returned is there,
      whole; a batch in flight at the crash is there whole or not at all.
    - Group commit (`defer_sync`, k2store/groupcommit.py): a node process hands the sync to its
      barrier instead. A `sync=True` batch is then written without one and the engine reports
      itself; `sync_wal` later fsyncs the log, covering every batch written before it. What was
      written is in the kernel's page cache at once (a killed process loses nothing); until the
      sync it is not on disk, and the node sends nothing that depends on it meanwhile.
    - `get` is one iterator seek to `version_key(key, ts)`: versions are stored newest first, so
      the entry found, if it belongs to `key`, is the newest version at or below `ts`.
    - The retention horizon lives under the engine-state prefix and is cached in memory.

Failure modes
    - The data directory's LOCK is held (another process, or another open engine in this
      process): `DataDirLocked`.
    - `create=False` and no database there, a database written in another format, or any
      RocksDB error: `StorageError` with RocksDB's message.
    - Calls after `close`: `StorageError`.

Lifetime
    rocksdict keeps the database (and its LOCK) open while any iterator on it is alive, even
    after `close()`. Iterators here never outlive the call that made them (`_iterator` scopes
    them), so `close()` really releases the directory and a reopen in the same process works.
    An engine dropped without `close()` releases the lock when it is garbage-collected; the
    data is safe either way because every acknowledged batch is already in the WAL.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import rocksdict

from k2store import keycodec as kc
from txn.readmarks import ReadMarks
from txn.storage import (
    MAX_TS,
    DataDirLocked,
    GcStats,
    Intent,
    Mutation,
    StorageError,
    Version,
    VersionedStore,
    check_gc_horizon,
    plan_batch,
)

__all__ = ["FORMAT_VERSION", "RocksBlobStore", "RocksEngine"]

FORMAT_VERSION = 1
"""On-disk layout version, stored in the database; bump it when keycodec's layout changes."""

_HORIZON = kc.state_key(b"horizon")
_FORMAT = kc.state_key(b"format")
_VERSION_SPACE_END = bytes([kc.VERSION_PREFIX[0] + 1])
_INTENT_SPACE_END = bytes([kc.INTENT_PREFIX[0] + 1])

# GC writes its deletions in batches of this many, so that collecting a large store does not
# build one huge WriteBatch in memory. The horizon goes in the first batch (see gc).
_GC_BATCH = 10_000


def _is_lock_error(exc: Exception) -> bool:
    # RocksDB reports a held LOCK as an IO error: "While lock file: <dir>/LOCK: Resource
    # temporarily unavailable" from another process, "lock hold by current process" from this one.
    return "lock" in str(exc).lower()


class RocksEngine(VersionedStore):
    """A durable multi-version store in the RocksDB database at `path`."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        create: bool = True,
        read_marks: ReadMarks | None = None,
    ) -> None:
        """Open (and with `create`, create if missing) the database at `path`.

        Takes the directory's lock for as long as the engine is open. Replays the WAL, so every
        batch acknowledged before a crash is visible once this returns. Raises `DataDirLocked`
        if the directory is in use, `StorageError` for anything else that stops the open.
        """
        self.path = os.fspath(path)
        self.read_marks = read_marks if read_marks is not None else ReadMarks()
        options = rocksdict.Options(raw_mode=True)
        options.create_if_missing(create)
        try:
            self._db: Any = rocksdict.Rdict(self.path, options)
        except Exception as exc:
            if _is_lock_error(exc):
                raise DataDirLocked(self.path, str(exc)) from exc
            raise StorageError(f"cannot open RocksDB at {self.path!r}: {exc}") from exc
        self._closed = False
        self._sync_write = rocksdict.WriteOptions()
        self._sync_write.sync = True
        self._async_write = rocksdict.WriteOptions()
        self.defer_sync: Callable[[RocksEngine], None] | None = None
        """Set by a node with group commit: a batch that asks for a sync is written without
        one and this is called instead; the caller syncs (`sync_wal`) before any output."""
        try:
            self._horizon = self._load_state()
        except BaseException:
            self._db.close()
            raise

    def _load_state(self) -> int:
        stored = self._db.get(_FORMAT)
        if stored is None:
            # A fresh database (or one with no versions yet): stamp it so that a later layout
            # change can tell old data from new instead of misreading it.
            self._db.put(_FORMAT, str(FORMAT_VERSION).encode(), self._sync_write)
        elif stored != str(FORMAT_VERSION).encode():
            raise StorageError(
                f"RocksDB at {self.path!r} has storage format {stored!r}; this build reads "
                f"format {FORMAT_VERSION}"
            )
        horizon = self._db.get(_HORIZON)
        return 0 if horizon is None else int.from_bytes(horizon, "big")

    # -- plumbing -------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(f"RocksDB engine at {self.path!r} is closed")

    @contextmanager
    def _iterator(self, upper_bound: bytes | None = None) -> Iterator[Any]:
        """An iterator that is dropped on exit, so it cannot keep the database open after close.

        `upper_bound` (exclusive) lets RocksDB stop at the end of the range instead of walking
        on (past deletion markers left by GC, among others)."""
        self._check_open()
        if upper_bound is None:
            it = self._db.iter()
        else:
            read_options = rocksdict.ReadOptions()
            read_options.set_iterate_upper_bound(upper_bound)
            it = self._db.iter(read_options)
        try:
            try:
                yield it
            except rocksdict.DbClosedError as exc:
                raise StorageError(f"RocksDB engine at {self.path!r} is closed") from exc
            # An iterator stops being valid at the end of the range *or* on an I/O error; only
            # the status tells them apart, and a silent short read would be wrong data.
            try:
                it.status()
            except Exception as exc:
                raise StorageError(f"RocksDB read from {self.path!r} failed: {exc}") from exc
        finally:
            del it

    def _write(self, batch: Any, *, sync: bool) -> None:
        defer = self.defer_sync if sync else None
        try:
            self._db.write(batch, self._sync_write if sync and defer is None else self._async_write)
        except Exception as exc:
            raise StorageError(f"RocksDB write to {self.path!r} failed: {exc}") from exc
        if defer is not None:
            defer(self)

    def sync_wal(self) -> None:
        """fsync the write-ahead log: every batch written so far is durable once this returns."""
        self._check_open()
        try:
            self._db.flush_wal(True)
        except Exception as exc:
            raise StorageError(f"RocksDB WAL sync of {self.path!r} failed: {exc}") from exc

    @staticmethod
    def _decode_value(raw: bytes, where: bytes) -> bytes | None:
        try:
            return kc.decode_value(raw)
        except ValueError as exc:
            raise StorageError(f"corrupt version at {where!r}: {exc}") from exc

    # -- reads ----------------------------------------------------------------------------------

    def get(self, key: bytes, ts: int) -> Version | None:
        self._check_open()
        self.check_read_ts(key, ts)
        if ts < 1:
            return None  # no version is that old; also keeps inverted_ts in range
        prefix = kc.version_key_prefix(key)
        with self._iterator() as it:
            it.seek(prefix + kc.inverted_ts(min(ts, MAX_TS)))
            if not it.valid():
                return None
            found: bytes = it.key()
            if not found.startswith(prefix):
                return None  # the seek ran into the next key: no version of `key` <= ts
            return Version(kc.version_ts(found), self._decode_value(it.value(), found))

    def get_intent(self, key: bytes) -> Intent | None:
        self._check_open()
        raw = self._db.get(kc.intent_key(key))
        if raw is None:
            return None
        try:
            return kc.decode_intent(raw)
        except ValueError as exc:
            raise StorageError(f"corrupt intent on key {key!r}: {exc}") from exc

    def latest_version(self, key: bytes) -> Version | None:
        prefix = kc.version_key_prefix(key)
        with self._iterator(kc.version_key_successor(prefix)) as it:
            it.seek(prefix)
            if not it.valid():
                return None
            found: bytes = it.key()
            return Version(kc.version_ts(found), self._decode_value(it.value(), found))

    def versions(self, key: bytes) -> list[Version]:
        prefix = kc.version_key_prefix(key)
        out: list[Version] = []
        with self._iterator(kc.version_key_successor(prefix)) as it:
            it.seek(prefix)
            while it.valid():
                found: bytes = it.key()
                out.append(Version(kc.version_ts(found), self._decode_value(it.value(), found)))
                it.next()
        return out

    def scan_versions(
        self, start: bytes, end: bytes | None, max_keys: int
    ) -> list[tuple[bytes, list[Version]]]:
        self._check_open()
        out: list[tuple[bytes, list[Version]]] = []
        if max_keys <= 0 or (end is not None and end <= start):
            return out
        upper = _VERSION_SPACE_END if end is None else kc.version_key_prefix(end)
        with self._iterator(upper) as it:
            it.seek(kc.version_key_prefix(start))
            prefix = b""
            while it.valid():
                found: bytes = it.key()
                version = Version(kc.version_ts(found), self._decode_value(it.value(), found))
                if out and found[:-8] == prefix:
                    out[-1][1].append(version)
                else:
                    if len(out) >= max_keys:
                        break
                    prefix = found[:-8]
                    try:
                        user_key = kc.unescape(prefix[1:])
                    except ValueError as exc:
                        raise StorageError(f"corrupt version key {found!r}: {exc}") from exc
                    out.append((user_key, [version]))
                it.next()
        return out

    def scan(
        self, start: bytes, end: bytes | None, ts: int, limit: int | None = None
    ) -> list[tuple[bytes, Version]]:
        self._check_open()
        self.check_read_ts(start, ts)
        rows: list[tuple[bytes, Version]] = []
        if (limit is not None and limit <= 0) or ts < 1 or (end is not None and end <= start):
            return rows
        suffix = kc.inverted_ts(min(ts, MAX_TS))
        # Escaping preserves order and is prefix-free, so "user key < end" is exactly "version
        # key < version_key_prefix(end)", and RocksDB can enforce the bound for us.
        upper = _VERSION_SPACE_END if end is None else kc.version_key_prefix(end)
        with self._iterator(upper) as it:
            it.seek(kc.version_key_prefix(start) + suffix)
            # Loop invariant: the iterator is at the first entry of some key at or after the
            # keys already handled, or at that key's newest version <= ts.
            while it.valid():
                found: bytes = it.key()
                prefix = found[: -len(suffix)]
                version_ts = kc.version_ts(found)
                if version_ts > ts:
                    # Newer than the read: jump to this key's newest version <= ts (one seek
                    # rather than stepping through the newer versions).
                    it.seek(prefix + suffix)
                    if not it.valid():
                        break
                    found = it.key()
                    if not found.startswith(prefix):
                        continue  # none <= ts; we are already at the next key's first entry
                    version_ts = kc.version_ts(found)
                value = self._decode_value(it.value(), found)
                if value is not None:
                    try:
                        user_key = kc.unescape(prefix[1:])
                    except ValueError as exc:
                        raise StorageError(f"corrupt version key {found!r}: {exc}") from exc
                    rows.append((user_key, Version(version_ts, value)))
                    if limit is not None and len(rows) >= limit:
                        break
                it.seek(kc.version_key_successor(prefix))  # skip this key's older versions
        return rows

    def scan_intents(self, start: bytes, end: bytes | None) -> list[tuple[bytes, Intent]]:
        out: list[tuple[bytes, Intent]] = []
        if end is not None and end <= start:
            return out
        upper = _INTENT_SPACE_END if end is None else kc.intent_key(end)
        with self._iterator(upper) as it:
            it.seek(kc.intent_key(start))
            while it.valid():
                found: bytes = it.key()
                try:
                    out.append((found[1:], kc.decode_intent(it.value())))
                except ValueError as exc:
                    raise StorageError(f"corrupt intent at {found!r}: {exc}") from exc
                it.next()
        return out

    def get_meta(self, name: bytes) -> bytes | None:
        self._check_open()
        value: bytes | None = self._db.get(kc.meta_key(name))
        return value

    @property
    def horizon(self) -> int:
        return self._horizon

    def key_count_estimate(self) -> int:
        """RocksDB's estimate of stored entries (versions, intents and metadata together)."""
        self._check_open()
        estimate = self._db.property_int_value("rocksdb.estimate-num-keys")
        return int(estimate) if estimate is not None else 0

    # -- writes ---------------------------------------------------------------------------------

    def apply(self, mutations: Sequence[Mutation], *, sync: bool = True) -> None:
        """Atomic, and with `sync=True` durable before it returns (see the module overview).

        Validation reads the current intents; it is the caller's single thread that keeps them
        from changing between validation and the write.
        """
        self._check_open()
        plan = plan_batch(mutations, self.get_intent)
        batch = rocksdict.WriteBatch(raw_mode=True)
        for key, ts, value in plan.versions:
            batch.put(kc.version_key(key, ts), kc.encode_value(value))
        for key, intent in plan.intents.items():
            if intent is None:
                batch.delete(kc.intent_key(key))
            else:
                batch.put(kc.intent_key(key), kc.encode_intent(intent))
        for name, meta_value in plan.meta.items():
            if meta_value is None:
                batch.delete(kc.meta_key(name))
            else:
                batch.put(kc.meta_key(name), meta_value)
        if batch.is_empty():
            return  # e.g. only no-op resolutions: nothing to make durable
        self._write(batch, sync=sync)

    def gc(self, horizon: int) -> GcStats:
        """See `VersionedStore.gc`. The new horizon is written (fsynced) in the first batch,
        together with the first deletions; later batches only delete versions that the
        persisted horizon already hides, so a crash between batches is harmless and the next
        `gc` finishes the job."""
        self._check_open()
        check_gc_horizon(horizon)
        if horizon < self._horizon:
            return GcStats(0, 0)
        batch = rocksdict.WriteBatch(raw_mode=True)
        batch.put(_HORIZON, horizon.to_bytes(8, "big"))
        self._horizon = horizon  # reads below it are refused from now on, even mid-collection
        horizon_pending = True  # the first write must carry the horizon, deletions or not
        removed = 0
        keys_scanned = 0
        pending = 0
        boundary = kc.inverted_ts(horizon)
        with self._iterator(_VERSION_SPACE_END) as it:
            it.seek(kc.VERSION_PREFIX)
            while it.valid():
                found: bytes = it.key()
                prefix = found[:-8]
                keys_scanned += 1
                # Versions with ts < horizon sort after prefix + inverted_ts(horizon); the
                # first of them is the newest below the horizon, kept unless a tombstone.
                it.seek(prefix + boundary)
                if it.valid() and it.key() == prefix + boundary:
                    it.next()  # a version exactly at the horizon is kept
                first_below = True
                while it.valid():
                    below: bytes = it.key()
                    if not below.startswith(prefix):
                        break  # next key; the iterator is where the outer loop wants it
                    if first_below:
                        first_below = False
                        if self._decode_value(it.value(), below) is not None:
                            it.next()
                            continue
                    batch.delete(below)
                    removed += 1
                    pending += 1
                    if pending >= _GC_BATCH:
                        self._write(batch, sync=horizon_pending)
                        horizon_pending = False
                        batch = rocksdict.WriteBatch(raw_mode=True)
                        pending = 0
                    it.next()
        if horizon_pending or pending:
            self._write(batch, sync=True)
        return GcStats(versions_removed=removed, keys_scanned=keys_scanned)

    def close(self) -> None:
        """Flush and release the database and its directory lock. Idempotent. Every batch
        applied with `sync=True` was durable already; close adds durability for `sync=False`
        ones (memtables are flushed)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._db.close()
        except Exception as exc:
            raise StorageError(f"closing RocksDB at {self.path!r} failed: {exc}") from exc


class RocksBlobStore:
    """A plain durable byte map (no versions, no intents) for the KV tier's disk tier.

    Keys and values are raw bytes. `put` and `delete` with `sync=True` fsync the write-ahead log
    before returning: "durable before the metadata names it" rests on that. Each value's length
    is kept beside it (written in the same batch), so `sizes` walks small entries instead of
    reading every value back. The same lock and lifetime rules as `RocksEngine` apply
    (`DataDirLocked`, `StorageError`, iterators scoped to the call).
    """

    _DATA = b"\x01"
    _SIZE = b"\x02"

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True) -> None:
        self.path = os.fspath(path)
        options = rocksdict.Options(raw_mode=True)
        options.create_if_missing(create)
        try:
            self._db: Any = rocksdict.Rdict(self.path, options)
        except Exception as exc:
            if _is_lock_error(exc):
                raise DataDirLocked(self.path, str(exc)) from exc
            raise StorageError(f"cannot open RocksDB at {self.path!r}: {exc}") from exc
        self._closed = False
        self._sync_write = rocksdict.WriteOptions()
        self._sync_write.sync = True
        self._async_write = rocksdict.WriteOptions()

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(f"RocksDB blob store at {self.path!r} is closed")

    def _write(self, batch: Any, sync: bool) -> None:
        try:
            self._db.write(batch, self._sync_write if sync else self._async_write)
        except Exception as exc:
            raise StorageError(f"RocksDB write to {self.path!r} failed: {exc}") from exc

    def put(self, key: bytes, value: bytes, *, sync: bool = True) -> None:
        self._check_open()
        batch = rocksdict.WriteBatch(raw_mode=True)
        batch.put(self._DATA + key, value)
        batch.put(self._SIZE + key, len(value).to_bytes(8, "big"))
        self._write(batch, sync)

    def get(self, key: bytes) -> bytes | None:
        self._check_open()
        try:
            value: bytes | None = self._db.get(self._DATA + key)
        except Exception as exc:
            raise StorageError(f"RocksDB read from {self.path!r} failed: {exc}") from exc
        return value

    def delete(self, key: bytes, *, sync: bool = False) -> None:
        """Deleting is not acknowledged to anyone before the metadata forgets the block, so it
        need not be synced by default: a resurrected block after a crash is only unused space."""
        self._check_open()
        batch = rocksdict.WriteBatch(raw_mode=True)
        batch.delete(self._DATA + key)
        batch.delete(self._SIZE + key)
        self._write(batch, sync)

    def sizes(self) -> Iterator[tuple[bytes, int]]:
        """(key, value length) of every entry in key order, read as one list (no iterator
        outlives the call)."""
        out: list[tuple[bytes, int]] = []
        with self._scoped_iterator(bytes([self._SIZE[0] + 1])) as it:
            it.seek(self._SIZE)
            while it.valid():
                out.append((it.key()[1:], int.from_bytes(it.value(), "big")))
                it.next()
        return iter(out)

    @contextmanager
    def _scoped_iterator(self, upper_bound: bytes) -> Iterator[Any]:
        self._check_open()
        read_options = rocksdict.ReadOptions()
        read_options.set_iterate_upper_bound(upper_bound)
        it = self._db.iter(read_options)
        try:
            yield it
            try:
                it.status()
            except Exception as exc:
                raise StorageError(f"RocksDB read from {self.path!r} failed: {exc}") from exc
        finally:
            del it

    def approximate_bytes(self) -> int:
        """RocksDB's estimate of live data (SST files; the memtable is not counted)."""
        self._check_open()
        v = self._db.property_int_value("rocksdb.estimate-live-data-size")
        return int(v) if v is not None else 0

    def close(self) -> None:
        """Release the database and its lock. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._db.close()
        except Exception as exc:
            raise StorageError(f"closing RocksDB at {self.path!r} failed: {exc}") from exc
