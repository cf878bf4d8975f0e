"""K2-MVTO at a shard leader: the rules, as decisions over a VersionedStore, with no I/O.

A leader evaluates each operation of a transaction T (timestamp T.ts) and answers with one of:

- `ReadDone(version)`: what T sees. Its own intent first; otherwise the newest committed version
  at or below T.ts. The key's read mark is raised to T.ts, so no write below T.ts can land later
  and change what T saw. An intent of another transaction ABOVE T.ts is invisible to T.
- `WriteDone(mutation)`: the write may be installed as an intent; the caller applies the returned
  mutation (batched with the others of the same request, one fsync).
- `Wait(intent)`: another transaction U holds an intent on the key with U.ts < T.ts. T must learn
  U's outcome first (the caller waits for U's intents to resolve, or asks U's record), then
  evaluate the operation again. Waits only ever run from a higher timestamp to a lower one, so a
  cycle of waits is impossible: no deadlock.
- `Abort(rule, message)`: T cannot be serialized at T.ts; the client retries with a new timestamp.
  Rules: ``read-mark`` (a write under a later read), ``newer-version`` (a write under a committed
  later version), ``intent-higher`` (a write meets the intent of a transaction with a higher
  timestamp, or a read or write meets any intent when waiting is switched off: rule ``intent``).

The evaluation itself never blocks and never awaits, so a batch evaluated in one go is atomic with
respect to every other request at the leader. The `wait_for_lower` switch turns the lower-timestamp
wait off (plain K2-MVTO: abort on any intent), for the ablation benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

from truetime import format_ts
from txn.records import TxnRef
from txn.storage import Intent, PutIntent, ResolveIntent, Version, VersionedStore


@dataclass(frozen=True, slots=True)
class ReadDone:
    version: Version | None


@dataclass(frozen=True, slots=True)
class ScanDone:
    rows: list[tuple[bytes, Version]]
    more: bool
    marked_end: bytes | None


@dataclass(frozen=True, slots=True)
class WriteDone:
    mutation: PutIntent


@dataclass(frozen=True, slots=True)
class Wait:
    key: bytes
    intent: Intent


@dataclass(frozen=True, slots=True)
class Abort:
    rule: str
    message: str


class MvtoRules:
    def __init__(
        self,
        store: VersionedStore,
        *,
        wait_for_lower: bool = True,
        unsafe_ignore_read_marks: bool = False,
    ) -> None:
        """`unsafe_ignore_read_marks` breaks serializability on purpose (the read-mark rule
        is skipped), so tests can prove the consistency checkers notice."""
        self.store = store
        self.wait_for_lower = wait_for_lower
        self.unsafe_ignore_read_marks = unsafe_ignore_read_marks

    def _foreign_intent(self, txn: TxnRef | None, key: bytes) -> Intent | None:
        intent = self.store.get_intent(key)
        if intent is None or (txn is not None and intent.txn_id == txn.txn_id):
            return None
        return intent

    def read(self, txn: TxnRef | None, key: bytes, ts: int) -> ReadDone | Wait | Abort:
        intent = self.store.get_intent(key)
        if intent is not None:
            if txn is not None and intent.txn_id == txn.txn_id:
                self.store.read_marks.raise_key(key, ts)
                return ReadDone(Version(intent.ts, intent.value))
            if intent.ts <= ts:
                if not self.wait_for_lower:
                    return _abort_intent("intent", key, ts, intent)
                return Wait(key, intent)
        version = self.store.get(key, ts)
        self.store.read_marks.raise_key(key, ts)
        return ReadDone(version)

    def scan(
        self, txn: TxnRef | None, start: bytes, end: bytes | None, ts: int, limit: int
    ) -> ScanDone | Wait | Abort:
        """Rows of [start, end) at ts, own intents included; waits on the first lower intent."""
        for key, intent in self.store.scan_intents(start, end):
            if txn is not None and intent.txn_id == txn.txn_id:
                continue
            if intent.ts <= ts:
                if not self.wait_for_lower:
                    return _abort_intent("intent", key, ts, intent)
                return Wait(key, intent)
        own = (
            []
            if txn is None
            else [(k, i) for k, i in self.store.scan_intents(start, end) if i.txn_id == txn.txn_id]
        )
        # Own intents may hide (deletes) or add rows: fetch enough committed rows that the page
        # is still full after overlaying them.
        rows = dict(self.store.scan(start, end, ts, limit + 1 + len(own)))
        for key, intent in own:
            rows[key] = Version(intent.ts, intent.value)
        live = sorted((k, v) for k, v in rows.items() if v.value is not None)
        more = len(live) > limit
        live = live[:limit]
        marked_end = live[-1][0] + b"\x00" if more else end
        self.store.read_marks.raise_range(start, marked_end, ts)
        return ScanDone(live, more, marked_end)

    def doomed_write(self, txn: TxnRef, key: bytes) -> Abort | None:
        """The abort txn's write of key meets now, and so at any later time (read marks and
        committed versions only grow): `write` checks it first, and a read for update may ask
        it to fail at once instead of holding its places and waiting on its other keys for a
        write that cannot succeed. None while the write could still succeed."""
        mark = self.store.read_marks.get(key)
        # A mark equal to T.ts is T's own read (timestamps are unique per transaction).
        if mark > txn.ts and not self.unsafe_ignore_read_marks:
            return Abort(
                "read-mark",
                f"write of key {key[:64]!r} at {format_ts(txn.ts)} aborted by rule read-mark: "
                f"it was already read at {format_ts(mark)}",
            )
        latest = self.store.latest_version(key)
        if latest is not None and latest.ts >= txn.ts:
            return Abort(
                "newer-version",
                f"write of key {key[:64]!r} at {format_ts(txn.ts)} aborted by rule newer-version: "
                f"a version committed at {format_ts(latest.ts)} exists",
            )
        return None

    def write(self, txn: TxnRef, key: bytes, value: bytes | None) -> WriteDone | Wait | Abort:
        doomed = self.doomed_write(txn, key)
        if doomed is not None:
            return doomed
        intent = self._foreign_intent(txn, key)
        if intent is not None:
            if intent.ts < txn.ts and self.wait_for_lower:
                return Wait(key, intent)
            return _abort_intent(
                "intent-higher" if self.wait_for_lower else "intent", key, txn.ts, intent
            )
        return WriteDone(PutIntent(key, Intent(txn.txn_id, txn.ts, value, txn.record_key)))

    def resolve(self, txn_id: bytes, commit_ts: int | None, keys: list[bytes]) -> int:
        """Commit (at commit_ts) or abort (None) the transaction's intents on keys; idempotent.
        Returns how many intents were resolved."""
        present = [k for k in keys if (i := self.store.get_intent(k)) and i.txn_id == txn_id]
        if present:
            self.store.apply([ResolveIntent(k, txn_id, commit_ts) for k in present], sync=True)
        return len(present)


def _abort_intent(rule: str, key: bytes, ts: int, intent: Intent) -> Abort:
    return Abort(
        rule,
        f"operation on key {key[:64]!r} at {format_ts(ts)} aborted by rule {rule}: transaction "
        f"{intent.txn_id.hex()[:12]} holds an intent at {format_ts(intent.ts)}",
    )
