"""Block-path figures: frame encode/decode, compression, block store and gRPC get throughput,
side by side with Redis (a local redis-server, same payloads) and a plain memory copy.

    k2 bench kvtier [--tokens 256] [--blocks 16] [--json out.json]   (= python -m kvtier.blockbench)
    python -m kvtier.blockbench --connector [--prefix 2048]   # + end-to-end retrieval over WAN

`--connector` runs an in-process three-region cluster with DESIGN.md's emulated links (RTTs,
1 Gbit/s), stores a prefix from us-east and times `retrieve` in us-east (local) and in eu-west
and ap-southeast (remote): the number to hold against recomputing the prefix.

Blocks are SmolLM2-135M shaped (30 layers, 3 KV heads, head dim 64: 46,080 bytes per token in
float32) with outlier-scaled normal values, so compression sees realistic exponent statistics.
Durations come from the monotonic reading of `truetime.SystemClock`. Prints one line per
figure and, with --json, writes them all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch

from k2store import evloop
from k2store.bench.kvtier_options import add_arguments
from k2store.errors import InvalidArgument
from kvtier.blocknode import BlockNode, BlockStoreClient
from kvtier.blocks import BlockSpec, decode_block, encode_block
from kvtier.blockstore import BlockStore, BlockStoreConfig, MemoryBlobStore
from kvtier.compression import choose_codec
from kvtier.shm import ARENA_HEADER_BYTES, SharedArena
from truetime import SystemClock

_clock = SystemClock()


def _kv(spec: BlockSpec, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(
        torch.randn(spec.num_layers, 2, spec.num_kv_heads, 1, spec.head_dim, generator=g)
    )
    return (torch.randn(spec.shape(), generator=g) * scale).to(spec.torch_dtype)


def _rate(nbytes: int, fn: Callable[[], object], repeat: int = 5) -> float:
    """Best-of-`repeat` bytes per second (noisy shared machines: the best is the least noisy)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = _clock.monotonic_ns() / 1e9
        fn()
        best = min(best, _clock.monotonic_ns() / 1e9 - t0)
    return nbytes / best


def run(tokens: int, blocks: int, rounds: int = 1) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dtype in ("float32", "bfloat16"):
        spec = BlockSpec(tokens, 30, 3, 64, dtype)
        kv = _kv(spec, 0)
        frame = encode_block(spec, kv)
        dst = torch.empty(spec.shape(), dtype=spec.torch_dtype)
        out[f"{dtype}.block_bytes"] = len(frame)
        n = len(frame)

        def enc(s: BlockSpec = spec, t: torch.Tensor = kv) -> object:
            return encode_block(s, t)

        def dec(s: BlockSpec = spec, f: bytes = frame) -> object:
            return decode_block(f, s)

        def dec_into(s: BlockSpec = spec, f: bytes = frame, d: torch.Tensor = dst) -> object:
            return decode_block(f, s, out=d)

        out[f"{dtype}.encode_MBps"] = _rate(n, enc) / 1e6
        out[f"{dtype}.decode_new_MBps"] = _rate(n, dec) / 1e6
        out[f"{dtype}.decode_into_MBps"] = _rate(n, dec_into) / 1e6
        for mbit in (1000, 100, 10):
            c = choose_codec(frame, mbit * 1e6 / 8)
            out[f"{dtype}.codec@{mbit}Mbit"] = c.codec
        out[f"{dtype}.zlib_ratio"] = c.ratio["zlib"]
        if "lz4" in c.ratio:
            out[f"{dtype}.lz4_ratio"] = c.ratio["lz4"]

    spec = BlockSpec(tokens, 30, 3, 64, "bfloat16")
    frames = {
        bytes([i]) * 32: encode_block(spec, _kv(spec, i), bytes([i]) * 32) for i in range(blocks)
    }
    total = sum(len(f) for f in frames.values())
    with tempfile.TemporaryDirectory() as tmp:
        from k2store.rocksengine import RocksBlobStore

        store = BlockStore(
            RocksBlobStore(Path(tmp) / "blocks"),
            BlockStoreConfig(memory_bytes=total * 2, disk_bytes=total * 4),
        )
        t0 = _clock.monotonic_ns() / 1e9
        for k, f in frames.items():
            store.put(k, f)
        out["store.put_fsync_MBps"] = total / (_clock.monotonic_ns() / 1e9 - t0) / 1e6
        # Memory hits hand out the stored bytes object (no copy): count operations, not bytes.
        out["store.get_memory_ops_per_s"] = _rate(
            len(frames) * 100, lambda: [store.get(k) for _ in range(100) for k in frames]
        )
        store._memory.clear()  # force the disk tier (benchmark only)
        store.stats.memory_used = 0
        store.config = BlockStoreConfig(memory_bytes=0, disk_bytes=total * 4)
        out["store.get_disk_verified_MBps"] = (
            _rate(total, lambda: [store.get(k) for k in frames], repeat=3) / 1e6
        )
        store.close()
    # The node's paths and Redis, one after the other, `rounds` times: on a shared machine
    # either side's figure moves by up to 3x between runs, so each round's ratio is taken
    # from figures measured seconds apart, and the medians and the rounds' range reported.
    per_round: list[dict[str, float]] = []
    for _ in range(rounds):
        figures = evloop.run(_node_paths(frames, total))
        figures.update(evloop.run(_redis(frames, total)))
        per_round.append(figures)
    for name in per_round[0]:
        out[name] = statistics.median(r[name] for r in per_round if name in r)
    if rounds > 1:
        out["rounds"] = per_round
    out["memcopy_MBps"] = memcopy_MBps(frames, total)
    return out


async def _get_rates(
    name: str, get: Callable[[bytes], Awaitable[object]], keys: list[bytes], total: int
) -> dict[str, float]:
    """`<name>.get_sequential_MBps` and `<name>.get_parallel_MBps`: every key read one after
    another, then all at once; the best of three rounds each."""
    res: dict[str, float] = {}
    for mode in ("sequential", "parallel"):
        best = float("inf")
        for _ in range(3):
            t0 = _clock.monotonic_ns() / 1e9
            if mode == "parallel":
                await asyncio.gather(*(get(k) for k in keys))
            else:
                for k in keys:
                    await get(k)
            best = min(best, _clock.monotonic_ns() / 1e9 - t0)
        res[f"{name}.get_{mode}_MBps"] = total / best / 1e6
    return res


def _serve_node(addr_file: Path) -> None:
    """Run a block store node (memory tier) until stdin closes; its address goes to addr_file.
    The benchmark reads from it in another process, as it reads Redis."""

    async def main() -> None:
        store = BlockStore(MemoryBlobStore(), BlockStoreConfig(sync=False))
        node = BlockNode(store, "us-east", "127.0.0.1:0")
        await node.start()
        addr_file.write_text(node.address)
        await asyncio.to_thread(sys.stdin.read)  # the parent closes stdin when it is done
        await node.stop(0)

    evloop.run(main())


async def _node_paths(frames: dict[bytes, bytes], total: int) -> dict[str, float]:
    """The node's read paths (streamed gRPC, bulk TCP port, shared memory), the node in a process
    of its own."""
    with tempfile.TemporaryDirectory() as tmp:
        addr_file = Path(tmp) / "address"
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvtier.blockbench", "--serve-node", str(addr_file)],
            stdin=subprocess.PIPE,
        )
        try:
            for _ in range(600):
                if addr_file.exists() and addr_file.read_text():
                    break
                if proc.poll() is not None:
                    raise RuntimeError("the benchmark's block store node exited at start")
                await asyncio.sleep(0.05)
            else:
                raise RuntimeError("the benchmark's block store node did not start in 30 s")
            return await _read_paths(addr_file.read_text(), frames, total)
        finally:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _read_paths(address: str, frames: dict[bytes, bytes], total: int) -> dict[str, float]:
    loader = BlockStoreClient(address, bulk=False)
    try:
        for k, f in frames.items():
            await loader.put(k, f)
    finally:
        await loader.close()
    c = BlockStoreClient(address, bulk=False)
    bulk = BlockStoreClient(address)
    res: dict[str, float] = {}
    try:
        await c.get(next(iter(frames)))  # connect
        res.update(await _get_rates("grpc", c.get, list(frames), total))
        # The node's bulk TCP port (kvtier/bulk.py), which the first streamed Get names; read
        # with `fetch` as the connector does (the frame is lent, not copied into bytes).
        await bulk.get(next(iter(frames)))

        async def fetch_bulk(k: bytes) -> None:
            async with bulk.fetch(k) as (frame, _):
                assert frame is not None

        rates = await _get_rates("bulk", fetch_bulk, list(frames), total)
        if bulk.stats.bulk_gets:
            res.update(rates)
        # The same node read by a client on its host through a shared-memory arena (what a
        # serving node does with its region's store: kvtier/shm.py).
        arena = SharedArena(ARENA_HEADER_BYTES + 2 * total + (1 << 20))
        shared = BlockStoreClient(address, arena=arena)
        try:
            size = max(len(f) for f in frames.values())

            async def fetch(k: bytes) -> None:
                async with shared.fetch(k, size_hint=size) as (frame, _):
                    assert frame is not None

            shm = await _get_rates("shm", fetch, list(frames), total)
            if shared.stats.shared_gets:  # else the node could not use the arena: streamed
                res.update(shm)
        finally:
            await shared.close()
            arena.close()
    finally:
        await c.close()
        await bulk.close()
    return res


async def _redis(frames: dict[bytes, bytes], total: int) -> dict[str, float]:
    """The same payloads through a local redis-server (no persistence; Redis's default
    snapshotting is off so neither side writes to disk on the read path)."""
    import shutil
    import subprocess

    import redis.asyncio as aredis

    from k2store.launcher import free_ports

    exe = shutil.which("redis-server")
    if exe is None:
        return {}
    (port,) = free_ports(1)
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    res: dict[str, float] = {}
    r = aredis.Redis(host="127.0.0.1", port=port)
    try:
        for _ in range(100):
            try:
                await r.ping()
                break
            except Exception:
                await asyncio.sleep(0.05)
        t0 = _clock.monotonic_ns() / 1e9
        for k, f in frames.items():
            await r.set(k, f)
        res["redis.set_MBps"] = total / (_clock.monotonic_ns() / 1e9 - t0) / 1e6
        res.update(await _get_rates("redis", r.get, list(frames), total))
    finally:
        await r.aclose()
        proc.terminate()
        proc.wait(10)
    return res


def memcopy_MBps(frames: dict[bytes, bytes], total: int) -> float:
    """The physical limit on this machine: copying the same bytes once in memory, into a buffer
    that already exists (fresh memory would time the page faults: FIGURES.md)."""
    buf = bytearray(max(len(f) for f in frames.values()))

    def copy_all() -> None:
        for f in frames.values():
            buf[: len(f)] = f

    return _rate(total, copy_all) / 1e6


async def _connector_bench(prefix_tokens: int, block_tokens: int) -> dict[str, Any]:
    from dataclasses import replace

    from k2store.client import AsyncClient, RetryPolicy
    from k2store.cluster import ClusterSettings, local_cluster
    from k2store.launcher import free_ports
    from k2store.node import Node
    from k2store.transport import cluster_transport
    from k2store.wan import NetworkSettings
    from kvtier.blocks import Namespace
    from kvtier.blockstore import MemoryBlobStore
    from kvtier.connector import AsyncKVConnector, ConnectorConfig
    from kvtier.metadata import BlockMetadata

    regions = ["us-east", "eu-west", "ap-southeast"]
    spec = BlockSpec(block_tokens, 30, 3, 64, "float32")
    res: dict[str, Any] = {"prefix_tokens": prefix_tokens, "prefix_bytes": 0}
    with tempfile.TemporaryDirectory() as tmp:
        settings = replace(ClusterSettings(), network=NetworkSettings(enabled=True))
        cfg = local_cluster(regions, free_ports(3), root=Path(tmp), settings=settings)
        cfg = cfg.write(Path(tmp) / "cluster.toml")
        nodes = [Node(cfg, n.name) for n in cfg.nodes]
        for node in nodes:
            await node.start()
        big = BlockStoreConfig(memory_bytes=1 << 31, disk_bytes=1 << 33, max_block_bytes=1 << 28)
        bnodes = {
            r: BlockNode(BlockStore(MemoryBlobStore(), big), r, "127.0.0.1:0") for r in regions
        }
        for bn in bnodes.values():
            await bn.start()
        stores = {r: [bn.address] for r, bn in bnodes.items()}
        retry = RetryPolicy(max_attempts=30, initial_backoff_s=0.01, max_backoff_s=0.2)
        clients = {
            r: AsyncClient(cfg, region=r, retry=retry, transport=cluster_transport(cfg, region=r))
            for r in regions
        }
        try:
            md = BlockMetadata(clients["us-east"])
            ns = Namespace("smollm2-135m", "smollm2", spec, "bench", b"salt")
            await md.register_tenant("bench", quota_bytes=1 << 40)
            await md.register_namespace(ns)
            conns = {
                r: await AsyncKVConnector.open(
                    clients[r],
                    ns,
                    # Leader reads: each region reads right after the store (this measures the
                    # transfer, not how soon replicas see new rows).
                    config=ConnectorConfig(
                        region=r,
                        timeout_s=60,
                        max_block_bytes=1 << 28,
                        remote_metadata="leader",
                    ),
                    stores=stores,
                )
                for r in regions
            }
            tokens = list(range(prefix_tokens))
            g = torch.Generator().manual_seed(0)
            kv = torch.randn(spec.shape(prefix_tokens), generator=g)
            t0 = _clock.monotonic_ns() / 1e9
            stored = await conns["us-east"].store(tokens, kv)
            res["store_us-east_s"] = _clock.monotonic_ns() / 1e9 - t0
            res["prefix_bytes"] = stored.charged_bytes
            for r in regions:
                t0 = _clock.monotonic_ns() / 1e9
                found = await conns[r].lookup(tokens)
                t1 = _clock.monotonic_ns() / 1e9
                got = await conns[r].retrieve(tokens, found)
                t2 = _clock.monotonic_ns() / 1e9
                assert got.kv is not None and got.num_tokens == prefix_tokens
                assert torch.equal(got.kv, kv)
                res[f"lookup_{r}_ms"] = (t1 - t0) * 1000
                res[f"retrieve_{r}_s"] = t2 - t1
                res[f"bytes_moved_{r}"] = got.bytes_moved
            for c in conns.values():
                await c.close()
        finally:
            for cl in clients.values():
                await cl.close()
            for bn in bnodes.values():
                await bn.stop(0)
            for node in nodes:
                await node.stop(grace_s=0)
    return res


def _spread(figures: dict[str, Any], ours: str, theirs: str) -> str:
    """Over several rounds: the lowest and highest of the rounds' own ratios."""
    each = [r[ours] / r[theirs] for r in figures.get("rounds", []) if r.get(theirs) and ours in r]
    if len(each) < 2:
        return ""
    return f"; {min(each):.2f}-{max(each):.2f}x over {len(each)} rounds"


def ratios(figures: dict[str, Any]) -> list[str]:
    """The side-by-side lines: block store node against Redis and a memory copy (over several
    rounds, the medians, and the range of the rounds' ratios)."""
    out = []
    mem = figures.get("memcopy_MBps")
    for mode in ("sequential", "parallel"):
        ours = figures.get(f"grpc.get_{mode}_MBps")
        redis_key = f"redis.get_{mode}_MBps"
        theirs = figures.get(redis_key)
        if ours is None:
            continue
        line = f"block get ({mode}): block store node over gRPC {ours:.0f} MB/s"
        if theirs:
            spread = _spread(figures, f"grpc.get_{mode}_MBps", redis_key)
            line += f", Redis {theirs:.0f} MB/s ({ours / theirs:.2f}x{spread})"
        if mem:
            line += f", memory copy {mem:.0f} MB/s ({ours / mem:.0%} of it)"
        out.append(line)
        for path, how in (
            ("bulk", "the node's bulk TCP port"),
            ("shm", "same host through shared memory"),
        ):
            rate = figures.get(f"{path}.get_{mode}_MBps")
            if rate is not None:
                line = f"block get ({mode}), {how}: {rate:.0f} MB/s"
                if theirs:
                    spread = _spread(figures, f"{path}.get_{mode}_MBps", redis_key)
                    line += f" ({rate / theirs:.2f}x Redis{spread})"
                out.append(line)
    if not figures.get("redis.get_sequential_MBps"):
        out.append("Redis: not measured (apt-get install redis-server; pip install redis)")
    return out


def main_args(a: argparse.Namespace) -> int:
    """`k2 bench kvtier` and `python -m kvtier.blockbench`."""
    if a.quick:
        a.tokens, a.blocks, a.rounds = 64, 4, 1
    if not 1 <= a.rounds <= 50:
        raise InvalidArgument(f"--rounds must be 1 to 50, got {a.rounds}")
    figures = run(a.tokens, a.blocks, a.rounds)
    if a.connector:
        figures.update(evloop.run(_connector_bench(a.prefix, a.tokens)))
    for k, v in figures.items():
        if k != "rounds":
            print(f"{k:32} {v:.3f}" if isinstance(v, float) else f"{k:32} {v}")
    print()
    for line in ratios(figures):
        print(line)
    if a.json:
        a.json.write_text(json.dumps(figures, indent=2))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    add_arguments(p)
    p.add_argument("--serve-node", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve_node is not None:
        _serve_node(a.serve_node)
        return 0
    return main_args(a)


if __name__ == "__main__":
    raise SystemExit(main())
