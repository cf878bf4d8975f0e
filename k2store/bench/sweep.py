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

Seeds: a saturated run is chaotic (a trivial change to the schedule moves a simulated YCSB-T run
at 100 clients by 10-15%), so one seed cannot resolve a ratio near its target. `--seeds 1,2,3`
runs every point at each seed; the table, JSON and plot then give each protocol's mean
throughput, the ratio of the means, and the range of the per-seed ratios beside it (the spread
is what says whether a difference is real).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

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
    seed: int | None = None
    """The run's seed; None on a point averaged over seeds (`average_seeds`)."""
    throughputs: tuple[float, ...] = ()
    """On a point averaged over several seeds: each seed's throughput, in seed order."""
    cpu_busy: float = math.nan
    """On node processes: the fraction of the machine's cores the run's processes (nodes and
    benchmark) kept busy in the window (`k2store.bench.cpu`); NaN in the simulator."""
    restamps: int = 0
    """First requests the leaders restamped instead of aborting in the window
    (`TxnSettings.restamp`; not in the abort rates); summed over the seeds of an averaged
    point, like `gave_up`."""


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


def add_seed_arguments(p: argparse.ArgumentParser) -> None:
    """`--seeds` and `--jobs`, for a benchmark with `--sweep`, `--seed` and `--sim`."""
    p.add_argument(
        "--seeds",
        default=None,
        metavar="S,S,...",
        help="with --sweep: run every point at each of these seeds and report the mean "
        "throughput with the range of the per-seed ratios (saturated runs are chaotic: one seed "
        "cannot resolve 10-15%%)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="with --sweep --sim: run N simulated runs at a time, each in its own process "
        "(default 1; at most the number of cores is useful)",
    )


def add_client_time_argument(p: argparse.ArgumentParser) -> None:
    """`--client-time` / `--no-client-time`, for the transaction benchmarks (`k2 bench tpcc`,
    `k2 bench txn`). On by default since session 16: the benchmark's clients stand for the
    serving nodes' embedded clients, on hosts whose clocks are held to the cluster's bound."""
    p.add_argument(
        "--client-time",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="clients hold time themselves (default on: clocks within the bound, as the clients "
        "embedded in the serving nodes have): K2-MVTO stamps a transaction when the client "
        "sends it and the client waits out the commit-wait during the reply's trip. "
        "--no-client-time stamps on arrival at the coordinator, which holds the reply through "
        "the wait (the figures of sessions before 16)",
    )


def seeds_from_args(args: argparse.Namespace, default_seed: int) -> list[int]:
    """The seeds a run covers (`--seeds`, else `--seed` or `default_seed`), after refusing what
    does not go together: seeds or workers without a sweep, seeds beside `--seed`, workers for
    node processes (they would share the CPU with each other's clusters)."""
    if args.seeds is not None and (args.sweep is None or args.seed is not None):
        raise InvalidArgument("--seeds runs a --sweep at each seed: give --sweep, and not --seed")
    if args.jobs != 1 and args.sweep is None:
        raise InvalidArgument("--jobs runs a --sweep's simulated runs side by side: give --sweep")
    if args.jobs < 1 or (args.jobs > 1 and not args.sim):
        raise InvalidArgument(
            "--jobs runs simulated runs side by side (at least 1, and more only with --sim: node "
            "processes would share the CPU with each other's clusters)"
        )
    if args.seeds is not None:
        return parse_counts(args.seeds, "--seeds")
    return [args.seed if args.seed is not None else default_seed]


T = TypeVar("T")


def side_by_side(run: Callable[..., T], calls: Sequence[tuple[Any, ...]], jobs: int) -> Iterator[T]:
    """run(*call) for every call, in worker processes `jobs` at a time (fresh interpreters:
    nothing of this process's state leaks into a run), yielding the results in the calls'
    order as each becomes available. The simulator gives the same figures in a worker as here."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context) as pool:
        futures = [pool.submit(run, *call) for call in calls]
        for future in futures:
            yield future.result()


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 and not math.isnan(a) else math.nan


def _fmt_ratio(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.2f}x"


def average_seeds(points: Sequence[SweepPoint]) -> list[SweepPoint]:
    """One point per (protocol, concurrency): as given when it ran at one seed; over several,
    the means of throughput, latencies and abort rates, the worst region's worst abort rate,
    the sum of transactions that gave up, and each seed's throughput. A failed run at any seed
    fails the point (a mean over the seeds that ran would compare unlike sets)."""
    groups: dict[tuple[str, int], list[SweepPoint]] = {}
    for p in points:
        groups.setdefault((p.protocol, p.clients_per_region), []).append(p)
    out: list[SweepPoint] = []
    for runs in groups.values():
        failed = [p for p in runs if p.error]
        if len(runs) == 1 or failed:
            out.append(failed[0] if failed else runs[0])
            continue
        runs = sorted(runs, key=lambda p: p.seed or 0)
        n = len(runs)
        out.append(
            SweepPoint(
                protocol=runs[0].protocol,
                clients_per_region=runs[0].clients_per_region,
                clients=runs[0].clients,
                throughput=sum(p.throughput for p in runs) / n,
                p50_ms=sum(p.p50_ms for p in runs) / n,
                p99_ms=sum(p.p99_ms for p in runs) / n,
                abort_rate=sum(p.abort_rate for p in runs) / n,
                worst_region_abort_rate=max(p.worst_region_abort_rate for p in runs),
                gave_up=sum(p.gave_up for p in runs),
                throughputs=tuple(p.throughput for p in runs),
                restamps=sum(p.restamps for p in runs),
                cpu_busy=_busiest(runs),
            )
        )
    return out


def _busiest(points: Sequence[SweepPoint]) -> float:
    """The highest CPU use among points that measured one; NaN if none did."""
    measured = [p.cpu_busy for p in points if not math.isnan(p.cpu_busy)]
    return max(measured) if measured else math.nan


def ratio_ranges(points: Sequence[SweepPoint], base: str) -> dict[int, tuple[float, float]]:
    """K2-MVTO's throughput over `base`'s at each seed, as (lowest, highest) per concurrency,
    where both ran at more than one seed (from the runs, not from averaged points)."""
    by_seed: dict[int, dict[tuple[str, int], float]] = {}
    for p in points:
        if not p.error and p.seed is not None:
            by_seed.setdefault(p.clients_per_region, {})[p.protocol, p.seed] = p.throughput
    out: dict[int, tuple[float, float]] = {}
    for n, tps in sorted(by_seed.items()):
        each = [
            _ratio(tps["k2-mvto", seed], tps[base, seed])
            for seed in sorted({seed for _, seed in tps})
            if ("k2-mvto", seed) in tps and (base, seed) in tps
        ]
        if len(each) > 1:
            out[n] = (min(each), max(each))
    return out


def by_concurrency(points: Sequence[SweepPoint]) -> dict[int, dict[str, SweepPoint]]:
    """clients per region -> protocol -> its point (successful runs only), ascending."""
    out: dict[int, dict[str, SweepPoint]] = {}
    for p in sorted(points, key=lambda p: p.clients_per_region):
        if not p.error:
            out.setdefault(p.clients_per_region, {})[p.protocol] = p
    return out


def ratios(points: Sequence[SweepPoint], base: str) -> dict[int, float]:
    """K2-MVTO's throughput over `base`'s at each concurrency where both ran (over several
    seeds: the ratio of the mean throughputs)."""
    out: dict[int, float] = {}
    for n, row in by_concurrency(average_seeds(points)).items():
        if "k2-mvto" in row and base in row:
            out[n] = _ratio(row["k2-mvto"].throughput, row[base].throughput)
    return out


def _fmt_range(r: tuple[float, float] | None) -> str:
    return "" if r is None else f" ({r[0]:.2f}-{r[1]:.2f})"


def seeds_of(points: Sequence[SweepPoint]) -> list[int]:
    """The seeds the runs used, ascending (empty when the points name none)."""
    return sorted({p.seed for p in points if p.seed is not None})


def sweep_table(points: Sequence[SweepPoint], protocols: Sequence[str]) -> list[str]:
    """A header and one line per concurrency: each protocol's txn/s, K2-MVTO's ratios to
    d2PL-TTC and MVTO-HLC, and K2-MVTO's failed attempts (overall / worst region); then one line
    per failed run. Over several seeds: mean throughputs, the ratio of the means, and in
    brackets the lowest and highest of the per-seed ratios."""
    rows = by_concurrency(average_seeds(points))
    vs_2pl, vs_hlc = ratios(points, "d2pl-ttc"), ratios(points, "mvto-hlc")
    range_2pl, range_hlc = ratio_ranges(points, "d2pl-ttc"), ratio_ranges(points, "mvto-hlc")
    w = 20 if range_2pl or range_hlc else 8
    cpu = any(not math.isnan(p.cpu_busy) for p in points)
    head = (
        f"{'clients/region':>14} {'clients':>8} "
        + " ".join(f"{p[:10]:>10}" for p in protocols)
        + f" {'k2/d2pl':>{w}} {'k2/hlc':>{w}} {'k2 aborts':>10} {'worst':>6} {'gave up':>8}"
        + (f" {'cpu busy':>8}" if cpu else "")
    )
    lines = [head]
    for n, row in rows.items():
        clients = next(iter(row.values())).clients
        k2 = row.get("k2-mvto")
        r2 = _fmt_ratio(vs_2pl.get(n, math.nan)) + _fmt_range(range_2pl.get(n))
        rh = _fmt_ratio(vs_hlc.get(n, math.nan)) + _fmt_range(range_hlc.get(n))
        lines.append(
            f"{n:>14} {clients:>8} "
            + " ".join(
                f"{row[p].throughput:>10.1f}" if p in row else f"{'-':>10}" for p in protocols
            )
            + f" {r2:>{w}} {rh:>{w}}"
            + (
                f" {k2.abort_rate:>10.1%} {k2.worst_region_abort_rate:>6.0%} {k2.gave_up:>8}"
                if k2
                else f" {'-':>10} {'-':>6} {'-':>8}"
            )
            + (f" {_fmt_busy(_busiest(list(row.values()))):>8}" if cpu else "")
        )
    lines += [
        f"{p.protocol} at {p.clients_per_region} clients/region: FAILED: {p.error[:100]}"
        for p in points
        if p.error
    ]
    seeds = seeds_of(points)
    lines.append(
        "(txn/s: commits inside the window"
        + (
            f", the mean over seeds {', '.join(map(str, seeds))}; ratios of the means, the "
            "per-seed ratios' range in brackets"
            if len(seeds) > 1
            else ""
        )
        + "; k2 aborts: failed attempts / attempts"
        + (
            "; cpu busy: the most of the machine's cores any protocol's processes kept busy, "
            "near 100% the run measures the machine, not the protocol"
            if cpu
            else ""
        )
        + ")"
    )
    return lines


def _fmt_busy(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.0%}"


def _per_protocol(
    ax: Any, points: Sequence[SweepPoint], field: str, label: str, title: str
) -> None:
    """One line per protocol: `field` of its points against the total number of clients; a
    throughput averaged over seeds has a bar from its lowest to its highest seed."""
    for proto in dict.fromkeys(p.protocol for p in points):
        pts = sorted((p for p in points if p.protocol == proto), key=lambda p: p.clients)
        xs, ys = [p.clients for p in pts], [getattr(p, field) for p in pts]
        if field == "throughput" and any(p.throughputs for p in pts):
            lo = [y - min(p.throughputs or (y,)) for p, y in zip(pts, ys, strict=True)]
            hi = [max(p.throughputs or (y,)) - y for p, y in zip(pts, ys, strict=True)]
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=proto)
        else:
            ax.plot(xs, ys, marker="o", label=proto)
    _clients_axis(ax, sorted({p.clients for p in points}))
    ax.set_ylabel(label)
    ax.set_title(title)
    ax.legend()


def _clients_axis(ax: Any, clients: Sequence[int]) -> None:
    """Log scale, ticked and labelled at the sweep's own numbers of clients (3, 9, 30 rather
    than powers of ten)."""
    ax.set_xscale("log")
    ax.set_xticks(list(clients), [f"{n:,}" for n in clients])
    ax.minorticks_off()
    ax.set_xlabel("concurrent clients (all regions)")


def plot_sweep(points: Sequence[SweepPoint], path: Path, title: str) -> bool:
    """Throughput, K2-MVTO's ratios and p99 latency against the total number of clients (log
    axes where the range calls for it), and on node processes how busy each run kept the
    machine's cores. Returns False, drawing nothing, without matplotlib."""
    from k2store.bench.txn import pyplot

    plt = pyplot()
    ok = [p for p in average_seeds(points) if not p.error]
    if plt is None or not ok:
        return False
    cpu = any(not math.isnan(p.cpu_busy) for p in ok)
    fig, axes = plt.subplots(1, 4 if cpu else 3, figsize=(21 if cpu else 16, 4.4))
    _per_protocol(axes[0], ok, "throughput", "committed txn/s", "throughput against concurrency")
    ax = axes[1]
    rows = by_concurrency(ok)
    clients = {n: next(iter(row.values())).clients for n, row in rows.items()}
    drawn = 0
    for base in ("d2pl-ttc", "mvto-hlc"):
        r = ratios(points, base)
        if r:
            xs = sorted(r)
            spread = ratio_ranges(points, base)
            lo = [r[n] - spread[n][0] if n in spread else 0.0 for n in xs]
            hi = [spread[n][1] - r[n] if n in spread else 0.0 for n in xs]
            ax.errorbar(
                [clients[n] for n in xs],
                [r[n] for n in xs],
                yerr=[lo, hi] if spread else None,
                marker="o",
                capsize=3,
                label=f"vs {base}",
            )
            drawn += 1
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    shown = [v for base in ("d2pl-ttc", "mvto-hlc") for v in ratios(points, base).values()]
    if shown and max(shown) > 10 * min(shown):
        ax.set_yscale("log")  # a 40x beside a 1.1x: both readable
    _clients_axis(ax, sorted(clients.values()))
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
    if cpu:
        from matplotlib.ticker import PercentFormatter

        _per_protocol(
            axes[3],
            [p for p in ok if not math.isnan(p.cpu_busy)],
            "cpu_busy",
            "cores busy (nodes and benchmark)",
            "CPU against concurrency",
        )
        axes[3].axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        axes[3].set_ylim(0, 1.1)
        axes[3].yaxis.set_major_formatter(PercentFormatter(1.0))
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
    doc: dict[str, Any] = {
        "benchmark": "sweep",
        "title": title,
        "config": config,
        "seeds": seeds_of(points),
        "points": [asdict(p) for p in average_seeds(points)],
        "k2_vs_d2pl": {str(n): v for n, v in ratios(points, "d2pl-ttc").items()},
        "k2_vs_hlc": {str(n): v for n, v in ratios(points, "mvto-hlc").items()},
    }
    if len(seeds_of(points)) > 1:
        doc["runs"] = [asdict(p) for p in points]
        for key, base in (("k2_vs_d2pl_range", "d2pl-ttc"), ("k2_vs_hlc_range", "mvto-hlc")):
            doc[key] = {str(n): list(r) for n, r in ratio_ranges(points, base).items()}
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(json_safe(doc), indent=1, allow_nan=False) + "\n")
    written = [json_path]
    png = stem.with_suffix(".png")
    if plot_sweep(points, png, title):
        written.append(png)
    return written


__all__ = [
    "SweepPoint",
    "add_seed_arguments",
    "average_seeds",
    "by_concurrency",
    "json_safe",
    "parse_counts",
    "plot_sweep",
    "ratio_ranges",
    "ratios",
    "seeds_from_args",
    "seeds_of",
    "side_by_side",
    "stamp",
    "sweep_table",
    "write_sweep",
]
