"""k2store: the storage engine, shards, node process, gRPC API, client, CLI and cluster launcher.

How data flows::

    Client/AsyncClient --gRPC--> Node (any) --forward--> Node leading the key's shard
                                                     |-- BatchClient -> region oracle (K2-TB)
                                                     |-- ShardLeader (MVTO rules, no I/O)
                                                     '-- VersionedStore: RocksEngine | MemoryEngine

Invariants: a write is fsynced before it is acknowledged, and acknowledged only after its
timestamp has certainly passed (commit-wait); a read returns a version only once its timestamp has
certainly passed; bad input is refused before anything changes. Failure modes a caller sees are
the typed errors exported here: retryable ones (`Unavailable`, `WriteTooOld`, `ClockUncertain`,
`DeadlineExceeded`) and terminal ones (`InvalidArgument` and its kinds, `BelowHorizon`).
"""

from k2store.client import (
    AsyncClient,
    AsyncTransaction,
    Client,
    ReadResult,
    ReplicaSnapshot,
    RetryPolicy,
    Snapshot,
    Transaction,
    WriteResult,
)
from k2store.cluster import (
    ClusterConfig,
    ClusterSettings,
    NodeConfig,
    RegionConfig,
    ReplicationSettings,
    ShardConfig,
    TxnSettings,
)
from k2store.errors import (
    BelowHorizon,
    ClockUncertain,
    ClusterFileError,
    CommitOutcomeUnknown,
    DataDirLockedError,
    DeadlineExceeded,
    InvalidArgument,
    K2Error,
    KeyTooLarge,
    NotLeader,
    NotVisibleYet,
    StalenessExceeded,
    TransactionRetry,
    TxnAborted,
    Unavailable,
    UnknownNode,
    UnknownShard,
    ValueTooLarge,
    WriteTooOld,
)
from k2store.memengine import MemoryEngine
from k2store.wan import NetworkSettings
from txn.storage import Intent, Version, VersionedStore

__all__ = [
    "AsyncClient",
    "AsyncTransaction",
    "BelowHorizon",
    "Client",
    "ClockUncertain",
    "ClusterConfig",
    "ClusterFileError",
    "ClusterSettings",
    "CommitOutcomeUnknown",
    "DataDirLockedError",
    "DeadlineExceeded",
    "Intent",
    "InvalidArgument",
    "K2Error",
    "KeyTooLarge",
    "MemoryEngine",
    "NetworkSettings",
    "NodeConfig",
    "NotLeader",
    "NotVisibleYet",
    "ReadResult",
    "RegionConfig",
    "ReplicaSnapshot",
    "ReplicationSettings",
    "RetryPolicy",
    "ShardConfig",
    "Snapshot",
    "StalenessExceeded",
    "Transaction",
    "TransactionRetry",
    "TxnAborted",
    "TxnSettings",
    "Unavailable",
    "UnknownNode",
    "UnknownShard",
    "ValueTooLarge",
    "Version",
    "VersionedStore",
    "WriteResult",
    "WriteTooOld",
]
