"""A serving node: the engine behind an OpenAI-compatible HTTP API (`k2 serve`).

Endpoints (loopback only)
    POST /v1/chat/completions   messages -> an assistant message; ``"stream": true`` streams
                                server-sent events (``chat.completion.chunk``, then ``[DONE]``)
    POST /v1/completions        prompt (text, or a list of token ids) -> text; streams the same way
    GET  /v1/models             the one model served
    GET  /metrics               Prometheus text: requests, TTFT histogram, time between tokens,
                                prompt tokens, tokens reused, bytes loaded and moved
    GET  /healthz               {"status": "ok", ...}

Extensions to the OpenAI request and response
    - ``session_id`` (request): the chat continues a kvtier session (kvtier.sessions). Send only
      the new messages; the node prepends the session's earlier turns, and after answering
      appends the new messages and the reply as turns (token ids and block keys included). An id
      without a region (``"alice"``) names a session of this region, created on first use; the
      response's ``session_id`` is the full id (``"us-east:alice"``), usable in any region. A
      request in another region than the session's home reads it with read-your-writes and then
      moves its home here (`ServeConfig.move_sessions`), so the user's next turns are local.
    - ``k2`` (response; in the last chunk when streaming): what the KV tier did for this request
      (tokens reused and from which regions, bytes moved, TTFT, the recompute estimate).
    - ``usage.prompt_tokens_details.cached_tokens`` as OpenAI reports prompt caching.

Why the stdlib (asyncio streams) and not aiohttp: the node needs four routes, JSON bodies and
server-sent events, which fit in ~150 lines; a framework would add five packages to every
install for that. HTTP/1.1 keep-alive is supported for non-streaming requests; a streamed
response ends its connection (``Connection: close``), which every OpenAI client handles.

Failure modes
    Malformed JSON or fields: 400 with an OpenAI-style error object. A session that does not
    exist (given with its region) or expired: 404. The tier or the store unavailable: the engine
    computes the prompt itself (the connector degrades to misses); a session store that cannot
    answer: 503. Requests are served one at a time by the engine; others wait their turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from k2store import evloop
from k2store.client import AsyncClient, RetryPolicy, client_truetime
from k2store.cluster import ClusterConfig
from k2store.errors import InvalidArgument, K2Error, PermissionDenied
from kvtier.blocks import block_hashes
from kvtier.connector import AsyncKVConnector, ConnectorConfig
from kvtier.engine import (
    Engine,
    EngineConfig,
    HFTokenCodec,
    RequestMetrics,
    SamplingParams,
    TokenCodec,
    block_spec_for,
    namespace_for,
)
from kvtier.errors import UnknownTenant
from kvtier.metadata import BlockMetadata
from kvtier.router import RouterRegistration
from kvtier.sessions import Session, SessionNotFound, SessionStore, TurnInput
from truetime import ClockSource, SystemClock

__all__ = ["TTFT_BUCKETS_S", "ServeConfig", "ServingNode", "ServingStats", "serve_http"]

log = logging.getLogger("kvtier.serve")

TTFT_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
DEFAULT_QUOTA_BYTES = 16 << 30
_MAX_BODY = 16 << 20


@dataclass(frozen=True, slots=True)
class ServeConfig:
    region: str
    tenant: str = "default"
    """The tenant whose namespace this node's blocks live in (registered on first start)."""
    model_name: str = "k2-model"
    """The model id reported by the API."""
    default_max_tokens: int = 128
    move_sessions: bool = True
    """Move a session's home to this region when a request for it lands here."""


@dataclass(slots=True)
class ServingStats:
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    bytes_moved: int = 0
    bytes_loaded: int = 0
    ttft_buckets: list[int] = field(default_factory=lambda: [0] * (len(TTFT_BUCKETS_S) + 1))
    ttft_sum_s: float = 0.0
    inter_token_sum_s: float = 0.0
    inter_token_count: int = 0

    def observe(self, m: RequestMetrics) -> None:
        self.requests += 1
        self.prompt_tokens += m.prompt_tokens
        self.cached_tokens += m.cached_tokens
        self.completion_tokens += m.completion_tokens
        self.bytes_moved += m.bytes_moved
        self.bytes_loaded += m.bytes_loaded
        i = next((i for i, b in enumerate(TTFT_BUCKETS_S) if m.ttft_s <= b), len(TTFT_BUCKETS_S))
        self.ttft_buckets[i] += 1
        self.ttft_sum_s += m.ttft_s
        self.inter_token_sum_s += sum(m.inter_token_s)
        self.inter_token_count += len(m.inter_token_s)

    def prometheus(self, region: str) -> str:
        lab = f'region="{region}"'
        lines = [
            "# TYPE k2_requests_total counter",
            f"k2_requests_total{{{lab}}} {self.requests}",
            "# TYPE k2_request_errors_total counter",
            f"k2_request_errors_total{{{lab}}} {self.errors}",
            "# TYPE k2_prompt_tokens_total counter",
            f"k2_prompt_tokens_total{{{lab}}} {self.prompt_tokens}",
            "# TYPE k2_reused_tokens_total counter",
            f"k2_reused_tokens_total{{{lab}}} {self.cached_tokens}",
            "# TYPE k2_completion_tokens_total counter",
            f"k2_completion_tokens_total{{{lab}}} {self.completion_tokens}",
            "# TYPE k2_kv_bytes_moved_total counter",
            f"k2_kv_bytes_moved_total{{{lab}}} {self.bytes_moved}",
            "# TYPE k2_kv_bytes_loaded_total counter",
            f"k2_kv_bytes_loaded_total{{{lab}}} {self.bytes_loaded}",
            "# TYPE k2_ttft_seconds histogram",
        ]
        cum = 0
        for b, n in zip(TTFT_BUCKETS_S, self.ttft_buckets, strict=False):
            cum += n
            lines.append(f'k2_ttft_seconds_bucket{{{lab},le="{b}"}} {cum}')
        lines += [
            f'k2_ttft_seconds_bucket{{{lab},le="+Inf"}} {self.requests}',
            f"k2_ttft_seconds_sum{{{lab}}} {self.ttft_sum_s:.6f}",
            f"k2_ttft_seconds_count{{{lab}}} {self.requests}",
            "# TYPE k2_inter_token_seconds summary",
            f"k2_inter_token_seconds_sum{{{lab}}} {self.inter_token_sum_s:.6f}",
            f"k2_inter_token_seconds_count{{{lab}}} {self.inter_token_count}",
        ]
        return "\n".join(lines) + "\n"


class BadRequest(InvalidArgument):
    pass


@dataclass(slots=True)
class _Prepared:
    prompt_ids: list[int]
    params: SamplingParams
    session: Session | None
    session_id: str | None
    new_messages: list[dict[str, str]]
    arrived_ns: int | None = None


class ServingNode:
    """An engine, its tier connector and the session store of one region, behind the API."""

    def __init__(
        self,
        engine: Engine,
        config: ServeConfig,
        *,
        sessions: SessionStore | None = None,
        clock: ClockSource | None = None,
        owned: Sequence[Any] = (),
    ) -> None:
        self.engine = engine
        self.config = config
        self.sessions = sessions
        self.clock: ClockSource = clock or SystemClock()
        self.stats = ServingStats()
        self.in_flight = 0
        """Requests being answered now (the load this node reports to a router)."""
        self._owned = list(owned)

    @classmethod
    async def open(
        cls,
        cluster: ClusterConfig | str | Path,
        region: str,
        *,
        model: Any,
        tokenizer: TokenCodec | Any,
        revision: str,
        tenant: str = "default",
        engine_config: EngineConfig | None = None,
        model_name: str | None = None,
        clock: ClockSource | None = None,
        stores: Mapping[str, Sequence[str]] | None = None,
        connector_config: ConnectorConfig | None = None,
        token: str | None = None,
        client_time: bool = True,
    ) -> ServingNode:
        """Connect to the cluster as a node of `region`: register the tenant (if new, and the
        token may: see `_ensure_tenant`) and the model's namespace, open the connector (block stores registered in the metadata unless
        `stores` is given) and the session store. `token`: the bearer token on a secured
        cluster (default: K2_TOKEN, K2_TOKEN_FILE or the cluster file's); the tenant's own
        token suffices once an operator has registered the tenant. `client_time` (default on):
        this node's K2 client holds time on this host's clock (README, "Client time"; the
        host's clock must be held to the cluster's bound, as the nodes' are; a coordinator that
        reads a client's clock ahead of its own keeps that transaction's wait)."""
        clk: ClockSource = clock or SystemClock()
        codec: TokenCodec = (
            tokenizer if hasattr(tokenizer, "chat_ids") else HFTokenCodec(tokenizer, revision)
        )
        ecfg = engine_config or EngineConfig()
        # Generous retries: a wide-area transaction can lose several rounds to replication seals
        # while a fresh cluster settles.
        retry = RetryPolicy(max_attempts=30, initial_backoff_s=0.02, max_backoff_s=0.5)
        client = await AsyncClient.connect(cluster, region=region, retry=retry, token=token)
        if client_time:
            client.tt = client_truetime(client.cluster)
        try:
            metadata = BlockMetadata(client, clock=clk)
            await _ensure_tenant(metadata, tenant)
            spec = block_spec_for(model.config, block_tokens=ecfg.block_tokens, dtype=ecfg.kv_dtype)
            ns = namespace_for(revision, f"{codec.name}"[:128], spec, tenant)
            await metadata.register_namespace(ns)
            conn = await AsyncKVConnector.open(
                client,
                ns,
                config=replace(connector_config or ConnectorConfig(region), region=region),
                stores=stores,
                clock=clk,
            )
        except BaseException:
            await client.close()
            raise
        engine = Engine(model, codec, conn, config=ecfg, clock=clk)
        sessions = SessionStore(client, clk)
        cfg = ServeConfig(region=region, tenant=tenant, model_name=model_name or revision)
        return cls(engine, cfg, sessions=sessions, clock=clk, owned=[conn, client])

    async def close(self) -> None:
        await self.engine.flush()
        for x in self._owned:
            with contextlib.suppress(Exception):
                await x.close()

    # -- requests -------------------------------------------------------------------------------

    def _params(self, body: Mapping[str, Any]) -> SamplingParams:
        try:
            max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
            temperature = float(body.get("temperature", 0.0) or 0.0)
            top_p = float(body.get("top_p", 1.0) or 1.0)
            seed = body.get("seed")
            mt = int(self.config.default_max_tokens if max_tokens is None else max_tokens)
        except (TypeError, ValueError) as e:
            raise BadRequest(f"bad sampling parameter: {e}") from None
        if mt < 1 or mt > 8192:
            raise BadRequest(f"max_tokens must be in [1, 8192], got {mt}")
        if not 0.0 <= temperature <= 5.0 or not 0.0 < top_p <= 1.0:
            raise BadRequest("temperature must be in [0, 5] and top_p in (0, 1]")
        if seed is not None and not isinstance(seed, int):
            raise BadRequest("seed must be an integer")
        return SamplingParams(max_tokens=mt, temperature=temperature, top_p=top_p, seed=seed)

    async def _session(self, sid: str) -> tuple[str, Session | None]:
        """The full session id and the session (None: a new one is created on append)."""
        if self.sessions is None:
            raise BadRequest("this node has no session store")
        tenant = self.config.tenant
        full = sid if ":" in sid else f"{self.config.region}:{sid}"
        try:
            return full, await self.sessions.get(tenant, full)
        except SessionNotFound:
            if ":" in sid:
                raise
        name = sid
        await self.sessions.create(tenant, self.config.model_name, name=name)
        return full, None

    async def prepare_chat(self, body: Mapping[str, Any]) -> _Prepared:
        arrived = self.clock.monotonic_ns()
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise BadRequest("messages must be a non-empty list")
        new: list[dict[str, str]] = []
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise BadRequest("each message needs a role and a content")
            content = m.get("content", "")
            if isinstance(content, list):  # OpenAI content parts: keep the text ones
                content = "".join(
                    p.get("text", "")
                    for p in content
                    if isinstance(p, dict) and p.get("type") == "text"
                )
            if not isinstance(content, str):
                raise BadRequest("message content must be a string")
            new.append({"role": m["role"], "content": content})
        params = self._params(body)
        sid = body.get("session_id")
        session: Session | None = None
        full_sid: str | None = None
        history: list[dict[str, str]] = []
        if sid is not None:
            if not isinstance(sid, str) or not sid:
                raise BadRequest("session_id must be a non-empty string")
            full_sid, session = await self._session(sid)
            if session is not None:
                history = [{"role": t.role, "content": t.text} for t in session.turns]
        ids = self.engine.tokenizer.chat_ids(history + new)
        return _Prepared(ids, params, session, full_sid, new, arrived)

    def prepare_completion(self, body: Mapping[str, Any]) -> _Prepared:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str) and prompt:
            ids = self.engine.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            ids = [int(t) for t in prompt]
        else:
            raise BadRequest("prompt must be a non-empty string or list of token ids")
        return _Prepared(ids, self._params(body), None, None, [], self.clock.monotonic_ns())

    async def run(
        self, prep: _Prepared
    ) -> AsyncIterator[tuple[str, str | None, RequestMetrics | None]]:
        """(text delta, finish reason, metrics) per token; records the session turns after."""
        out: list[int] = []
        text: list[str] = []
        metrics: RequestMetrics | None = None
        self.in_flight += 1
        try:
            # A session last served in another region: its blocks there may be newer than this
            # region's replicas, so that region's rows are read at its leader.
            fresh: tuple[str, ...] = ()
            if prep.session is not None and prep.session.info.home_region != self.config.region:
                fresh = (prep.session.info.home_region,)
            async for ev in self.engine.generate(
                prep.prompt_ids, prep.params, arrived_ns=prep.arrived_ns, fresh_regions=fresh
            ):
                out.append(ev.token_id)
                text.append(ev.text)
                if ev.metrics is not None:
                    metrics = ev.metrics
                    self.stats.observe(ev.metrics)
                yield ev.text, ev.finish_reason, ev.metrics
            if prep.session_id is not None and metrics is not None:
                # Before the response ends (the non-streamed body, or the stream's [DONE]), so
                # a client's next turn, in any region, reads this one.
                await self._record(prep, out, "".join(text))
        finally:
            self.in_flight -= 1

    async def _record(self, prep: _Prepared, generated: list[int], reply: str) -> None:
        """Append the new messages and the reply as turns; move the session's home here."""
        assert self.sessions is not None and prep.session_id is not None
        tenant = self.config.tenant
        ns = self.engine.connector.ns if self.engine.connector is not None else None
        prev = len(prep.session.token_ids) if prep.session is not None else 0
        prompt = prep.prompt_ids
        hashes = [h.hex() for h in block_hashes(ns, [*prompt, *generated])] if ns else []
        bt = self.engine.spec.block_tokens

        def keys(lo: int, hi: int) -> list[str]:
            return [h for i, h in enumerate(hashes) if lo < (i + 1) * bt <= hi]

        try:
            for j, m in enumerate(prep.new_messages):
                last = j == len(prep.new_messages) - 1
                await self.sessions.append(
                    tenant,
                    prep.session_id,
                    TurnInput(
                        m["role"],
                        token_ids=prompt[prev:] if last else (),
                        block_keys=keys(prev, len(prompt)) if last else (),
                        text=m["content"],
                    ),
                )
            await self.sessions.append(
                tenant,
                prep.session_id,
                TurnInput(
                    "assistant",
                    token_ids=generated,
                    block_keys=keys(len(prompt), len(prompt) + len(generated)),
                    text=reply,
                ),
            )
            if (
                self.config.move_sessions
                and prep.session is not None
                and prep.session.info.home_region != self.config.region
            ):
                await self.sessions.move(tenant, prep.session_id, self.config.region)
        except K2Error as e:
            log.warning("could not record turns of session %s: %s", prep.session_id, e)

    async def flush(self) -> None:
        """Wait for the block stores of finished requests."""
        await self.engine.flush()

    # -- OpenAI objects -------------------------------------------------------------------------

    def k2_fields(self, m: RequestMetrics | None) -> dict[str, Any]:
        if m is None:
            return {}
        return {
            "region": self.config.region,
            "prompt_tokens": m.prompt_tokens,
            "reused_tokens": m.cached_tokens,
            "reused_blocks_by_region": m.cached_by_region,
            "choice": m.choice,
            "bytes_moved": m.bytes_moved,
            "bytes_loaded": m.bytes_loaded,
            "ttft_s": round(m.ttft_s, 6),
            "recompute_estimate_s": None
            if m.recompute_estimate_s is None
            else round(m.recompute_estimate_s, 6),
            "mean_inter_token_s": round(m.mean_inter_token_s, 6),
        }

    def usage(self, m: RequestMetrics | None) -> dict[str, Any]:
        if m is None:
            return {}
        return {
            "prompt_tokens": m.prompt_tokens,
            "completion_tokens": m.completion_tokens,
            "total_tokens": m.prompt_tokens + m.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": m.cached_tokens},
        }


# -- HTTP ---------------------------------------------------------------------------------------

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            413: "Payload Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}  # fmt: skip


def _error(
    status: int, message: str, kind: str = "invalid_request_error"
) -> tuple[int, dict[str, Any]]:
    return status, {"error": {"message": message, "type": kind, "code": status}}


async def _read_request(
    reader: asyncio.StreamReader,
) -> tuple[str, str, dict[str, str], bytes] | None:
    line = await reader.readline()
    if not line:
        return None
    parts = line.decode("latin-1").split()
    if len(parts) != 3:
        raise BadRequest("malformed request line")
    method, target, _version = parts
    headers: dict[str, str] = {}
    for _ in range(100):
        h = await reader.readline()
        if h in (b"\r\n", b"\n", b""):
            break
        k, _, v = h.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    n = int(headers.get("content-length", "0") or 0)
    if n < 0 or n > _MAX_BODY:
        raise BadRequest("body too large")
    body = await reader.readexactly(n) if n else b""
    return method, target.split("?", 1)[0], headers, body


def _head(status: int, ctype: str, length: int | None, keep_alive: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, '')}", f"Content-Type: {ctype}"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    else:
        lines.append("Cache-Control: no-cache")
    lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _handle(
    node: ServingNode, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while True:
            try:
                req = await _read_request(reader)
            except BadRequest as e:
                status, obj = _error(400, str(e))
                data = json.dumps(obj).encode()
                writer.write(_head(status, "application/json", len(data), False) + data)
                await writer.drain()
                return
            if req is None:
                return
            method, path, headers, raw = req
            keep = headers.get("connection", "").lower() != "close"
            streamed = await _dispatch(node, writer, method, path, raw, keep)
            if streamed or not keep:
                return
    except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _dispatch(
    node: ServingNode, writer: asyncio.StreamWriter, method: str, path: str, raw: bytes, keep: bool
) -> bool:
    """Answer one request; True when the response was streamed (the connection then ends)."""

    async def send(status: int, obj: Any, ctype: str = "application/json") -> None:
        data = obj.encode() if isinstance(obj, str) else json.dumps(obj).encode()
        writer.write(_head(status, ctype, len(data), keep) + data)
        await writer.drain()

    now_s = node.clock.now_ns() // 1_000_000_000
    if method == "GET" and path == "/healthz":
        await send(
            200, {"status": "ok", "region": node.config.region, "model": node.config.model_name}
        )
        return False
    if method == "GET" and path == "/metrics":
        await send(200, node.stats.prometheus(node.config.region), "text/plain; version=0.0.4")
        return False
    if method == "GET" and path == "/v1/models":
        await send(200, {"object": "list", "data": [
            {"id": node.config.model_name, "object": "model", "created": now_s, "owned_by": "k2"}
        ]})  # fmt: skip
        return False
    if path not in ("/v1/chat/completions", "/v1/completions"):
        await send(*_error(404, f"no route {method} {path}"))
        return False
    if method != "POST":
        await send(*_error(405, "use POST"))
        return False
    chat = path == "/v1/chat/completions"
    try:
        body = json.loads(raw or b"{}")
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        prep = await node.prepare_chat(body) if chat else node.prepare_completion(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        await send(*_error(400, f"malformed JSON: {e}"))
        return False
    except SessionNotFound as e:
        await send(*_error(404, str(e), "not_found_error"))
        return False
    except InvalidArgument as e:
        await send(*_error(400, str(e)))
        return False
    except K2Error as e:
        node.stats.errors += 1
        await send(*_error(503, f"session store unavailable: {e}", "service_unavailable"))
        return False
    rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
    base: dict[str, Any] = {
        "id": rid,
        "created": now_s,
        "model": node.config.model_name,
    }
    if prep.session_id is not None:
        base["session_id"] = prep.session_id
    if body.get("stream"):
        writer.write(_head(200, "text/event-stream", None, False))
        obj = "chat.completion.chunk" if chat else "text_completion"
        if chat:
            first = {**base, "object": obj, "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            ]}  # fmt: skip
            writer.write(f"data: {json.dumps(first)}\n\n".encode())
        async for delta, finish, m in node.run(prep):
            choice: dict[str, Any] = (
                {"index": 0, "delta": {"content": delta} if delta else {}, "finish_reason": finish}
                if chat
                else {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}
            )
            chunk: dict[str, Any] = {**base, "object": obj, "choices": [choice]}
            if finish is not None:
                chunk["usage"] = node.usage(m)
                chunk["k2"] = node.k2_fields(m)
            writer.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await writer.drain()
        writer.write(b"data: [DONE]\n\n")
        await writer.drain()
        return True
    parts: list[str] = []
    finish_reason: str | None = None
    metrics: RequestMetrics | None = None
    async for delta, finish, m in node.run(prep):
        parts.append(delta)
        finish_reason = finish or finish_reason
        metrics = m or metrics
    text = "".join(parts)
    choice0: dict[str, Any] = (
        {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish_reason,
        }
        if chat
        else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    )
    await send(200, {
        **base,
        "object": "chat.completion" if chat else "text_completion",
        "choices": [choice0],
        "usage": node.usage(metrics),
        "k2": node.k2_fields(metrics),
    })  # fmt: skip
    return False


async def serve_http(
    node: ServingNode,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    started: Any = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve node's API on http://host:port until `stop` is set; `started(port)` once listening."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise InvalidArgument(f"serving binds loopback addresses only, not {host!r}")
    stop = stop or asyncio.Event()
    server = await asyncio.start_server(lambda r, w: _handle(node, r, w), host, port)
    try:
        if started is not None:
            started(server.sockets[0].getsockname()[1])
        await stop.wait()
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5.0)


def main(args: Any) -> int:
    """`k2 serve`: load the model, join the cluster as a serving node of --region, serve HTTP."""
    import signal

    from k2store import launcher
    from kvtier.models import load_model

    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    data = args.data
    if args.cluster is None and data is None:
        data = Path(os.environ.get("K2_DATA", "k2-data"))
    cfg = launcher.load_cluster(data, args.cluster)
    cfg.region(args.region)  # bad input before the model loads
    if args.router:
        # The same checks the registration makes, before minutes of model loading.
        RouterRegistration(
            args.router,
            name=args.name or f"serve-{args.region}-{args.port}",
            region=args.region,
            url=f"http://127.0.0.1:{args.port or 1}",
            ttl_s=args.router_ttl,
        )
        if not args.router.startswith("http://"):
            raise InvalidArgument(f"--router {args.router!r}: only http://host:port is supported")
    loaded = load_model(args.model, progress=lambda msg: log.info("%s", msg))
    engine_config = EngineConfig(block_tokens=args.block_tokens, kv_dtype=args.kv_dtype)

    async def run() -> None:
        node = await ServingNode.open(
            cfg, args.region, model=loaded.model, tokenizer=loaded.tokenizer,
            revision=loaded.revision, tenant=args.tenant, engine_config=engine_config,
            model_name=loaded.name, client_time=args.client_time,
        )  # fmt: skip
        node.config = replace(node.config, default_max_tokens=args.max_tokens)
        await node.engine.calibrate((64, 256, 512))  # the prefill cost model's first points
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        registration: RouterRegistration | None = None

        def started(port: int) -> None:
            nonlocal registration
            print(
                f"serving {loaded.name} for region {args.region} on http://127.0.0.1:{port}/v1",
                flush=True,
            )
            if args.router:
                registration = RouterRegistration(
                    args.router,
                    name=args.name or f"serve-{args.region}-{port}",
                    region=args.region,
                    url=f"http://127.0.0.1:{port}",
                    load=lambda: float(node.in_flight),
                    ttl_s=args.router_ttl,
                ).start()

        try:
            await serve_http(node, port=args.port, started=started, stop=stop)
        finally:
            if registration is not None:
                await registration.close()
            await node.close()

    evloop.run(run())
    return 0


async def _ensure_tenant(metadata: BlockMetadata, tenant: str) -> None:
    """Register `tenant` with the default quota unless it is known. Registration writes the
    operator's rows (quota, sharing): on a secured cluster only an admin token may, so a serving
    node running with its tenant's token needs the operator to have registered the tenant first,
    and says so (PermissionDenied) rather than failing on some later row."""
    try:
        await metadata.tenant(tenant)
        return
    except UnknownTenant:
        pass
    try:
        await metadata.register_tenant(tenant, quota_bytes=DEFAULT_QUOTA_BYTES)
    except PermissionDenied:
        raise PermissionDenied(
            f"tenant {tenant!r} is not registered in the KV tier and this token may not register "
            f"it: an operator registers it first with an admin token (`k2 tenant register "
            f"{tenant}`, or kvtier.metadata.BlockMetadata.register_tenant)"
        ) from None
