"""The lock table of the d2PL-TTC baseline (Spanner-like two-phase locking), with no I/O.

Each key has shared (read) and exclusive (write) holders. Deadlocks are prevented by wound-wait on
transaction priority (the start timestamp: older = higher priority):

- a request compatible with the current holders is granted (shared with shared; a holder may
  upgrade its own shared lock when it is the only holder);
- an OLDER requester wounds the younger conflicting holders that are not yet prepared (they are
  aborted: the caller drops their locks and intents here and fails their next operation), then
  waits for any that remain;
- a YOUNGER requester waits.

Waits therefore only run from younger to older transactions, so no cycle can form. Prepared
holders are never wounded: they wait for their coordinator's decision (2PC).

`acquire` answers Granted, Wait(blockers) or Wounded(victims) + Wait; the caller parks waiters
and calls `acquire` again when a blocker releases (`release` returns the keys that changed).

Scans take a SHARED lock on a key range `[start, end)` (`acquire_range`), which also covers keys
that do not exist yet: an exclusive lock on any key inside a range another transaction holds
conflicts with it, so a scan's result cannot gain or lose rows (phantoms) before it commits.
Ranges are few per transaction and held briefly; they are kept in a plain list, and a range
request checks the exclusive holders one by one (the baseline's cost, not K2's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Mode(Enum):
    SHARED = "shared"
    EXCLUSIVE = "exclusive"


@dataclass(frozen=True, slots=True)
class Granted:
    pass


@dataclass(frozen=True, slots=True)
class Blocked:
    blockers: frozenset[bytes]
    """Transactions the requester must wait for."""
    wounded: frozenset[bytes]
    """Younger holders the requester wounded: the caller must abort them."""


@dataclass
class _KeyLocks:
    shared: set[bytes] = field(default_factory=set)
    exclusive: bytes | None = None


class LockTable:
    def __init__(self) -> None:
        self._keys: dict[bytes, _KeyLocks] = {}
        self._held: dict[bytes, set[bytes]] = {}
        self._priority: dict[bytes, int] = {}
        self.prepared: set[bytes] = set()
        self._ranges: dict[bytes, list[tuple[bytes, bytes | None]]] = {}
        """txn -> shared key ranges it holds."""

    def holders(self, key: bytes) -> tuple[frozenset[bytes], bytes | None]:
        kl = self._keys.get(key)
        if kl is None:
            return frozenset(), None
        return frozenset(kl.shared), kl.exclusive

    def acquire(self, txn: bytes, priority: int, key: bytes, mode: Mode) -> Granted | Blocked:
        """Try to lock key for txn (priority: smaller is older and wins)."""
        self._priority[txn] = priority
        kl = self._keys.setdefault(key, _KeyLocks())
        if mode is Mode.SHARED:
            conflicting = {kl.exclusive} if kl.exclusive not in (None, txn) else set()
        else:
            conflicting = set(kl.shared) - {txn}
            if kl.exclusive not in (None, txn):
                conflicting.add(kl.exclusive)
            conflicting |= {
                holder
                for holder, ranges in self._ranges.items()
                if holder != txn and any(_covers(s, e, key) for s, e in ranges)
            }
        if not conflicting:
            if mode is Mode.SHARED:
                if kl.exclusive != txn:
                    kl.shared.add(txn)
            else:
                kl.shared.discard(txn)
                kl.exclusive = txn
            self._held.setdefault(txn, set()).add(key)
            return Granted()
        if not kl.shared and kl.exclusive is None:
            del self._keys[key]
        return self._blocked(conflicting, priority)

    def acquire_range(
        self, txn: bytes, priority: int, start: bytes, end: bytes | None
    ) -> Granted | Blocked:
        """Try to lock every key of `[start, end)` (`end None`: unbounded) SHARED for txn."""
        self._priority[txn] = priority
        conflicting = {
            kl.exclusive
            for key, kl in self._keys.items()
            if kl.exclusive is not None and kl.exclusive != txn and _covers(start, end, key)
        }
        if not conflicting:
            self._ranges.setdefault(txn, []).append((start, end))
            self._held.setdefault(txn, set())
            return Granted()
        return self._blocked(conflicting, priority)

    def _blocked(self, conflicting: set[bytes], priority: int) -> Blocked:
        wounded = frozenset(
            h for h in conflicting if self._priority.get(h, 0) > priority and h not in self.prepared
        )
        return Blocked(frozenset(conflicting), wounded)

    def release(self, txn: bytes) -> list[bytes]:
        """Drop every lock of txn; returns the keys it held (their waiters may retry)."""
        keys = self._held.pop(txn, set())
        self._ranges.pop(txn, None)
        for key in keys:
            kl = self._keys.get(key)
            if kl is None:
                continue
            kl.shared.discard(txn)
            if kl.exclusive == txn:
                kl.exclusive = None
            if not kl.shared and kl.exclusive is None:
                del self._keys[key]
        self._priority.pop(txn, None)
        self.prepared.discard(txn)
        return sorted(keys)

    def held_by(self, txn: bytes) -> set[bytes]:
        return set(self._held.get(txn, set()))

    def __len__(self) -> int:
        return len(self._keys)


def _covers(start: bytes, end: bytes | None, key: bytes) -> bool:
    return start <= key and (end is None or key < end)
