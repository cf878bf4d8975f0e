"""`k2 blockstore` as a real process: serve, store durably, survive SIGKILL, stop on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kvtier_env import SPEC, make_kv

from k2store.launcher import free_ports
from kvtier.blocknode import BlockStoreClient
from kvtier.blocks import encode_block
from kvtier.errors import BlockStoreUnavailable

pytestmark = pytest.mark.slow


def start(port: int, data: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "k2store", "blockstore", "--region", "us-east"),
            *("--port", str(port), "--data", str(data)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def wait_up(c: BlockStoreClient) -> None:
    for _ in range(200):
        try:
            await c.node_stats()
            return
        except BlockStoreUnavailable:
            await asyncio.sleep(0.05)
    raise AssertionError("block store did not come up")


def test_blockstore_process(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    key = bytes(32 * [5])
    frame = encode_block(SPEC, make_kv(SPEC, 4), key)

    async def phase(expect_present: bool) -> None:
        c = BlockStoreClient(f"127.0.0.1:{port}", timeout_s=2)
        try:
            await wait_up(c)
            if expect_present:
                assert await c.get(key) == frame
            else:
                assert await c.put(key, frame) is True
        finally:
            await c.close()

    p = start(port, tmp_path)
    try:
        asyncio.run(phase(False))
        p.send_signal(signal.SIGKILL)  # an acknowledged put was fsynced: it survives
        p.wait(10)
        p = start(port, tmp_path)
        asyncio.run(phase(True))
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0 and time.monotonic() - t0 < 10
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
