"""The block store node: a `BlockStore` served over gRPC, and the client that talks to it.

Purpose
    One node per region (``k2 blockstore``, or started by ``k2 cluster up``) holds that region's
    KV-block bytes; connectors anywhere read and write them through `BlockStoreClient`.

Data flow
    ::

        BlockStoreClient.put(key, frame) ──compress?──▶ chunks ══gRPC stream══▶ BlockStoreService
            ──decompress──▶ BlockStore.put (verify, fsync) ──▶ PutResponse (after durable)
        BlockStoreClient.get(key) ──▶ BlockStoreService ──BlockStore.get (verify)──compress?──▶
            chunks ══▶ join ──decompress──▶ verify ──▶ frame

    Frames travel in chunks (`chunk_bytes`, 1 MiB by default), so a block larger than one gRPC
    message moves and no side holds more than the frame plus one chunk of framing. Disk work
    runs in worker threads, so the event loop keeps serving while a block is read or fsynced.

    Faster read paths, both found by the client on its own: `fetch` from a node on the same
    host goes through a shared-memory arena (`GetShared`, kvtier/shm.py); any other uncompressed
    read, once a Get reply has named the node's bulk port, goes over a plain TCP socket
    (kvtier/bulk.py: ~4x what grpc.aio moves here). A node runs the bulk port only when the
    cluster is not secured.

Invariants
    - A Put is acknowledged only after the frame is durable in the store (first phase of the
      two-phase publish).
    - The client verifies every frame it receives (header, checksum, key), so a corrupt transfer
      is a miss, never data; `bytes_received` counts bytes on the wire (after compression).

Security (a cluster file with ``[security] tls = true``, k2store/security.py)
    ::

        mutual TLS (cluster CA; this node's certificate blockstore-<region>)   else no connection
        _Authenticator: node certificate of a block store, or a bearer token  UNAUTHENTICATED
            └─ per-principal rate limit                                       RESOURCE_EXHAUSTED
        decode the request                                                    INVALID_ARGUMENT
        Guard.block_namespace(identity, request.namespace)
            Get / Has outside the caller's namespaces ──▶ exactly a miss (found = false)
            Put / Delete outside them                 ──▶ PERMISSION_DENIED
            Stats                                     ──▶ admins and nodes only
        BlockOwners: the namespace each held key was put in; a key read or deleted in another
            namespace is a miss, and a put of a key held for another namespace changes nothing

    Namespaces are ``<tenant>/<label>`` (`block_namespace` of a `kvtier.blocks.Namespace`), so a
    namespace's tenant is read off its name; see `Guard.block_namespace` for who may use which.
    Why the owner index: block keys are content hashes, and events (kvtier/events.py) publish
    them, so a tenant can learn another tenant's key. Without it that tenant could put a frame
    of its own under the key first and have the other tenant load it. Block copies between
    regions by a block store node present that node's certificate and name the namespace.

Failure modes
    The node is down, partitioned or too slow: `BlockStoreUnavailable` (retryable; the connector
    turns it into a miss). Typed store errors (`CorruptBlock`, `BlockTooLarge`,
    `BlockStoreFull`) and refusals (`Unauthenticated`, `PermissionDenied`, `RateLimited`) cross
    the wire with their reason in the ``k2-error`` trailer.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError

from k2store.errors import (
    ERROR_METADATA_KEY,
    DeadlineExceeded,
    InvalidArgument,
    K2Error,
    PermissionDenied,
    Unavailable,
)
from k2store.security import Guard, Identity, SecuritySettings, bearer_metadata, client_token
from k2store.transport import CHANNEL_OPTIONS, MAX_MESSAGE_BYTES, WanEmulation, rpc_error_to_k2
from kvtier.blocks import Namespace, verify_frame
from kvtier.blockstore import BlobStore, BlockStore, BlockStoreConfig
from kvtier.bulk import BulkClient, BulkServer, BulkUnavailable, frame_range
from kvtier.shm import ArenaMapper, SharedArena, SharedUnavailable, Slot

if TYPE_CHECKING:
    from k2store.cluster import ClusterConfig
from kvtier.compression import compress_frame, decompress_frame
from kvtier.errors import BlockStoreUnavailable, BlockTooLarge, CorruptBlock
from kvtier.proto import blockstore_pb2 as bpb
from kvtier.proto import blockstore_pb2_grpc as bpb_grpc

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "BlockNode",
    "BlockNodeSecurity",
    "BlockOwners",
    "BlockStoreClient",
    "BlockStoreService",
    "LinkPacer",
    "TransferStats",
    "block_namespace",
    "serve_blockstore",
]

log = logging.getLogger("kvtier.blocknode")

DEFAULT_CHUNK_BYTES = 1024 * 1024
_CODEC_BY_NAME: dict[str, bpb.Codec.ValueType] = {
    "none": bpb.CODEC_NONE,
    "zlib": bpb.CODEC_ZLIB,
    "lz4": bpb.CODEC_LZ4,
}
_NAME_BY_CODEC: dict[int, str] = {int(v): k for k, v in _CODEC_BY_NAME.items()}


def _codec_name(code: int) -> str:
    name = _NAME_BY_CODEC.get(code)
    if name is None:
        raise InvalidArgument(f"unknown codec {code}")
    return name


def block_namespace(ns: Namespace) -> str:
    """The block store namespace of a kvtier namespace: ``<tenant>/<id>``, or ``/<id>`` when it
    is shared between tenants (see the module docstring)."""
    return f"{'' if ns.shared else ns.tenant}/{ns.id}"


# -- security ------------------------------------------------------------------------------------


class BlockOwners:
    """Which namespace each key was put in, durably (a `BlobStore` of its own beside the block
    store's disk tier). Rows are written, fsynced, before the block's bytes, so every block a
    secured node holds has an owner row; a row can outlive its block (eviction does not remove
    it), and is simply overwritten by the next put of that key when the block is gone."""

    _TAG = b"="  # values are never empty: "" is a namespace too

    def __init__(self, rows: BlobStore) -> None:
        self._rows = rows
        # Striped by the key's first byte (keys are content hashes): check, claim and put of one
        # key happen under its stripe, so two namespaces racing for a new key cannot both win.
        self._locks = [asyncio.Lock() for _ in range(64)]

    def lock(self, key: bytes) -> asyncio.Lock:
        return self._locks[key[0] % len(self._locks) if key else 0]

    def get(self, key: bytes) -> str | None:
        raw = self._rows.get(key)
        if raw is None or not raw.startswith(self._TAG):
            return None
        return raw[len(self._TAG) :].decode("utf-8", errors="replace")

    def claim(self, key: bytes, namespace: str) -> None:
        self._rows.put(key, self._TAG + namespace.encode(), sync=True)

    def release(self, key: bytes) -> None:
        self._rows.delete(key)

    def close(self) -> None:
        self._rows.close()


@dataclass(frozen=True, slots=True)
class BlockNodeSecurity:
    """What a secured block store node needs: its certificate's name, the guard that checks
    callers (k2store/security.py) and the owner index."""

    settings: SecuritySettings
    name: str
    """This node's certificate: ``<certs_dir>/<name>.pem`` (`k2store.certs.blockstore_name`)."""
    guard: Guard
    owners: BlockOwners

    @classmethod
    def for_cluster(
        cls, cluster: ClusterConfig, region: str, owners: BlockOwners
    ) -> BlockNodeSecurity | None:
        """The security of `region`'s block store node in `cluster`, or None when it is off.
        Only block store node certificates are trusted as nodes here: a store node's
        certificate is nobody to a block store."""
        from k2store.certs import blockstore_name
        from truetime import SystemClock

        sec = cluster.settings.security
        if not sec.tls:
            return None
        regions = cluster.region_names()
        guard = Guard(
            sec,
            regions=regions,
            nodes={blockstore_name(r): r for r in regions},
            monotonic_ns=SystemClock().monotonic_ns,
        )
        return cls(sec, blockstore_name(region), guard, owners)


_IDENTITY: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "kvtier_blocknode_identity", default=None
)
_Ctx = grpc.aio.ServicerContext[Any, Any]


async def _abort(context: _Ctx, e: K2Error) -> None:
    await context.abort(e.code, str(e), trailing_metadata=((ERROR_METADATA_KEY, e.reason),))


PUT_ATTEMPTS_ON_LOST_STATUS = 4


def status_lost(e: grpc.aio.AioRpcError) -> bool:
    """Whether a client-streaming call failed in the client's own grpc core rather than at the
    server: when the server ends a call (a refusal after the first chunk) while the client is
    still sending, grpc.aio marks the call INTERNAL "Internal error from Core" and the server's
    status (PERMISSION_DENIED, UNAUTHENTICATED, ...) never reaches the caller. Measured: 26% of
    refused 64-byte-chunk puts, ~1 in 300 refused 3-message puts."""
    return e.code() == grpc.StatusCode.INTERNAL and e.details() == "Internal error from Core"


class _Authenticator(grpc.aio.ServerInterceptor):
    """Authenticates and rate-limits every call before its request bytes are decoded (the
    handlers get raw bytes from here and the decoded message only after), then hands the
    identity to the service through `_IDENTITY`. Authorization needs the decoded namespace, so
    it stays in the service."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    def _identify(self, context: _Ctx) -> Identity:
        ident = self.guard.authenticate(context.invocation_metadata() or (), context.auth_context())
        self.guard.admit(ident)
        return ident

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        decode: Callable[[bytes], Any] = handler.request_deserializer or (lambda b: b)

        def parse(data: bytes) -> Any:
            try:
                return decode(data)
            except DecodeError:
                raise InvalidArgument("malformed block store request") from None

        serialize = handler.response_serializer
        if handler.unary_unary is not None:
            inner_uu: Any = handler.unary_unary

            async def unary_unary(data: bytes, context: _Ctx) -> Any:
                try:
                    _IDENTITY.set(self._identify(context))
                    request = parse(data)
                except K2Error as e:
                    await _abort(context, e)
                    raise AssertionError("unreachable: context.abort raises") from e
                return await inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, response_serializer=serialize)
        if handler.unary_stream is not None:
            inner_us: Any = handler.unary_stream

            async def unary_stream(data: bytes, context: _Ctx) -> AsyncIterator[Any]:
                try:
                    _IDENTITY.set(self._identify(context))
                    request = parse(data)
                except K2Error as e:
                    await _abort(context, e)
                    return
                async for item in inner_us(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(unary_stream, response_serializer=serialize)
        if handler.stream_unary is not None:
            inner_su: Any = handler.stream_unary

            async def stream_unary(requests: AsyncIterator[bytes], context: _Ctx) -> Any:
                try:
                    _IDENTITY.set(self._identify(context))
                except K2Error as e:
                    await _abort(context, e)
                    raise AssertionError("unreachable: context.abort raises") from e

                async def decoded() -> AsyncIterator[Any]:
                    async for data in requests:
                        yield parse(data)

                return await inner_su(decoded(), context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, response_serializer=serialize)
        return handler  # no stream-stream methods in this service


class BlockStoreService(bpb_grpc.BlockStoreServicer):
    """The gRPC face of one `BlockStore`; K2Errors become statuses with their reason.

    With `security`, every handler runs after `_Authenticator` and checks the request's
    namespace (see the module docstring); without it, namespaces are ignored."""

    def __init__(
        self,
        store: BlockStore,
        region: str,
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        security: BlockNodeSecurity | None = None,
    ) -> None:
        self.bulk_port = 0
        """The node's bulk read port (kvtier/bulk.py), told to readers in Get replies; 0: none."""
        self.store = store
        self.region = region
        self.chunk_bytes = chunk_bytes
        self.security = security
        self.arenas = ArenaMapper()

    def _namespace(self, namespace: str) -> tuple[str, bool]:
        """(namespace, allowed) for the caller of this call (secured nodes only)."""
        assert self.security is not None
        ident = _IDENTITY.get()
        if ident is None:  # the interceptor did not run: never serve such a call
            return namespace, False
        return self.security.guard.block_namespace(ident, namespace)

    def _writable(self, namespace: str) -> str:
        ns, ok = self._namespace(namespace)
        if not ok:
            raise PermissionDenied("the request is outside the principal's block namespaces")
        return ns

    def _owned(self, key: bytes, namespace: str, allowed: bool) -> bool:
        """Whether key was put in namespace (the owner row is read either way, so a refused
        read costs what a miss costs)."""
        assert self.security is not None
        owner = self.security.owners.get(key)
        return allowed and owner == namespace

    async def _put_owned(self, key: bytes, namespace: str, frame: bytes) -> bool:
        assert self.security is not None
        owners = self.security.owners
        async with owners.lock(key):
            owner = await asyncio.to_thread(owners.get, key)
            if owner is not None and owner != namespace and self.store.has(key):
                # Held for another namespace: answered like a block already held, and nothing
                # changes. The writer's later read of it is a miss, which it recomputes.
                return False
            if owner is None and self.store.has(key):
                # Held without an owner: stored before this node was secured. Nobody can read
                # it (a miss for every namespace); replace it rather than adopt bytes of unknown
                # origin.
                await asyncio.to_thread(self.store.delete, key)
            if owner != namespace:
                await asyncio.to_thread(owners.claim, key, namespace)
            return await asyncio.to_thread(self.store.put, key, frame)

    async def _abort(self, context: grpc.aio.ServicerContext[Any, Any], e: K2Error) -> None:
        await context.abort(e.code, str(e), trailing_metadata=((ERROR_METADATA_KEY, e.reason),))

    async def Put(
        self,
        request_iterator: AsyncIterator[bpb.PutChunk],
        context: grpc.aio.ServicerContext[bpb.PutChunk, bpb.PutResponse],
    ) -> bpb.PutResponse:
        try:
            key = b""
            namespace = ""
            codec = "none"
            total = 0
            parts: list[bytes] = []
            received = 0
            limit = self.store.config.max_block_bytes + (1 << 20)
            async for chunk in request_iterator:
                if not parts and not key:
                    key, total, codec = chunk.key, chunk.total_bytes, _codec_name(chunk.codec)
                    if not key:
                        raise InvalidArgument("block put: the first chunk must carry the key")
                    if self.security is not None:
                        namespace = self._writable(chunk.namespace)
                    if total > limit:
                        raise BlockTooLarge(
                            f"block {key.hex()[:16]}: {total} bytes on the wire exceeds the limit"
                        )
                received += len(chunk.data)
                if received > max(total, 0) or received > limit:
                    raise InvalidArgument(f"block put {key.hex()[:16]}: more bytes than announced")
                parts.append(chunk.data)
            if not key:
                raise InvalidArgument("block put: empty stream")
            if received != total:
                raise CorruptBlock(
                    f"block put {key.hex()[:16]}: stream ended at {received} of {total} bytes"
                )
            data = b"".join(parts)
            frame = await asyncio.to_thread(decompress_frame, codec, data)
            if self.security is not None:
                stored = await self._put_owned(key, namespace, frame)
            else:
                stored = await asyncio.to_thread(self.store.put, key, frame)
            return bpb.PutResponse(stored=stored, frame_bytes=len(frame))
        except K2Error as e:
            await self._abort(context, e)
            raise AssertionError("unreachable: context.abort raises") from e

    async def Get(
        self,
        request: bpb.GetRequest,
        context: grpc.aio.ServicerContext[bpb.GetRequest, bpb.GetChunk],
    ) -> AsyncIterator[bpb.GetChunk]:
        try:
            codec = _codec_name(request.accept)
            if self.security is not None:
                ns, ok = self._namespace(request.namespace)
                if not await asyncio.to_thread(self._owned, request.key, ns, ok):
                    yield bpb.GetChunk(found=False)  # another namespace's block: a plain miss
                    return
            if request.range_length and codec != "none":
                raise InvalidArgument("a byte range of a frame is read raw (accept CODEC_NONE)")
            frame = await asyncio.to_thread(self.store.get, request.key)
            if frame is None:
                yield bpb.GetChunk(found=False, bulk_port=self.bulk_port)
                return
            if request.range_length:
                data: bytes | memoryview = frame_range(
                    frame, request.range_start, request.range_length
                )
            elif codec == "none":
                data = frame
            else:
                data = await asyncio.to_thread(compress_frame, codec, frame)
        except K2Error as e:
            await self._abort(context, e)
            return
        step = request.chunk_bytes or self.chunk_bytes
        mv = memoryview(data)
        for off in range(0, max(len(data), 1), step):
            if off == 0:
                yield bpb.GetChunk(
                    found=True,
                    total_bytes=len(data),
                    codec=_CODEC_BY_NAME[codec],
                    data=bytes(mv[off : off + step]),
                    bulk_port=self.bulk_port,
                )
            else:
                yield bpb.GetChunk(data=bytes(mv[off : off + step]))

    async def GetShared(
        self,
        request: bpb.GetSharedRequest,
        context: grpc.aio.ServicerContext[bpb.GetSharedRequest, bpb.GetSharedResponse],
    ) -> bpb.GetSharedResponse:
        """Get for a reader on this host: the frame is copied into the reader's shared-memory
        arena (kvtier/shm.py) instead of streamed. Same namespace checks as Get."""
        try:
            if self.security is not None:
                ns, ok = self._namespace(request.namespace)
                if not await asyncio.to_thread(self._owned, request.key, ns, ok):
                    return bpb.GetSharedResponse(found=False)

            def copy() -> bpb.GetSharedResponse:
                frame = self.store.get(request.key)
                if frame is None:
                    return bpb.GetSharedResponse(found=False)
                if len(frame) > request.capacity:
                    return bpb.GetSharedResponse(
                        found=True, length=len(frame), status=bpb.SHARED_TOO_SMALL
                    )
                self.arenas.write(
                    request.pid,
                    request.fd,
                    request.nonce,
                    request.offset,
                    request.capacity,
                    frame,
                )
                return bpb.GetSharedResponse(found=True, length=len(frame))

            try:
                return await asyncio.to_thread(copy)
            except SharedUnavailable as e:
                return bpb.GetSharedResponse(status=bpb.SHARED_NO_ARENA, detail=str(e))
        except K2Error as e:
            await self._abort(context, e)
            raise AssertionError("unreachable: context.abort raises") from e

    async def Has(
        self,
        request: bpb.HasRequest,
        context: grpc.aio.ServicerContext[bpb.HasRequest, bpb.HasResponse],
    ) -> bpb.HasResponse:
        if self.security is None:
            return bpb.HasResponse(present=[self.store.has(k) for k in request.keys])
        try:
            ns, ok = self._namespace(request.namespace)
        except K2Error as e:
            await _abort(context, e)
            raise AssertionError("unreachable: context.abort raises") from e

        def present() -> list[bool]:
            return [self._owned(k, ns, ok) and self.store.has(k) for k in request.keys]

        return bpb.HasResponse(present=await asyncio.to_thread(present))

    async def Delete(
        self,
        request: bpb.DeleteRequest,
        context: grpc.aio.ServicerContext[bpb.DeleteRequest, bpb.DeleteResponse],
    ) -> bpb.DeleteResponse:
        if self.security is None:
            n = 0
            for k in request.keys:
                n += await asyncio.to_thread(self.store.delete, k)
            return bpb.DeleteResponse(deleted=n)
        try:
            ns = self._writable(request.namespace)
        except K2Error as e:
            await _abort(context, e)
            raise AssertionError("unreachable: context.abort raises") from e
        owners = self.security.owners
        n = 0
        for k in request.keys:
            async with owners.lock(k):
                if await asyncio.to_thread(self._owned, k, ns, True):
                    n += await asyncio.to_thread(self.store.delete, k)
                    await asyncio.to_thread(owners.release, k)
        return bpb.DeleteResponse(deleted=n)

    async def Stats(
        self,
        request: bpb.StatsRequest,
        context: grpc.aio.ServicerContext[bpb.StatsRequest, bpb.StatsResponse],
    ) -> bpb.StatsResponse:
        if self.security is not None:
            ident = _IDENTITY.get()
            try:
                if ident is None:
                    raise PermissionDenied("block store stats need the admin role")
                # Counts of every tenant's traffic: not for tenants.
                self.security.guard.require_admin(ident, "block store stats")
            except K2Error as e:
                await _abort(context, e)
                raise AssertionError("unreachable: context.abort raises") from e
        s = self.store.stats
        c = self.store.config
        return bpb.StatsResponse(
            region=self.region,
            blocks=s.blocks,
            memory_used=s.memory_used,
            memory_bytes=c.memory_bytes,
            disk_used=s.disk_used,
            disk_bytes=c.disk_bytes,
            memory_hits=s.memory_hits,
            disk_hits=s.disk_hits,
            misses=s.misses,
            corrupt_dropped=s.corrupt_dropped,
            memory_evictions=s.memory_evictions,
            disk_evictions=s.disk_evictions,
            puts=s.puts,
        )


class BlockNode:
    """A block store served on `address` (loopback host:port) until `stop`."""

    def __init__(
        self,
        store: BlockStore,
        region: str,
        address: str,
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        security: BlockNodeSecurity | None = None,
        bulk: bool = True,
    ) -> None:
        """`security`: serve mutual TLS and check every caller (None: plaintext, no checks).
        `bulk`: also serve reads on a plain TCP port (kvtier/bulk.py), which readers learn from
        Get replies; never on a secured node (the path has no TLS and no tokens)."""
        self.store = store
        self.region = region
        self.address = address
        self.security = security
        self.service = BlockStoreService(store, region, chunk_bytes=chunk_bytes, security=security)
        self.bulk: BulkServer | None = None
        self._want_bulk = bulk and security is None
        self._server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        options: list[tuple[str, Any]] = [*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)]
        sec = self.security
        if sec is not None:
            options.append(("grpc.max_concurrent_streams", sec.settings.max_concurrent_streams))
        server = grpc.aio.server(
            options=options,
            interceptors=[_Authenticator(sec.guard)] if sec is not None else None,
        )
        bpb_grpc.add_BlockStoreServicer_to_server(self.service, server)
        try:
            if sec is None:
                port = server.add_insecure_port(self.address)
            else:
                from k2store.certs import server_credentials

                port = server.add_secure_port(
                    self.address, server_credentials(sec.settings, sec.name)
                )
        except RuntimeError:
            raise Unavailable(f"block store: cannot listen on {self.address}") from None
        host = self.address.rsplit(":", 1)[0]
        self.address = f"{host}:{port}"  # resolves port 0 to the one chosen
        if self._want_bulk:
            bulk = BulkServer(
                self.store.get, host.strip("[]"), get_if_in_memory=self.store.get_if_in_memory
            )
            try:
                await bulk.start()
            except OSError as e:
                log.warning("block store %s: no bulk read port (%s); gRPC only", self.address, e)
            else:
                self.bulk = bulk
                self.service.bulk_port = bulk.port
        await server.start()
        self._server = server
        log.info(
            "block store for %s serving on %s (%s)",
            self.region,
            self.address,
            "mutual TLS" if sec is not None else "plaintext",
        )

    async def stop(self, grace_s: float = 1.0, *, close_store: bool = True) -> None:
        """Stop serving; with `close_store`, also close the store (releasing its directory)."""
        if self._stopped.is_set():
            return
        if self.bulk is not None:
            self.service.bulk_port = 0
            await self.bulk.stop()
        if self._server is not None:
            await self._server.stop(grace_s)
        self.service.arenas.close()
        if close_store:
            self.store.close()
            if self.security is not None:
                self.security.owners.close()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


class LinkPacer:
    """Makes transfers between a client's region and a block store's region pay the cluster's
    emulated wide-area link (k2store/wan.py: half the RTT each way, bytes at the link's
    bandwidth, partitions), with queueing: transfers in one direction send their bytes one after
    another. The K2 transport's emulation does not queue (its HAZARD note); KV blocks are
    bandwidth-bound and fetched in parallel, so without queueing 8 parallel fetches would see 8
    times the link's bandwidth. Jitter is not applied. Time is the event loop's."""

    def __init__(self, wan: WanEmulation, client_region: str, store_region: str) -> None:
        self._wan = wan
        self._here = client_region
        self._there = store_region
        self._free_at = {True: 0.0, False: 0.0}

    async def pay(self, nbytes: int, *, outbound: bool) -> None:
        """Wait as long as a message of nbytes takes; BlockStoreUnavailable if the link is cut."""
        now = asyncio.get_running_loop().time()
        model = self._wan.model(now)
        if not model.is_active():
            return
        src, dst = (self._here, self._there) if outbound else (self._there, self._here)
        rule = model.cut_rule(src, dst, None, None)
        if rule is not None:
            raise BlockStoreUnavailable(f"link {src} -> {dst} is cut ({rule})")
        p = model.link(src, dst)
        serial = nbytes * 8 / (p.bandwidth_mbit * 1e6) if p.bandwidth_mbit > 0 else 0.0
        done = max(now, self._free_at[outbound]) + serial
        self._free_at[outbound] = done
        await asyncio.sleep(done - now + p.rtt_ms / 2000)


_REQUEST_BYTES = 64
"""What a small request or reply is charged on an emulated link."""


@dataclass(slots=True)
class TransferStats:
    bytes_sent: int = 0
    """Wire bytes of puts (after compression)."""
    bytes_received: int = 0
    """Wire bytes of gets (after compression)."""
    frame_bytes_received: int = 0
    """Frame bytes the gets delivered (before compression)."""
    gets: int = 0
    puts: int = 0
    failures: int = 0
    shared_gets: int = 0
    """Gets served through the shared-memory arena (kvtier/shm.py) rather than streamed."""
    bulk_gets: int = 0
    """Gets served through the node's bulk TCP port (kvtier/bulk.py) rather than streamed."""


class BlockStoreClient:
    """Async client of one block store node. Create and use it on one event loop."""

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 10.0,
        codec: str = "none",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        pacer: LinkPacer | None = None,
        security: SecuritySettings | None = None,
        token: str | None = None,
        node: str | None = None,
        namespace: str = "",
        arena: SharedArena | None = None,
        bulk: bool = True,
    ) -> None:
        """`codec`: compression for transfers through this client (see kvtier.compression;
        choose it with `choose_codec` for the link this client crosses). `pacer`: the emulated
        link to the node's region, if the cluster emulates one.

        `security`: the cluster's `[security]` settings; with ``tls`` the client dials with
        mutual TLS and, unless `node` names the block store node it acts as (its certificate,
        for copies between block stores), sends a bearer token (`token`, else K2_TOKEN,
        K2_TOKEN_FILE or the settings' token file). `namespace`: the block store namespace
        every call works in (`block_namespace`; "" is the caller's default). `arena`: a
        shared-memory arena (kvtier/shm.py) for `fetch` to receive frames through when the node
        is on this host; the caller owns and closes it. `bulk`: read uncompressed frames through
        the node's bulk TCP port once it names one (kvtier/bulk.py; never on a secured
        cluster)."""
        if codec not in _CODEC_BY_NAME:
            raise InvalidArgument(f"unknown codec {codec!r}")
        self.address = address
        self.timeout_s = timeout_s
        self.codec = codec
        self.chunk_bytes = chunk_bytes
        self.namespace = namespace
        self.stats = TransferStats()
        self._pacer = pacer
        self._arena = arena
        self._bulk: BulkClient | None = None
        self._bulk_ok = bulk and (security is None or not security.tls)
        """Read through the node's bulk port (kvtier/bulk.py) once a Get reply names one; off
        for good after a failure there, and on a secured cluster."""
        self._metadata: tuple[tuple[str, str], ...] = ()
        if security is not None and security.tls:
            from k2store.certs import channel_credentials

            creds = channel_credentials(security, node)
            self._channel = grpc.aio.secure_channel(address, creds, options=CHANNEL_OPTIONS)
            tok = None if node is not None else client_token(security, token)
            self._metadata = bearer_metadata(tok) if tok else ()
        else:
            self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = bpb_grpc.BlockStoreStub(self._channel)

    async def close(self) -> None:
        if self._bulk is not None:
            self._bulk.close()
        await self._channel.close()

    async def _pay(self, nbytes: int, *, outbound: bool) -> None:
        if self._pacer is not None:
            try:
                await self._pacer.pay(nbytes, outbound=outbound)
            except BlockStoreUnavailable:
                self.stats.failures += 1
                raise

    def _error(self, e: grpc.aio.AioRpcError) -> K2Error:
        self.stats.failures += 1
        err = rpc_error_to_k2(e, f"block store {self.address}")
        if isinstance(err, Unavailable | DeadlineExceeded) and not isinstance(
            err, BlockStoreUnavailable
        ):
            return BlockStoreUnavailable(str(err))
        return err

    async def put(self, key: bytes, frame: bytes, *, codec: str | None = None) -> bool:
        """Store a frame; returns once it is durable at the node (False: it was already there)."""
        codec = codec or self.codec
        data = frame if codec == "none" else await asyncio.to_thread(compress_frame, codec, frame)

        async def chunks(step: int) -> AsyncIterator[bpb.PutChunk]:
            mv = memoryview(data)
            for off in range(0, max(len(data), 1), step):
                piece = bytes(mv[off : off + step])
                if off == 0:
                    yield bpb.PutChunk(
                        key=key,
                        total_bytes=len(data),
                        codec=_CODEC_BY_NAME[codec],
                        data=piece,
                        namespace=self.namespace,
                    )
                else:
                    yield bpb.PutChunk(data=piece)

        await self._pay(len(data), outbound=True)
        step = self.chunk_bytes
        for attempt in range(PUT_ATTEMPTS_ON_LOST_STATUS):
            try:
                r = await self._stub.Put(
                    chunks(step), timeout=self.timeout_s, metadata=self._metadata
                )
                break
            except grpc.aio.AioRpcError as e:
                if not status_lost(e) or attempt == PUT_ATTEMPTS_ON_LOST_STATUS - 1:
                    raise self._error(e) from None
                # The node refused before reading every chunk and grpc lost its reason (see
                # status_lost). A put is idempotent and a refusal repeats: ask again, as one
                # message when it fits, which leaves the client almost nothing to send late.
                self.stats.failures += 1
                step = max(step, min(len(data), MAX_MESSAGE_BYTES - (1 << 20)))
        await self._pay(_REQUEST_BYTES, outbound=False)
        self.stats.puts += 1
        self.stats.bytes_sent += len(data)
        return r.stored

    async def get_sized(self, key: bytes, *, codec: str | None = None) -> tuple[bytes | None, int]:
        """The verified frame stored under key, or None when the node does not hold it.
        Raises BlockStoreUnavailable when the node cannot answer, CorruptBlock when what arrived
        is not the frame (the caller should treat both as a miss). Also returns the bytes this
        call moved over the wire (after compression)."""
        frame, moved = await self._get_any(key, codec or self.codec)
        return (bytes(frame) if isinstance(frame, bytearray) else frame), moved

    async def _get_any(self, key: bytes, codec: str) -> tuple[bytes | bytearray | None, int]:
        """`get_sized` without the copy a bulk read's buffer needs to become bytes: through the
        bulk port when the node named one (and nothing is compressed), else streamed."""
        if self._bulk is not None and codec == "none":
            got = await self._get_bulk(key)
            if got is not None:
                return got
        return await self._get_streamed(key, codec)

    async def get_range(
        self, key: bytes, start: int, length: int
    ) -> tuple[bytes | bytearray | None, int]:
        """Bytes [start, start + length) of the frame stored under key, raw (None when the node
        does not hold it), and the bytes moved. Unverified: a frame's checksum covers all of
        it, so the caller verifies the frame it assembles from its parts (`verify_frame`). A
        reply of another length than asked (a frame shorter than expected) is `CorruptBlock`.
        Through the bulk port when the node named one, else streamed."""
        if length <= 0 or start < 0:
            raise InvalidArgument(f"byte range [{start}, {start + length}) of a frame")
        got: tuple[bytes | bytearray | None, int] | None = None
        if self._bulk is not None:
            got = await self._get_bulk(key, (start, length))
        if got is None:
            got = await self._get_streamed(key, "none", (start, length))
        part, moved = got
        if part is not None and len(part) != length:
            self.stats.failures += 1
            raise CorruptBlock(
                f"block {key.hex()[:16]}: {len(part)} bytes at {start}, {length} asked"
            )
        return part, moved

    async def _get_streamed(
        self, key: bytes, codec: str, span: tuple[int, int] | None = None
    ) -> tuple[bytes | None, int]:
        parts: list[bytes] = []
        total = 0
        wire_codec = "none"
        found = False
        start, length = span or (0, 0)
        await self._pay(_REQUEST_BYTES, outbound=True)
        try:
            call = self._stub.Get(
                bpb.GetRequest(
                    key=key,
                    accept=_CODEC_BY_NAME[codec],
                    chunk_bytes=self.chunk_bytes,
                    namespace=self.namespace,
                    range_start=start,
                    range_length=length,
                ),
                timeout=self.timeout_s,
                metadata=self._metadata,
            )
            async for chunk in call:
                if not parts:
                    self._learn_bulk(chunk.bulk_port)
                    found = chunk.found
                    if not found:
                        break
                    total, wire_codec = chunk.total_bytes, _codec_name(chunk.codec)
                parts.append(chunk.data)
        except grpc.aio.AioRpcError as e:
            raise self._error(e) from None
        self.stats.gets += 1
        data = b"".join(parts)
        await self._pay(max(len(data), _REQUEST_BYTES), outbound=False)
        if not found:
            return None, 0
        self.stats.bytes_received += len(data)
        if len(data) != total:
            raise CorruptBlock(f"block {key.hex()[:16]}: got {len(data)} of {total} bytes")
        if span is not None:  # a part: the caller verifies the frame it assembles
            self.stats.frame_bytes_received += len(data)
            return data, len(data)
        frame = (
            data
            if wire_codec == "none"
            else await asyncio.to_thread(decompress_frame, wire_codec, data)
        )
        verify_frame(frame, key)
        self.stats.frame_bytes_received += len(frame)
        return frame, len(data)

    def _learn_bulk(self, port: int) -> None:
        if port and self._bulk is None and self._bulk_ok:
            host = self.address.rsplit(":", 1)[0].strip("[]")
            self._bulk = BulkClient(host, port, timeout_s=self.timeout_s)

    async def _get_bulk(
        self, key: bytes, span: tuple[int, int] | None = None
    ) -> tuple[bytearray | None, int] | None:
        """The verified frame (None on a miss) and the bytes moved, through the bulk port; None
        when the path failed (it is off from then on: the caller streams over gRPC). With
        `span`: that byte range of the frame, unverified."""
        bulk = self._bulk
        assert bulk is not None
        await self._pay(_REQUEST_BYTES, outbound=True)
        try:
            frame = await bulk.get(key, span)
        except BulkUnavailable as e:
            log.info("block store %s: bulk reads off, streaming over gRPC (%s)", self.address, e)
            bulk.close()
            self._bulk = None
            self._bulk_ok = False
            return None
        n = len(frame) if frame is not None else 0
        await self._pay(max(n, _REQUEST_BYTES), outbound=False)
        self.stats.gets += 1
        self.stats.bulk_gets += 1
        if frame is None:
            return None, 0
        self.stats.bytes_received += n
        if span is None:
            verify_frame(frame, key)
        self.stats.frame_bytes_received += n
        return frame, n

    @contextlib.asynccontextmanager
    async def fetch(
        self, key: bytes, *, size_hint: int = 0
    ) -> AsyncIterator[tuple[bytes | memoryview | None, int]]:
        """`async with client.fetch(key, size_hint=n) as (frame, moved)`: the verified frame
        (None on a miss) and the bytes moved, as `get_sized`, but through this client's shared
        arena when it has one, the node is on this host and a slot of `size_hint` bytes is free.
        The frame is then a view of the arena, valid only inside the block. Any other case, and
        a node that cannot use the arena (from then on), goes through `get_sized`."""
        arena = self._arena
        slot = arena.alloc(size_hint) if arena is not None and size_hint > 0 else None
        if slot is None or arena is None:
            frame, moved = await self._get_any(key, self.codec)
            yield (memoryview(frame) if isinstance(frame, bytearray) else frame), moved
            return
        done = False
        try:
            r = await self._get_shared(key, arena, slot)
            done = True
        finally:
            if not done:  # the node may still write the slot: never reuse it
                arena.quarantine(slot)
        if r.status != bpb.SHARED_OK or not r.found:
            arena.free(slot)
            if r.status == bpb.SHARED_NO_ARENA:
                log.info("block store %s cannot use shared memory: %s", self.address, r.detail)
                self._arena = None
            if r.status == bpb.SHARED_OK:  # a miss
                yield None, 0
            else:
                yield await self.get_sized(key)
            return
        view = arena.view(slot, r.length)
        try:
            verify_frame(view, key)
            self.stats.gets += 1
            self.stats.shared_gets += 1
            self.stats.bytes_received += r.length
            self.stats.frame_bytes_received += r.length
            yield view, r.length
        finally:
            with contextlib.suppress(BufferError):
                view.release()
            arena.free(slot)

    async def _get_shared(
        self, key: bytes, arena: SharedArena, slot: Slot
    ) -> bpb.GetSharedResponse:
        await self._pay(_REQUEST_BYTES, outbound=True)
        try:
            r = await self._stub.GetShared(
                bpb.GetSharedRequest(
                    key=key,
                    namespace=self.namespace,
                    pid=arena.pid,
                    fd=arena.fd,
                    nonce=arena.nonce,
                    offset=slot.offset,
                    capacity=slot.size,
                ),
                timeout=self.timeout_s,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as e:
            raise self._error(e) from None
        # What the emulated link, if any, would have carried.
        await self._pay(max(r.length if r.found else 0, _REQUEST_BYTES), outbound=False)
        return r

    async def get(self, key: bytes, *, codec: str | None = None) -> bytes | None:
        """The verified frame stored under key, or None (see `get_sized`)."""
        frame, _ = await self.get_sized(key, codec=codec)
        return frame

    async def has(self, keys: Sequence[bytes]) -> list[bool]:
        await self._pay(_REQUEST_BYTES + 32 * len(keys), outbound=True)
        try:
            r = await self._stub.Has(
                bpb.HasRequest(keys=list(keys), namespace=self.namespace),
                timeout=self.timeout_s,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as e:
            raise self._error(e) from None
        await self._pay(_REQUEST_BYTES, outbound=False)
        return list(r.present)

    async def delete(self, keys: Sequence[bytes]) -> int:
        try:
            r = await self._stub.Delete(
                bpb.DeleteRequest(keys=list(keys), namespace=self.namespace),
                timeout=self.timeout_s,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as e:
            raise self._error(e) from None
        return r.deleted

    async def node_stats(self) -> bpb.StatsResponse:
        try:
            return await self._stub.Stats(
                bpb.StatsRequest(), timeout=self.timeout_s, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as e:
            raise self._error(e) from None


def open_store(data: Path, config: BlockStoreConfig | None = None) -> BlockStore:
    """A block store over a RocksDB disk tier in `data` (created if missing)."""
    from k2store.rocksengine import RocksBlobStore

    data.mkdir(parents=True, exist_ok=True)
    return BlockStore(RocksBlobStore(data / "blocks"), config)


async def serve_blockstore(
    region: str,
    address: str,
    data: Path,
    *,
    config: BlockStoreConfig | None = None,
    cluster_file: Path | None = None,
) -> None:
    """Run a block store node until SIGTERM or SIGINT (the body of `k2 blockstore`). With a
    cluster file, the node registers its address and capacity in the region's metadata row so
    connectors find it; a cluster that cannot be reached is logged and serving continues
    (connectors given the address explicitly still work)."""
    store = open_store(data, config)
    security = None
    if cluster_file is not None:
        from k2store import cluster as cluster_mod
        from k2store.rocksengine import RocksBlobStore

        cluster = cluster_mod.load(cluster_file)
        if cluster.settings.security.tls:
            owners = BlockOwners(RocksBlobStore(data / "owners"))
            security = BlockNodeSecurity.for_cluster(cluster, region, owners)
    node = BlockNode(store, region, address, security=security)
    # With a fixed port, register before serving: whoever sees this node answer (the launcher
    # waits for that) can also find it in the metadata. Port 0 is known only once serving.
    early = cluster_file is not None and not address.endswith(":0")
    if early and cluster_file is not None:
        await _register(cluster_file, region, node.address, store.config.disk_bytes)
    await node.start()
    if not early and cluster_file is not None:
        await _register(cluster_file, region, node.address, store.config.disk_bytes)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(node.stop()))
    await node.wait_stopped()


async def _register(cluster_file: Path, region: str, address: str, capacity: int) -> None:
    """Add this store to its region's row. The row is the operator's (tenants only read it), so
    on a secured cluster this runs on an admin token: K2_TOKEN, K2_TOKEN_FILE or the cluster
    file's `client_token_file` (the operator's, as `k2 cluster up --secure` writes it). A block
    store node's certificate is not a K2 node's, so it cannot stand in."""
    from k2store.client import AsyncClient
    from kvtier.metadata import BlockMetadata

    try:
        async with await AsyncClient.connect(cluster_file, region=region) as client:
            await BlockMetadata(client).register_store(region, address, capacity_bytes=capacity)
        log.info("registered block store %s in region %s", address, region)
    except K2Error as e:
        log.warning("could not register block store %s in the metadata: %s", address, e)
