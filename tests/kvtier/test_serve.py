"""The serving node's OpenAI-compatible API over a tiny model and an in-process cluster:
non-streaming and streaming responses parse as OpenAI objects, sessions carry a chat across
turns and regions, /metrics and /healthz answer."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from engine_env import ByteCodec, tiny_model
from kvtier_env import Env, kv_env, run

from kvtier.engine import EngineConfig
from kvtier.serve import ServingNode, serve_http


@asynccontextmanager
async def serving(
    env: Env, region: str, model: Any, *, client_time: bool = False
) -> AsyncIterator[tuple[ServingNode, str]]:
    node = await ServingNode.open(
        env.cfg,
        region,
        model=model,
        tokenizer=ByteCodec(),
        revision="tiny-llama@0",
        tenant="acme",
        engine_config=EngineConfig(block_tokens=4, kv_dtype="float32"),
        stores=env.addresses(),
        client_time=client_time,
    )
    stop = asyncio.Event()
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve_http(node, port=0, started=port.set_result, stop=stop))
    try:
        yield node, f"http://127.0.0.1:{await port}"
    finally:
        stop.set()
        await task
        await node.close()


def _call(url: str, body: dict[str, Any] | None = None) -> tuple[int, str, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


async def call(url: str, body: dict[str, Any] | None = None) -> tuple[int, str, bytes]:
    return await asyncio.to_thread(_call, url, body)


def sse(raw: bytes) -> list[Any]:
    events = [line[len(b"data: ") :] for line in raw.split(b"\n") if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    return [json.loads(e) for e in events[:-1]]


SYSTEM = "You are a terse assistant. " * 3


def test_chat_completion_non_streaming_and_streaming(tmp_path: Path) -> None:
    async def body() -> None:
        async with (
            kv_env(tmp_path, tenants=()) as env,
            serving(env, "us-east", tiny_model()) as (node, url),
        ):
            msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]
            status, ctype, raw = await call(
                url + "/v1/chat/completions", {"messages": msgs, "max_tokens": 5}
            )
            assert status == 200 and ctype == "application/json"
            r = json.loads(raw)
            assert r["object"] == "chat.completion" and r["id"].startswith("chatcmpl-")
            assert r["choices"][0]["message"]["role"] == "assistant"
            assert isinstance(r["choices"][0]["message"]["content"], str)
            assert r["choices"][0]["finish_reason"] in ("stop", "length")
            assert r["usage"]["prompt_tokens"] == len(ByteCodec().chat_ids(msgs))
            assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
            await node.flush()

            status, ctype, raw = await call(
                url + "/v1/chat/completions", {"messages": msgs, "max_tokens": 5, "stream": True}
            )
            assert status == 200 and ctype == "text/event-stream"
            chunks = sse(raw)
            assert all(
                c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"]
                for c in chunks
            )
            assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
            assert [c["choices"][0]["finish_reason"] for c in chunks[1:-1]] == [None] * (
                len(chunks) - 2
            )
            assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
            text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
            assert text == r["choices"][0]["message"]["content"]  # greedy: the same reply
            k2 = chunks[-1]["k2"]
            assert k2["reused_tokens"] > 0 and k2["choice"] == "local"
            assert (
                chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == k2["reused_tokens"]
            )

            status, _, raw = await call(url + "/v1/completions", {"prompt": "abc", "max_tokens": 3})
            c = json.loads(raw)
            assert status == 200 and c["object"] == "text_completion"
            assert isinstance(c["choices"][0]["text"], str) and c["usage"]["completion_tokens"] <= 3
            status, _, raw = await call(
                url + "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 2, "stream": True}
            )
            assert status == 200 and all(ch["object"] == "text_completion" for ch in sse(raw))

            status, _, raw = await call(url + "/healthz")
            assert status == 200 and json.loads(raw)["status"] == "ok"
            status, ctype, raw = await call(url + "/metrics")
            text = raw.decode()
            assert status == 200 and ctype.startswith("text/plain")
            assert 'k2_requests_total{region="us-east"} 4' in text
            assert 'k2_ttft_seconds_bucket{region="us-east",le="+Inf"} 4' in text
            assert "k2_reused_tokens_total" in text and "k2_kv_bytes_moved_total" in text

            for bad in (
                {"messages": []},
                {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            ):
                status, _, raw = await call(url + "/v1/chat/completions", bad)
                assert status == 400 and "message" in json.loads(raw)["error"]
            assert (await call(url + "/v1/nothing", {}))[0] == 404

    run(body)


def test_session_follows_the_user_to_another_region(tmp_path: Path) -> None:
    async def body() -> None:
        model = tiny_model()
        async with (
            kv_env(tmp_path, tenants=()) as env,
            serving(env, "us-east", model) as (east, east_url),
            # eu-west's node holds time itself (client time): the session it takes over from
            # us-east, and every turn it records, go through its client-stamped transactions.
            serving(env, "eu-west", model, client_time=True) as (west, west_url),
        ):
            assert west.sessions is not None and west.sessions.client.tt is not None
            assert east.sessions is not None and east.sessions.client.tt is None
            first = {"role": "system", "content": SYSTEM}
            status, _, raw = await call(east_url + "/v1/chat/completions", {
                "messages": [first, {"role": "user", "content": "one"}],
                "max_tokens": 4, "session_id": "alice",
            })  # fmt: skip
            r1 = json.loads(raw)
            assert status == 200 and r1["session_id"] == "us-east:alice"
            await east.flush()
            status, _, raw = await call(west_url + "/v1/chat/completions", {
                "messages": [{"role": "user", "content": "two"}],
                "max_tokens": 4, "session_id": "us-east:alice",
            })  # fmt: skip
            r2 = json.loads(raw)
            assert status == 200, raw
            k2 = r2["k2"]
            # The whole first turn's prompt came from us-east's block store.
            assert k2["region"] == "eu-west" and k2["reused_tokens"] >= 40
            assert k2["choice"] == "remote" and k2["bytes_moved"] > 0
            await west.flush()
            assert west.sessions is not None
            s = await west.sessions.get("acme", "us-east:alice")
            assert [t.role for t in s.turns] == [
                "system",
                "user",
                "assistant",
                "user",
                "assistant",
            ]
            assert s.info.home_region == "eu-west"  # moved with the user
            status, _, raw = await call(west_url + "/v1/chat/completions", {
                "messages": [{"role": "user", "content": "three"}],
                "max_tokens": 4, "session_id": "us-east:alice",
            })  # fmt: skip
            r3 = json.loads(raw)
            assert status == 200, raw
            assert r3["k2"]["choice"] == "local", r3["k2"]
            assert r3["k2"]["reused_tokens"] > k2["reused_tokens"]
            status, _, raw = await call(west_url + "/v1/chat/completions", {
                "messages": [{"role": "user", "content": "x"}], "session_id": "eu-west:nobody",
            })  # fmt: skip
            assert status == 404

    run(body)
