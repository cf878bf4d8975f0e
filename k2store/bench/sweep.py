"""Throughput against concurrency: `k2 bench tpcc --sweep` and `k2 bench txn --sweep`.

A sweep runs every protocol at each concurrency in a list (closed-loop clients per region), one
run per pair, and reduces each run to a `SweepPoint`. It prints one table with a row per
concurrency (each protocol's throughput, K2-MVTO's ratios to the baselines, and K2-MVTO's
failed attempts, overall and in its worst region) and writes the points as JSON and a plot of
throughput, ratio and p99 latency against the total number of clients.

Why: a single concurrency hides where each protocol saturates. 2PL's throughput stops growing
once its lock waits fill the clients; MVTO's keeps growing until its hot keys' lines fill, where
aborts take over. The issue's targets are stated at several concurrencies (ten clients per
warehouse, 1,000 clients), and the crossover points are what a reader wants to see.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from k2store.errors import InvalidArgument
from truetime import SystemClock

MAX_POINTS = 12
"""More values than this in one list is a typo, not a plan (each is a run per protocol, or per
prefix length)."""


@dataclass(frozen=True, slots=True)
class SweepPoint:
    """One protocol's run at one concurrency."""

    protocol: str
    clients_per_region: int
    clients: int
    """All regions together (the plot's x axis)."""
    throughput: float
    """Commits that finished inside the window, per second of it."""
    p50_ms: float
    p99_ms: float
    abort_rate: float
    """Failed attempts / attempts."""
    worst_region_abort_rate: float
    gave_up: int
    """Transactions that ran out of attempts."""
    error: str = ""


def parse_counts(text: str, option: str = "--sweep") -> list[int]:
    """`"10,30,100"` -> [10, 30, 100]: positive whole numbers, ascending, each once (the
    benchmarks' lists: --sweep's clients per region, `k2 bench engine`'s --sizes and --rtts).
    Refuses anything else with the reason."""
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            n = int(part)
        except ValueError:
            raise InvalidArgument(
                f"{option} takes a comma-separated list of whole numbers (e.g. 10,30,100), "
                f"not {part!r}"
            ) from None
        if n < 1:
            raise InvalidArgument(f"{option}: each value must be at least 1, got {n}")
        out.add(n)
    if not out:
        raise InvalidArgument(f"{option} needs at least one value (e.g. 10,30,100)")
    if len(out) > MAX_POINTS:
        raise InvalidArgument(f"{option}: at most {MAX_POINTS} values, got {len(out)}")
    return sorted(out)


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 and not math.isnan(a) else math.nan


def _fmt_ratio(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.2f}x"


def by_concurrency(points: Sequence[SweepPoint]) -> dict[int, dict[str, SweepPoint]]:
    """clients per region -> protocol -> its point (successful runs only), ascending."""
    out: dict[int, dict[str, SweepPoint]] = {}
    for p in sorted(points, key=lambda p: p.clients_per_region):
        if not p.error:
            out.setdefault(p.clients_per_region, {})[p.protocol] = p
    return out


def ratios(points: Sequence[SweepPoint], base: str) -> dict[int, float]:
    """K2-MVTO's throughput over `base`'s at each concurrency where both ran."""
    out: dict[int, float] = {}
    for n, row in by_concurrency(points).items():
        if "k2-mvto" in row and base in row:
            out[n] = _ratio(row["k2-mvto"].throughput, row[base].throughput)
    return out


def sweep_table(points: Sequence[SweepPoint], protocols: Sequence[str]) -> list[str]:
    """A header and one line per concurrency: each protocol's txn/s, K2-MVTO's ratios to
    d2PL-TTC and MVTO-HLC, and K2-MVTO's failed attempts (overall / worst region); then one line
    per failed run."""
    rows = by_concurrency(points)
    vs_2pl, vs_hlc = ratios(points, "d2pl-ttc"), ratios(points, "mvto-hlc")
    head = (
        f"{'clients/region':>14} {'clients':>8} "
        + " ".join(f"{p[:10]:>10}" for p in protocols)
        + f" {'k2/d2pl':>8} {'k2/hlc':>7} {'k2 aborts':>10} {'worst':>6} {'gave up':>8}"
    )
    lines = [head]
    for n, row in rows.items():
        clients = next(iter(row.values())).clients
        k2 = row.get("k2-mvto")
        lines.append(
            f"{n:>14} {clients:>8} "
            + " ".join(
                f"{row[p].throughput:>10.1f}" if p in row else f"{'-':>10}" for p in protocols
            )
            + f" {_fmt_ratio(vs_2pl.get(n, math.nan)):>8} {_fmt_ratio(vs_hlc.get(n, math.nan)):>7}"
            + (
                f" {k2.abort_rate:>10.1%} {k2.worst_region_abort_rate:>6.0%} {k2.gave_up:>8}"
                if k2
                else f" {'-':>10} {'-':>6} {'-':>8}"
            )
        )
    lines += [
        f"{p.protocol} at {p.clients_per_region} clients/region: FAILED: {p.error[:100]}"
        for p in points
        if p.error
    ]
    lines.append("(txn/s: commits inside the window; k2 aborts: failed attempts / attempts)")
    return lines


def _per_protocol(
    ax: Any, points: Sequence[SweepPoint], field: str, label: str, title: str
) -> None:
    """One line per protocol: `field` of its points against the total number of clients."""
    for proto in dict.fromkeys(p.protocol for p in points):
        pts = sorted((p.clients, getattr(p, field)) for p in points if p.protocol == proto)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=proto)
    ax.set_xscale("log")
    ax.set_xlabel("concurrent clients (all regions)")
    ax.set_ylabel(label)
    ax.set_title(title)
    ax.legend()


def plot_sweep(points: Sequence[SweepPoint], path: Path, title: str) -> bool:
    """Throughput, K2-MVTO's ratios and p99 latency against the total number of clients (log
    axes where the range calls for it). Returns False, drawing nothing, without matplotlib."""
    from k2store.bench.txn import pyplot

    plt = pyplot()
    ok = [p for p in points if not p.error]
    if plt is None or not ok:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    _per_protocol(axes[0], ok, "throughput", "committed txn/s", "throughput against concurrency")
    ax = axes[1]
    rows = by_concurrency(ok)
    clients = {n: next(iter(row.values())).clients for n, row in rows.items()}
    drawn = 0
    for base in ("d2pl-ttc", "mvto-hlc"):
        r = ratios(ok, base)
        if r:
            xs = sorted(r)
            ax.plot([clients[n] for n in xs], [r[n] for n in xs], marker="o", label=f"vs {base}")
            drawn += 1
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xscale("log")
    ax.set_xlabel("concurrent clients (all regions)")
    ax.set_ylabel("K2-MVTO throughput ratio")
    ax.set_title("K2-MVTO against the baselines")
    if drawn:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no baseline in this sweep", transform=ax.transAxes, ha="center")
    _per_protocol(
        axes[2], ok, "p99_ms", "p99 end-to-end latency (ms)", "tail latency against concurrency"
    )
    axes[2].set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def stamp() -> str:
    """The UTC time in the benchmarks' result file names (20261202T170456Z)."""
    return datetime.fromtimestamp(SystemClock().now_ns() / 1e9, UTC).strftime("%Y%m%dT%H%M%SZ")


def json_safe(value: Any) -> Any:
    """NaN (a percentile of nothing, a failed run's figures) as null: JSON has no NaN. Every
    benchmark's JSON goes through this."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def write_sweep(
    points: Sequence[SweepPoint], config: dict[str, Any], stem: Path, title: str
) -> list[Path]:
    """`<stem>.json` (the config, every point, and the ratios by concurrency) and, with
    matplotlib, `<stem>.png`. Returns the paths written."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "sweep",
        "title": title,
        "config": config,
        "points": [asdict(p) for p in points],
        "k2_vs_d2pl": {str(n): v for n, v in ratios(points, "d2pl-ttc").items()},
        "k2_vs_hlc": {str(n): v for n, v in ratios(points, "mvto-hlc").items()},
    }
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(json_safe(doc), indent=1, allow_nan=False) + "\n")
    written = [json_path]
    png = stem.with_suffix(".png")
    if plot_sweep(points, png, title):
        written.append(png)
    return written


__all__ = [
    "SweepPoint",
    "by_concurrency",
    "json_safe",
    "parse_counts",
    "plot_sweep",
    "ratios",
    "stamp",
    "sweep_table",
    "write_sweep",
]
