"""The K2 client: `AsyncClient` for asyncio code, `Client` for everything else.

The client reads the cluster's shard map (from a cluster file, or from any node's ClusterInfo),
routes each key to its shard's leader, puts a deadline on every call, and retries what is safe to
retry (an unavailable or restarting node, a clock momentarily too uncertain, a write that lost an
MVTO race and needs a fresh timestamp) with bounded exponential backoff and jitter. Everything else
surfaces as a typed `K2Error` (see k2store/errors.py) naming the key and the rule.

Keys and values are bytes; `str` keys are encoded as UTF-8 for convenience.

    with Client.connect("k2-data/cluster.toml") as c:
        c.put("us-east/user/1", b"alice")
        c.get("us-east/user/1")            # b"alice"
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import threading
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import grpc

from k2store import cluster as cluster_mod
from k2store import evloop
from k2store.cluster import ClusterConfig, ClusterSettings, NodeConfig, RegionConfig, ShardConfig
from k2store.errors import (
    CommitOutcomeUnknown,
    InvalidArgument,
    K2Error,
    TransactionRetry,
    TxnAborted,
    Unavailable,
)
from k2store.proto import k2_pb2 as pb
from k2store.security import SecuritySettings, bearer_metadata, client_token
from k2store.transport import (
    CHANNEL_OPTIONS,
    Transport,
    cluster_transport,
    rpc_error_to_k2,
)
from truetime import ClockSource, SystemClock, TrueTime, UncertaintyExceeded

T = TypeVar("T")
K = "/k2.v1.K2/"
KeyLike = bytes | str


@dataclass(frozen=True, slots=True)
class ReadResult:
    value: bytes | None
    version_ts: int
    """Commit timestamp of the version read (0 when the key has no live value)."""
    read_ts: int
    served_by: str


@dataclass(frozen=True, slots=True)
class WriteResult:
    commit_ts: int
    served_by: str
    existed: bool = False
    """For deletes: whether the key had a live value."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 6
    initial_backoff_s: float = 0.02
    max_backoff_s: float = 1.0


def _key(k: KeyLike, what: str = "key") -> bytes:
    if isinstance(k, bytes):
        return k
    if isinstance(k, str):
        return k.encode()
    raise TypeError(f"{what} must be bytes or str, not {type(k).__name__}")


def _value(v: bytes | bytearray | memoryview) -> bytes:
    if isinstance(v, bytes):
        return v
    if isinstance(v, bytearray | memoryview):
        return bytes(v)
    raise TypeError(f"value must be bytes, not {type(v).__name__}")


class AsyncClient:
    transaction_type: ClassVar[type[AsyncTransaction]]
    """What `begin` makes (AsyncTransaction; a subclass may watch its transactions)."""

    def __init__(
        self,
        cluster: ClusterConfig,
        *,
        timeout_s: float | None = None,
        retry: RetryPolicy | None = None,
        region: str | None = None,
        transport: Transport | None = None,
        rng: random.Random | None = None,
        token: str | None = None,
        truetime: TrueTime | None = None,
    ) -> None:
        """`region`: where this client runs; its transactions are coordinated by a node there
        (default: the first region of the cluster). `transport` and `rng` (backoff jitter) are
        injectable: the deterministic simulator passes its network and a seeded generator.
        `token`: the bearer token for a secured cluster (default: K2_TOKEN, K2_TOKEN_FILE, or
        the cluster file's `[security] client_token_file`; see k2store/security.py).

        `truetime`: client time, for a client whose clock is held to the cluster's bound (one
        embedded in a serving node, on the node's host: `client_truetime(cluster)`). On a
        K2-MVTO cluster its transactions are then stamped with the client's `now().latest` when
        their first operation is sent, and the client waits out the commit-wait itself, so the
        wait runs during the round trip instead of after it: a local transaction costs one
        round trip, not one round trip plus twice the clock uncertainty. HAZARD: with this
        clock off by more than the bound, a transaction that begins after another committed
        can get a smaller timestamp (it misses that commit), and commits are reported before
        their timestamp has passed. A clock whose uncertainty is above the bound is not used
        (the coordinator stamps and waits, as without client time)."""
        self.cluster = cluster
        self.tt = truetime
        self.region = region or cluster.regions[0].name
        self._coordinators = [n.name for n in cluster.nodes_in(self.region)]
        if not self._coordinators:
            raise InvalidArgument(f"region {self.region!r} has no nodes")
        self._next_coordinator = 0
        self.timeout_s = timeout_s or cluster.settings.request_timeout_s
        self.retry = retry or RetryPolicy()
        # Pays the cluster's wide-area emulation, if any, from this client's region.
        self._transport: Transport = transport or cluster_transport(
            cluster, region=self.region, token=token
        )
        self.token = token
        """The bearer token given at construction (None: the defaults above); clients of other
        services of the cluster (the KV tier's block stores) present the same identity."""
        self._rng = rng or random.Random()
        self.retries = 0
        """Attempts retried after a retryable error (a metric for callers and tests)."""

    @classmethod
    async def connect(cls, target: str | Path | ClusterConfig, **kw: Any) -> AsyncClient:
        """`target`: a ClusterConfig, a cluster file path, or a node's host:port."""
        if isinstance(target, ClusterConfig):
            return cls(target, **kw)
        s = str(target)
        if Path(s).exists() or s.endswith(".toml"):
            return cls(cluster_mod.load(s), **kw)
        # An address: `security` (settings of a secured cluster) is for the discovery call.
        cfg = await fetch_cluster_info(s, security=kw.pop("security", None), token=kw.get("token"))
        return cls(cfg, **kw)

    async def close(self) -> None:
        await self._transport.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- retries -------------------------------------------------------------------------------

    async def _with_retry(self, attempt: Callable[[], Awaitable[T]]) -> T:
        backoff = self.retry.initial_backoff_s
        for i in range(self.retry.max_attempts):
            try:
                return await attempt()
            except K2Error as e:
                if not e.retryable or i == self.retry.max_attempts - 1:
                    raise
                self.retries += 1
                await asyncio.sleep(backoff * (0.5 + self._rng.random()))
                backoff = min(backoff * 2, self.retry.max_backoff_s)
        raise AssertionError("unreachable")

    async def _call(
        self, node: str, method: str, request: Any, response_type: type[T], service: str = "K2"
    ) -> T:
        result: T = await self._transport.call(
            node, f"/k2.v1.{service}/{method}", request, response_type, timeout_s=self.timeout_s
        )  # type: ignore[type-var]
        return result

    def _route(self, key: bytes, via: str | None) -> str:
        if via is not None:
            self.cluster.node(via)  # UnknownNode on a typo, before anything is sent
            return via
        return self.cluster.shard_for_key(key).leader

    # -- operations ----------------------------------------------------------------------------

    async def get(
        self, key: KeyLike, *, at_ts: int | None = None, via: str | None = None
    ) -> bytes | None:
        return (await self.get_versioned(key, at_ts=at_ts, via=via)).value

    async def get_versioned(
        self, key: KeyLike, *, at_ts: int | None = None, via: str | None = None
    ) -> ReadResult:
        """Read key at `at_ts` (default: the latest committed value). `via` sends the request to a
        named node, which forwards it to the leader when it is not the leader itself."""
        k = _key(key)
        node = self._route(k, via)
        req = pb.GetRequest(key=k, at_ts=at_ts or 0)
        r = await self._with_retry(lambda: self._call(node, "Get", req, pb.GetResponse))
        return ReadResult(r.value if r.found else None, r.version_ts, r.read_ts, r.served_by)

    async def put(self, key: KeyLike, value: bytes, *, via: str | None = None) -> WriteResult:
        k, v = _key(key), _value(value)
        node = self._route(k, via)
        req = pb.PutRequest(key=k, value=v)
        r = await self._with_retry(lambda: self._call(node, "Put", req, pb.PutResponse))
        return WriteResult(r.commit_ts, r.served_by)

    async def delete(self, key: KeyLike, *, via: str | None = None) -> WriteResult:
        k = _key(key)
        node = self._route(k, via)
        req = pb.DeleteRequest(key=k)
        r = await self._with_retry(lambda: self._call(node, "Delete", req, pb.DeleteResponse))
        return WriteResult(r.commit_ts, r.served_by, existed=r.existed)

    async def scan(
        self,
        start: KeyLike = b"",
        end: KeyLike | None = None,
        *,
        limit: int | None = None,
        at_ts: int | None = None,
    ) -> list[tuple[bytes, bytes]]:
        """Live keys in [start, end) in key order, all read at one timestamp (one snapshot)."""
        return [
            (k, v) for k, v, _ in await self.scan_versioned(start, end, limit=limit, at_ts=at_ts)
        ]

    async def scan_versioned(
        self,
        start: KeyLike = b"",
        end: KeyLike | None = None,
        *,
        limit: int | None = None,
        at_ts: int | None = None,
    ) -> list[tuple[bytes, bytes, int]]:
        s = _key(start, "start")
        e = None if end is None else _key(end, "end")
        if limit is not None and limit <= 0:
            raise InvalidArgument(f"scan limit must be positive, got {limit}")
        if e is not None and e <= s:
            raise InvalidArgument(f"scan end {e!r} must sort after start {s!r}")
        ts = at_ts or 0
        out: list[tuple[bytes, bytes, int]] = []
        hashed = self.cluster.settings.partitioning == "hash"
        for shard in self.cluster.shards_for_range(s, e):
            lo = s if hashed else max(s, shard.start)
            hi = e if hashed else _min_end(e, shard.end)
            while True:
                want = 0 if limit is None else (limit if hashed else limit - len(out))
                req = pb.ScanRequest(
                    start=lo,
                    end=hi or b"",
                    has_end=hi is not None,
                    limit=want,
                    at_ts=ts,
                    shard_id=shard.id,
                )
                r = await self._with_retry(
                    functools.partial(self._call, shard.leader, "Scan", req, pb.ScanResponse)
                )
                ts = ts or r.read_ts  # the first answer fixes the snapshot for the rest
                out.extend((kv.key, kv.value, kv.version_ts) for kv in r.items)
                if not r.more or (limit is not None and not hashed and len(out) >= limit):
                    break
                lo = r.resume_key
            if limit is not None and not hashed and len(out) >= limit:
                break
        if hashed:
            out.sort(key=lambda row: row[0])
        return out[:limit] if limit is not None else out

    # -- transactions ------------------------------------------------------------------------

    def _pick_coordinator(self) -> str:
        """The next coordinator in this client's region, round robin."""
        node = self._coordinators[self._next_coordinator % len(self._coordinators)]
        self._next_coordinator += 1
        return node

    async def begin(
        self, *, read_only: bool = False, keys: Sequence[KeyLike] = (), inline: bool = False
    ) -> AsyncTransaction:
        """Start a transaction at a coordinator in this client's region. Prefer `run(fn)`,
        which also retries; a transaction begun here must be committed or aborted.

        `inline`: send nothing yet; the transaction begins with its first operation, in that
        operation's round trip (as Spanner's clients begin inside the first statement), so its
        `txn_id` and `ts` are unset (empty, 0) until then. `run` begins this way."""
        node = self._pick_coordinator()
        req = pb.BeginTxnRequest(read_only=read_only, keys=[_key(k) for k in keys])
        if inline:
            return self.transaction_type(self, node, b"", 0, read_only, begin=req)
        self._client_time(req, stamp=False)  # begun now, used later: the coordinator stamps
        r = await self._with_retry(lambda: self._call(node, "BeginTxn", req, pb.BeginTxnResponse))
        return self.transaction_type(self, node, r.txn_id, r.ts, read_only)

    def _client_time(self, req: pb.BeginTxnRequest, *, stamp: bool) -> None:
        """With client time (see `__init__`): ask to wait out the commit-wait here, and with
        `stamp` (the request also carries the first operations) give this clock's
        `now().latest` as the timestamp's floor. Without it, or with this clock too uncertain,
        clear both: the coordinator stamps and waits."""
        req.client_ts, req.client_waits = 0, False
        if self.tt is None:
            return
        try:
            now = self.tt.checked_now()
        except UncertaintyExceeded:
            return
        req.client_waits = True
        if stamp:
            req.client_ts = now.latest

    async def _wait_out(self, wait_until: int) -> None:
        """The commit-wait of a transaction begun with client time: return once `wait_until`
        has certainly passed on this client's clock."""
        if not wait_until:
            return
        # Only a request that asked to wait here (client_waits, sent only with a clock) gets
        # a wait_until back. Not an error to raise: the transaction has committed, and a
        # retryable error would have `run` commit it again.
        assert self.tt is not None, "wait_until in reply to a request without client_waits"
        # HAZARD (client time): see __init__; with this clock beyond its bound the commit is
        # reported before its timestamp has certainly passed.
        await self.tt.wait_until_after(wait_until)

    async def read_many(self, keys: Sequence[KeyLike]) -> list[bytes | None]:
        """The values of keys (None: absent) in one consistent snapshot at a fresh timestamp: a
        one-shot read-only transaction, run by a coordinator in this client's region in one
        round trip (begin, read and commit there) instead of three. It waits on lower intents
        and returns only once what it read has certainly passed, like `run(..., read_only=True)`
        reading the same keys. With client time the snapshot is this client's `now().latest` at
        the send and that last wait is this client's (BeginTxnResponse.wait_until)."""
        if not keys:
            return []
        node = self._pick_coordinator()
        req = pb.BeginTxnRequest(read_only=True, read_keys=[_key(k) for k in keys])

        async def attempt() -> pb.BeginTxnResponse:
            self._client_time(req, stamp=True)  # each attempt stamped at its own send
            return await self._call(node, "BeginTxn", req, pb.BeginTxnResponse)

        r = await self._with_retry(attempt)
        await self._wait_out(r.wait_until)
        if len(r.results) != len(keys):
            raise Unavailable(
                f"coordinator {node} answered {len(r.results)} values for {len(keys)} keys "
                "(a node without one-shot read-only transactions?)"
            )
        return [x.value if x.found else None for x in r.results]

    def replica_snapshot(
        self, *, fresh: bool = False, max_staleness: float | None = None, min_ts: int = 0
    ) -> ReplicaSnapshot:
        """A read-only snapshot served by replicas in this client's region (see
        `ReplicaSnapshot`): at the region's visible timestamp by default, or at `min_ts` if
        that is later (waiting until it is visible: read-your-writes after a commit at
        min_ts); `fresh=True` reads at now().latest (waiting until it is visible there);
        `max_staleness` (seconds) refuses to read older than that rather than go to another
        region."""
        return ReplicaSnapshot(self, fresh=fresh, max_staleness_s=max_staleness, min_ts=min_ts)

    async def run(
        self,
        fn: Callable[[AsyncTransaction], Awaitable[T]],
        *,
        read_only: bool = False,
        max_attempts: int | None = None,
        keys: Sequence[KeyLike] = (),
    ) -> T:
        """Run `fn(tx)` in a transaction and commit it; `keys` (optional) names the keys it
        will touch, which lets a transaction that reaches other regions use a future timestamp.
        On a retryable abort, run it again in a new transaction (new timestamp) with backoff, up
        to `max_attempts`. Returns fn's result.
        fn must be safe to run more than once (only its last, committed run takes effect)."""
        attempts = max_attempts or self.retry.max_attempts
        backoff = self.retry.initial_backoff_s
        for i in range(attempts):
            tx = await self.begin(read_only=read_only, keys=keys, inline=True)
            try:
                result = await fn(tx)
                await tx.commit()
                return result
            except K2Error as e:
                await tx.abort()
                if not e.retryable or i == attempts - 1:
                    raise
                self.retries += 1
                await asyncio.sleep(backoff * (0.5 + self._rng.random()))
                backoff = min(backoff * 2, self.retry.max_backoff_s)
            except BaseException:
                await tx.abort()
                raise
        raise AssertionError("unreachable")

    def transaction(self, *, read_only: bool = False) -> _TxnContext:
        """`async with client.transaction() as tx:` commits on success and aborts on error. It
        cannot re-run its body: a retryable abort surfaces as TransactionRetry (use `run`)."""
        return _TxnContext(self, read_only)


class ReplicaSnapshot:
    """Reads at one timestamp from replicas in the client's region: no wide-area round trip.

    The first read fixes the timestamp (the region's visible timestamp, or for `fresh` reads
    now().latest once it is visible); every later read of the snapshot uses it, so several reads
    see one consistent state and a multi-shard transaction wholly or not at all. Nothing to
    commit: replica reads set no read marks and never block writers.

    Errors: `StalenessExceeded` when the region's replicas are further behind than
    `max_staleness_s` (never sent to another region instead); `NotVisibleYet` when a fresh read's
    timestamp did not become visible within the deadline (replication is cut off).
    """

    def __init__(
        self,
        client: AsyncClient,
        *,
        fresh: bool = False,
        max_staleness_s: float | None = None,
        min_ts: int = 0,
    ) -> None:
        if fresh and max_staleness_s is not None:
            raise InvalidArgument("a read is either fresh or bounded-staleness, not both")
        if max_staleness_s is not None and max_staleness_s < 0:
            raise InvalidArgument(f"max_staleness must be >= 0 s, got {max_staleness_s}")
        self._client = client
        self.fresh = fresh
        self.max_staleness_s = max_staleness_s
        self.min_ts = min_ts
        """Read at no lower timestamp than this (e.g. the caller's last commit: read-your-writes)."""
        self.ts = 0
        """The snapshot's timestamp (0 until the first read)."""
        self.served_by: set[str] = set()

    def _request(self, **kw: Any) -> pb.ReplicaReadRequest:
        req = pb.ReplicaReadRequest(at_ts=self.ts, **kw)
        if not self.ts:
            if self.fresh:
                req.mode = pb.READ_FRESH
            elif self.max_staleness_s is not None:
                req.mode = pb.READ_BOUNDED
                req.max_staleness_ns = int(self.max_staleness_s * 1e9)
            else:
                req.min_ts = self.min_ts
        return req

    async def _read(self, req: pb.ReplicaReadRequest) -> pb.ReplicaReadResponse:
        c = self._client
        node = c._pick_coordinator()
        r: pb.ReplicaReadResponse = await c._with_retry(
            lambda: c._call(node, "ReplicaRead", req, pb.ReplicaReadResponse, service="Replication")
        )
        self.ts = self.ts or r.read_ts
        self.served_by.add(r.served_by)
        return r

    async def get(self, key: KeyLike) -> bytes | None:
        return (await self.get_many([key]))[0]

    async def get_many(self, keys: Sequence[KeyLike]) -> list[bytes | None]:
        r = await self._read(self._request(keys=[_key(k) for k in keys]))
        return [x.value if x.found else None for x in r.results]

    async def scan(
        self, start: KeyLike = b"", end: KeyLike | None = None, *, limit: int | None = None
    ) -> list[tuple[bytes, bytes]]:
        """Live keys in [start, end) at the snapshot's timestamp, shard by shard."""
        cfg = self._client.cluster
        s = _key(start, "start")
        e = None if end is None else _key(end, "end")
        if limit is not None and limit <= 0:
            raise InvalidArgument(f"scan limit must be positive, got {limit}")
        if e is not None and e <= s:
            raise InvalidArgument(f"scan end {e!r} must sort after start {s!r}")
        if cfg.settings.partitioning == "hash":
            raise InvalidArgument("replica scans need range partitioning")
        out: list[tuple[bytes, bytes]] = []
        for shard in cfg.shards_for_range(s, e):
            lo, hi = max(s, shard.start), _min_end(e, shard.end)
            while True:
                want = 0 if limit is None else limit - len(out)
                req = self._request(
                    has_scan=True,
                    scan_start=lo,
                    scan_end=hi or b"",
                    scan_has_end=hi is not None,
                    scan_limit=want,
                )
                r = await self._read(req)
                out.extend((kv.key, kv.value) for kv in r.items)
                if not r.more or not r.items or (limit is not None and len(out) >= limit):
                    break
                lo = r.items[-1].key + b"\x00"
            if limit is not None and len(out) >= limit:
                break
        return out[:limit] if limit is not None else out


class AsyncTransaction:
    """One transaction: every read and write happens at its timestamp `ts`.

    Writes are sent at once (early writes), so a conflict surfaces at the operation that meets
    it. `batch` sends several independent operations to their shards in one parallel round.
    """

    def __init__(
        self,
        client: AsyncClient,
        coordinator: str,
        txn_id: bytes,
        ts: int,
        read_only: bool,
        *,
        begin: pb.BeginTxnRequest | None = None,
    ) -> None:
        """`begin`: not begun yet; the first operation begins it (`AsyncClient.begin(inline=...)`)."""
        self._client = client
        self.coordinator = coordinator
        self.txn_id = txn_id
        self.ts = ts
        self.read_only = read_only
        self.commit_ts: int | None = None
        self._ended = False
        self._begin = begin
        self._beginning = asyncio.Lock()
        """Held by the operation that carries the begin: others wait for the transaction's id."""

    async def _ops(self, ops: list[pb.TxnOp], commit: bool = False) -> list[pb.TxnOpResult]:
        if self._begin is not None:
            async with self._beginning:
                if self._begin is not None:
                    return await self._send(ops, self._begin, commit)
        return await self._send(ops, None, commit)

    async def _send(
        self, ops: list[pb.TxnOp], begin: pb.BeginTxnRequest | None, commit: bool
    ) -> list[pb.TxnOpResult]:
        if self._ended:
            raise InvalidArgument("the transaction has already ended")
        req = pb.TxnOpsRequest(txn_id=self.txn_id, ops=ops, commit=commit)
        if begin is not None:
            req.begin.CopyFrom(begin)
            self._client._client_time(req.begin, stamp=True)
        try:
            r = await self._client._call(self.coordinator, "TxnOps", req, pb.TxnOpsResponse)
        except TxnAborted:
            self._ended = True  # the coordinator aborted it
            raise
        except K2Error as e:
            # Retryable: the coordinator aborted it, or, with commit, perhaps committed it (the
            # coordinator turns its ops' other retryable errors into aborts, so a retryable
            # error here is the wire's: the request may have run). Otherwise it stays open; if
            # this call was to begin it, the coordinator ended what it began and the next
            # operation begins.
            if e.retryable or isinstance(e, CommitOutcomeUnknown):
                self._ended = True
            if commit and e.retryable:
                raise CommitOutcomeUnknown.of(self.txn_id, self.ts, e) from e
            raise
        if begin is not None:
            self.txn_id, self._begin = r.txn_id, None
        self.ts = r.ts or self.ts  # final from the first operation on (late stamping)
        if commit:
            self._ended = True
            await self._client._wait_out(r.wait_until)
            self.commit_ts = r.commit_ts
        return list(r.results)

    async def _begin_now(self) -> None:
        """Begin a transaction that has had no operation (to commit it: it gets a timestamp)."""
        if self._begin is None:
            return
        begin, c = self._begin, self._client
        c._client_time(begin, stamp=False)
        r = await c._with_retry(
            lambda: c._call(self.coordinator, "BeginTxn", begin, pb.BeginTxnResponse)
        )
        self.txn_id, self.ts, self._begin = r.txn_id, r.ts, None

    async def get(self, key: KeyLike, *, for_update: bool = False) -> bytes | None:
        """The value of key at this transaction's timestamp (None: absent). `for_update`: see
        `get_many`."""
        (r,) = await self._ops([pb.TxnOp(kind=pb.OP_GET, key=_key(key), for_update=for_update)])
        return r.value if r.found else None

    async def get_many(
        self, keys: list[KeyLike], *, for_update: bool | Sequence[bool] = False
    ) -> list[bytes | None]:
        """Read several keys in one parallel round. `for_update` (all keys, or one flag per
        key): this transaction will write the key (a read-modify-write, SQL's SELECT ... FOR
        UPDATE). Its leader then lets later transactions read the key only after that write, so
        they cannot read it under the coming write and abort it (d2PL-TTC locks it exclusively
        at once). Only timing changes; results are the same."""
        flags = [for_update] * len(keys) if isinstance(for_update, bool) else list(for_update)
        if len(flags) != len(keys):
            raise InvalidArgument(f"for_update has {len(flags)} flags for {len(keys)} keys")
        rs = await self._ops(
            [
                pb.TxnOp(kind=pb.OP_GET, key=_key(k), for_update=f)
                for k, f in zip(keys, flags, strict=True)
            ]
        )
        return [r.value if r.found else None for r in rs]

    async def put(self, key: KeyLike, value: bytes) -> None:
        await self._ops([pb.TxnOp(kind=pb.OP_PUT, key=_key(key), value=_value(value))])

    async def delete(self, key: KeyLike) -> None:
        await self._ops([pb.TxnOp(kind=pb.OP_DELETE, key=_key(key))])

    async def put_many(self, items: dict[KeyLike, bytes | None], *, commit: bool = False) -> None:
        """Write (None deletes) several keys in one parallel round. `commit`: these are the
        transaction's last operations; commit it in the same round trip (see `batch`)."""
        await self._ops(
            [
                pb.TxnOp(kind=pb.OP_PUT, key=_key(k), value=_value(v))
                if v is not None
                else pb.TxnOp(kind=pb.OP_DELETE, key=_key(k))
                for k, v in items.items()
            ],
            commit,
        )

    async def batch(
        self,
        reads: Sequence[KeyLike],
        writes: Mapping[KeyLike, bytes | None],
        *,
        commit: bool = False,
    ) -> list[bytes | None]:
        """Reads and writes that do not depend on each other, in ONE parallel round (one-shot
        dispatch): each shard reads its keys and lays down its intents in the same step, so a
        read-modify-write of a hot key leaves no window for another transaction's read between
        the read and the write (which would abort the write by rule read-mark). Returns the
        values read (before this batch's writes).

        `commit`: these are the transaction's last operations; the coordinator commits it as
        soon as they succeed, in the same round trip (CockroachDB's one-phase commit of a
        transaction's final batch), and `commit()` then only returns the commit timestamp.
        Raises TxnAborted (nothing committed) or CommitOutcomeUnknown (the reply was lost)."""
        ops = [pb.TxnOp(kind=pb.OP_GET, key=_key(k)) for k in reads]
        ops += [
            pb.TxnOp(kind=pb.OP_PUT, key=_key(k), value=_value(v))
            if v is not None
            else pb.TxnOp(kind=pb.OP_DELETE, key=_key(k))
            for k, v in writes.items()
        ]
        rs = await self._ops(ops, commit)
        return [r.value if r.found else None for r in rs[: len(reads)]]

    async def scan(
        self, start: KeyLike = b"", end: KeyLike | None = None, *, limit: int = 1000
    ) -> list[tuple[bytes, bytes]]:
        e = None if end is None else _key(end, "end")
        (r,) = await self._ops(
            [
                pb.TxnOp(
                    kind=pb.OP_SCAN,
                    key=_key(start, "start"),
                    end=e or b"",
                    has_end=e is not None,
                    limit=limit,
                )
            ]
        )
        return [(kv.key, kv.value) for kv in r.items]

    async def commit(self) -> int:
        """Commit; returns the commit timestamp. Raises TxnAborted (retryable) if it lost.
        After operations sent with `commit=True` it only returns their commit timestamp."""
        if self.commit_ts is not None:
            return self.commit_ts
        if self._ended:
            raise InvalidArgument("the transaction has already ended")
        await self._begin_now()
        self._ended = True
        req = pb.CommitTxnRequest(txn_id=self.txn_id)
        try:
            r = await self._client._call(self.coordinator, "CommitTxn", req, pb.CommitTxnResponse)
        except TxnAborted:
            raise
        except K2Error as e:
            if not e.retryable:
                raise
            raise CommitOutcomeUnknown.of(self.txn_id, self.ts, e) from e
        await self._client._wait_out(r.wait_until)
        self.commit_ts = r.commit_ts
        return r.commit_ts

    async def abort(self) -> None:
        """Abort (best effort, idempotent): nothing the transaction wrote becomes visible."""
        if self._ended:
            return
        self._ended = True
        if self._begin is not None:
            return  # never begun: the coordinator holds nothing of it
        with contextlib.suppress(K2Error):
            await self._client._call(
                self.coordinator,
                "AbortTxn",
                pb.AbortTxnRequest(txn_id=self.txn_id),
                pb.AbortTxnResponse,
            )


AsyncClient.transaction_type = AsyncTransaction


class _TxnContext:
    def __init__(self, client: AsyncClient, read_only: bool) -> None:
        self._client = client
        self._read_only = read_only
        self._tx: AsyncTransaction | None = None

    async def __aenter__(self) -> AsyncTransaction:
        self._tx = await self._client.begin(read_only=self._read_only)
        return self._tx

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        assert self._tx is not None
        if exc is not None:
            await self._tx.abort()
            if isinstance(exc, K2Error) and exc.retryable and not isinstance(exc, TransactionRetry):
                raise _retry_error(exc) from exc
            return
        try:
            await self._tx.commit()
        except K2Error as e:
            if e.retryable:
                raise _retry_error(e) from e
            raise


def _retry_error(e: K2Error) -> TransactionRetry:
    return TransactionRetry(
        f"{e} -- this transaction must be retried, but a `with client.transaction()` block "
        "cannot re-run its body: use client.run(fn), which retries"
    )


def _min_end(a: bytes | None, b: bytes | None) -> bytes | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def client_truetime(cluster: ClusterConfig, clock: ClockSource | None = None) -> TrueTime:
    """Client time for `AsyncClient(truetime=...)`: `clock` (default: this host's) with the
    cluster's uncertainty floor and bound, as the cluster's nodes read theirs. Only for a client
    whose clock is held to that bound (see AsyncClient)."""
    st = cluster.settings
    return TrueTime(clock or SystemClock(), st.epsilon_us * 1000, st.max_uncertainty_us * 1000)


async def fetch_cluster_info(
    address: str,
    timeout_s: float = 5.0,
    *,
    security: SecuritySettings | None = None,
    token: str | None = None,
) -> ClusterConfig:
    """Build a ClusterConfig from a live node's ClusterInfo (no cluster file needed).

    For a secured cluster pass its client-side `security` (`k2store.certs.client_security`
    makes them from a certificates directory): the call then goes over mutual TLS with a bearer
    token (`token`, else K2_TOKEN, K2_TOKEN_FILE or the settings' token file), and the returned
    config carries `security`, so clients built from it are secured too. Without credentials a
    secured node refuses the call: Unavailable (no TLS) or Unauthenticated (no valid token)."""
    sec = security or SecuritySettings()
    metadata: tuple[tuple[str, str], ...] = ()
    if sec.tls:
        from k2store.certs import channel_credentials

        channel = grpc.aio.secure_channel(
            address, channel_credentials(sec, None), options=CHANNEL_OPTIONS
        )
        tok = client_token(sec, token)
        metadata = bearer_metadata(tok) if tok else ()
    else:
        channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    async with channel as ch:
        stub: Any = ch.unary_unary(
            K + "ClusterInfo",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.ClusterInfoResponse.FromString,
        )
        try:
            info: pb.ClusterInfoResponse = await stub(
                pb.ClusterInfoRequest(), timeout=timeout_s, metadata=metadata or None
            )
        except grpc.aio.AioRpcError as e:
            raise rpc_error_to_k2(e, address) from None
    regions: dict[str, str] = {}
    for n in info.nodes:
        regions.setdefault(n.region, n.name)
    shards = tuple(
        ShardConfig(s.id, s.start, s.end if s.has_end else None, s.home_region, s.leader)
        for s in info.shards
    )
    return ClusterConfig(
        settings=ClusterSettings(
            name=info.cluster_name,
            partitioning=info.partitioning,
            max_key_bytes=info.max_key_bytes,
            max_value_bytes=info.max_value_bytes,
            security=sec,
        ),
        regions=tuple(RegionConfig(r, o) for r, o in regions.items()),
        nodes=tuple(NodeConfig(n.name, n.region, n.address, Path()) for n in info.nodes),
        shards=shards,
        _range_starts=tuple(s.start for s in shards),
    )


class Client:
    """Synchronous facade over `AsyncClient`; runs its own event loop on a daemon thread.

    Safe to share between threads. Close it (or use `with`) to stop the thread.
    """

    def __init__(self, cluster: ClusterConfig, **kw: Any) -> None:
        self._loop = evloop.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="k2-client", daemon=True
        )
        self._thread.start()
        self._async: AsyncClient = self._run(_make_async(cluster, kw))

    @classmethod
    def connect(cls, target: str | Path | ClusterConfig, **kw: Any) -> Client:
        if isinstance(target, ClusterConfig):
            return cls(target, **kw)
        s = str(target)
        if Path(s).exists() or s.endswith(".toml"):
            return cls(cluster_mod.load(s), **kw)
        loop = evloop.new_event_loop()
        try:
            cfg = loop.run_until_complete(
                fetch_cluster_info(s, security=kw.pop("security", None), token=kw.get("token"))
            )
        finally:
            loop.close()
        return cls(cfg, **kw)

    @property
    def cluster(self) -> ClusterConfig:
        return self._async.cluster

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if not self._thread.is_alive():
            coro.close()
            raise Unavailable("client is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def get(
        self, key: KeyLike, *, at_ts: int | None = None, via: str | None = None
    ) -> bytes | None:
        return self._run(self._async.get(key, at_ts=at_ts, via=via))

    def get_versioned(
        self, key: KeyLike, *, at_ts: int | None = None, via: str | None = None
    ) -> ReadResult:
        return self._run(self._async.get_versioned(key, at_ts=at_ts, via=via))

    def put(self, key: KeyLike, value: bytes, *, via: str | None = None) -> WriteResult:
        return self._run(self._async.put(key, value, via=via))

    def delete(self, key: KeyLike, *, via: str | None = None) -> WriteResult:
        return self._run(self._async.delete(key, via=via))

    def scan(
        self,
        start: KeyLike = b"",
        end: KeyLike | None = None,
        *,
        limit: int | None = None,
        at_ts: int | None = None,
    ) -> list[tuple[bytes, bytes]]:
        return self._run(self._async.scan(start, end, limit=limit, at_ts=at_ts))

    def replica_snapshot(
        self, *, fresh: bool = False, max_staleness: float | None = None
    ) -> Snapshot:
        """See AsyncClient.replica_snapshot."""
        return Snapshot(
            self, self._async.replica_snapshot(fresh=fresh, max_staleness=max_staleness)
        )

    def read_many(self, keys: Sequence[KeyLike]) -> list[bytes | None]:
        """One consistent snapshot of keys in one round trip (see `AsyncClient.read_many`)."""
        return self._run(self._async.read_many(keys))

    def transaction(self, *, read_only: bool = False) -> Transaction:
        """`with client.transaction() as tx:` commits on success, aborts on error; it cannot
        re-run its body, so a retryable abort raises TransactionRetry. Prefer `run(fn)`."""
        return Transaction(self, self._run(self._async.begin(read_only=read_only)))

    def run(
        self,
        fn: Callable[[Transaction], T],
        *,
        read_only: bool = False,
        max_attempts: int | None = None,
        keys: Sequence[KeyLike] = (),
    ) -> T:
        """Run `fn(tx)` in a transaction and commit; retry retryable aborts (see AsyncClient.run).
        fn runs on the calling thread; its operations go through the client's loop."""
        attempts = max_attempts or self._async.retry.max_attempts
        backoff = self._async.retry.initial_backoff_s
        for i in range(attempts):
            begin = self._async.begin(read_only=read_only, keys=keys, inline=True)
            tx = Transaction(self, self._run(begin))
            try:
                result = fn(tx)
                tx.commit()
                return result
            except K2Error as e:
                tx.abort()
                if not e.retryable or i == attempts - 1:
                    raise
                self._async.retries += 1
                threading.Event().wait(backoff * (0.5 + self._async._rng.random()))
                backoff = min(backoff * 2, self._async.retry.max_backoff_s)
            except BaseException:
                tx.abort()
                raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._thread.is_alive():
            self._run(self._async.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Snapshot:
    """Synchronous view of a ReplicaSnapshot (see there)."""

    def __init__(self, client: Client, snap: ReplicaSnapshot) -> None:
        self._client = client
        self._snap = snap

    @property
    def ts(self) -> int:
        return self._snap.ts

    def get(self, key: KeyLike) -> bytes | None:
        return self._client._run(self._snap.get(key))

    def get_many(self, keys: Sequence[KeyLike]) -> list[bytes | None]:
        return self._client._run(self._snap.get_many(keys))

    def scan(
        self, start: KeyLike = b"", end: KeyLike | None = None, *, limit: int | None = None
    ) -> list[tuple[bytes, bytes]]:
        return self._client._run(self._snap.scan(start, end, limit=limit))


class Transaction:
    """Synchronous view of an AsyncTransaction (see there); also a context manager."""

    def __init__(self, client: Client, tx: AsyncTransaction) -> None:
        self._client = client
        self._tx = tx

    @property
    def ts(self) -> int:
        return self._tx.ts

    @property
    def commit_ts(self) -> int | None:
        return self._tx.commit_ts

    def get(self, key: KeyLike, *, for_update: bool = False) -> bytes | None:
        return self._client._run(self._tx.get(key, for_update=for_update))

    def get_many(
        self, keys: list[KeyLike], *, for_update: bool | Sequence[bool] = False
    ) -> list[bytes | None]:
        return self._client._run(self._tx.get_many(keys, for_update=for_update))

    def put(self, key: KeyLike, value: bytes) -> None:
        self._client._run(self._tx.put(key, value))

    def delete(self, key: KeyLike) -> None:
        self._client._run(self._tx.delete(key))

    def put_many(self, items: dict[KeyLike, bytes | None], *, commit: bool = False) -> None:
        self._client._run(self._tx.put_many(items, commit=commit))

    def batch(
        self,
        reads: Sequence[KeyLike],
        writes: Mapping[KeyLike, bytes | None],
        *,
        commit: bool = False,
    ) -> list[bytes | None]:
        return self._client._run(self._tx.batch(reads, writes, commit=commit))

    def scan(
        self, start: KeyLike = b"", end: KeyLike | None = None, *, limit: int = 1000
    ) -> list[tuple[bytes, bytes]]:
        return self._client._run(self._tx.scan(start, end, limit=limit))

    def commit(self) -> int:
        return self._client._run(self._tx.commit())

    def abort(self) -> None:
        self._client._run(self._tx.abort())

    def __enter__(self) -> Transaction:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if exc is not None:
            self.abort()
            if isinstance(exc, K2Error) and exc.retryable and not isinstance(exc, TransactionRetry):
                raise _retry_error(exc) from exc
            return
        try:
            self.commit()
        except K2Error as e:
            if e.retryable:
                raise _retry_error(e) from e
            raise


async def _make_async(cluster: ClusterConfig, kw: dict[str, Any]) -> AsyncClient:
    # Channels bind to the loop they are created on: build the AsyncClient on the client's thread.
    return AsyncClient(cluster, **kw)
