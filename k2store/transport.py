"""Node-to-node and client-to-node calls over gRPC, behind a small interface.

Protocol code asks a `Transport` to deliver a request to a named node and waits for the answer;
it never sees channels, addresses or status codes. `GrpcTransport` binds that to gRPC (one channel
per peer, a deadline on every call, typed errors rebuilt from the ``k2-error`` trailer). The
deterministic simulator binds the same interface to a simulated network; the wide-area link
emulation (latency, partitions) also hooks in here, so every message between regions pays it.

Wide-area emulation (`WanEmulation`, built by `cluster_transport` from the cluster file)
    A call sleeps the request's one-way delay (k2store/wan.py: RTT/2 + size/bandwidth + jitter)
    before sending it and the reply's after receiving it, so a cross-region call costs one round
    trip of the pair, and its deadline covers both. A node calling itself pays nothing. Partitions
    are checked as each direction is sent:

    - request cut: `Unavailable` at once, naming the cut. Nothing was sent, so a retry is safe,
      and a demo or test does not wait out a deadline per attempt;
    - reply cut (a one-way partition the other way): the request was delivered and may have run;
      the caller gets `DeadlineExceeded` when its timeout expires, an ambiguous outcome as on a
      real network;
    - a reply that would land after the deadline: `DeadlineExceeded` at the deadline.

    An error reply (a typed K2Error, a refused connection) pays the return trip like an answer.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import grpc
from google.protobuf.message import Message

from k2store.errors import (
    ERROR_METADATA_KEY,
    DeadlineExceeded,
    K2Error,
    Unavailable,
    UnknownNode,
    error_for,
)
from k2store.filewatch import FileWatch
from k2store.wan import OVERRIDES_FILE, LinkCut, LinkModel, NetworkSettings, read_overrides

if TYPE_CHECKING:
    from k2store.cluster import ClusterConfig

log = logging.getLogger("k2.wan")

M = TypeVar("M", bound=Message)

# 64 MiB values plus framing; both ends must agree or large values fail with RESOURCE_EXHAUSTED.
MAX_MESSAGE_BYTES = 80 * 1024 * 1024
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 0),  # K2 retries itself, knowing which errors are safe to retry
    # gRPC shares connections between channels of one process by default, so one caller's failed
    # dial (a replica pulling from a node that is still starting) would put every other caller's
    # channel to that node into the same reconnect backoff. Each channel keeps its own, and
    # reconnects quickly: nodes restart in about a second.
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


class Transport(Protocol):
    """Delivers one request to a named node and returns its answer or raises a K2Error."""

    async def call(
        self, node: str, method: str, request: Message, response_type: type[M], *, timeout_s: float
    ) -> M: ...

    async def close(self) -> None: ...


def rpc_error_to_k2(e: grpc.aio.AioRpcError, target: str) -> K2Error:
    reason = None
    for k, v in e.trailing_metadata() or ():
        if k == ERROR_METADATA_KEY:
            reason = v if isinstance(v, str) else bytes(v).decode()
    code = e.code()
    if reason is None and code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"{target} is unavailable: {e.details()}")
    if reason is None and code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"{target} did not answer within the deadline")
    return error_for(reason, code, e.details() or str(code))


_DROPPED_CHANNEL_GRACE_S = 30.0


class GrpcTransport:
    """A `Transport` over gRPC to the nodes named in `addresses` (name -> host:port)."""

    def __init__(
        self,
        addresses: Mapping[str, str],
        *,
        channel_factory: Callable[[str], grpc.aio.Channel] | None = None,
        wan: WanEmulation | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        """`wan`: the wide-area emulation this caller pays (None: none; see the module doc).
        `metadata`: sent with every call (a client's bearer token; k2store/security.py)."""
        self._addresses = dict(addresses)
        self._wan = wan
        self._metadata = tuple(metadata) or None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._factory = channel_factory or (
            lambda addr: grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS)
        )

    def channel(self, node: str) -> grpc.aio.Channel:
        ch = self._channels.get(node)
        if ch is None:
            addr = self._addresses.get(node)
            if addr is None:
                raise UnknownNode(f"unknown node {node!r}")
            ch = self._factory(addr)
            self._channels[node] = ch
        return ch

    async def call(
        self, node: str, method: str, request: Message, response_type: type[M], *, timeout_s: float
    ) -> M:
        self.channel(node)  # UnknownNode before anything else

        def stub() -> Any:
            # Taken at the moment of sending: the channel may have been replaced meanwhile
            # (during the emulated delay) by a call that found the node unreachable.
            return self.channel(node).unary_unary(
                method,
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=response_type.FromString,
            )

        wan = self._wan
        if (
            wan is not None
            and wan.applies_to(node)
            and wan.model(asyncio.get_running_loop().time()).is_active()
        ):
            result: M = await self._emulated_call(wan, stub, node, request, timeout_s)
        else:
            result = await self._invoke(stub, node, request, timeout_s)
        return result

    async def _invoke(
        self, stub: Callable[[], Any], node: str, request: Message, timeout_s: float
    ) -> Any:
        try:
            # The outer bound guards against a call that would never finish (gRPC has been seen
            # to leave a call on a channel closed under it pending past its deadline).
            # asyncio.timeout, not wait_for: no task of its own for every call.
            async with asyncio.timeout(timeout_s + 1.0):
                return await stub()(request, timeout=timeout_s, metadata=self._metadata)
        except TimeoutError:
            self._drop(node)
            raise DeadlineExceeded(f"node {node!r} did not answer within the deadline") from None
        except grpc.aio.UsageError:  # the channel was closed under this call: try a fresh one
            self._drop(node)
            raise Unavailable(f"node {node!r}: connection replaced, retry") from None
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE and ERROR_METADATA_KEY not in dict(
                e.trailing_metadata() or ()
            ):
                # The node could not be reached. Start the next call on a fresh channel: the
                # old one would fail fast for its whole reconnect backoff (up to seconds) even
                # after the node is back, e.g. when it restarted or was still starting.
                self._drop(node)
            raise rpc_error_to_k2(e, f"node {node!r} ({self._addresses[node]})") from None

    def _drop(self, node: str) -> None:
        """Replace node's channel for future calls. The old one closes only after a grace
        period, so calls still running on it (long polls) finish or time out on their own."""
        ch = self._channels.pop(node, None)
        if ch is not None:
            task = asyncio.ensure_future(self._close_later(ch))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _close_later(self, ch: grpc.aio.Channel) -> None:
        try:
            await asyncio.sleep(_DROPPED_CHANNEL_GRACE_S)
        finally:
            await ch.close()

    async def _emulated_call(
        self,
        wan: WanEmulation,
        stub: Callable[[], Any],
        node: str,
        request: Message,
        timeout_s: float,
    ) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        target = f"node {node!r} ({self._addresses[node]})"
        late = DeadlineExceeded(f"{target} did not answer within the deadline")
        try:
            there = wan.delay(loop.time(), node, request.ByteSize(), outbound=True)
        except LinkCut as e:
            raise Unavailable(f"{target} is unreachable: {e}") from None
        if there >= timeout_s:
            await asyncio.sleep(timeout_s)
            raise late
        await _sleep(there)
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise late
        error: K2Error | None = None
        try:
            result = await self._invoke(stub, node, request, remaining)
            nbytes = result.ByteSize()
        except DeadlineExceeded:
            raise
        except K2Error as e:
            error, result, nbytes = e, None, len(str(e)) + 16  # + status code and reason
        try:
            back = wan.delay(loop.time(), node, nbytes, outbound=False)
        except LinkCut as e:
            # Delivered and perhaps executed, but the answer is lost: the caller cannot know.
            await _sleep(deadline - loop.time())
            raise DeadlineExceeded(
                f"{target} did not answer within the deadline (its reply was lost: {e})"
            ) from None
        if loop.time() + back > deadline:
            await _sleep(deadline - loop.time())
            raise late
        await _sleep(back)
        if error is not None:
            raise error
        return result

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        closing = list(self._closing)
        for task in closing:
            task.cancel()  # its finally closes the dropped channel now
        await asyncio.gather(*(c.close() for c in channels), *closing, return_exceptions=True)


async def _sleep(seconds: float) -> None:
    if seconds > 0:
        await asyncio.sleep(seconds)


class WanEmulation:
    """One caller's place on the emulated wide-area network, and the `LinkModel` it pays.

    The model is the cluster file's `[network]` settings with the overrides file on top; the file
    is looked at (one stat) at most once per `check_interval_s` of event-loop time and re-read when
    its inode, mtime or size changed, so `k2 cluster net ...` reaches every process within about
    that long. A malformed overrides file is logged and ignored: the previous model stays.
    """

    def __init__(
        self,
        settings: NetworkSettings,
        *,
        region: str,
        regions_of: Mapping[str, str],
        node: str | None = None,
        overrides_path: Path | None = None,
        rng: random.Random | None = None,
        check_interval_s: float = 0.1,
    ) -> None:
        """`region`/`node`: where the caller sits (`node` None: a client). `regions_of`: each
        node's region. `rng`: draws the jitter (inject a seeded one for a replayable run)."""
        self.region = region
        self.node = node
        self._regions_of = dict(regions_of)
        self._settings = settings
        self._rng = rng or random.Random()
        self._check_interval_s = check_interval_s
        self._next_check = float("-inf")
        self._watch = None if overrides_path is None else FileWatch(overrides_path)
        self._model = LinkModel(settings)

    def applies_to(self, node: str) -> bool:
        """False for a call to the caller itself (loopback: no wire to emulate)."""
        return node != self.node

    def model(self, now: float) -> LinkModel:
        """The model in force at event-loop time `now`, after re-reading a changed file."""
        if self._watch is not None and now >= self._next_check:
            self._next_check = now + self._check_interval_s
            if self._watch.changed():
                self._reload(self._watch.path)
        return self._model

    def _reload(self, path: Path) -> None:
        try:
            overrides = read_overrides(path)
        except (OSError, ValueError) as e:
            log.warning("ignoring network overrides: %s", e)
            return
        self._model = LinkModel(self._settings, overrides)
        log.info("network overrides %s", "reset" if overrides.is_empty() else "changed")

    def delay(self, now: float, node: str, nbytes: int, *, outbound: bool) -> float:
        """Seconds a message of `nbytes` to (`outbound`) or from `node` takes; `LinkCut` if a
        partition stops it."""
        model = self.model(now)
        if not model.is_active():
            return 0.0
        other = self._regions_of.get(node, self.region)
        if outbound:
            return model.delay_for(
                self.region, other, nbytes, self._rng, src_node=self.node, dst_node=node
            )
        return model.delay_for(
            other, self.region, nbytes, self._rng, src_node=node, dst_node=self.node
        )


def cluster_transport(
    cluster: ClusterConfig,
    *,
    node: str | None = None,
    region: str | None = None,
    rng: random.Random | None = None,
    check_interval_s: float = 0.1,
    token: str | None = None,
) -> GrpcTransport:
    """The `GrpcTransport` of node `node`, or of a client in `region` (default: the first region),
    paying the cluster's wide-area emulation: its `[network]` settings, plus the overrides file
    next to the cluster file (`net.toml`) when the cluster came from a file, looked at every
    `check_interval_s`.

    With `[security] tls` on, channels are mutual TLS with the node's certificate (`node`) or the
    client certificate, and a client sends its bearer token (`token`, else see
    `security.client_token`) with every call."""
    addresses = {n.name: n.address for n in cluster.nodes}
    path = cluster.path.parent / OVERRIDES_FILE if cluster.path is not None else None
    secured = _secured(cluster, node, token)
    if path is None and not cluster.settings.network.enabled:
        return GrpcTransport(addresses, **secured)
    wan = WanEmulation(
        cluster.settings.network,
        region=cluster.node(node).region if node else region or cluster.regions[0].name,
        node=node,
        regions_of={n.name: n.region for n in cluster.nodes},
        overrides_path=path,
        rng=rng,
        check_interval_s=check_interval_s,
    )
    return GrpcTransport(addresses, wan=wan, **secured)


def _secured(cluster: ClusterConfig, node: str | None, token: str | None) -> dict[str, Any]:
    """GrpcTransport arguments for a secured cluster: TLS channels, and a client's token."""
    sec = cluster.settings.security
    if not sec.tls:
        return {}
    from k2store.certs import channel_credentials
    from k2store.security import bearer_metadata, client_token

    creds = channel_credentials(sec, node)
    tok = None if node is not None else client_token(sec, token)
    return {
        "channel_factory": lambda addr: grpc.aio.secure_channel(
            addr, creds, options=CHANNEL_OPTIONS
        ),
        "metadata": bearer_metadata(tok) if tok else (),
    }
