"""Typed errors of the KV-cache tier.

They extend the K2 hierarchy (`k2store.errors`), so callers handle one family: bad input is an
`InvalidArgument` (terminal: nothing was stored), a block store that cannot answer is
`Unavailable` (retryable, and the connector turns it into a cache miss), a quota that would be
exceeded is terminal until space is freed. Messages name the namespace, block hash and rule.
"""

from __future__ import annotations

import grpc

from k2store.errors import InvalidArgument, K2Error, Unavailable, _register

__all__ = [
    "BlockSpecMismatch",
    "BlockStoreFull",
    "BlockStoreUnavailable",
    "BlockTooLarge",
    "CorruptBlock",
    "KVTierError",
    "QuotaExceeded",
    "SharingNotAllowed",
    "UnknownNamespace",
    "UnknownTenant",
]


class KVTierError(K2Error):
    """Base of errors that only the KV-cache tier raises."""

    reason = "kvtier"


class BlockSpecMismatch(InvalidArgument):
    """A tensor or a serialized block does not match the block spec (shape, dtype or layout)."""

    reason = "kv-block-spec"


class BlockTooLarge(InvalidArgument):
    """A block is larger than the configured maximum block size; nothing was stored."""

    reason = "kv-block-too-large"


class UnknownNamespace(InvalidArgument):
    """The namespace (model revision, tokenizer, spec, tenant) is not registered in the store."""

    reason = "kv-unknown-namespace"
    code = grpc.StatusCode.NOT_FOUND


class UnknownTenant(InvalidArgument):
    reason = "kv-unknown-tenant"
    code = grpc.StatusCode.NOT_FOUND


class SharingNotAllowed(InvalidArgument):
    """A cross-tenant namespace was asked for by a tenant that has not opted in to sharing."""

    reason = "kv-sharing-not-allowed"
    code = grpc.StatusCode.PERMISSION_DENIED


class QuotaExceeded(KVTierError):
    """Publishing would take the tenant over its quota; the publish transaction did nothing."""

    reason = "kv-quota-exceeded"
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class BlockStoreFull(KVTierError):
    """A block store cannot make room: every block it could evict is protected (pinned or
    leased). Nothing was stored."""

    reason = "kv-blockstore-full"
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class CorruptBlock(KVTierError):
    """A block's bytes fail their checksum or header check. Readers treat it as a miss."""

    reason = "kv-corrupt-block"
    code = grpc.StatusCode.DATA_LOSS


class BlockStoreUnavailable(Unavailable):
    """A block store node did not answer (down, partitioned, or past the deadline)."""

    reason = "kv-blockstore-unavailable"


# Make the new reasons known to `error_for`, so they survive a trip over gRPC.
_register(K2Error)
