"""kvtier: the geo-distributed KV-cache tier (work of the kvtier and engine issues).

Will hold KV-cache blocks keyed by chained content hashes under a namespace (model revision,
tokenizer, dtype, layout, tenant salt), block metadata as transactions in the store, block store
nodes (memory LRU over RocksDB), placement across regions with cost-aware retrieval, sessions,
MQTT events with a cache-aware router, and the local inference engine it feeds.
"""
