"""`k2 bench engine`: time to first token with and without the KV tier, side by side in one run.

For each prefix length N (256 ... 4096 tokens, block-aligned) the benchmark sends requests of
N prefix tokens followed by 16 fresh tokens (a new question about the same document) and times
the first token of each, end to end (lookup, load, prefill, first sample):

    recompute   nothing cached: the whole prompt is prefilled (on an engine without the tier,
                after the untimed first request in us-east that stores the prefix)
    local hit   us-east again: the prefix's blocks come from us-east's block store (always
                loaded: this column times the hit, not the cost model's choice)
    remote hit  eu-west: the blocks come from us-east's block store over the emulated
                us-east<->eu-west link (75 ms RTT, 1 Gbit/s by default); eu-west stores nothing
                back and makes no demand copies, so every repetition is a cross-region hit. The
                pass over the question runs while the blocks arrive, layer by layer
                (`EngineConfig.layerwise`, `ConnectorConfig.layer_parts`)
    whole       the same remote hit with whole blocks and the pass after the load (layer-wise
                off), interleaved with the remote hits; `gain` is whole / remote
    choice      what the connector's cost model chose for the remote hit (remote: fetched;
                recompute: fetching was judged slower than recomputing)

Setup: a local three-region cluster of node processes with one block store process per region
and wide-area emulation on (`k2store.launcher.up`), the model in this process (one engine per
region). Hits are the median of `--reps` requests, after one untimed request per size and
column (the first hit of a size pays for a new buffer, a first pass that long and new
connections). Ratios are TTFT / recompute TTFT. Output: a table on stdout, JSON (`--out`,
default k2-bench-engine.json) and a plot beside it (.png). Targets (DESIGN.md 7, issue 7)
at 2,048 tokens: local <= 1/10, remote <= 1/5 of recompute; the exit status is 1 if one is
missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import statistics
import sys
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from k2store import evloop
from k2store.bench.sweep import parse_counts

__all__ = ["crossover_summary", "main", "plot", "plot_crossover", "run_bench", "run_crossover"]

SUFFIX_TOKENS = 16
TARGETS = {"local": 0.10, "remote": 0.20}
TARGET_TOKENS = 2048


def main(args: argparse.Namespace) -> int:
    if args.rtts:
        return _main_crossover(args)
    if args.sizes:
        sizes = parse_counts(args.sizes, "--sizes")
    else:
        sizes = [256, 1024, 2048] if args.quick else [256, 512, 1024, 2048, 4096]
    reps = args.reps or (2 if args.quick else 3)
    out = _output(args, "k2-bench-engine.json")
    result = run_bench(
        sizes,
        reps=reps,
        block_tokens=args.block_tokens,
        kv_dtype=args.kv_dtype,
        data=args.data,
        loaded=_load(args),
        remote_codec=args.remote_codec,
    )
    _write(out, result, plot)
    return 0 if result["targets_met"] in (True, None) else 1


def _load(args: argparse.Namespace) -> Any:
    """The model the options name: --architecture (random weights), else --model (or the
    default), on --device."""
    from kvtier.models import load_model, random_model

    if args.architecture:
        return random_model(args.architecture, device=args.device, progress=_say)
    return load_model(args.model, device=args.device, progress=_say)


def _output(args: argparse.Namespace, default: str) -> Path:
    """Where the JSON goes; its directory is made before the run, so a bad path fails at once."""
    out: Path = args.out or Path(default)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _write(out: Path, result: dict[str, Any], draw: Callable[[dict[str, Any], Path], bool]) -> None:
    out.write_text(json.dumps(result, indent=2) + "\n")
    png = out.with_suffix(".png")
    drawn = draw(result, png)
    print(f"\nwrote {out}" + (f" and {png}" if drawn else " (no plot: matplotlib missing)"))


def _main_crossover(args: argparse.Namespace) -> int:
    rtts = parse_counts(args.rtts, "--rtts")
    out = _output(args, "k2-bench-engine-crossover.json")
    if args.sizes:
        sizes = parse_counts(args.sizes, "--sizes")
    else:
        sizes = [256, 1024] if args.quick else [256, 1024, 2048]
    result = run_crossover(
        sizes,
        rtts,
        reps=args.reps or 2,
        loaded=_load(args),
        block_tokens=args.block_tokens,
        kv_dtype=args.kv_dtype,
        data=args.data,
    )
    _write(out, result, plot_crossover)
    return 0


def run_bench(
    sizes: list[int],
    *,
    reps: int = 3,
    model_path: str | None = None,
    block_tokens: int = 64,
    kv_dtype: str = "float16",
    data: Path | None = None,
    loaded: Any = None,
    remote_codec: str | None = None,
) -> dict[str, Any]:
    """`loaded`: a model already loaded (a `kvtier.models.LoadedModel`, or anything with its
    model, tokenizer and revision; tests pass a tiny one) instead of loading `model_path`."""
    from kvtier.models import load_model

    if loaded is None:
        loaded = load_model(model_path, progress=_say)
    return _on_cluster(
        data,
        lambda cfg: _run(cfg, loaded, sizes, reps, block_tokens, kv_dtype, remote_codec),
        memory_mb=_store_memory_mb(loaded, sizes, block_tokens, kv_dtype),
    )


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _store_memory_mb(loaded: Any, sizes: list[int], block_tokens: int, kv_dtype: str) -> int:
    """A memory tier for each block store that holds every block the run stores twice over
    (each prefix, a block of each request's question and reply, the warm-up), at least
    `k2 blockstore`'s 256 MB: a hit measured here is a memory hit (with the default, a
    Llama-3.1-8B-shaped 2,048-token prefix, 268 MB, was partly a disk hit)."""
    from kvtier.engine import block_spec_for

    spec = block_spec_for(loaded.model.config, block_tokens=block_tokens, dtype=kv_dtype)
    tokens = sum(sizes) + block_tokens * (len(sizes) + 1)
    return max(256, math.ceil(2 * tokens * spec.nbytes / spec.block_tokens / (1 << 20)))


def _on_cluster(
    data: Path | None,
    fn: Callable[[Any], Coroutine[Any, Any, dict[str, Any]]],
    *,
    memory_mb: int | None = None,
) -> dict[str, Any]:
    """Run `fn(cluster)` on a fresh local three-region cluster with block stores (in `data`, or
    a temporary directory; `memory_mb`: their memory tiers), stopped afterwards."""
    from k2store import launcher

    tmp = None
    if data is None:
        tmp = tempfile.TemporaryDirectory(prefix="k2-bench-engine-")
        data = Path(tmp.name)
    _say("starting a local three-region cluster with block stores ...")
    cfg = launcher.up(
        data, progress=False, blockstores=True, with_parent=True, blockstore_memory_mb=memory_mb
    )
    try:
        return evloop.run(fn(cfg))
    finally:
        launcher.down(cfg)
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.cleanup()


async def _run(
    cfg: Any,
    loaded: Any,
    sizes: list[int],
    reps: int,
    block_tokens: int,
    kv_dtype: str,
    remote_codec: str | None,
) -> dict[str, Any]:
    from dataclasses import replace

    import torch

    from kvtier.connector import ConnectorConfig
    from kvtier.engine import Engine, EngineConfig, SamplingParams
    from kvtier.serve import ServingNode

    east = await ServingNode.open(
        cfg, "us-east", model=loaded.model, tokenizer=loaded.tokenizer,
        revision=loaded.revision, tenant="bench",
        engine_config=EngineConfig(block_tokens=block_tokens, kv_dtype=kv_dtype),
        # The local column times the hit itself: loaded whatever the cost model would say (a
        # tiny model recomputes in milliseconds, and its first slow load can tip the model).
        connector_config=ConnectorConfig("us-east", cost_aware=False),
    )  # fmt: skip
    west = await ServingNode.open(
        cfg, "eu-west", model=loaded.model, tokenizer=loaded.tokenizer,
        revision=loaded.revision, tenant="bench",
        engine_config=EngineConfig(block_tokens=block_tokens, kv_dtype=kv_dtype, store=False),
        # Nor copies made by demand (placement): every repetition is a cross-region hit.
        connector_config=ConnectorConfig(
            "eu-west", replicate_after=0, remote_codec=remote_codec or "none"
        ),
    )  # fmt: skip
    one = SamplingParams(max_tokens=1, stop_at_eos=False)
    plain = Engine(loaded.model, east.engine.tokenizer, None)
    vocab = int(loaded.model.config.get_text_config().vocab_size)
    g = torch.Generator().manual_seed(2048)

    def tokens(n: int) -> list[int]:
        return [int(t) for t in torch.randint(100, vocab, (n,), generator=g)]

    layered_config = west.engine.config
    assert west.engine.connector is not None
    layered_parts = west.engine.connector.config

    def layerwise(on: bool) -> None:
        """eu-west's engine with the layer-wise load and pass, or without (whole blocks, then
        the pass)."""
        conn = west.engine.connector
        assert conn is not None
        west.engine.config = layered_config if on else replace(layered_config, layerwise=False)
        conn.config = layered_parts if on else replace(layered_parts, layer_parts=1)

    rows: list[dict[str, Any]] = []
    try:
        await east.engine.complete(tokens(64), one)  # warm-up (first calls are slow)
        await east.engine.flush()
        print(
            f"{'prefix':>7} {'recompute':>10} {'local':>9} {'remote':>9} {'whole':>9} "
            f"{'local/rc':>9} {'remote/rc':>10} {'gain':>6} {'moved MB':>9} {'shm':>5}  choice"
        )
        for n in sizes:
            n = max(block_tokens, n // block_tokens * block_tokens)
            prefix = tokens(n)
            # Untimed, like the first request of each column: it stores the prefix (and is the
            # first pass at this length).
            await east.engine.complete(prefix + tokens(SUFFIX_TOKENS), one)
            await east.engine.flush()
            # Recompute samples from an engine without the tier (no lookup: if anything this
            # flatters recompute).
            recompute = []
            for _ in range(reps):
                miss = await plain.complete(prefix + tokens(SUFFIX_TOKENS), one)
                recompute.append(miss.metrics.ttft_s)
            # One untimed hit per size first, here as for the remote column below: the first
            # hit of a size pays for a new cache buffer's pages and the first pass over a
            # cache that long (0.43 s against 0.21 s at 2,048 tokens).
            await east.engine.complete(prefix + tokens(SUFFIX_TOKENS), one)
            local = []
            gets0 = _local_gets(east.engine)
            for _ in range(reps):
                c = await east.engine.complete(prefix + tokens(SUFFIX_TOKENS), one)
                assert c.metrics.cached_tokens == n, c.metrics
                local.append(c.metrics.ttft_s)
                local_m = c.metrics
            gets, shared = (b - a for a, b in zip(gets0, _local_gets(east.engine), strict=True))
            shared_fraction = shared / gets if gets else None
            remote: list[float] = []
            whole: list[float] = []
            moved = 0
            choice = ""
            # One untimed here too: the first load from another region also opens the
            # connections its parts use, whichever mode goes first.
            await west.engine.complete(prefix + tokens(SUFFIX_TOKENS), one)
            for _ in range(reps):  # interleaved, so drift in the machine's load hits both
                for on, samples in ((True, remote), (False, whole)):
                    layerwise(on)
                    c = await west.engine.complete(prefix + tokens(SUFFIX_TOKENS), one)
                    samples.append(c.metrics.ttft_s)
                    if on:
                        moved = c.metrics.bytes_moved
                        choice = c.metrics.choice
                        remote_m = c.metrics
                    else:
                        whole_m = c.metrics
            layerwise(True)
            rc = statistics.median(recompute)
            row = {
                "prefix_tokens": n,
                "recompute_ttft_s": rc,
                "local_hit_ttft_s": statistics.median(local),
                "remote_hit_ttft_s": statistics.median(remote),
                "local_ratio": statistics.median(local) / rc,
                # Local blocks received through shared memory rather than streamed over gRPC
                # (kvtier/shm.py; below 1 when the arena had no free slot, or another host).
                "local_shared_fraction": shared_fraction,
                "remote_ratio": statistics.median(remote) / rc,
                "remote_whole_ttft_s": statistics.median(whole),
                "remote_whole_ratio": statistics.median(whole) / rc,
                "layerwise_gain": statistics.median(whole) / statistics.median(remote),
                "remote_bytes_moved": moved,
                "remote_choice": choice,
                "recompute_samples_s": recompute,
                "local_samples_s": local,
                "remote_samples_s": remote,
                "remote_whole_samples_s": whole,
                "local_breakdown_s": _breakdown(local_m),
                "remote_breakdown_s": _breakdown(remote_m),
                "remote_whole_breakdown_s": _breakdown(whole_m),
                "recompute_breakdown_s": _breakdown(miss.metrics),
            }
            rows.append(row)
            print(
                f"{n:>7} {rc:>9.3f}s {row['local_hit_ttft_s']:>8.3f}s "
                f"{row['remote_hit_ttft_s']:>8.3f}s {row['remote_whole_ttft_s']:>8.3f}s "
                f"{row['local_ratio']:>9.3f} {row['remote_ratio']:>10.3f} "
                f"{row['layerwise_gain']:>5.2f}x {moved / 1e6:>9.1f} {_pct(shared_fraction)}"
                f"  {choice}",
                flush=True,
            )
    finally:
        await east.close()
        await west.close()
    target_row = next((r for r in rows if r["prefix_tokens"] == TARGET_TOKENS), None)
    met: bool | None = None
    if target_row is not None:
        met = (
            target_row["local_ratio"] <= TARGETS["local"]
            and target_row["remote_ratio"] <= TARGETS["remote"]
        )
        print(
            f"\ntargets at {TARGET_TOKENS} tokens: local <= {TARGETS['local']} "
            f"(got {target_row['local_ratio']:.3f}), remote <= {TARGETS['remote']} "
            f"(got {target_row['remote_ratio']:.3f}): {'met' if met else 'MISSED'}"
        )
    return {
        "benchmark": "engine-ttft",
        "model": loaded.revision,
        "device": device_name(loaded.model),
        "regions": {"local": "us-east", "remote": "eu-west -> us-east"},
        "suffix_tokens": SUFFIX_TOKENS,
        "block_tokens": block_tokens,
        "kv_dtype": kv_dtype,
        "reps": reps,
        "torch_threads": _torch_threads(),
        "rows": rows,
        "targets": TARGETS,
        "targets_met": met,
    }


# -- where fetching stops paying: cross-region fetch against recompute at several RTTs -----------

CROSS_LINK = ("us-east", "eu-west")
"""The link the crossover run changes (`k2 cluster net set` does the same): blocks are stored in
us-east and read from eu-west."""


def run_crossover(
    sizes: list[int],
    rtts: list[int],
    *,
    reps: int = 2,
    model_path: str | None = None,
    block_tokens: int = 64,
    kv_dtype: str = "float16",
    data: Path | None = None,
    loaded: Any = None,
) -> dict[str, Any]:
    """For each prefix length, the time to first token in eu-west of a prefix cached in us-east
    at each us-east<->eu-west round-trip time: fetched always (a connector without the cost
    model), recomputed, and as the cost model chooses (after one request at that RTT to
    measure the link). Shows where fetching stops paying and whether the model switches there.
    `loaded` as in `run_bench`."""
    from kvtier.models import load_model

    if loaded is None:
        loaded = load_model(model_path, progress=_say)
    return _on_cluster(
        data, lambda cfg: _crossover(cfg, loaded, sizes, rtts, reps, block_tokens, kv_dtype)
    )


async def _crossover(
    cfg: Any,
    loaded: Any,
    sizes: list[int],
    rtts: list[int],
    reps: int,
    block_tokens: int,
    kv_dtype: str,
) -> dict[str, Any]:
    import torch

    from k2store.launcher import write_net_overrides
    from k2store.wan import LinkOverride, NetOverrides
    from kvtier.connector import ConnectorConfig
    from kvtier.engine import Engine, EngineConfig, SamplingParams
    from kvtier.serve import ServingNode

    async def set_rtt(ms: int | None) -> None:
        links = {} if ms is None else {frozenset(CROSS_LINK): LinkOverride(rtt_ms=float(ms))}
        write_net_overrides(cfg, NetOverrides(links=links))
        await asyncio.sleep(0.5)  # every process re-reads net.toml within a few tenths

    def node(region: str, **connector: Any) -> Any:
        store = region == "us-east"
        return ServingNode.open(
            cfg, region, model=loaded.model, tokenizer=loaded.tokenizer,
            revision=loaded.revision, tenant="bench",
            engine_config=EngineConfig(block_tokens=block_tokens, kv_dtype=kv_dtype, store=store),
            connector_config=None if store else ConnectorConfig(
                region, replicate_after=0, **connector
            ),
        )  # fmt: skip

    east = await node("us-east")
    auto = await node("eu-west")  # the cost model decides
    await auto.engine.calibrate((64, 256, 512))  # what `k2 serve` does at start
    always = await node("eu-west", cost_aware=False)  # fetches whatever it finds
    one = SamplingParams(max_tokens=1, stop_at_eos=False)
    plain = Engine(loaded.model, east.engine.tokenizer, None)
    vocab = int(loaded.model.config.get_text_config().vocab_size)
    g = torch.Generator().manual_seed(4096)

    def tokens(n: int) -> list[int]:
        return [int(t) for t in torch.randint(100, vocab, (n,), generator=g)]

    async def ttfts(engine: Any, prefix: list[int], n: int) -> tuple[float, list[Any]]:
        runs = [await engine.complete(prefix + tokens(SUFFIX_TOKENS), one) for _ in range(n)]
        return statistics.median(c.metrics.ttft_s for c in runs), [c.metrics for c in runs]

    rows: list[dict[str, Any]] = []
    print(
        f"{'prefix':>7} {'rtt ms':>7} {'fetch':>8} {'recompute':>10} {'model chose':>18} "
        f"{'model':>8} {'best':>10} {'model/best':>11}"
    )
    try:
        await east.engine.complete(tokens(64), one)  # warm-up (first calls are slow)
        for n in sizes:
            n = max(block_tokens, n // block_tokens * block_tokens)
            prefix = tokens(n)
            await set_rtt(None)
            await east.engine.complete(prefix + tokens(SUFFIX_TOKENS), one)
            await east.engine.flush()
            rc, _ = await ttfts(plain, prefix, reps)
            # eu-west reads the block rows from its replicas: wait until they show them.
            for _ in range(50):
                c = await always.engine.complete(prefix + tokens(SUFFIX_TOKENS), one)
                if c.metrics.cached_tokens == n:
                    break
                await asyncio.sleep(0.2)
            else:
                raise RuntimeError(f"eu-west never saw the {n}-token prefix stored in us-east")
            for rtt in rtts:
                await set_rtt(rtt)
                fetch, fms = await ttfts(always.engine, prefix, reps)
                await auto.engine.complete(prefix + tokens(SUFFIX_TOKENS), one)  # measures
                model, mms = await ttfts(auto.engine, prefix, reps)
                mm = mms[-1]
                best = "fetch" if fetch < rc else "recompute"
                row = {
                    "prefix_tokens": n,
                    "rtt_ms": rtt,
                    "fetch_ttft_s": fetch,
                    "fetch_bytes_moved": fms[-1].bytes_moved,
                    "recompute_ttft_s": rc,
                    "model_choice": mm.choice,
                    "model_cached_tokens": mm.cached_tokens,
                    "model_ttft_s": model,
                    "model_samples": [_sample_of(m) for m in mms],
                    "best": best,
                    "model_over_best": model / min(fetch, rc),
                }
                rows.append(row)
                print(
                    f"{n:>7} {rtt:>7} {fetch:>7.3f}s {rc:>9.3f}s {mm.choice:>18} "
                    f"{model:>7.3f}s {best:>10} {row['model_over_best']:>10.2f}x",
                    flush=True,
                )
    finally:
        await set_rtt(None)
        for sn in (east, auto, always):
            await sn.close()
    summary = crossover_summary(rows)
    for line in summary["lines"]:
        print(line)
    return {
        "benchmark": "engine-crossover",
        "model": loaded.revision,
        "device": device_name(loaded.model),
        "link": "us-east -> eu-west",
        "suffix_tokens": SUFFIX_TOKENS,
        "block_tokens": block_tokens,
        "kv_dtype": kv_dtype,
        "reps": reps,
        "rows": rows,
        "crossover": summary["by_size"],
    }


def _sample_of(m: Any) -> dict[str, Any]:
    """One request of the cost-aware node: its TTFT, what it chose, and where the time went."""
    return {"choice": m.choice, "cached_tokens": m.cached_tokens, **_breakdown(m)}


def crossover_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per prefix length: the lowest RTT at which fetching measured slower than recomputing, and
    the lowest at which the cost model no longer fetched the whole prefix (None: not within the
    RTTs tried)."""
    by_size: dict[int, dict[str, Any]] = {}
    for r in sorted(rows, key=lambda r: (r["prefix_tokens"], r["rtt_ms"])):
        d = by_size.setdefault(
            r["prefix_tokens"], {"fetch_loses_from_ms": None, "model_stops_fetching_from_ms": None}
        )
        if d["fetch_loses_from_ms"] is None and r["best"] == "recompute":
            d["fetch_loses_from_ms"] = r["rtt_ms"]
        whole = r["model_cached_tokens"] >= r["prefix_tokens"]
        if d["model_stops_fetching_from_ms"] is None and not whole:
            d["model_stops_fetching_from_ms"] = r["rtt_ms"]
    lines = []
    for n, d in by_size.items():
        lose, stop = d["fetch_loses_from_ms"], d["model_stops_fetching_from_ms"]
        lines.append(
            f"{n} tokens: fetching measured slower than recomputing "
            + (f"from {lose} ms RTT" if lose is not None else "at no RTT tried")
            + "; the cost model stopped fetching the whole prefix "
            + (f"from {stop} ms" if stop is not None else "at no RTT tried")
        )
    return {"by_size": {str(n): d for n, d in by_size.items()}, "lines": lines}


def plot_crossover(result: dict[str, Any], path: Path) -> bool:
    """One panel per prefix length: TTFT against RTT when always fetching, when recomputing,
    and as the cost model chose (marker: what it chose). False without matplotlib or rows."""
    from k2store.bench.txn import pyplot

    plt = pyplot()
    rows = result["rows"]
    if plt is None or not rows:
        return False
    sizes = sorted({r["prefix_tokens"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.2 * len(sizes), 4.2), squeeze=False)
    markers = {"remote": "o", "recompute": "x"}
    for ax, n in zip(axes[0], sizes, strict=True):
        rs = sorted((r for r in rows if r["prefix_tokens"] == n), key=lambda r: r["rtt_ms"])
        xs = [r["rtt_ms"] for r in rs]
        ax.plot(xs, [r["fetch_ttft_s"] for r in rs], marker="o", label="always fetch")
        ax.plot(xs, [r["recompute_ttft_s"] for r in rs], linestyle="--", label="recompute")
        for choice in sorted({r["model_choice"] for r in rs}):
            pts = [r for r in rs if r["model_choice"] == choice]
            ax.scatter(
                [r["rtt_ms"] for r in pts], [r["model_ttft_s"] for r in pts],
                marker=markers.get(choice, "^"), s=60, color="black", zorder=3,
                label=f"cost model: {choice}",
            )  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("us-east <-> eu-west round trip (ms)")
        ax.set_ylabel("time to first token in eu-west (s)")
        ax.set_title(f"{n}-token prefix cached in us-east", fontsize=9)
        ax.legend(fontsize="x-small")
    fig.suptitle(
        f"{result['model']} on {result.get('device', 'cpu')}: fetch across regions or recompute?",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot(result: dict[str, Any], path: Path) -> bool:
    """TTFT by prefix length (recompute, local hit, cross-region hit; log scale, ratios to
    recompute written on the hit bars) and where a hit's time went at each length. False,
    drawing nothing, when matplotlib is missing or there are no rows."""
    from k2store.bench.txn import pyplot

    plt = pyplot()
    rows = result["rows"]
    if plt is None or not rows:
        return False
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.4))
    xs = range(len(rows))
    width = 0.21
    series = [
        ("recompute", "recompute_ttft_s", None),
        ("local hit", "local_hit_ttft_s", "local_ratio"),
        ("us-east -> eu-west hit", "remote_hit_ttft_s", "remote_ratio"),
        ("same, whole blocks, then the pass", "remote_whole_ttft_s", "remote_whole_ratio"),
    ]
    for j, (label, key, ratio) in enumerate(series):
        if not all(key in r for r in rows):  # a result file from before the column existed
            continue
        bars = ax.bar(
            [x + (j - 1.5) * width for x in xs], [r[key] for r in rows], width, label=label
        )
        if ratio is not None:
            for b, r in zip(bars, rows, strict=True):
                ax.annotate(
                    f"{r[ratio]:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=7,
                )  # fmt: skip
    ax.set_yscale("log")
    ax.set_xticks(list(xs), [str(r["prefix_tokens"]) for r in rows])
    ax.set_xlabel("cached prefix (tokens) + a 16-token question")
    ax.set_ylabel("time to first token (s)")
    targets = result["targets"]
    fig.suptitle(f"{result['model']} on {result.get('device', 'cpu')}", fontsize=10)
    ax.set_title(
        f"TTFT (targets at {TARGET_TOKENS}: local <= {targets['local']}x, "
        f"remote <= {targets['remote']}x)",
        fontsize=9,
    )
    ax.legend(fontsize="small")

    def part_s(r: dict[str, Any], kind: str, part: str) -> float:
        b = r[f"{kind}_breakdown_s"]
        convert = b.get("convert", 0.0)  # (older result files have none)
        return float(b["load"] - convert if part == "load" else b.get(part, 0.0))

    parts = ("lookup", "load", "convert", "prefill")
    for j, kind in enumerate(("local", "remote")):
        bottom = [0.0] * len(rows)
        for part in parts:
            vals = [part_s(r, kind, part) for r in rows]
            bx.bar(
                [x + (j - 0.5) * 0.4 for x in xs], vals, 0.38, bottom=bottom,
                label=f"{kind}: {part}", alpha=1.0 if kind == "local" else 0.6,
            )  # fmt: skip
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    bx.set_xticks(list(xs), [str(r["prefix_tokens"]) for r in rows])
    bx.set_xlabel("cached prefix (tokens)")
    bx.set_ylabel("seconds (one hit request)")
    bx.set_title(
        "where a hit's TTFT goes (left: local; right: cross-region, its pass running during\n"
        "the load: prefill is what is left after it; convert: blocks put into the cache)",
        fontsize=8,
    )
    bx.legend(fontsize="x-small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _pct(fraction: float | None) -> str:
    return f"{'-':>5}" if fraction is None else f"{fraction:>5.0%}"


def _local_gets(engine: Any) -> tuple[int, int]:
    """Gets, and gets through shared memory, of the engine's clients of its own region's block
    stores so far."""
    conn = engine.connector
    clients = conn.stores.get(conn.config.region, []) if conn is not None else []
    return sum(c.stats.gets for c in clients), sum(c.stats.shared_gets for c in clients)


def device_name(model: Any) -> str:
    """Where the model runs, in words: "cpu (N threads)" or the GPU's name."""
    import torch

    dev = next(model.parameters()).device
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return f"{dev} ({_torch_threads()} threads)"


def _breakdown(m: Any) -> dict[str, float]:
    """Where one request's TTFT went."""
    return {
        "lookup": m.lookup_s,
        "load": m.load_s,
        "convert": m.convert_s,  # part of load: the torch thread putting blocks into the cache
        "prefill": m.prefill_s,
        "ttft": m.ttft_s,
    }


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())
