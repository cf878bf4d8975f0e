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
    models       load_model: the default SmolLM2 GGUF (dequantized once, cached) or an HF dir
    engine       Engine: a transformers causal LM that loads cached prefixes and prefills the rest
    serve        ServingNode: the engine behind an OpenAI-compatible HTTP API (`k2 serve`)
    demo         `k2 demo`: multi-region chat through the tier; enginebench: `k2 bench engine`
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
from kvtier.engine import (
    Completion,
    Engine,
    EngineConfig,
    HFTokenCodec,
    PrefillCostModel,
    RequestMetrics,
    SamplingParams,
    TokenCodec,
    TokenEvent,
    block_spec_for,
    namespace_for,
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
from kvtier.models import LoadedModel, ModelNotFound, load_model
from kvtier.placement import CostModel, DemandTracker, PlacementPlan, PlacementSweeper
from kvtier.router import HolderSnapshot, Router, RouterConfig, RouterService, RouteScore
from kvtier.serve import ServeConfig, ServingNode, serve_http
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
    "Completion",
    "ConnectorConfig",
    "ConnectorStats",
    "Consistency",
    "CorruptBlock",
    "CostModel",
    "DemandTracker",
    "EmbeddedBroker",
    "Engine",
    "EngineConfig",
    "EventKind",
    "EventPublisher",
    "EventSequencer",
    "EventSubscriber",
    "HFTokenCodec",
    "HolderSnapshot",
    "KVConnector",
    "KVTierError",
    "Layout",
    "LoadedModel",
    "LookupResult",
    "MemoryBlobStore",
    "ModelNotFound",
    "Namespace",
    "NamespaceRecord",
    "PlacementPlan",
    "PlacementSweeper",
    "PrefillCostModel",
    "PublishBlock",
    "QuotaExceeded",
    "RequestMetrics",
    "ResyncRequest",
    "RetrieveResult",
    "RouteScore",
    "Router",
    "RouterConfig",
    "RouterService",
    "SamplingParams",
    "ServeConfig",
    "ServingNode",
    "Session",
    "SessionExpired",
    "SessionInfo",
    "SessionNotFound",
    "SessionStore",
    "SharingNotAllowed",
    "StoreResult",
    "TenantRecord",
    "TokenCodec",
    "TokenEvent",
    "Turn",
    "TurnInput",
    "UnknownNamespace",
    "UnknownTenant",
    "block_hashes",
    "block_spec_for",
    "choose_codec",
    "decode_block",
    "encode_block",
    "load_model",
    "namespace_for",
    "parse_broker_url",
    "serve_blockstore",
    "serve_http",
]
