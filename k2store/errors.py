"""Typed errors of the K2 API, and how they cross the wire.

Every error a caller can act on is a subclass of `K2Error` with two facts attached:

- `retryable`: True when the same request may succeed if sent again (a conflict with a
  concurrent transaction, a node that is restarting, a clock whose uncertainty is momentarily too
  wide). False when it never will (bad input, a read below the retention horizon).
- `reason`: a stable identifier that travels in the gRPC trailing metadata key ``k2-error``, so the
  client re-raises the same type the server raised. The gRPC status code is chosen so that plain
  gRPC tooling also classifies the failure sensibly.

Messages name the key, timestamp and rule involved; they never include values.
"""

from __future__ import annotations

from typing import ClassVar

import grpc

ERROR_METADATA_KEY = "k2-error"


class K2Error(Exception):
    """Base of every error K2 raises to its users."""

    reason: ClassVar[str] = "internal"
    retryable: ClassVar[bool] = False
    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL


class InvalidArgument(K2Error):
    """The request is malformed; nothing was changed."""

    reason = "invalid-argument"
    code = grpc.StatusCode.INVALID_ARGUMENT


class KeyTooLarge(InvalidArgument):
    reason = "key-too-large"


class ValueTooLarge(InvalidArgument):
    reason = "value-too-large"


class UnknownShard(InvalidArgument):
    reason = "unknown-shard"
    code = grpc.StatusCode.NOT_FOUND


class UnknownNode(InvalidArgument):
    reason = "unknown-node"
    code = grpc.StatusCode.NOT_FOUND


class ClusterFileError(InvalidArgument):
    """A cluster file could not be read; the message names the file and the field."""

    reason = "cluster-file"


class BelowHorizon(K2Error):
    """A read asked for a timestamp whose versions were garbage-collected."""

    reason = "below-horizon"
    code = grpc.StatusCode.OUT_OF_RANGE


class Unavailable(K2Error):
    """The node (or the node it needed) cannot serve right now; try again."""

    reason = "unavailable"
    retryable = True
    code = grpc.StatusCode.UNAVAILABLE


class NotLeader(Unavailable):
    """The node does not lead the shard the request was sent for (stale routing)."""

    reason = "not-leader"
    code = grpc.StatusCode.FAILED_PRECONDITION


class ClockUncertain(Unavailable):
    """The node's clock uncertainty exceeds the configured bound: it refuses to order writes."""

    reason = "clock-uncertain"


class DeadlineExceeded(K2Error):
    reason = "deadline-exceeded"
    retryable = True
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class WriteTooOld(K2Error):
    """An MVTO rule rejected a write: a later read or a later version already exists.

    Retrying with a fresh (larger) timestamp succeeds unless the conflict repeats.
    """

    reason = "write-too-old"
    retryable = True
    code = grpc.StatusCode.ABORTED


class DataDirLockedError(K2Error):
    reason = "data-dir-locked"
    code = grpc.StatusCode.FAILED_PRECONDITION


_BY_REASON: dict[str, type[K2Error]] = {}


def _register(cls: type[K2Error]) -> None:
    _BY_REASON[cls.reason] = cls
    for sub in cls.__subclasses__():
        _register(sub)


_register(K2Error)


def error_for(reason: str | None, code: grpc.StatusCode, message: str) -> K2Error:
    """Rebuild the typed error from a failed RPC (client side)."""
    cls = _BY_REASON.get(reason or "")
    if cls is None:
        cls = {
            grpc.StatusCode.UNAVAILABLE: Unavailable,
            grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
            grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
            grpc.StatusCode.RESOURCE_EXHAUSTED: InvalidArgument,
            grpc.StatusCode.ABORTED: WriteTooOld,
            grpc.StatusCode.UNAUTHENTICATED: _BY_REASON.get("unauthenticated"),
            grpc.StatusCode.PERMISSION_DENIED: _BY_REASON.get("permission-denied"),
        }.get(code) or K2Error
    return cls(message)


class TxnAborted(K2Error):
    """The transaction was aborted by a K2-MVTO rule (or its record was aborted) and did nothing.

    Retryable: a new attempt gets a new, larger timestamp. The message names the rule, the key and
    the timestamps involved; `rule` extracts the rule's name.
    """

    reason = "txn-aborted"
    retryable = True
    code = grpc.StatusCode.ABORTED

    @property
    def rule(self) -> str:
        text = str(self)
        marker = "by rule "
        if marker not in text:
            return "unknown"
        return text.split(marker, 1)[1].split(":", 1)[0].split()[0]


class TransactionRetry(TxnAborted):
    """A retryable abort inside a bare `with client.transaction()` block, which cannot re-run its
    body: use `client.run(fn)` or `client.attempts()` to retry automatically."""

    reason = "txn-retry"


class CommitOutcomeUnknown(K2Error):
    """The commit request failed in a way that leaves its outcome unknown (the record may or may
    not be durable). Not retried automatically: re-running the transaction could apply it twice.
    Read back what it wrote to learn the outcome."""

    reason = "commit-unknown"
    code = grpc.StatusCode.UNAVAILABLE

    @classmethod
    def of(cls, txn_id: bytes, ts: int, cause: BaseException) -> CommitOutcomeUnknown:
        """The error for transaction `txn_id`'s commit at `ts`, lost to `cause`."""
        name = txn_id.hex()[:12] or "(begun inline)"
        return cls(
            f"commit of transaction {name} at {ts}: outcome unknown ({cause}); it was not "
            "retried, since that could apply it twice"
        )


_register(TxnAborted)
_register(CommitOutcomeUnknown)


class StalenessExceeded(K2Error):
    """A bounded-staleness read could not be served by replicas in its region within the bound
    (the region is partitioned from a shard's leader, or replication is behind). Not retried,
    and never silently sent to another region: raise the bound, or read fresh from the leader."""

    reason = "staleness-exceeded"
    code = grpc.StatusCode.FAILED_PRECONDITION


class NotVisibleYet(Unavailable):
    """A fresh replica read waited for its timestamp to become visible in the region and the
    deadline passed first (replication from some shard's home region is stalled or cut off)."""

    reason = "not-visible-yet"


_register(StalenessExceeded)
_register(NotVisibleYet)


class Unauthenticated(K2Error):
    """The request carried no valid credentials (no token, an unknown token, or a peer
    certificate that is not a node's on an internal RPC). Nothing was read or changed."""

    reason = "unauthenticated"
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(K2Error):
    """The caller is known but may not do this: a key outside its tenant, an admin RPC without
    the admin role, an internal RPC from a client. The message never names other tenants."""

    reason = "permission-denied"
    code = grpc.StatusCode.PERMISSION_DENIED


class RateLimited(K2Error):
    """The principal exceeded its request rate ([security] rate_limit_rps); retry after a pause."""

    reason = "rate-limited"
    retryable = True
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


_register(Unauthenticated)
_register(PermissionDenied)
_register(RateLimited)
