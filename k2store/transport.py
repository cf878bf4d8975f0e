"""Node-to-node and client-to-node calls over gRPC, behind a small interface.

Protocol code asks a `Transport` to deliver a request to a named node and waits for the answer;
it never sees channels, addresses or status codes. `GrpcTransport` binds that to gRPC (one channel
per peer, a deadline on every call, typed errors rebuilt from the ``k2-error`` trailer). The
deterministic simulator binds the same interface to a simulated network; the wide-area link
emulation (latency, partitions) also hooks in here, so every message between regions pays it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

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

M = TypeVar("M", bound=Message)

# 64 MiB values plus framing; both ends must agree or large values fail with RESOURCE_EXHAUSTED.
MAX_MESSAGE_BYTES = 80 * 1024 * 1024
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 0),  # K2 retries itself, knowing which errors are safe to retry
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


class GrpcTransport:
    """A `Transport` over gRPC to the nodes named in `addresses` (name -> host:port)."""

    def __init__(
        self,
        addresses: Mapping[str, str],
        *,
        channel_factory: Callable[[str], grpc.aio.Channel] | None = None,
    ) -> None:
        self._addresses = dict(addresses)
        self._channels: dict[str, grpc.aio.Channel] = {}
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
        ch = self.channel(node)
        stub: Any = ch.unary_unary(
            method,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_type.FromString,
        )
        try:
            result: M = await stub(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            raise rpc_error_to_k2(e, f"node {node!r} ({self._addresses[node]})") from None
        return result

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
