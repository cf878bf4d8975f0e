"""A block store node's bulk read path: frames over a plain TCP socket, beside its gRPC service.

Purpose
    grpc.aio moves about 0.65 GB/s here whatever the chunk size (a serialization, a parse and a
    join per message in Python); a plain socket read with `loop.sock_recv_into` into a buffer
    sized for the frame moves the same payloads at ~2.8 GB/s, twice what Redis serves
    (docs/benchmarks.md). A `BlockStoreClient` reads through this path once the node has told it
    the port (`GetChunk.bulk_port`, in the first reply of a streamed Get), and falls back to gRPC
    for good if the path fails. Same-host readers use shared memory first (kvtier/shm.py).

Wire format (one request and one reply at a time per connection; connections are reused)
    request: ``b"K2B1" || u16 key length (big endian) || key``
             ``b"K2B2" || u16 key length || key || u64 start || u64 length``: bytes
             [start, start + length) of the frame, cut at its end (`frame_range`; a layer-wise
             load reads each block in parts, kvtier/connector.py)
    reply:   ``status (1 byte: 0 found, 1 miss) || u64 length || frame or range``

Security
    The path has no TLS and no tokens, so a node runs it only when the cluster is not secured
    (`BlockNode` leaves it off otherwise, and its Get replies carry no port). It serves reads
    only; what arrives is verified by the reader like any frame (`verify_frame`: checksum and
    key), so a wrong or damaged frame is a miss, never data.

Failure modes
    A request the server cannot parse closes the connection. On the client, anything but a whole
    reply (refused, reset, short, a bad status, past the deadline) raises `BulkUnavailable`; the
    connection is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

from kvtier.errors import BlockStoreUnavailable

__all__ = ["MAGIC", "MAGIC_RANGE", "BulkClient", "BulkServer", "BulkUnavailable", "frame_range"]

log = logging.getLogger("kvtier.bulk")

MAGIC = b"K2B1"
MAGIC_RANGE = b"K2B2"
_FOUND, _MISS = 0, 1
MAX_KEY_BYTES = 1024


class BulkUnavailable(BlockStoreUnavailable):
    """The bulk path did not deliver a whole reply (the caller falls back to gRPC)."""


def frame_range(frame: bytes | bytearray | memoryview, start: int, length: int) -> memoryview:
    """Bytes [start, start + length) of a frame, cut at its end (empty past it); a view, no
    copy. The reader compares the length it got with the one it asked for."""
    mv = memoryview(frame)
    return mv[min(start, mv.nbytes) : min(start + length, mv.nbytes)]


class BulkServer:
    """Serves `get(key) -> frame | None` (run in a worker thread: the store reads disk) over TCP.
    Bind to the host of the node's gRPC address, port 0 (the chosen one is `port`)."""

    def __init__(
        self,
        get: Callable[[bytes], bytes | None],
        host: str,
        *,
        get_if_in_memory: Callable[[bytes], bytes | None] | None = None,
    ) -> None:
        """`get_if_in_memory`: a non-blocking lookup tried first on the event loop (a memory
        hit needs no worker thread)."""
        self._get = get
        self._peek = get_if_in_memory
        self._host = host
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self.port = 0
        self.served = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self._host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening and close every connection (a server's close leaves them open)."""
        if self._server is not None:
            self._server.close()
            for w in list(self._conns):
                w.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        try:
            while True:
                head = await reader.readexactly(6)
                n = int.from_bytes(head[4:6], "big")
                if head[:4] not in (MAGIC, MAGIC_RANGE) or not 0 < n <= MAX_KEY_BYTES:
                    return  # not our protocol: drop the connection
                key = await reader.readexactly(n)
                span = None
                if head[:4] == MAGIC_RANGE:
                    raw = await reader.readexactly(16)
                    span = int.from_bytes(raw[:8], "big"), int.from_bytes(raw[8:], "big")
                frame = self._peek(key) if self._peek is not None else None
                if frame is None:
                    frame = await asyncio.to_thread(self._get, key)
                if frame is None:
                    writer.write(bytes([_MISS]) + (0).to_bytes(8, "big"))
                else:
                    data = frame if span is None else frame_range(frame, *span)
                    writer.write(bytes([_FOUND]) + len(data).to_bytes(8, "big"))
                    writer.write(data)
                    self.served += 1
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return  # the client went away
        except Exception:
            log.exception("bulk read failed")
        finally:
            self._conns.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class BulkClient:
    """Reads frames from one node's bulk port; create and use it on one event loop. Keeps idle
    connections for reuse (one per concurrent read)."""

    def __init__(self, host: str, port: int, *, timeout_s: float = 10.0) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self._idle: list[socket.socket] = []

    def close(self) -> None:
        for s in self._idle:
            s.close()
        self._idle.clear()

    def __del__(self) -> None:
        self.close()  # a client dropped without close must not leak its kept sockets

    async def _connect(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        family, kind, proto, _, addr = infos[0]
        s = socket.socket(family, kind, proto)
        s.setblocking(False)
        try:
            await loop.sock_connect(s, addr)
        except BaseException:
            s.close()
            raise
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    async def get(self, key: bytes, span: tuple[int, int] | None = None) -> bytearray | None:
        """The frame stored under key (unverified: the caller verifies it), None on a miss.
        `span` (start, length): only that byte range of the frame, cut at its end."""
        if not 0 < len(key) <= MAX_KEY_BYTES:
            raise BulkUnavailable(f"bulk read: a key of {len(key)} bytes")
        if span is None:
            request = MAGIC + len(key).to_bytes(2, "big") + key
        else:
            start, length = span
            request = (
                MAGIC_RANGE
                + len(key).to_bytes(2, "big")
                + key
                + start.to_bytes(8, "big")
                + length.to_bytes(8, "big")
            )
        # A kept connection may have been closed by the node since (a restart): one more try
        # on a fresh one before the path counts as failed.
        for reused in (True, False) if self._idle else (False,):
            s = self._idle.pop() if reused else None
            try:
                async with asyncio.timeout(self.timeout_s):
                    if s is None:
                        s = await self._connect()
                    frame = await self._exchange(s, request)
            except (OSError, TimeoutError, BulkUnavailable) as e:
                if s is not None:
                    s.close()
                if reused:
                    continue
                if isinstance(e, BulkUnavailable):
                    raise
                raise BulkUnavailable(f"bulk read from {self.host}:{self.port}: {e!r}") from None
            except BaseException:
                if s is not None:
                    s.close()  # cancelled mid-reply: the connection's state is unknown
                raise
            self._idle.append(s)
            return frame
        raise AssertionError("unreachable")

    async def _exchange(self, s: socket.socket, request: bytes) -> bytearray | None:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(s, request)
        head = bytearray(9)
        await _recv_exactly(loop, s, memoryview(head))
        n = int.from_bytes(head[1:], "big")
        if head[0] == _MISS and n == 0:
            return None
        if head[0] != _FOUND:
            raise BulkUnavailable(f"bulk read from {self.host}:{self.port}: status {head[0]}")
        frame = bytearray(n)
        await _recv_exactly(loop, s, memoryview(frame))
        return frame


async def _recv_exactly(
    loop: asyncio.AbstractEventLoop, s: socket.socket, into: memoryview
) -> None:
    got = 0
    while got < len(into):
        n = await loop.sock_recv_into(s, into[got:])
        if n == 0:
            raise BulkUnavailable(f"bulk read: connection closed after {got} of {len(into)} bytes")
        got += n
