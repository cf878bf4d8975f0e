"""A shard's asynchronous replica: applies the leader's log in order, persists how far it got.

Purpose
    A replica in another region holds a copy of one shard for reads at or below its seal. It is
    fed `LogEntry`s in LSN order (by the puller in the node) and, when its leader has truncated
    the log past it, a snapshot followed by the log from the snapshot's LSN.

Invariants
    - Entries apply strictly in order: entry n+1 only after n. A gap raises `ReplicaGap`
      (the driver re-pulls from `next_lsn`); a duplicate (n < next_lsn) is skipped.
    - One atomic batch per entry (or group of entries): the versions and the new `next_lsn`
      and `sealed_ts`, so a crash (kill -9) leaves the replica at an entry boundary and it
      resumes from `next_lsn` after restart.
    - `sealed_ts` is the newest SEAL applied: every version `<= sealed_ts` of the shard is here.
      During a snapshot install it does not move, and the snapshot's versions at or below it
      are ones the replica already had, so reads at `sealed_ts` stay correct throughout.
    - Re-applying a version is harmless (`PutVersion` of the same `(key, ts)` replaces it), which
      is what makes a fuzzy snapshot plus the log from its start LSN exact.
"""

from __future__ import annotations

from collections.abc import Sequence

from replication.log import KIND_SEAL, LogEntry
from txn.storage import Mutation, PutMeta, PutVersion, Version, VersionedStore

__all__ = ["ReplicaApplier", "ReplicaGap"]

NEXT = b"replica/next-lsn"
SEALED = b"replica/sealed"
SNAPSHOT = b"replica/snapshot-lsn"
"""Set while a snapshot is being installed: the LSN the log resumes from once it is done."""


class ReplicaGap(Exception):
    """The entries handed over do not continue where the replica is."""


def _int(raw: bytes | None, default: int) -> int:
    return default if raw is None else int.from_bytes(raw, "big")


def _b(n: int) -> bytes:
    return n.to_bytes(8, "big")


class ReplicaApplier:
    def __init__(self, store: VersionedStore) -> None:
        self.store = store
        self.next_lsn = _int(store.get_meta(NEXT), 1)
        self.sealed_ts = _int(store.get_meta(SEALED), 0)
        self.snapshot_lsn = _int(store.get_meta(SNAPSHOT), 0)
        """Nonzero while a snapshot install is in progress (it restarts from scratch)."""
        self.applied_entries = 0

    def apply(self, entries: Sequence[LogEntry], *, sync: bool = True) -> list[LogEntry]:
        """Apply entries continuing at `next_lsn`; returns those newly applied."""
        batch: list[Mutation] = []
        fresh: list[LogEntry] = []
        lsn = self.next_lsn
        sealed = self.sealed_ts
        for e in entries:
            if e.lsn < lsn:
                continue
            if e.lsn != lsn:
                raise ReplicaGap(f"replica expects log entry {lsn}, got {e.lsn}")
            if e.kind == KIND_SEAL:
                sealed = max(sealed, e.seal_ts)
            else:
                batch.extend(PutVersion(k, ts, v) for k, ts, v in e.versions)
            fresh.append(e)
            lsn += 1
        if not fresh:
            return []
        batch.append(PutMeta(NEXT, _b(lsn)))
        if sealed != self.sealed_ts:
            batch.append(PutMeta(SEALED, _b(sealed)))
        self.store.apply(batch, sync=sync)
        self.next_lsn, self.sealed_ts = lsn, sealed
        self.applied_entries += len(fresh)
        return fresh

    # -- snapshots -----------------------------------------------------------------------------

    def begin_snapshot(self, snapshot_lsn: int) -> None:
        """The leader truncated past `next_lsn`: copy its versions, then resume at
        `snapshot_lsn`. Persisted, so a crash mid-install restarts the install."""
        self.store.apply([PutMeta(SNAPSHOT, _b(snapshot_lsn))], sync=True)
        self.snapshot_lsn = snapshot_lsn

    def apply_snapshot_page(self, rows: Sequence[tuple[bytes, Sequence[Version]]]) -> None:
        batch: list[Mutation] = [
            PutVersion(key, v.ts, v.value) for key, versions in rows for v in versions
        ]
        if batch:
            self.store.apply(batch, sync=False)

    def finish_snapshot(self, sealed_at_start: int) -> None:
        """Every page is in: continue the log at the snapshot's LSN. `sealed_at_start` is the
        leader's seal when the snapshot began; every version at or below it was copied."""
        lsn = self.snapshot_lsn
        sealed = max(self.sealed_ts, sealed_at_start)
        self.store.apply(
            [PutMeta(NEXT, _b(lsn)), PutMeta(SEALED, _b(sealed)), PutMeta(SNAPSHOT, None)],
            sync=True,
        )
        self.next_lsn, self.sealed_ts, self.snapshot_lsn = lsn, sealed, 0
