"""Transaction identity and records.

A transaction is named by a random 16-byte id and carries one timestamp (K2-MVTO: reads and writes
happen at it). Its **record** lives on the shard that holds `record_key` (by default the first key
it writes: its home, usually hottest, row) and is the single source of truth for its outcome:

- no record and a live heartbeat: PENDING;
- COMMITTED: written (fsynced) by the coordinator's EndTxn; this is the commit point;
- ABORTED: written by the coordinator's EndTxn(abort), or by a leader that found the transaction's
  heartbeat expired (its coordinator died), so that a late commit attempt fails.

Records are tiny and encoded by hand (no protobuf in this layer).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

TXN_ID_BYTES = 16
RECORD_META_PREFIX = b"txn/"


class TxnStatus(enum.IntEnum):
    PENDING = 0
    COMMITTED = 1
    ABORTED = 2


@dataclass(frozen=True, slots=True)
class TxnRef:
    """What a participant needs to know of a transaction."""

    txn_id: bytes
    ts: int
    record_key: bytes


@dataclass(frozen=True, slots=True)
class TxnRecord:
    txn_id: bytes
    status: TxnStatus
    ts: int
    commit_ts: int

    _FMT = struct.Struct(">BBQQ")  # version, status, ts, commit_ts

    def encode(self) -> bytes:
        return self._FMT.pack(1, int(self.status), self.ts, self.commit_ts) + self.txn_id

    @classmethod
    def decode(cls, raw: bytes) -> TxnRecord:
        version, status, ts, commit_ts = cls._FMT.unpack_from(raw)
        if version != 1:
            raise ValueError(f"unknown transaction record version {version}")
        return cls(raw[cls._FMT.size :], TxnStatus(status), ts, commit_ts)


def record_meta_name(txn_id: bytes) -> bytes:
    return RECORD_META_PREFIX + txn_id
