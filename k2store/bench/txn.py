"""`k2 bench txn`: YCSB-T transactions against a real cluster of node processes.

How a run goes::

    cluster (a file, or a fresh local 3-region cluster in a temp dir, torn down afterwards)
      load:  every key <region>/ycsb/<i> written once (a counter plus padding)
      run:   clients_per_region closed-loop clients in every region, each its own AsyncClient
             with region= its region; each transaction reads ops_per_txn keys in one round
             (get_many, which also begins the transaction) and writes back the
             read-modify-write ones (put_many with commit=True: the commit goes in the same
             round trip), through client.run(fn), which retries aborts with a new timestamp
      report: throughput, latency percentiles, abort rate overall, by rule, by region and by
             local versus cross-region transactions (starvation must not hide behind an average)

Keys: each region's key space holds keys // regions keys, drawn by a seeded Zipfian (rank 0 the
hottest). A transaction works on its own region's keys; a `remote_fraction` of them send one
read-modify-write to another region's keys instead. The `hot-reads` mix turns half the operations
into plain reads of the region's `hot_keys` hottest keys, the rows other transactions write: the
case where MVTO's reads do not block writers and 2PL's read locks do.

What is measured, per transaction: attempts, the abort rule (`TxnAborted.rule`) or error reason of
every failed attempt, the latency of the committed attempt and end to end (first begin to commit).
`client.run` does the retrying; a subclass of AsyncClient only observes each attempt's begin and
commit, so aborts at commit are counted as well as aborts during execution.

Without `--cluster` every protocol of `--protocol` (all three unless given) runs in turn on a
fresh local cluster, and the runs are printed side by side with their ratios.

`--ablate` runs the same mix once with every refinement on and once with each switched off in turn
(the cluster file's `[txn]` table), each on a fresh local cluster, and prints ratios to the default.

All timing reads `truetime.SystemClock` (the one OS-clock reader in K2).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import importlib
import itertools
import json
import math
import random
import sys
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from k2store import cluster as cluster_mod
from k2store import evloop, launcher
from k2store.bench.cpu import CpuMeter, CpuUse
from k2store.bench.sweep import (
    SweepPoint,
    add_client_time_argument,
    add_seed_arguments,
    json_safe,
    parse_counts,
    seeds_from_args,
    side_by_side,
    stamp,
    sweep_table,
    write_sweep,
)
from k2store.client import AsyncClient, AsyncTransaction, RetryPolicy, client_truetime
from k2store.cluster import (
    DEFAULT_REGIONS,
    ClusterConfig,
    ClusterSettings,
    ReplicationSettings,
    TxnSettings,
)
from k2store.errors import InvalidArgument, K2Error, TxnAborted
from truetime import SystemClock

PROTOCOLS: tuple[str, ...] = ("k2-mvto", "d2pl-ttc", "mvto-hlc")
"""Protocols this benchmark runs; each is set as the local cluster's `[txn] protocol`."""

MIXES: tuple[str, ...] = ("rmw", "hot-reads")

REFINEMENTS: tuple[str, ...] = (
    "wait_for_lower",
    "one_shot",
    "record_at_home",
    "async_resolve",
    "early_resolve",
    "future_ts",
    "late_stamping",
    "wait_places",
    "for_update",
    "commit_with_writes",
    "restamp",
)
"""The `[txn]` switches that `--ablate` turns off one at a time (see cluster.TxnSettings)."""

_CLOCK = SystemClock()


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """One benchmark run's workload. Defaults suit a laptop; `quick()` a CI smoke test."""

    protocol: str = "k2-mvto"
    mix: str = "rmw"
    """`rmw`: every operation is a read-modify-write. `hot-reads`: half are reads of hot keys."""
    theta: float = 0.99
    """Zipfian skew: 0 is uniform; 0.99 is YCSB's default (the hottest key draws ~1 in 7)."""
    keys: int = 3000
    """Total keys, split evenly over the regions (<region>/ycsb/<i>)."""
    clients_per_region: int = 4
    ops_per_txn: int = 2
    duration_s: float = 20.0
    warmup_s: float = 2.0
    """The first seconds of the window, not measured: every client starts at once with empty
    lines, and until the hot keys' queues form the protocols commit several times their steady
    rate (YCSB-T rmw at 33 clients per region: 579 commits in the first simulated second, about
    140 a second from the third on). Throughput counts the commits that finish after it;
    latencies and abort rates the transactions that begin after it."""
    remote_fraction: float = 0.2
    """Fraction of transactions that send one read-modify-write to another region's keys."""
    hot_keys: int = 4
    """`hot-reads`: reads go to this many hottest keys of the client's region."""
    value_bytes: int = 100
    max_attempts: int = 30
    """Attempts per transaction before `client.run` gives up (the transaction counts as failed)."""
    initial_backoff_s: float = 0.005
    max_backoff_s: float = 1.0
    """A failed attempt is retried after a jittered backoff that doubles from
    `initial_backoff_s` up to this cap, the client library's default (`RetryPolicy`). Runs
    before session 10 capped it at 0.1 s (from 2 ms), below the widest round trip (210 ms): a
    cross-region transaction that lost a hot key came back before the line it lost in had
    cleared, and under saturation the MVTO protocols spent their hot keys on attempts that
    aborted (YCSB-T rmw at 33 clients per region, seeds 1 / 2: K2-MVTO 114.1 / 116.6 -> 136.0 /
    155.3 txn/s, d2PL-TTC 95.9 / 95.7 -> 93.1 / 106.2, MVTO-HLC 121.8 / 96.3 -> 121.6 / 119.4)."""
    seed: int = 1
    client_time: bool = True
    """Clients with client time (as `k2 bench tpcc`; `--no-client-time` turns it off): K2-MVTO
    stamps a transaction when the client sends it and the client waits out the commit-wait."""

    @staticmethod
    def quick(**overrides: Any) -> BenchConfig:
        base = BenchConfig(keys=300, clients_per_region=2, duration_s=6.0, warmup_s=1.0)
        return replace(base, **overrides)

    def validate(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise InvalidArgument(
                f"unknown protocol {self.protocol!r}; available: {', '.join(PROTOCOLS)}"
            )
        if self.mix not in MIXES:
            raise InvalidArgument(f"unknown mix {self.mix!r}; available: {', '.join(MIXES)}")
        if not (math.isfinite(self.theta) and self.theta >= 0):
            raise InvalidArgument(f"theta must be a finite number >= 0, got {self.theta}")
        if self.ops_per_txn < 1:
            raise InvalidArgument(f"ops-per-txn must be at least 1, got {self.ops_per_txn}")
        if self.clients_per_region < 1:
            raise InvalidArgument(
                f"clients-per-region must be at least 1, got {self.clients_per_region}"
            )
        if not 0 <= self.remote_fraction <= 1:
            raise InvalidArgument(f"remote fraction must be in [0, 1], got {self.remote_fraction}")
        if self.duration_s <= 0:
            raise InvalidArgument(f"duration must be positive, got {self.duration_s}")
        if not 0 <= self.warmup_s < self.duration_s:
            raise InvalidArgument(
                f"warm-up must be at least 0 and shorter than the duration ({self.duration_s:g} "
                f"s), got {self.warmup_s:g}"
            )
        if self.max_attempts < 1 or self.hot_keys < 1 or self.value_bytes < 8:
            raise InvalidArgument("max-attempts and hot-keys must be >= 1, value-bytes >= 8")
        if not 0 < self.initial_backoff_s <= self.max_backoff_s <= 60:
            raise InvalidArgument(
                f"backoff: need 0 < initial ({self.initial_backoff_s:g} s) <= max "
                f"({self.max_backoff_s:g} s) <= 60 s"
            )

    def keys_per_region(self, regions: int) -> int:
        return self.keys // regions

    def check_keys(self, regions: int) -> None:
        need = max(self.ops_per_txn, self.hot_keys if self.mix == "hot-reads" else 1)
        if self.keys_per_region(regions) < need:
            raise InvalidArgument(
                f"--keys {self.keys} gives {self.keys_per_region(regions)} keys per region over "
                f"{regions} regions; need at least {need} per region (ops-per-txn, and hot-keys "
                "for the hot-reads mix)"
            )


# -- the workload -------------------------------------------------------------------------------


class Zipfian:
    """Ranks 0..n-1 with P(rank r) proportional to 1 / (r + 1)^theta, from a seeded Random.

    Exact: draws invert the cumulative distribution (precomputed, O(n) memory, O(log n) a draw),
    rather than YCSB's closed-form approximation, so any theta >= 0 works, 1 included.
    """

    def __init__(self, n: int, theta: float, rng: random.Random) -> None:
        if n < 1:
            raise ValueError(f"a Zipfian needs at least one item, got {n}")
        if theta < 0:
            raise ValueError(f"theta must be >= 0, got {theta}")
        self.n = n
        self.theta = theta
        self._rng = rng
        self._cdf = list(itertools.accumulate(1.0 / (r + 1) ** theta for r in range(n)))
        self._total = self._cdf[-1]

    def probability(self, rank: int) -> float:
        return float(1.0 / (rank + 1) ** self.theta / self._total)

    def next(self) -> int:
        u = self._rng.random() * self._total
        return min(bisect.bisect_right(self._cdf, u), self.n - 1)


def ycsb_key(region: str, i: int) -> str:
    return f"{region}/ycsb/{i}"


@dataclass(frozen=True, slots=True)
class TxnSpec:
    reads: tuple[str, ...]
    """Keys only read (the hot-reads mix)."""
    rmw: tuple[str, ...]
    """Keys read, then written back."""
    remote: bool
    """Whether one key belongs to another region."""


class Workload:
    """The transactions of one client: a seeded stream of TxnSpec for its region."""

    def __init__(self, bc: BenchConfig, regions: Sequence[str], region: str, seed: int) -> None:
        self._bc = bc
        self._regions = list(regions)
        self._region = region
        self._others = [r for r in regions if r != region]
        self._rng = random.Random(seed)
        self._zipf = Zipfian(bc.keys_per_region(len(regions)), bc.theta, self._rng)
        self._hot = Zipfian(bc.hot_keys, bc.theta, self._rng)
        self.reads_per_txn = bc.ops_per_txn // 2 if bc.mix == "hot-reads" else 0
        self.rmw_per_txn = bc.ops_per_txn - self.reads_per_txn

    def _distinct(self, zipf: Zipfian, region: str, taken: set[str]) -> str:
        for _ in range(64):
            k = ycsb_key(region, zipf.next())
            if k not in taken:
                return k
        # Extreme skew, or more hot reads than hot keys: the region's hottest key not yet taken
        # (check_keys makes sure the region has enough keys).
        return next(
            ycsb_key(region, i) for i in range(self._zipf.n) if ycsb_key(region, i) not in taken
        )

    def next(self) -> TxnSpec:
        remote = bool(self._others) and self._rng.random() < self._bc.remote_fraction
        taken: set[str] = set()
        rmw: list[str] = []
        for j in range(self.rmw_per_txn):
            region = self._region
            if remote and j == self.rmw_per_txn - 1:
                region = self._rng.choice(self._others)
            k = self._distinct(self._zipf, region, taken)
            taken.add(k)
            rmw.append(k)
        reads = []
        for _ in range(self.reads_per_txn):
            k = self._distinct(self._hot, self._region, taken)
            taken.add(k)
            reads.append(k)
        return TxnSpec(tuple(reads), tuple(rmw), remote)


def _bump(value: bytes | None, size: int) -> bytes:
    n = int.from_bytes(value[:8], "big") + 1 if value else 1
    return n.to_bytes(8, "big") + b"." * (size - 8)


# -- observing attempts -------------------------------------------------------------------------


class _ObservedTxn(AsyncTransaction):
    """An AsyncTransaction that reports how its commit ended to the client that began it."""

    _observer: _ObservingClient

    async def commit(self) -> int:
        try:
            return await super().commit()
        except K2Error as e:
            self._observer.failed(e)
            raise


class _ObservingClient(AsyncClient):
    """An AsyncClient that notes the start of every attempt and why each failed attempt failed.

    `client.run` still does the retrying; this only watches `begin` (one per attempt) and
    `commit`, plus the errors the transaction body raises (reported by the caller via `failed`).
    One closed-loop client drives it, so the notes belong to one transaction at a time.
    """

    transaction_type = _ObservedTxn

    def __init__(self, cluster: ClusterConfig, **kw: Any) -> None:
        super().__init__(cluster, **kw)
        self.now_ns: Callable[[], int] = _CLOCK.monotonic_ns
        """The run's clock (the simulator's virtual one in `--sim` runs)."""
        self.attempts = 0
        self.attempt_started_ns = 0
        self.failures: list[str] = []

    def reset(self) -> None:
        self.attempts = 0
        self.failures = []

    def failed(self, e: BaseException) -> None:
        if isinstance(e, TxnAborted):
            self.failures.append(e.rule)
        elif isinstance(e, K2Error):
            self.failures.append(f"error:{e.reason}")
        else:
            self.failures.append(f"error:{type(e).__name__}")

    async def begin(self, **kw: Any) -> AsyncTransaction:
        self.attempts += 1
        self.attempt_started_ns = self.now_ns()
        tx = await super().begin(**kw)
        assert isinstance(tx, _ObservedTxn)
        tx._observer = self
        return tx


# -- results ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TxnRecord:
    region: str
    remote: bool
    committed: bool
    attempts: int
    failures: tuple[str, ...]
    """Abort rule (or `error:<reason>`) of each failed attempt, in order."""
    attempt_ms: float
    """Latency of the last attempt (the committed one when `committed`)."""
    total_ms: float
    """End to end: the first begin to the commit's reply (or the final failure)."""
    finished_s: float
    """When it finished, in seconds since the run started."""


@dataclass
class RunResult:
    label: str
    config: BenchConfig
    txn_settings: TxnSettings
    regions: list[str]
    elapsed_s: float
    """Start to the last transaction's end: the window (`config.duration_s`) plus the drain of
    the transactions in flight when it closed."""
    records: list[TxnRecord] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    """Why the run could not complete (an ablation variant that broke); empty when it ran."""
    mode: str = "processes"
    """"processes" (node processes, emulated links) or "sim" (the simulator, virtual time)."""
    cpu: CpuUse | None = None
    """On node processes: the CPU the nodes and the benchmark spent in the measured window."""

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "mode": self.mode,
            "protocol": self.config.protocol,
            "error": self.error,
            "txn_settings": asdict(self.txn_settings),
            "regions": self.regions,
            "elapsed_s": self.elapsed_s,
            "summary": self.summary,
            "cpu": None if self.cpu is None else self.cpu.to_json(),
            "transactions": {
                "fields": [
                    "region",
                    "remote",
                    "committed",
                    "attempts",
                    "failures",
                    "attempt_ms",
                    "total_ms",
                    "finished_s",
                ],
                "rows": [
                    [
                        r.region,
                        r.remote,
                        r.committed,
                        r.attempts,
                        list(r.failures),
                        round(r.attempt_ms, 3),
                        round(r.total_ms, 3),
                        round(r.finished_s, 3),
                    ]
                    for r in self.records
                ],
            },
        }


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending sequence (nan when empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _began_s(r: TxnRecord) -> float:
    return r.finished_s - r.total_ms / 1e3


def _group_summary(
    records: Sequence[TxnRecord], window_s: float, warmup_s: float = 0.0
) -> dict[str, Any]:
    """Throughput counts the commits that finished inside the run's window after its warm-up
    (from `warmup_s` to `window_s` after its start, see `BenchConfig.warmup_s`); the
    transactions in flight when it closed still finish (and count in the latency percentiles and
    abort rates) but not as throughput: under saturation they take seconds to drain, and
    dividing every commit by the time the drain took would charge a protocol for its tail twice,
    while dividing them by the window would credit it with work done after it. Latencies and
    abort rates are of the transactions that began after the warm-up."""
    in_window = sum(1 for r in records if r.committed and warmup_s < r.finished_s <= window_s)
    records = [r for r in records if _began_s(r) >= warmup_s]
    done = [r for r in records if r.committed]
    measured_s = window_s - warmup_s
    total = sorted(r.total_ms for r in done)
    attempt = sorted(r.attempt_ms for r in done)
    attempts = sum(r.attempts for r in records)
    failed = sum(len(r.failures) for r in records)
    return {
        "transactions": len(records),
        "committed": len(done),
        "committed_in_window": in_window,
        "gave_up": len(records) - len(done),
        "throughput_tps": in_window / measured_s if measured_s > 0 else 0.0,
        "p50_ms": percentile(total, 50),
        "p99_ms": percentile(total, 99),
        "attempt_p50_ms": percentile(attempt, 50),
        "attempt_p99_ms": percentile(attempt, 99),
        "attempts": attempts,
        "failed_attempts": failed,
        "abort_rate": failed / attempts if attempts else 0.0,
        "max_attempts": max((r.attempts for r in records), default=0),
    }


def commits_per_second(records: Sequence[TxnRecord], window_s: float) -> list[int]:
    """Commits that finished in each second of the window (the last may be partial): where a
    run settles, and so how much warm-up it needs (see `BenchConfig.warmup_s`)."""
    counts = [0] * max(1, math.ceil(window_s))
    for r in records:
        if r.committed and 0 <= r.finished_s <= window_s:
            counts[min(int(r.finished_s), len(counts) - 1)] += 1
    return counts


def draw_commits_over_run(
    ax: Any, series: Sequence[tuple[str, list[int]]], warmup_s: float
) -> None:
    """A run's timeline panel (both benchmarks' plots): commits in each second of the window,
    one line per (label, counts), with the warm-up shaded, so a run that had not settled when
    measuring began shows it."""
    for label, counts in series:
        ax.plot(counts, label=label, drawstyle="steps-post")
    if warmup_s:
        ax.axvspan(0, warmup_s, color="0.85", label="warm-up (not measured)")
    ax.set_xlabel("second of the run")
    ax.set_ylabel("commits per second")
    ax.set_title("commits over the run")
    ax.legend(fontsize="small")


def summarize(
    records: Sequence[TxnRecord], window_s: float, regions: Sequence[str], warmup_s: float = 0.0
) -> dict[str, Any]:
    """Overall, per-region and local/cross-region figures, and failed attempts by rule;
    `window_s`: the run's window, `warmup_s` its unmeasured start (see `_group_summary`)."""
    measured = [r for r in records if _began_s(r) >= warmup_s]
    rules = Counter(f for r in measured for f in r.failures)
    attempts = sum(r.attempts for r in measured)

    def group(rs: Sequence[TxnRecord]) -> dict[str, Any]:
        return _group_summary(rs, window_s, warmup_s)

    return {
        "warmup_s": warmup_s,
        "commits_per_second": commits_per_second(records, window_s),
        "overall": group(records),
        "by_region": {
            region: group([r for r in records if r.region == region]) for region in regions
        },
        "by_kind": {
            "local": group([r for r in records if not r.remote]),
            "cross-region": group([r for r in records if r.remote]),
        },
        "aborts_by_rule": {
            rule: {"attempts": n, "share_of_attempts": n / attempts if attempts else 0.0}
            for rule, n in rules.most_common()
        },
    }


# -- running ------------------------------------------------------------------------------------


MakeClient = Callable[[str, RetryPolicy], _ObservingClient]
"""A client located in a region, with a retry policy (node processes or the simulator)."""


def _process_clients(cfg: ClusterConfig, client_time: bool = False) -> MakeClient:
    return lambda region, retry: _ObservingClient(
        cfg,
        region=region,
        retry=retry,
        truetime=client_truetime(cfg) if client_time else None,
    )


async def _load(make_client: MakeClient, bc: BenchConfig, regions: Sequence[str]) -> None:
    """Write every key once, in transactions of up to 100 keys homed in one region."""
    per_region = bc.keys_per_region(len(regions))
    retry = RetryPolicy(max_attempts=bc.max_attempts, initial_backoff_s=0.005, max_backoff_s=0.2)

    async def load_region(region: str) -> None:
        async with make_client(region, retry) as client:
            for lo in range(0, per_region, 100):
                batch: dict[bytes | str, bytes | None] = {
                    ycsb_key(region, i): _bump(None, bc.value_bytes)
                    for i in range(lo, min(lo + 100, per_region))
                }

                async def write(
                    tx: AsyncTransaction, b: dict[bytes | str, bytes | None] = batch
                ) -> None:
                    await tx.put_many(b)

                await client.run(write)

    await asyncio.gather(*(load_region(r) for r in regions))


async def run_mix(
    cfg: ClusterConfig,
    bc: BenchConfig,
    *,
    label: str = "default",
    progress: bool = True,
    make_client: MakeClient | None = None,
    now_ns: Callable[[], int] = _CLOCK.monotonic_ns,
    restamps: Callable[[], Awaitable[int]] | None = None,
) -> RunResult:
    """Load the keys, run the closed-loop clients for `bc.duration_s`, and summarize.
    `make_client`, `now_ns` and `restamps`: where clients come from, what clock times the run
    and how many requests the leaders have restamped so far (default: `cfg`'s node processes,
    the OS clock and the nodes' Status; `run_sim` passes the simulator's)."""
    from tqdm import tqdm

    bc.validate()
    regions = cfg.region_names()
    bc.check_keys(len(regions))
    # On node processes, what the window cost in CPU (k2store/bench/cpu.py).
    meter = CpuMeter(launcher.running_nodes(cfg), now_ns) if make_client is None else None
    make_client = make_client or _process_clients(cfg, bc.client_time)
    if restamps is None:

        async def restamps() -> int:
            return await asyncio.to_thread(restamps_of, cfg)

    await _load(make_client, bc, regions)

    retry = RetryPolicy(
        max_attempts=bc.max_attempts,
        initial_backoff_s=bc.initial_backoff_s,
        max_backoff_s=bc.max_backoff_s,
    )
    clients = [
        (region, make_client(region, retry))
        for region in regions
        for _ in range(bc.clients_per_region)
    ]
    for _, c in clients:
        c.now_ns = now_ns
    records: list[TxnRecord] = []
    failed_attempts = 0
    start_ns = now_ns()
    stop_ns = start_ns + int(bc.duration_s * 1e9)

    async def closed_loop(index: int, region: str, client: _ObservingClient) -> None:
        nonlocal failed_attempts
        workload = Workload(bc, regions, region, seed=bc.seed * 1_000_003 + index)
        while now_ns() < stop_ns:
            spec = workload.next()

            async def body(tx: AsyncTransaction, spec: TxnSpec = spec) -> None:
                try:
                    # The read-modify-write keys are read for update (every protocol: 2PL
                    # locks them exclusively at the read, the MVTO ones hold a place in line).
                    values = await tx.get_many(
                        list(spec.reads + spec.rmw),
                        for_update=[False] * len(spec.reads) + [True] * len(spec.rmw),
                    )
                    old = values[len(spec.reads) :]
                    await tx.put_many(
                        {k: _bump(v, bc.value_bytes) for k, v in zip(spec.rmw, old, strict=True)},
                        commit=True,
                    )
                except K2Error as e:
                    client.failed(e)
                    raise

            client.reset()
            t0 = now_ns()
            committed = True
            try:
                # keys: lets a transaction that reaches another region take a future timestamp.
                await client.run(body, max_attempts=bc.max_attempts, keys=spec.reads + spec.rmw)
            except K2Error:
                committed = False
            t1 = now_ns()
            failed_attempts += len(client.failures)
            records.append(
                TxnRecord(
                    region=region,
                    remote=spec.remote,
                    committed=committed,
                    attempts=client.attempts,
                    failures=tuple(client.failures),
                    attempt_ms=(t1 - client.attempt_started_ns) / 1e6,
                    total_ms=(t1 - t0) / 1e6,
                    finished_s=(t1 - start_ns) / 1e9,
                )
            )

    async def show_progress(bar: Any) -> None:
        while True:
            await asyncio.sleep(0.25)
            elapsed = min((now_ns() - start_ns) / 1e9, bc.duration_s)
            bar.n = round(elapsed, 1)
            attempts = sum(r.attempts for r in records) or 1
            bar.set_postfix(
                committed=sum(r.committed for r in records),
                aborts=f"{failed_attempts / attempts:.1%}",
                refresh=False,
            )
            bar.refresh()

    async def count_restamps() -> int:
        """Requests restamped by their leaders in the measured window (not aborts)."""
        assert restamps is not None
        await asyncio.sleep(bc.warmup_s)
        before = await restamps()
        await asyncio.sleep(max(0.0, (stop_ns - now_ns()) / 1e9))
        return await restamps() - before

    async def measure_cpu() -> CpuUse | None:
        assert meter is not None
        await asyncio.sleep(bc.warmup_s)
        meter.start()
        await asyncio.sleep(max(0.0, (stop_ns - now_ns()) / 1e9))
        return meter.stop(sum(1 for r in records if r.committed and r.finished_s > bc.warmup_s))

    with tqdm(
        total=bc.duration_s,
        desc=label,
        unit="s",
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s{postfix}",
        file=sys.stderr,
        disable=not progress,
        leave=False,
    ) as bar:
        ticker = asyncio.ensure_future(show_progress(bar))
        metering = asyncio.ensure_future(measure_cpu()) if meter is not None else None
        counting = asyncio.ensure_future(count_restamps())
        try:
            await asyncio.gather(*(closed_loop(i, r, c) for i, (r, c) in enumerate(clients)))
            cpu = await metering if metering is not None else None
            restamped = await counting
        finally:
            for t in (ticker, metering, counting):
                if t is not None and not t.done():
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await t
            await asyncio.gather(*(c.close() for _, c in clients), return_exceptions=True)
    elapsed_s = (now_ns() - start_ns) / 1e9
    result = RunResult(label, bc, cfg.settings.txn, regions, elapsed_s, records, cpu=cpu)
    result.summary = summarize(records, min(elapsed_s, bc.duration_s), regions, bc.warmup_s)
    result.summary["restamps"] = restamped
    return result


def restamps_of(cfg: ClusterConfig) -> int:
    """Requests the cluster's leaders have restamped since they started (their Status;
    `TxnSettings.restamp`)."""
    return sum(s.restamps for s in launcher.status(cfg))


def run_sim(
    bc: BenchConfig,
    *,
    regions: int = 3,
    txn: TxnSettings | None = None,
    label: str = "default",
) -> RunResult:
    """The same closed-loop run in the deterministic simulator (k2store/sim): `regions` of
    us-east, eu-west, ap-southeast, us-west, ap-northeast with the TPC-C benchmark's RTT
    matrix, virtual time, every node in one process. `txn`: the [txn] table (default: the
    protocol's defaults). The same seed gives the same figures."""
    from k2store.bench.tpcc import REGIONS, settings_for
    from k2store.cluster import local_cluster as make_cluster
    from k2store.sim import SimCluster, run_simulation

    if not 1 <= regions <= len(REGIONS):
        raise InvalidArgument(f"regions must be 1 to {len(REGIONS)}, got {regions}")
    names = list(REGIONS[:regions])
    settings = settings_for(bc.protocol)
    if txn is not None:
        settings = replace(settings, txn=txn)
    cfg = make_cluster(
        names, list(range(1, regions + 1)), root=Path("/nonexistent-sim"), settings=settings
    )
    out: list[RunResult] = []

    async def main() -> None:
        cluster = SimCluster(cfg, seed=bc.seed)

        def make_client(region: str, retry: RetryPolicy) -> _ObservingClient:
            c = cluster.txn_client(
                region, retry=retry, client_class=_ObservingClient, client_time=bc.client_time
            )
            assert isinstance(c, _ObservingClient)
            return c

        async def restamps() -> int:
            return cluster.restamps()

        async def job() -> None:
            out.append(
                await run_mix(
                    cfg,
                    bc,
                    label=label,
                    progress=False,
                    make_client=make_client,
                    now_ns=lambda: int(cluster.now_s * 1e9),
                    restamps=restamps,
                )
            )

        # Virtual time for the drain too: d2PL-TTC at 1,002 clients over 40 s has transactions
        # in flight for over 3 minutes (p99 187 s) when the window closes.
        await cluster.run([job], bc.duration_s + 600)

    run_simulation(main, seed=bc.seed)
    if not out:
        raise K2Error(f"simulated run {label!r} did not finish within its virtual deadline")
    out[0].mode = "sim"
    return out[0]


@dataclass(frozen=True, slots=True)
class ProtocolRow:
    """One protocol's figures in a side-by-side table (`protocol_table`)."""

    protocol: str
    throughput: float
    p50_ms: float
    p99_ms: float
    abort_rate: float
    region_abort_rates: Mapping[str, float]


def protocol_table(rows: Sequence[ProtocolRow], regions: Sequence[str]) -> list[str]:
    """The header and one line per protocol: throughput, latency, failed attempts overall and
    per region, and throughput ratios to d2PL-TTC and MVTO-HLC (`k2 bench txn --sim` and
    `k2 bench tpcc` both print it)."""
    by = {r.protocol: r.throughput for r in rows}

    def ratio(p: str, base: str) -> str:
        return f"{by[p] / by[base]:.2f}x" if by.get(base) and p in by else "-"

    lines = [
        f"{'protocol':<10} {'txn/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'aborts':>7} "
        + " ".join(f"{g[:9]:>9}" for g in regions)
        + f" {'vs d2pl':>8} {'vs hlc':>7}"
    ]
    for r in rows:
        lines.append(
            f"{r.protocol:<10} {r.throughput:>8.1f} {_ms(r.p50_ms):>8} {_ms(r.p99_ms):>8} "
            f"{r.abort_rate:>7.1%} "
            + " ".join(f"{r.region_abort_rates.get(g, 0.0):>9.1%}" for g in regions)
            + f" {ratio(r.protocol, 'd2pl-ttc'):>8} {ratio(r.protocol, 'mvto-hlc'):>7}"
        )
    return lines


def format_side_by_side(results: Sequence[RunResult]) -> str:
    """`protocol_table` of the runs (one per protocol); failed runs as a line each."""
    rows = [
        ProtocolRow(
            r.config.protocol,
            r.summary["overall"]["throughput_tps"],
            r.summary["overall"]["p50_ms"],
            r.summary["overall"]["p99_ms"],
            r.summary["overall"]["abort_rate"],
            {g: v["abort_rate"] for g, v in r.summary["by_region"].items()},
        )
        for r in results
        if not r.error
    ]
    failed = [
        f"{r.config.protocol:<10} FAILED: {r.error.splitlines()[0][:100]}"
        for r in results
        if r.error
    ]
    return "\n".join(protocol_table(rows, results[0].regions) + failed)


@contextlib.contextmanager
def local_cluster(
    data: Path,
    settings: ClusterSettings,
    *,
    progress: bool,
    timeout_s: float = 60.0,
    regions: Sequence[str] = DEFAULT_REGIONS,
) -> Iterator[ClusterConfig]:
    """A fresh local cluster (`regions`, by default DESIGN's three, one node each) with
    `settings`, stopped on exit. (launcher.up cannot take ClusterSettings yet, so this writes
    the file itself.)"""
    data.mkdir(parents=True, exist_ok=True)
    ports = launcher.free_ports(len(regions))
    cfg = cluster_mod.local_cluster(regions, ports, root=data, settings=settings).write(
        data / launcher.CLUSTER_FILE
    )
    procs = {}
    try:
        for n in cfg.nodes:  # they stop with this process, even if it is killed
            procs[n.name] = launcher.start_node(cfg, n, with_parent=True)
        launcher.wait_healthy(cfg, procs, timeout_s, progress)
        yield cfg
    finally:
        launcher.down(cfg)
        for p in procs.values():  # nodes that never took their data-dir lock
            if p.poll() is None:
                p.kill()
            p.wait()


# -- reporting ----------------------------------------------------------------------------------


def _ms(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.1f}"


def format_run(result: RunResult) -> str:
    bc = result.config
    s = result.summary
    if result.error:
        return f"{bc.protocol} {bc.mix} [{result.label}]: FAILED: {result.error}"
    lines = [
        f"{bc.protocol} {bc.mix}: theta {bc.theta}, {bc.keys} keys, "
        f"{bc.clients_per_region} clients/region, {bc.ops_per_txn} ops/txn, "
        f"{bc.remote_fraction:.0%} cross-region, {bc.duration_s:g} s window, the first "
        f"{bc.warmup_s:g} s not measured (drained at {result.elapsed_s:.1f} s) [{result.label}]",
        f"{'':<14} {'committed':>9} {'txn/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'att p50':>8} {'att p99':>8} {'aborts':>7} {'max att':>7} {'gave up':>7}",
    ]

    def row(name: str, g: dict[str, Any]) -> str:
        return (
            f"{name:<14} {g['committed']:>9} {g['throughput_tps']:>8.1f} {_ms(g['p50_ms']):>8} "
            f"{_ms(g['p99_ms']):>8} {_ms(g['attempt_p50_ms']):>8} {_ms(g['attempt_p99_ms']):>8} "
            f"{g['abort_rate']:>7.1%} {g['max_attempts']:>7} {g['gave_up']:>7}"
        )

    lines.append(row("all", s["overall"]))
    lines += [row(region, g) for region, g in s["by_region"].items()]
    lines += [row(kind, g) for kind, g in s["by_kind"].items()]
    rules = s["aborts_by_rule"]
    if rules:
        lines.append(
            "failed attempts by rule: "
            + ", ".join(
                f"{rule} {v['attempts']} ({v['share_of_attempts']:.1%})"
                for rule, v in rules.items()
            )
        )
    else:
        lines.append("failed attempts by rule: none")
    if s.get("restamps"):
        lines.append(
            f"restamped by their leader instead of aborted (not failed attempts): {s['restamps']:,}"
        )
    if result.cpu is not None:
        lines.append(result.cpu.describe())
    lines.append(
        "(txn/s: commits that finished inside the window; p50/p99: end to end, retries "
        "included; att: the committed attempt alone; aborts: failed attempts / attempts)"
    )
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class AblationRow:
    """One variant's figures in an ablation table (`ablation_table`)."""

    label: str
    throughput: float
    p50_ms: float
    p99_ms: float
    abort_rate: float
    worst_region: tuple[str, float]
    top_rule: str
    error: str = ""


def ablation_table(rows: Sequence[AblationRow]) -> str:
    """Each variant beside the first (the default): throughput and latency with their ratios,
    failed attempts overall and in the worst region, and the rule that failed most attempts
    (`k2 bench txn --ablate` and `k2 bench tpcc --ablate` both print it)."""
    base = rows[0]

    def ratio(a: float, b: float) -> str:
        return "-" if not b or math.isnan(a) or math.isnan(b) else f"{a / b:.2f}x"

    lines = [
        "ablation (each row one refinement off; ratios to the default run beside it)",
        f"{'variant':<20} {'txn/s':>8} {'ratio':>7} {'p50 ms':>8} {'ratio':>7} {'p99 ms':>8} "
        f"{'ratio':>7} {'aborts':>7} {'worst region aborts':>22} top failure",
    ]
    for r in rows:
        if r.error:
            lines.append(f"{r.label:<20} FAILED: {r.error.splitlines()[0][:100]}")
            continue
        lines.append(
            f"{r.label:<20} {r.throughput:>8.1f} {ratio(r.throughput, base.throughput):>7} "
            f"{_ms(r.p50_ms):>8} {ratio(r.p50_ms, base.p50_ms):>7} {_ms(r.p99_ms):>8} "
            f"{ratio(r.p99_ms, base.p99_ms):>7} {r.abort_rate:>7.1%} "
            f"{r.worst_region[0] + ' ' + format(r.worst_region[1], '.1%'):>22} {r.top_rule}"
        )
    return "\n".join(lines)


def format_ablation(results: Sequence[RunResult]) -> str:
    rows = []
    for r in results:
        if r.error:
            rows.append(AblationRow(r.label, 0, 0, 0, 0, ("", 0), "", r.error))
            continue
        g = r.summary["overall"]
        worst = max(r.summary["by_region"].items(), key=lambda kv: kv[1]["abort_rate"])
        rows.append(
            AblationRow(
                r.label,
                g["throughput_tps"],
                g["p50_ms"],
                g["p99_ms"],
                g["abort_rate"],
                (worst[0], worst[1]["abort_rate"]),
                next(iter(r.summary["aborts_by_rule"]), "-"),
            )
        )
    return ablation_table(rows)


def pyplot() -> Any | None:
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        return None
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def plot(results: Sequence[RunResult], path: Path) -> bool:
    """Draw latency CDFs by region, failed attempts by rule, commits per second over the run
    with the warm-up shaded (and, for an ablation, throughput per variant). Returns False,
    drawing nothing, when matplotlib is missing."""
    plt = pyplot()
    results = [r for r in results if not r.error]
    if plt is None or not results:
        return False
    ncols = 4 if len(results) > 1 else 3
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4.2))
    first = results[0]
    ax = axes[0]
    for region in first.regions:
        lat = sorted(r.total_ms for r in first.records if r.committed and r.region == region)
        if lat:
            ax.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], label=region)
    ax.set_xscale("log")
    ax.set_xlabel("end-to-end latency (ms)")
    ax.set_ylabel("fraction of committed transactions")
    ax.set_title(f"{first.config.mix}, {first.label}: latency by region")
    ax.legend()
    ax = axes[1]
    rules = sorted({rule for r in results for rule in r.summary["aborts_by_rule"]})
    width = 0.8 / len(results)
    for j, r in enumerate(results):
        shares = [
            r.summary["aborts_by_rule"].get(rule, {}).get("share_of_attempts", 0.0) * 100
            for rule in rules
        ]
        ax.bar([i + j * width for i in range(len(rules))], shares, width, label=r.label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rules))], rules, rotation=30, ha="right")
    ax.set_ylabel("% of attempts")
    ax.set_title("failed attempts by rule")
    if len(results) > 1:
        ax.legend(fontsize="small")
    draw_commits_over_run(
        axes[2],
        [(r.label, r.summary.get("commits_per_second", [])) for r in results],
        first.config.warmup_s,
    )
    if len(results) > 1:
        ax = axes[3]
        labels = [r.label for r in results]
        ax.bar(labels, [r.summary["overall"]["throughput_tps"] for r in results])
        ax.set_ylabel("committed txn/s")
        ax.set_title("throughput by variant")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_results(
    results: Sequence[RunResult], out: Path, *, cluster_file: Path | None, ablate: bool
) -> tuple[Path, Path | None]:
    """Write the JSON (and the PNG when matplotlib is there); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"txn-{stamp()}"
    doc = {
        "benchmark": "txn",
        "config": asdict(results[0].config),
        "cluster_file": str(cluster_file) if cluster_file else None,
        "ablation": ablate,
        "runs": [r.to_json() for r in results],
    }
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(json_safe(doc), indent=1, allow_nan=False) + "\n")
    png_path = stem.with_suffix(".png")
    return json_path, png_path if plot(results, png_path) else None


# -- command line -------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `k2 bench txn` (defaults None mean: BenchConfig's, or --quick's)."""
    d = BenchConfig()
    p.add_argument(
        "--cluster",
        type=Path,
        default=None,
        help="run against this cluster file (default: a fresh local 3-region cluster)",
    )
    p.add_argument(
        "--protocol",
        action="append",
        choices=PROTOCOLS,
        default=None,
        help="repeatable (default: all three side by side, each on a fresh cluster; with "
        f"--ablate or --cluster, {d.protocol})",
    )
    p.add_argument(
        "--sim",
        action="store_true",
        help="the deterministic simulator (virtual time; the same seed gives the same figures)",
    )
    p.add_argument(
        "--regions",
        type=int,
        default=None,
        metavar="N",
        help="with --sim: the first N of us-east, eu-west, ap-southeast, us-west, ap-northeast "
        "(default 3)",
    )
    p.add_argument("--mix", default=d.mix, help=f"one of {', '.join(MIXES)} (default: %(default)s)")
    p.add_argument("--theta", type=float, default=None, help=f"Zipfian skew (default {d.theta})")
    p.add_argument("--keys", type=int, default=None, help=f"total keys (default {d.keys})")
    p.add_argument(
        "--clients-per-region",
        type=int,
        default=None,
        metavar="N",
        help=f"closed-loop clients in each region (default {d.clients_per_region})",
    )
    p.add_argument("--ops-per-txn", type=int, default=None, help=f"default {d.ops_per_txn}")
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="S",
        help=f"seconds (default {d.duration_s})",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=None,
        metavar="S",
        help=f"seconds at the start of the window that are not measured: every client starts "
        f"at once with empty queues and the first second commits several times the steady rate "
        f"(default {d.warmup_s:g}; 0 measures the whole window, as runs before session 9 did)",
    )
    p.add_argument(
        "--max-backoff",
        type=float,
        default=None,
        metavar="S",
        help=f"the longest backoff before a retry (default {d.max_backoff_s:g}, the client's "
        "default; runs before session 10 used 0.1)",
    )
    p.add_argument(
        "--remote-fraction",
        type=float,
        default=None,
        help=f"fraction of cross-region transactions (default {d.remote_fraction})",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help=f"the workload's (and the simulator's) seed (default {d.seed})",
    )
    add_client_time_argument(p)
    add_seed_arguments(p)
    p.add_argument(
        "--quick", action="store_true", help="a small, short run (CI smoke test, under a minute)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench-results"),
        help="directory for the JSON and PNG (default: %(default)s)",
    )
    p.add_argument(
        "--sweep",
        default=None,
        metavar="N,N,...",
        help="throughput against concurrency: run every protocol (or --protocol's) at each of "
        "these clients per region (e.g. 4,33,100,334) and plot it",
    )
    p.add_argument(
        "--ablate",
        action="store_true",
        help="also run with each refinement of [txn] switched off in turn (fresh local clusters "
        "or --sim; not with --cluster)",
    )


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    overrides = {
        k: v
        for k, v in {
            "protocol": args.protocol[0] if args.protocol else None,
            "mix": args.mix,
            "theta": args.theta,
            "keys": args.keys,
            "clients_per_region": args.clients_per_region,
            "ops_per_txn": args.ops_per_txn,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "max_backoff_s": args.max_backoff,
            "remote_fraction": args.remote_fraction,
            "seed": args.seed,
            "client_time": args.client_time,
        }.items()
        if v is not None
    }
    if args.quick:
        if args.ablate and args.duration is None:
            overrides["duration_s"] = 3.0  # five clusters in a minute
        return BenchConfig.quick(**overrides)
    return BenchConfig(**overrides)


def replication_for(protocol: str) -> ReplicationSettings:
    """Each protocol with the replication its real-world analog runs: K2-MVTO with K2-VCR
    epochs; the baselines with closed timestamps (CockroachDB's 3 s lag; Spanner's safe time
    is likewise a lag). Under K2-VCR's short grace a baseline's cross-region writes, stamped at
    their start and arriving a round trip later, would be refused by rule sealed: a cost of
    pairing it with K2's replication, not of the baseline."""
    policy = "vcr" if protocol == "k2-mvto" else "closed-ts"
    return replace(ReplicationSettings(), policy=policy)


def variants(protocol: str, ablate: bool) -> list[tuple[str, TxnSettings]]:
    """The default [txn] settings, then (with ablate) each refinement switched off."""
    base = TxnSettings(protocol=protocol)
    out = [("default", base)]
    if ablate:
        for name in REFINEMENTS:
            off: dict[str, Any] = {name: False}
            out.append((f"no {name}", replace(base, **off)))
    return out


def run_local(bc: BenchConfig, data: Path, *, txn: TxnSettings, label: str) -> RunResult:
    """The mix on a fresh local 3-region cluster of node processes under `data` (DESIGN's
    emulated wide-area links), with the [txn] table `txn`; stopped afterwards."""
    progress = sys.stderr.isatty()
    print(f"[{label}] starting a local 3-region cluster ...", file=sys.stderr, flush=True)
    base = ClusterSettings()
    # DESIGN's wide-area latencies: without them the protocols cannot differ.
    settings = replace(
        base,
        txn=txn,
        network=replace(base.network, enabled=True),
        replication=replication_for(txn.protocol),
    )
    with local_cluster(data, settings, progress=progress) as cfg:
        print(f"[{label}] cluster up; running the mix ...", file=sys.stderr, flush=True)
        return evloop.run(run_mix(cfg, bc, label=label, progress=progress))


def sweep_point(run: RunResult, regions: int) -> SweepPoint:
    """`run` as one point of a sweep over `regions` regions (a failed run names none itself)."""
    bc = run.config
    n = regions
    if run.error:
        return SweepPoint(
            bc.protocol, bc.clients_per_region, n * bc.clients_per_region,
            math.nan, math.nan, math.nan, math.nan, math.nan, 0, run.error, bc.seed,
        )  # fmt: skip
    g = run.summary["overall"]
    return SweepPoint(
        protocol=bc.protocol,
        clients_per_region=bc.clients_per_region,
        clients=n * bc.clients_per_region,
        throughput=g["throughput_tps"],
        p50_ms=g["p50_ms"],
        p99_ms=g["p99_ms"],
        abort_rate=g["abort_rate"],
        worst_region_abort_rate=max(v["abort_rate"] for v in run.summary["by_region"].values()),
        gave_up=g["gave_up"],
        seed=bc.seed,
        cpu_busy=math.nan if run.cpu is None else run.cpu.busy,
        restamps=run.summary.get("restamps", 0),
    )


def _sweep_run(bc: BenchConfig, regions: int, label: str) -> RunResult:
    """One simulated run of a sweep, in this process or a worker (`--jobs`): a failure is a
    result with its error, so one broken run does not lose the others."""
    try:
        return run_sim(bc, regions=regions, label=label)
    except K2Error as e:
        return RunResult(label, bc, TxnSettings(protocol=bc.protocol), [], 0.0, error=str(e))


def _protocols(args: argparse.Namespace) -> list[str]:
    """The protocols `--protocol` names, each once, in order; every one without it."""
    return list(dict.fromkeys(args.protocol)) if args.protocol else list(PROTOCOLS)


def _sweep(args: argparse.Namespace, bc: BenchConfig, seeds: Sequence[int]) -> int:
    """`--sweep`: every protocol (or --protocol's) at each concurrency and each of `--seeds`, in
    the simulator (`--jobs` at a time) or each on a fresh local cluster; the per-run tables as
    they finish, then throughput against concurrency (k2store/bench/sweep.py)."""
    if args.clients_per_region is not None:
        raise InvalidArgument("--sweep sets the clients per region; drop --clients-per-region")
    if args.ablate or args.cluster is not None:
        raise InvalidArgument("--sweep runs fresh clusters with each protocol's defaults; drop "
                              "--ablate and --cluster")  # fmt: skip
    per_region = parse_counts(args.sweep)
    protocols = _protocols(args)
    regions = args.regions or 3
    n_regions = regions if args.sim else len(DEFAULT_REGIONS)
    plan = [
        (n, seed, replace(bc, protocol=proto, clients_per_region=n, seed=seed))
        for n in per_region
        for seed in seeds
        for proto in protocols
    ]
    points: list[SweepPoint] = []
    runs: list[RunResult] = []

    def done(n: int, seed: int, run: RunResult) -> None:
        runs.append(run)
        points.append(sweep_point(run, n_regions))
        if len(runs) == len(protocols):  # every protocol at this concurrency and seed
            print(f"{n} clients/region, seed {seed}:", flush=True)
            print(format_side_by_side(runs) + "\n", flush=True)
            runs.clear()

    def label(n: int, seed: int) -> str:
        return f"{n} clients/region" + (f", seed {seed}" if len(seeds) > 1 else "")

    if args.sim and args.jobs > 1:
        print(f"{len(plan)} simulated runs, {args.jobs} at a time ...", file=sys.stderr)
        calls = [(b, regions, label(n, seed)) for n, seed, b in plan]
        results = side_by_side(_sweep_run, calls, args.jobs)
        for (n, seed, _), run in zip(plan, results, strict=True):
            done(n, seed, run)  # in plan order, so tables print whole
    else:
        with tempfile.TemporaryDirectory(prefix="k2-bench-") as tmp:
            for i, (n, seed, run_bc) in enumerate(plan):
                proto = run_bc.protocol
                if args.sim:
                    print(f"[{proto} {label(n, seed)}] simulating ...", file=sys.stderr, flush=True)
                    run = _sweep_run(run_bc, regions, label(n, seed))
                else:
                    try:
                        run_bc.check_keys(len(DEFAULT_REGIONS))
                        run = run_local(
                            run_bc, Path(tmp) / f"run{i}", txn=TxnSettings(protocol=proto),
                            label=label(n, seed),
                        )  # fmt: skip
                    except K2Error as e:
                        run = RunResult(
                            label(n, seed), run_bc, TxnSettings(protocol=proto), [], 0.0,
                            error=str(e),
                        )  # fmt: skip
                done(n, seed, run)
    title = (
        f"YCSB-T {bc.mix} ({'sim' if args.sim else 'processes'}): theta {bc.theta}, "
        f"{bc.keys} keys, {bc.ops_per_txn} ops/txn, {bc.remote_fraction:.0%} cross-region, "
        f"{bc.duration_s:g} s per run, the first {bc.warmup_s:g} s not measured"
        + (f", seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else "")
    )
    print(title)
    print("\n".join(sweep_table(points, protocols)))
    for path in write_sweep(points, asdict(bc), args.out / f"txn-sweep-{stamp()}", title):
        print(f"wrote {path}")
    return 0 if all(not p.error for p in points) else 1


def main(args: argparse.Namespace) -> int:
    """`k2 bench txn`: run, print the tables, write JSON (and a PNG)."""
    bc = config_from_args(args)
    bc.validate()
    seeds = seeds_from_args(args, bc.seed)  # refuses --seeds or --jobs where they do not belong
    if args.sweep is not None:
        return _sweep(args, bc, seeds)
    if args.ablate and args.cluster is not None:
        raise InvalidArgument(
            "--ablate needs fresh local clusters (it changes each one's [txn] table); "
            "drop --cluster"
        )
    if (args.ablate or args.cluster is not None) and len(set(args.protocol or ())) > 1:
        raise InvalidArgument("--ablate and --cluster run one protocol: give --protocol once")
    progress = sys.stderr.isatty()
    results: list[RunResult] = []
    protocols = [bc.protocol] if args.ablate else _protocols(args)
    if args.regions is not None and not args.sim:
        raise InvalidArgument("--regions needs --sim (node-process runs use three regions)")
    if args.sim:
        if args.cluster is not None:
            raise InvalidArgument("--sim builds its own simulated cluster; drop --cluster")
        for proto in protocols:
            for label, txn in variants(proto, args.ablate):
                print(f"[{proto} {label}] simulating ...", file=sys.stderr, flush=True)
                run = run_sim(
                    replace(bc, protocol=proto), regions=args.regions or 3, txn=txn, label=label
                )
                results.append(run)
                print(format_run(run) + "\n", flush=True)
        if len(protocols) > 1:
            print(format_side_by_side(results), flush=True)
    elif args.cluster is not None:
        cfg = cluster_mod.load(args.cluster)
        if cfg.settings.txn.protocol != bc.protocol:
            raise InvalidArgument(
                f"{args.cluster} runs {cfg.settings.txn.protocol} ([txn] protocol), not "
                f"{bc.protocol}; pass --protocol {cfg.settings.txn.protocol}"
            )
        bc.check_keys(len(cfg.regions))
        results.append(evloop.run(run_mix(cfg, bc, progress=progress)))
        print(format_run(results[-1]), flush=True)
    else:
        bc.check_keys(len(DEFAULT_REGIONS))
        with tempfile.TemporaryDirectory(prefix="k2-bench-") as tmp:
            plan = [(p, v) for p in protocols for v in variants(p, args.ablate)]
            for i, (proto, (label, txn)) in enumerate(plan):
                run_bc = replace(bc, protocol=proto)
                try:
                    run = run_local(run_bc, Path(tmp) / f"run{i}", txn=txn, label=label)
                except K2Error as e:
                    if i == 0:
                        raise  # without the default run there is nothing to compare with
                    # A variant that breaks is a finding, not a reason to lose the others.
                    run = RunResult(label, run_bc, txn, list(DEFAULT_REGIONS), 0.0, error=str(e))
                results.append(run)
                print(format_run(run) + "\n", flush=True)
        if len(protocols) > 1:
            print(format_side_by_side(results), flush=True)
    if args.ablate and len(results) > 1:
        print(format_ablation(results), flush=True)
    json_path, png_path = write_results(
        results, args.out, cluster_file=args.cluster, ablate=args.ablate
    )
    print(f"results: {json_path}")
    if png_path is not None:
        print(f"plot:    {png_path}")
    else:
        print("plot:    skipped (matplotlib is not installed; pip install matplotlib)")
    return 0
