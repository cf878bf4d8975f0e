"""kvtier: the geo-distributed KV-cache tier (work of the kvtier and engine issues).

Will hold KV-cache blocks keyed by chained content hashes under a namespace (model revision,
tokenizer, dtype, layout, tenant salt), block metadata as transactions in the store, block store
nodes (memory LRU over RocksDB), placement across regions with cost-aware retrieval, sessions,
MQTT events with a cache-aware router, and the local inference engine it feeds.

Layers, bottom up (each module's docstring states its contracts):

    blocks       BlockSpec, Namespace, chained block hashes, the block frame (tensor <-> bytes)
    compression  codecs for wide-area block transfers, chosen by measurement
    blockstore   BlockStore: LRU memory tier over a RocksDB disk tier, checksums, capacity
    blocknode    the block store's gRPC node (`k2 blockstore`) and its client
    metadata     BlockMetadata: block rows, regions, pins, leases, quotas, as K2 transactions
    connector    AsyncKVConnector / KVConnector: lookup, retrieve, store for serving engines
"""

from kvtier.blocknode import BlockNode, BlockStoreClient, serve_blockstore
from kvtier.blocks import (
    HASH_ALGORITHM,
    BlockSpec,
    Layout,
    Namespace,
    block_hashes,
    decode_block,
    encode_block,
)
from kvtier.blockstore import BlockStore, BlockStoreConfig, MemoryBlobStore
from kvtier.broker import EmbeddedBroker, parse_broker_url
from kvtier.compression import CodecChoice, choose_codec
from kvtier.connector import (
    AsyncKVConnector,
    BlockLocation,
    ConnectorConfig,
    ConnectorStats,
    KVConnector,
    LookupResult,
    RetrieveResult,
    StoreResult,
)
from kvtier.errors import (
    BlockSpecMismatch,
    BlockStoreFull,
    BlockStoreUnavailable,
    BlockTooLarge,
    CorruptBlock,
    KVTierError,
    QuotaExceeded,
    SharingNotAllowed,
    UnknownNamespace,
    UnknownTenant,
)
from kvtier.events import (
    BlockEvent,
    EventKind,
    EventPublisher,
    EventSequencer,
    EventSubscriber,
    ResyncRequest,
)
from kvtier.metadata import BlockMetadata, BlockRow, NamespaceRecord, PublishBlock, TenantRecord
from kvtier.placement import CostModel, DemandTracker, PlacementPlan, PlacementSweeper
from kvtier.router import HolderSnapshot, Router, RouterConfig, RouterService, RouteScore
from kvtier.sessions import (
    AppendResult,
    Consistency,
    Session,
    SessionExpired,
    SessionInfo,
    SessionNotFound,
    SessionStore,
    Turn,
    TurnInput,
)

__all__ = [
    "HASH_ALGORITHM",
    "AppendResult",
    "AsyncKVConnector",
    "BlockEvent",
    "BlockLocation",
    "BlockMetadata",
    "BlockNode",
    "BlockRow",
    "BlockSpec",
    "BlockSpecMismatch",
    "BlockStore",
    "BlockStoreClient",
    "BlockStoreConfig",
    "BlockStoreFull",
    "BlockStoreUnavailable",
    "BlockTooLarge",
    "CodecChoice",
    "ConnectorConfig",
    "ConnectorStats",
    "Consistency",
    "CorruptBlock",
    "CostModel",
    "DemandTracker",
    "EmbeddedBroker",
    "EventKind",
    "EventPublisher",
    "EventSequencer",
    "EventSubscriber",
    "HolderSnapshot",
    "KVConnector",
    "KVTierError",
    "Layout",
    "LookupResult",
    "MemoryBlobStore",
    "Namespace",
    "NamespaceRecord",
    "PlacementPlan",
    "PlacementSweeper",
    "PublishBlock",
    "QuotaExceeded",
    "ResyncRequest",
    "RetrieveResult",
    "RouteScore",
    "Router",
    "RouterConfig",
    "RouterService",
    "Session",
    "SessionExpired",
    "SessionInfo",
    "SessionNotFound",
    "SessionStore",
    "SharingNotAllowed",
    "StoreResult",
    "TenantRecord",
    "Turn",
    "TurnInput",
    "UnknownNamespace",
    "UnknownTenant",
    "block_hashes",
    "choose_codec",
    "decode_block",
    "encode_block",
    "parse_broker_url",
    "serve_blockstore",
]
