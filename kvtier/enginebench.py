"""`k2 bench engine`: time to first token with and without the KV tier, side by side in one run.

For each prefix length N (256 ... 4096 tokens, block-aligned) the benchmark sends requests of
N prefix tokens followed by 16 fresh tokens (a new question about the same document) and times
the first token of each, end to end (lookup, load, prefill, first sample):

    recompute   us-east, nothing cached: the whole prompt is prefilled (the first request, which
                stores the prefix, and reps-1 more on an engine without the tier)
    local hit   us-east again: the prefix's blocks come from us-east's block store
    remote hit  eu-west: the blocks come from us-east's block store over the emulated
                us-east<->eu-west link (75 ms RTT, 1 Gbit/s by default); eu-west stores nothing
                back and makes no demand copies, so every repetition is a cross-region hit
    choice      what the connector's cost model chose for the remote hit (remote: fetched;
                recompute: fetching was judged slower than recomputing)

Setup: a local three-region cluster of node processes with one block store process per region
and wide-area emulation on (`k2store.launcher.up`), the model in this process (one engine per
region). Hits are the median of `--reps` requests. Ratios are TTFT / recompute TTFT. Output: a
table on stdout, JSON (`--out`, default k2-bench-engine.json) and a plot beside it (.png). Targets (DESIGN.md 7, issue 7)
at 2,048 tokens: local <= 1/10, remote <= 1/5 of recompute; the exit status is 1 if one is
missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["main", "plot", "run_bench"]

SUFFIX_TOKENS = 16
TARGETS = {"local": 0.10, "remote": 0.20}
TARGET_TOKENS = 2048


def main(args: argparse.Namespace) -> int:
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
    else:
        sizes = [256, 1024, 2048] if args.quick else [256, 512, 1024, 2048, 4096]
    reps = args.reps or (2 if args.quick else 3)
    result = run_bench(
        sizes,
        reps=reps,
        model_path=args.model,
        block_tokens=args.block_tokens,
        kv_dtype=args.kv_dtype,
        data=args.data,
        remote_codec=args.remote_codec,
    )
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    png = args.out.with_suffix(".png")
    drawn = plot(result, png)
    print(f"\nwrote {args.out}" + (f" and {png}" if drawn else " (no plot: matplotlib missing)"))
    return 0 if result["targets_met"] in (True, None) else 1


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
    from k2store import launcher
    from kvtier.models import load_model

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if loaded is None:
        loaded = load_model(model_path, progress=say)
    tmp = None
    if data is None:
        tmp = tempfile.TemporaryDirectory(prefix="k2-bench-engine-")
        data = Path(tmp.name)
    say("starting a local three-region cluster with block stores ...")
    cfg = launcher.up(data, progress=False, blockstores=True, with_parent=True)
    try:
        return asyncio.run(_run(cfg, loaded, sizes, reps, block_tokens, kv_dtype, remote_codec))
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
    import torch

    from kvtier.connector import ConnectorConfig
    from kvtier.engine import Engine, EngineConfig, SamplingParams
    from kvtier.serve import ServingNode

    east = await ServingNode.open(
        cfg, "us-east", model=loaded.model, tokenizer=loaded.tokenizer,
        revision=loaded.revision, tenant="bench",
        engine_config=EngineConfig(block_tokens=block_tokens, kv_dtype=kv_dtype),
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

    rows: list[dict[str, Any]] = []
    try:
        await east.engine.complete(tokens(64), one)  # warm-up (first calls are slow)
        await east.engine.flush()
        print(
            f"{'prefix':>7} {'recompute':>10} {'local':>9} {'remote':>9} "
            f"{'local/rc':>9} {'remote/rc':>10} {'moved MB':>9}  choice"
        )
        for n in sizes:
            n = max(block_tokens, n // block_tokens * block_tokens)
            prefix = tokens(n)
            miss = await east.engine.complete(prefix + tokens(SUFFIX_TOKENS), one)
            await east.engine.flush()
            # More recompute samples from an engine without the tier (no lookup: if anything
            # this flatters recompute), so one noisy prefill does not set the ratios.
            recompute = [miss.metrics.ttft_s]
            for _ in range(reps - 1):
                c = await plain.complete(prefix + tokens(SUFFIX_TOKENS), one)
                recompute.append(c.metrics.ttft_s)
            local = []
            for _ in range(reps):
                c = await east.engine.complete(prefix + tokens(SUFFIX_TOKENS), one)
                assert c.metrics.cached_tokens == n, c.metrics
                local.append(c.metrics.ttft_s)
                local_m = c.metrics
            remote = []
            moved = 0
            choice = ""
            for _ in range(reps):
                c = await west.engine.complete(prefix + tokens(SUFFIX_TOKENS), one)
                remote.append(c.metrics.ttft_s)
                moved = c.metrics.bytes_moved
                choice = c.metrics.choice
                remote_m = c.metrics
            rc = statistics.median(recompute)
            row = {
                "prefix_tokens": n,
                "recompute_ttft_s": rc,
                "local_hit_ttft_s": statistics.median(local),
                "remote_hit_ttft_s": statistics.median(remote),
                "local_ratio": statistics.median(local) / rc,
                "remote_ratio": statistics.median(remote) / rc,
                "remote_bytes_moved": moved,
                "remote_choice": choice,
                "recompute_samples_s": recompute,
                "local_samples_s": local,
                "remote_samples_s": remote,
                "local_breakdown_s": _breakdown(local_m),
                "remote_breakdown_s": _breakdown(remote_m),
                "recompute_breakdown_s": _breakdown(miss.metrics),
            }
            rows.append(row)
            print(
                f"{n:>7} {rc:>9.3f}s {row['local_hit_ttft_s']:>8.3f}s "
                f"{row['remote_hit_ttft_s']:>8.3f}s {row['local_ratio']:>9.3f} "
                f"{row['remote_ratio']:>10.3f} {moved / 1e6:>9.1f}  {choice}",
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
    width = 0.27
    series = [
        ("recompute", "recompute_ttft_s", None),
        ("local hit", "local_hit_ttft_s", "local_ratio"),
        ("us-east -> eu-west hit", "remote_hit_ttft_s", "remote_ratio"),
    ]
    for j, (label, key, ratio) in enumerate(series):
        bars = ax.bar([x + (j - 1) * width for x in xs], [r[key] for r in rows], width, label=label)
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
    ax.set_title(
        f"{result['model']}: TTFT (targets at {TARGET_TOKENS}: local <= {targets['local']}x, "
        f"remote <= {targets['remote']}x)",
        fontsize=9,
    )
    ax.legend(fontsize="small")
    parts = ("lookup", "load", "prefill")
    for j, kind in enumerate(("local", "remote")):
        bottom = [0.0] * len(rows)
        for part in parts:
            vals = [r[f"{kind}_breakdown_s"][part] for r in rows]
            bx.bar(
                [x + (j - 0.5) * 0.4 for x in xs], vals, 0.38, bottom=bottom,
                label=f"{kind}: {part}", alpha=1.0 if kind == "local" else 0.6,
            )  # fmt: skip
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    bx.set_xticks(list(xs), [str(r["prefix_tokens"]) for r in rows])
    bx.set_xlabel("cached prefix (tokens)")
    bx.set_ylabel("seconds (one hit request)")
    bx.set_title("where a hit's TTFT goes (left: local, right: cross-region)", fontsize=9)
    bx.legend(fontsize="x-small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _breakdown(m: Any) -> dict[str, float]:
    """Where one request's TTFT went."""
    return {"lookup": m.lookup_s, "load": m.load_s, "prefill": m.prefill_s, "ttft": m.ttft_s}


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())
