"""`k2 bench tpcc`: a TPC-C-like mix under K2-MVTO, d2PL-TTC and MVTO-HLC, side by side.

The mix (new-order and payment, the two transactions that make up almost all of TPC-C's load)::

    warehouses per region W, 10 districts each, homed in their region
    new-order: read the warehouse (tax) and a district, write the district (next order id) and a
               new order row; with probability `remote_fraction` also read a district of a
               warehouse in another region (the remote item stock of TPC-C)
    payment:   read and write the warehouse (year-to-date), read and write a district

The warehouse row that new-order reads and payment writes is the contention point: under 2PL a
reader's lock is held across the transaction's wide-area round trips and blocks every payment;
under MVTO the read leaves a read mark and writers below it abort, writers above it never wait.

Two scales: node processes on loopback with DESIGN's emulated latencies (default), or the
deterministic simulator (`--sim`), which reaches hundreds of concurrent clients. Reports
throughput, p50/p99 latency, abort rate (attempts that failed) per region, and ratios of every
protocol's throughput to d2PL-TTC's and MVTO-HLC's; writes JSON (and a PNG with matplotlib).
`--sweep 3,10,30,...` runs every protocol at each of those clients per region and plots
throughput against concurrency (k2store/bench/sweep.py), at several seeds with `--seeds`.
The first `--warmup` seconds of each run are not measured: every terminal starts at once with
empty lock queues, which d2PL-TTC rides far above its steady rate for a second or two.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from k2store import evloop, launcher
from k2store.bench.cpu import CpuMeter, CpuUse
from k2store.bench.sweep import (
    SweepPoint,
    add_client_time_argument,
    add_seed_arguments,
    parse_counts,
    seeds_from_args,
    side_by_side,
    sweep_table,
    write_sweep,
)
from k2store.bench.sweep import stamp as result_stamp
from k2store.bench.txn import (
    REFINEMENTS,
    AblationRow,
    ProtocolRow,
    ablation_table,
    draw_commits_over_run,
    local_cluster,
    protocol_table,
    pyplot,
    replication_for,
    restamps_of,
)
from k2store.client import AsyncClient, AsyncTransaction, RetryPolicy, client_truetime
from k2store.cluster import (
    DEFAULT_REGIONS,
    TXN_PROTOCOLS,
    ClusterConfig,
    ClusterSettings,
    TxnSettings,
)
from k2store.errors import InvalidArgument, K2Error, TxnAborted
from k2store.wan import DEFAULT_RTT_MS
from truetime import SystemClock

DISTRICTS = 10
REGIONS = (*DEFAULT_REGIONS, "us-west", "ap-northeast")
"""`--regions N` takes the first N: DESIGN's three, then us-west (Oregon) and ap-northeast
(Tokyo)."""
FIVE_REGION_RTT_MS = {
    **DEFAULT_RTT_MS,  # DESIGN.md's three pairs: 75, 210 and 160 ms
    frozenset({"us-east", "us-west"}): 65.0,
    frozenset({"us-west", "eu-west"}): 125.0,
    frozenset({"us-west", "ap-southeast"}): 165.0,
    frozenset({"us-west", "ap-northeast"}): 100.0,
    frozenset({"us-east", "ap-northeast"}): 150.0,
    frozenset({"eu-west", "ap-northeast"}): 215.0,
    frozenset({"ap-southeast", "ap-northeast"}): 70.0,
}
"""Round-trip times (ms) between the five regions: DESIGN's three pairs, and for the two added
regions rounded figures of the kind public inter-region latency tables give for the
corresponding cloud regions (Virginia, Ireland, Singapore, Oregon, Tokyo)."""
RETRY = RetryPolicy(max_attempts=50, initial_backoff_s=0.005, max_backoff_s=0.5)


@dataclass
class RegionStats:
    """One region's terminals. Throughput counts commits that finish inside the measured window
    (after the warm-up, before the window closes); latencies and abort rates count the
    transactions that begin after the warm-up, whenever they end."""

    committed: int = 0
    """Commits that finished inside the measured window (what throughput counts)."""
    drained: int = 0
    """Commits of transactions in flight when the window closed, finished after it."""
    warming: int = 0
    """Commits that finished during the warm-up (not measured)."""
    attempts: int = 0
    """Attempts of the transactions that began after the warm-up."""
    succeeded: int = 0
    """Commits of the transactions that began after the warm-up (in the window or drained)."""
    latencies_ms: list[float] = field(default_factory=list)
    """End-to-end latencies of the transactions that began after the warm-up and committed."""


@dataclass
class TpccResult:
    protocol: str
    mode: str
    clients: int
    remote_fraction: float
    duration_s: float
    interactive: bool = False
    split_schema: bool = False
    warmup_s: float = 0.0
    """The window's first seconds, not measured (`TpccConfig.warmup_s`)."""
    regions: dict[str, RegionStats] = field(default_factory=dict)
    commits_by_second: Counter[int] = field(default_factory=Counter)
    """Commits by the whole second of the run they finished in, warm-up and drain included: the
    timeline that shows whether the window was past the start-up transient."""
    failures: Counter[str] = field(default_factory=Counter)
    """Transactions begun after the warm-up that gave up (retries exhausted), by the last
    error."""
    rules: Counter[str] = field(default_factory=Counter)
    """Failed attempts during execution of transactions begun after the warm-up, by the rule
    that aborted them (aborts at commit are counted in the attempts but not here)."""
    cpu: CpuUse | None = None
    """On node processes: the CPU the nodes and the benchmark spent in the measured window."""
    client_time: bool = False
    """The clients had client time (`TpccConfig.client_time`)."""
    restamps: int = 0
    """First requests the leaders restamped instead of aborting in the measured window
    (`TxnSettings.restamp`): retries the clients never saw, so not in the abort rates."""
    error: str = ""

    @property
    def committed(self) -> int:
        return sum(r.committed for r in self.regions.values())

    @property
    def measured_s(self) -> float:
        return self.duration_s - self.warmup_s

    @property
    def throughput(self) -> float:
        """Commits inside the measured window per second of it: the transactions still in
        flight when it closed finish (they count in latencies and abort rates), but crediting
        them would count work done after the window, up to one transaction per client (a third
        of d2PL-TTC's figure at 1,000 clients over 3 s); commits during the warm-up are left out
        (every terminal starts at once with empty lock queues, which flatters a protocol that
        later settles into long waits)."""
        return self.committed / self.measured_s if self.measured_s > 0 else 0.0

    def abort_rate(self, region: str | None = None) -> float:
        """Failed attempts / attempts, of the transactions begun after the warm-up."""
        rs = [self.regions[region]] if region else list(self.regions.values())
        attempts = sum(r.attempts for r in rs)
        return 1 - sum(r.succeeded for r in rs) / attempts if attempts else 0.0

    def percentile(self, q: float) -> float:
        lat = sorted(x for r in self.regions.values() for x in r.latencies_ms)
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else math.nan


QUICK_CLIENTS_PER_REGION = 10
"""`--quick`'s terminals per region (unless given): a smoke test on node processes stays short."""
QUICK_DURATION_S = 4.0
QUICK_WARMUP_S = 0.5


@dataclass(frozen=True)
class TpccConfig:
    protocols: tuple[str, ...] = TXN_PROTOCOLS
    clients_per_region: int = 30
    """Closed-loop terminals per region (default: ten per warehouse)."""
    warehouses_per_region: int = 3
    """Default three: nine warehouses over three regions, the configuration of the design's
    discrete-event model that issue 8's targets quote (ten clients per warehouse: 90 clients;
    1,000 clients: `--clients-per-region 334`)."""
    remote_fraction: float = 0.1
    duration_s: float = 20.0
    warmup_s: float = 2.0
    """The window's first seconds, not measured: commits that finish in them do not count in
    throughput, and transactions that begin in them do not count in latencies or abort rates.
    Every terminal starts at once with empty lock queues and read marks; d2PL-TTC commits far
    above its steady rate until its lock queues fill (its rate falls over the first seconds,
    K2-MVTO's stays flat), so a whole-window figure flatters it. 0 measures the whole window,
    as runs before session 10 did."""
    sim: bool = False
    seed: int = 1
    regions: int = 3
    """How many of `REGIONS` (one warehouse set and one node each); 1 to 5."""
    epsilon_us: int | None = None
    """Clock error to assume (default: the cluster default, 400 us). Larger values show what
    clock uncertainty costs each protocol: MVTO-HLC restarts reads in its uncertainty window,
    K2-MVTO's commit-wait grows."""
    oracle_ttl_us: int | None = None
    """K2-TB batch lifetime, local and fetched (default: the cluster defaults, 200 us for a
    coordinator on its oracle's node, as every one is in these one-node-per-region clusters,
    5 ms over the network). Shorter batches lead true time by less, so commit-wait is shorter,
    for more batch fetches."""
    clock_offset_us: int = 0
    """Simulator only: real clock offsets, not just an assumed bound. Region i of n runs its
    node's clock off true time by (2i/(n-1) - 1) * this (so -X, 0 and +X for three regions:
    2X apart at the extremes). Within epsilon every protocol stays correct; MVTO-HLC restarts
    reads that meet a value stamped by a clock ahead of its own, K2-MVTO's cost is the bound
    whatever the offsets."""
    split_schema: bool = False
    """Payment's columns (warehouse and district year-to-date) on rows of their own, as a
    column-level or split-table schema has them: new-order's reads of the warehouse and district
    rows then never conflict with payment's writes, which removes the read-write conflict that
    costs 2PL half its throughput here (issue 8 asks for d2PL-TTC on this schema too)."""
    off: tuple[str, ...] = ()
    """Refinements of [txn] switched off (`--ablate` runs each in turn; see cluster.TxnSettings)."""
    client_time: bool = True
    """Clients with client time (`AsyncClient(truetime=...)`: their clocks held to the bound,
    as clients embedded in the serving nodes): a K2-MVTO transaction is stamped when the client
    sends it and the client waits out the commit-wait, during the round trip. The other
    protocols ignore it. On by default since session 16 (`--no-client-time`: stamped on arrival
    at the coordinator, which holds the reply through the wait)."""
    interactive: bool = False
    """Reads in one round, then writes in another (an interactive client). Default: one round
    with the reads and writes together (`AsyncTransaction.batch`), as a stored procedure would
    send them; the written values stand for increments the benchmark does not compute. Either
    way the last round carries the commit (`commit=True`) and the first the begin, so a local
    transaction is one round trip from client to coordinator (two when interactive)."""

    def validate(self) -> None:
        for p in self.protocols:
            if p not in TXN_PROTOCOLS:
                raise InvalidArgument(f"unknown protocol {p!r}; one of {', '.join(TXN_PROTOCOLS)}")
        if self.clients_per_region < 1 or self.warehouses_per_region < 1:
            raise InvalidArgument("clients-per-region and warehouses must be at least 1")
        if not 0 <= self.remote_fraction <= 1:
            raise InvalidArgument(f"remote-fraction must be in [0, 1], got {self.remote_fraction}")
        if self.duration_s <= 0:
            raise InvalidArgument("duration must be positive")
        if not 0 <= self.warmup_s < self.duration_s:
            raise InvalidArgument(
                f"the warm-up must leave part of the window to measure (0 <= warm-up < duration "
                f"{self.duration_s:g} s), got {self.warmup_s:g}"
            )
        if self.epsilon_us is not None and not 1 <= self.epsilon_us <= 1_000_000:
            # (Nodes refuse a zero bound: no real clock is exact.)
            raise InvalidArgument(f"epsilon-us must be 1-1000000, got {self.epsilon_us}")
        if not 1 <= self.regions <= len(REGIONS):
            raise InvalidArgument(f"regions must be 1 to {len(REGIONS)}, got {self.regions}")
        if self.oracle_ttl_us is not None and not 200 <= self.oracle_ttl_us <= 1_000_000:
            raise InvalidArgument(f"oracle-ttl-us must be 200-1000000, got {self.oracle_ttl_us}")
        if self.clock_offset_us:
            if not self.sim:
                raise InvalidArgument(
                    "--clock-offset-us needs --sim (on node processes skew clocks with the "
                    "jepsen clock nemesis or clock.toml)"
                )
            bound = self.epsilon_us if self.epsilon_us is not None else ClusterSettings().epsilon_us
            if not 0 <= self.clock_offset_us <= bound:
                raise InvalidArgument(
                    f"clock-offset-us must be 0 to epsilon ({bound} us), got "
                    f"{self.clock_offset_us}: beyond the bound nodes refuse to serve"
                )

    @property
    def region_names(self) -> tuple[str, ...]:
        return REGIONS[: self.regions]


class _Rng:
    """A tiny deterministic generator per client (no global random state)."""

    def __init__(self, seed: int) -> None:
        self.x = seed * 2654435761 % 2**32 or 1

    def next(self, n: int) -> int:
        self.x = (1103515245 * self.x + 12345) % 2**31
        return self.x % n


async def tpcc_client(
    c: AsyncClient,
    index: int,
    stop: asyncio.Event,
    tc: TpccConfig,
    result: TpccResult,
    elapsed_ms: Callable[[], float],
) -> None:
    """One closed-loop terminal: new-order and payment, half each, on its home region's
    warehouses. `elapsed_ms`: time since the run's window opened (virtual in the simulator)."""
    home = c.region
    others = [r for r in tc.region_names if r != home]
    stats = result.regions.setdefault(home, RegionStats())
    rng = _Rng(tc.seed * 100_003 + index)
    w_id = rng.next(tc.warehouses_per_region)
    w = f"{home}/w/{w_id}"
    fn: Callable[[AsyncTransaction], Awaitable[None]]
    attempts = 0
    measured = False
    warmup_ms = tc.warmup_s * 1000

    async def counted(tx: AsyncTransaction) -> None:
        nonlocal attempts
        attempts += 1
        try:
            await fn(tx)
        except TxnAborted as e:
            if measured:
                result.rules[e.rule] += 1
            raise

    j = 0
    while not stop.is_set():
        j += 1
        d = f"{w}/d/{rng.next(DISTRICTS)}"
        if j % 2:
            remote = None
            if others and rng.next(1000) < tc.remote_fraction * 1000:
                r = others[rng.next(len(others))]
                remote = f"{r}/w/{rng.next(tc.warehouses_per_region)}/d/{rng.next(DISTRICTS)}"
            keys = [w, d] + ([remote] if remote else [])
            order = f"{home}/o/{index}/{j}"

            async def new_order(
                tx: AsyncTransaction, d: str = d, keys: list[str] = keys, order: str = order
            ) -> None:
                writes: dict[str | bytes, bytes | None] = {d: b"next-o-id", order: b"order-line"}
                if tc.interactive:
                    await tx.get_many(list(keys))
                    await tx.put_many(writes, commit=True)
                else:
                    await tx.batch(keys, writes, commit=True)

            fn = new_order
        else:
            wy, dy = (f"{w}/ytd", f"{d}/ytd") if tc.split_schema else (w, d)
            keys = [wy, dy]

            async def payment(tx: AsyncTransaction, wy: str = wy, dy: str = dy) -> None:
                writes: dict[str | bytes, bytes | None] = {wy: b"w-ytd", dy: b"d-ytd"}
                if tc.interactive:
                    await tx.get_many([wy, dy])
                    await tx.put_many(writes, commit=True)
                else:
                    await tx.batch([wy, dy], writes, commit=True)

            fn = payment
        attempts = 0
        t0 = elapsed_ms()
        measured = t0 >= warmup_ms
        try:
            await c.run(counted, keys=keys)
            t1 = elapsed_ms()
            result.commits_by_second[int(t1 // 1000)] += 1
            if stop.is_set():
                stats.drained += 1
            elif t1 > warmup_ms:
                stats.committed += 1
            else:
                stats.warming += 1
            if measured:
                stats.succeeded += 1
                stats.latencies_ms.append(t1 - t0)
        except TxnAborted as e:
            if measured:
                result.failures[e.rule] += 1
        except K2Error as e:
            if measured:
                result.failures[type(e).__name__] += 1
        if measured:
            stats.attempts += attempts


NODE_SWITCHES: tuple[str, ...] = ("group_commit",)
"""Switches of the node processes, not of the protocol, that `--ablate` also turns off on
processes (the simulator has no disk to sync): `[cluster]` settings."""


def settings_for(
    protocol: str,
    epsilon_us: int | None = None,
    oracle_ttl_us: int | None = None,
    off: Sequence[str] = (),
) -> ClusterSettings:
    """The cluster settings a run of `protocol` uses; `off`: refinements of [txn] or
    `NODE_SWITCHES` switched off (`--ablate`)."""
    switched_off: dict[str, Any] = {k: False for k in off if k not in NODE_SWITCHES}
    node_off: dict[str, Any] = {k: False for k in off if k in NODE_SWITCHES}
    base = replace(ClusterSettings(), **node_off)
    if oracle_ttl_us is not None:
        # K2-TB batch lifetime: timestamps lead true time by up to this, and every read-write
        # transaction commit-waits that lead away. Both kinds: the benchmark's clusters have
        # one node per region, so every coordinator is on its oracle's node and gets local
        # batches (`oracle_local_ttl_us`), which the network lifetime would otherwise only cap.
        base = replace(base, oracle_ttl_us=oracle_ttl_us, oracle_local_ttl_us=oracle_ttl_us)
    if epsilon_us is not None:
        # The clock error every node assumes (the simulator's clocks report no bound of their
        # own); nodes refuse beyond max_uncertainty_us, so that moves with it.
        base = replace(
            base,
            epsilon_us=epsilon_us,
            max_uncertainty_us=max(base.max_uncertainty_us, 2 * epsilon_us),
        )
    return replace(
        base,
        txn=replace(TxnSettings(protocol=protocol), **switched_off),
        # The sim builds its network from this table too (SimNetwork.from_settings), so its
        # delays and the coordinators' RTT priors agree; three regions get DESIGN's RTTs.
        network=replace(base.network, enabled=True, rtt_ms=dict(FIVE_REGION_RTT_MS)),
        replication=replication_for(protocol),
    )


def run_sim(protocol: str, tc: TpccConfig) -> TpccResult:
    from k2store.cluster import local_cluster as make_cluster
    from k2store.sim import SimCluster, run_simulation

    regions = tc.region_names
    cfg = make_cluster(
        regions,
        list(range(1, len(regions) + 1)),
        root=Path("/nonexistent-sim"),
        settings=settings_for(protocol, tc.epsilon_us, tc.oracle_ttl_us, tc.off),
    )
    result = TpccResult(
        protocol,
        "sim",
        tc.clients_per_region * len(regions),
        tc.remote_fraction,
        tc.duration_s,
        tc.interactive,
        tc.split_schema,
        tc.warmup_s,
        client_time=tc.client_time,
    )

    async def main() -> None:
        cluster = SimCluster(cfg, seed=tc.seed, clock_skew_ns=clock_offsets_ns(cfg, tc))
        clients = [
            cluster.txn_client(r, retry=RETRY, client_time=tc.client_time)
            for r in regions
            for _ in range(tc.clients_per_region)
        ]
        stop = asyncio.Event()
        start_s = cluster.now_s

        async def stopper() -> None:
            await asyncio.sleep(tc.warmup_s)
            before = cluster.restamps()
            await asyncio.sleep(tc.duration_s - tc.warmup_s)
            result.restamps = cluster.restamps() - before
            stop.set()

        def elapsed_ms() -> float:
            return (cluster.now_s - start_s) * 1000

        jobs = [stopper] + [
            (lambda i=i, c=c: tpcc_client(c, i, stop, tc, result, elapsed_ms))
            for i, c in enumerate(clients)
        ]
        await cluster.run(jobs, tc.duration_s + 60)
        for c in clients:
            await c.close()

    run_simulation(main, seed=tc.seed)
    return result


def clock_offsets_ns(cfg: ClusterConfig, tc: TpccConfig) -> dict[str, int]:
    """Node name -> clock offset for `tc.clock_offset_us`: spread evenly from -X to +X over the
    regions in order, every node of a region alike."""
    if not tc.clock_offset_us:
        return {}
    names = list(cfg.region_names())
    n = len(names)
    out: dict[str, int] = {}
    for node in cfg.nodes:
        i = names.index(node.region)
        frac = 0.0 if n == 1 else 2 * i / (n - 1) - 1
        out[node.name] = round(frac * tc.clock_offset_us * 1000)
    return out


async def _run_on(cfg: ClusterConfig, protocol: str, tc: TpccConfig) -> TpccResult:
    result = TpccResult(
        protocol,
        "processes",
        tc.clients_per_region * len(cfg.region_names()),
        tc.remote_fraction,
        tc.duration_s,
        tc.interactive,
        tc.split_schema,
        tc.warmup_s,
        client_time=tc.client_time,
    )
    clock = SystemClock()
    clients = [
        AsyncClient(
            cfg,
            region=r,
            retry=RETRY,
            truetime=client_truetime(cfg) if tc.client_time else None,
        )
        for r in cfg.region_names()
        for _ in range(tc.clients_per_region)
    ]
    stop = asyncio.Event()
    start_ns = clock.monotonic_ns()
    meter = CpuMeter(launcher.running_nodes(cfg), clock.monotonic_ns)

    def elapsed_ms() -> float:
        return (clock.monotonic_ns() - start_ns) / 1e6

    tasks = [
        asyncio.create_task(tpcc_client(c, i, stop, tc, result, elapsed_ms))
        for i, c in enumerate(clients)
    ]
    await asyncio.sleep(tc.warmup_s)
    meter.start()
    before = await asyncio.to_thread(restamps_of, cfg)
    await asyncio.sleep(tc.duration_s - tc.warmup_s)
    stop.set()
    result.cpu = meter.stop(result.committed)
    result.restamps = await asyncio.to_thread(restamps_of, cfg) - before
    await asyncio.gather(*tasks)
    for c in clients:
        await c.close()
    return result


def run_processes(protocol: str, tc: TpccConfig, data: Path, progress: bool) -> TpccResult:
    with local_cluster(
        data,
        settings_for(protocol, tc.epsilon_us, tc.oracle_ttl_us, tc.off),
        progress=progress,
        regions=tc.region_names,
    ) as cfg:
        return evloop.run(_run_on(cfg, protocol, tc))


def format_results(results: Sequence[TpccResult]) -> str:
    regions = next((list(r.regions) for r in results if r.regions), list(DEFAULT_REGIONS))
    regions = [g for g in REGIONS if g in regions]  # a fixed order, whoever ran first
    ok = [r for r in results if not r.error]
    table = protocol_table(
        [
            ProtocolRow(
                r.protocol,
                r.throughput,
                r.percentile(0.5),
                r.percentile(0.99),
                r.abort_rate(),
                {g: r.abort_rate(g) for g in regions},
            )
            for r in ok
        ],
        regions,
    )
    head, lines = table[0], []
    for r, line in zip(ok, table[1:], strict=True):
        lines.append(line)
        if r.rules:
            top = ", ".join(f"{k} {v}" for k, v in r.rules.most_common(5))
            lines.append(f"{'':<10} aborted by: {top}")
        if r.failures:
            top = ", ".join(f"{k} {v}" for k, v in r.failures.most_common(4))
            lines.append(f"{'':<10} gave up: {top}")
        if r.restamps:
            attempts = sum(g.attempts for g in r.regions.values())
            share = f" ({r.restamps / attempts:.1%} of attempts)" if attempts else ""
            lines.append(
                f"{'':<10} restamped by their leader instead of aborted: {r.restamps:,}{share}"
            )
        if r.cpu is not None:
            lines.append(f"{'':<10} {r.cpu.describe()}")
    lines += [f"{r.protocol}: FAILED: {r.error}" for r in results if r.error]
    first = results[0]
    title = (
        f"TPC-C-like ({first.mode}): {len(regions)} regions, {first.clients} clients, "
        f"{first.remote_fraction:.0%} "
        f"cross-region new-orders, {first.duration_s:g} s per protocol (the first "
        f"{first.warmup_s:g} s not measured), "
        f"{'interactive' if first.interactive else 'one-shot'}"
        f"{', split schema' if first.split_schema else ''}"
        f"{', client time' if first.client_time else ''}"
        " (aborts: failed attempts / attempts, overall then per region)"
    )
    return "\n".join([title, head, *lines])


def _result_json(r: TpccResult) -> dict[str, Any]:
    return {
        "protocol": r.protocol,
        "mode": r.mode,
        "clients": r.clients,
        "throughput": r.throughput,
        "committed_in_window": r.committed,
        "warmup_s": r.warmup_s,
        "committed_in_warmup": sum(g.warming for g in r.regions.values()),
        "drained": sum(g.drained for g in r.regions.values()),
        "commits_per_second": commits_per_second(r),
        "p50_ms": r.percentile(0.5),
        "p99_ms": r.percentile(0.99),
        "abort_rate": r.abort_rate(),
        "abort_rate_by_region": {g: r.abort_rate(g) for g in r.regions},
        "failures": dict(r.failures),
        "aborts_by_rule": dict(r.rules),
        "restamps": r.restamps,
        "cpu": None if r.cpu is None else r.cpu.to_json(),
        "client_time": r.client_time,
        "error": r.error,
    }


def commits_per_second(r: TpccResult) -> list[int]:
    """Commits in each whole second of the window (the drain's are left out)."""
    return [r.commits_by_second[i] for i in range(math.ceil(r.duration_s))]


def write_results(results: Sequence[TpccResult], tc: TpccConfig, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    stamp = result_stamp()
    path = out / f"tpcc-{stamp}.json"
    rows = [_result_json(r) for r in results]
    path.write_text(json.dumps({"config": asdict(tc), "results": rows}, indent=2) + "\n")
    written = [path]
    plt = pyplot()
    if plt is not None:
        fig, (ax, tl) = plt.subplots(1, 2, figsize=(11, 3.8))
        ok = [r for r in results if not r.error]
        ax.bar([r.protocol for r in ok], [r.throughput for r in ok])
        ax.set_ylabel("committed txn/s (measured window)")
        ax.set_title(f"TPC-C-like, {results[0].clients} clients ({results[0].mode})")
        draw_commits_over_run(tl, [(r.protocol, commits_per_second(r)) for r in ok], tc.warmup_s)
        fig.tight_layout()
        png = path.with_suffix(".png")
        fig.savefig(png, dpi=120)
        plt.close(fig)
        written.append(png)
    return written


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TpccConfig()
    p.add_argument("--protocol", action="append", choices=TXN_PROTOCOLS, help="repeatable")
    p.add_argument(
        "--clients-per-region", type=int, default=None, metavar="N",
        help=f"closed-loop terminals per region (default {d.clients_per_region}: ten per "
        f"warehouse; {QUICK_CLIENTS_PER_REGION} with --quick; 334 for the 1,000-client point)",
    )  # fmt: skip
    p.add_argument(
        "--warehouses-per-region", type=int, default=d.warehouses_per_region, metavar="W",
        help=f"default {d.warehouses_per_region}: nine warehouses, as in the design's model",
    )  # fmt: skip
    p.add_argument(
        "--regions",
        type=int,
        default=d.regions,
        metavar="N",
        help=f"the first N of {', '.join(REGIONS)} (default {d.regions})",
    )
    p.add_argument("--remote-fraction", type=float, default=d.remote_fraction)
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="S",
        help=f"seconds per run (default {d.duration_s:g}; {QUICK_DURATION_S:g} with --quick)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=None,
        metavar="S",
        help=f"the first S seconds of each run are not measured (default {d.warmup_s:g}; "
        f"{QUICK_WARMUP_S:g} with --quick; 0 measures the whole window, as runs before session 10 "
        "did): every terminal starts at once with empty lock queues, and d2PL-TTC commits far "
        "above its steady rate until they fill",
    )
    p.add_argument("--sim", action="store_true", help="the deterministic simulator (virtual time)")
    p.add_argument(
        "--interactive",
        action="store_true",
        help="read round then write round (default: one round with reads and writes, one-shot)",
    )
    p.add_argument(
        "--epsilon-us",
        type=int,
        default=None,
        metavar="US",
        help="clock error every node assumes (default 400): what uncertainty costs each protocol",
    )
    p.add_argument(
        "--oracle-ttl-us",
        type=int,
        default=None,
        metavar="US",
        help="K2-TB timestamp batch lifetime, local and fetched alike (default: 200 for a "
        "coordinator on its oracle's node, as every one is here; 5000 over the network): how "
        "far timestamps lead true time, which every read-write transaction commit-waits away",
    )
    p.add_argument(
        "--clock-offset-us",
        type=int,
        default=0,
        metavar="US",
        help="with --sim: real clock offsets, -US to +US across the regions (at most epsilon)",
    )
    add_client_time_argument(p)
    p.add_argument(
        "--split-schema",
        action="store_true",
        help="payment's year-to-date columns on rows of their own (no new-order/payment "
        "read-write conflict; what a column-level schema gives 2PL)",
    )
    p.add_argument(
        "--sweep",
        default=None,
        metavar="N,N,...",
        help="throughput against concurrency: run every protocol at each of these clients per "
        "region (e.g. 3,10,30,100,334 for 9 to 1,002 clients) and plot it",
    )
    p.add_argument(
        "--ablate",
        action="store_true",
        help="run the protocol (k2-mvto unless --protocol mvto-hlc) with its defaults, then with "
        "each refinement of [txn] switched off in turn (on node processes also group commit), "
        "and print the ratios",
    )
    p.add_argument("--seed", type=int, default=None, help=f"default {d.seed}")
    add_seed_arguments(p)
    p.add_argument("--quick", action="store_true", help="short runs (CI smoke test)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench-results"),
        help="directory for the JSON and PNG (default: %(default)s)",
    )


def main(args: argparse.Namespace) -> int:
    tc = TpccConfig(
        protocols=tuple(args.protocol or (("k2-mvto",) if args.ablate else TXN_PROTOCOLS)),
        clients_per_region=(
            args.clients_per_region
            if args.clients_per_region is not None
            else QUICK_CLIENTS_PER_REGION
            if args.quick
            else TpccConfig.clients_per_region
        ),
        warehouses_per_region=args.warehouses_per_region,
        remote_fraction=args.remote_fraction,
        duration_s=args.duration or (QUICK_DURATION_S if args.quick else TpccConfig.duration_s),
        warmup_s=(
            args.warmup
            if args.warmup is not None
            else QUICK_WARMUP_S
            if args.quick
            else TpccConfig.warmup_s
        ),
        sim=args.sim,
        seed=args.seed if args.seed is not None else TpccConfig.seed,
        interactive=args.interactive,
        split_schema=args.split_schema,
        client_time=args.client_time,
        epsilon_us=args.epsilon_us,
        regions=args.regions,
        clock_offset_us=args.clock_offset_us,
        oracle_ttl_us=args.oracle_ttl_us,
    )
    tc.validate()
    seeds = seeds_from_args(args, tc.seed)
    if args.ablate:
        if len(tc.protocols) != 1 or tc.protocols[0] == "d2pl-ttc":
            raise InvalidArgument(
                "--ablate switches off the MVTO refinements of one protocol: give --protocol "
                "k2-mvto (the default) or --protocol mvto-hlc, once"
            )
        if args.sweep is not None:
            raise InvalidArgument("--ablate runs one concurrency; drop --sweep")
        return _ablate(tc, args.out)
    if args.sweep is not None:
        if args.clients_per_region is not None:
            raise InvalidArgument("--sweep sets the clients per region; drop --clients-per-region")
        return _sweep(tc, parse_counts(args.sweep), args.out, seeds, args.jobs)
    results = _run_protocols(tc)
    print(format_results(results))
    for path in write_results(results, tc, args.out):
        print(f"wrote {path}")
    return 0 if all(not r.error for r in results) else 1


def _run_protocols(tc: TpccConfig, label: str = "") -> list[TpccResult]:
    """One run per protocol of `tc`, in the simulator or each on a fresh local cluster; a run
    that fails is kept as a result with its error."""
    progress = sys.stderr.isatty()
    results: list[TpccResult] = []
    with tempfile.TemporaryDirectory(prefix="k2-bench-tpcc-") as tmp:
        for i, protocol in enumerate(tc.protocols):
            print(f"[{protocol}{label}] running ...", file=sys.stderr, flush=True)
            try:
                r = (
                    run_sim(protocol, tc)
                    if tc.sim
                    else run_processes(protocol, tc, Path(tmp) / f"run{i}", progress)
                )
            except K2Error as e:
                r = TpccResult(protocol, "sim" if tc.sim else "processes", 0, 0, 0, error=str(e))
            results.append(r)
    return results


def _ablate(tc: TpccConfig, out: Path) -> int:
    """`--ablate`: the protocol with its defaults, then with each refinement of [txn] off in
    turn (and on processes each of `NODE_SWITCHES`); the ablation table, JSON and a bar plot
    of throughput by variant."""
    protocol = tc.protocols[0]
    variants: list[tuple[str, TpccResult]] = []
    switches = REFINEMENTS + (() if tc.sim else NODE_SWITCHES)
    for off in [(), *((name,) for name in switches)]:
        label = f"no {off[0]}" if off else "default"
        r = _run_protocols(replace(tc, off=off), f" {label}")[0]
        print(format_results([r]) + "\n", flush=True)
        variants.append((label, r))
    print(
        f"TPC-C-like ({'sim' if tc.sim else 'processes'}), {protocol}, "
        f"{tc.clients_per_region * tc.regions} clients, {tc.duration_s:g} s per variant, "
        f"the first {tc.warmup_s:g} s not measured"
    )
    print(ablation_table([_ablation_row(label, r) for label, r in variants]))
    stamp = result_stamp()
    path = out / f"tpcc-ablation-{stamp}.json"
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "config": asdict(tc),
        "variants": [
            {"label": label, **_result_json(r), "vs_default": _ratio(r, variants[0][1])}
            for label, r in variants
        ],
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}")
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(9, 4))
        ax.bar([label for label, _ in variants], [r.throughput for _, r in variants])
        ax.set_ylabel("committed txn/s")
        ax.set_title(f"TPC-C-like ablation, {protocol}, {variants[0][1].clients} clients")
        ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        png = path.with_suffix(".png")
        fig.savefig(png, dpi=120)
        plt.close(fig)
        print(f"wrote {png}")
    return 0 if all(not r.error for _, r in variants) else 1


def _ratio(r: TpccResult, base: TpccResult) -> float | None:
    return r.throughput / base.throughput if base.throughput and not r.error else None


def _ablation_row(label: str, r: TpccResult) -> AblationRow:
    worst = max(((g, r.abort_rate(g)) for g in r.regions), key=lambda x: x[1], default=("", 0.0))
    top = r.rules.most_common(1)[0][0] if r.rules else "-"
    return AblationRow(
        label,
        r.throughput,
        r.percentile(0.5),
        r.percentile(0.99),
        r.abort_rate(),
        worst,
        top,
        r.error,
    )


def sweep_point(r: TpccResult, clients_per_region: int, seed: int | None = None) -> SweepPoint:
    return SweepPoint(
        protocol=r.protocol,
        clients_per_region=clients_per_region,
        clients=r.clients,
        throughput=r.throughput,
        p50_ms=r.percentile(0.5),
        p99_ms=r.percentile(0.99),
        abort_rate=r.abort_rate(),
        worst_region_abort_rate=max((r.abort_rate(g) for g in r.regions), default=0.0),
        gave_up=sum(r.failures.values()),
        error=r.error,
        seed=seed,
        cpu_busy=math.nan if r.cpu is None else r.cpu.busy,
        restamps=r.restamps,
    )


def _sweep_run(protocol: str, tc: TpccConfig) -> TpccResult:
    """One simulated run of a sweep, in this process or a worker (`--jobs`)."""
    try:
        return run_sim(protocol, tc)
    except K2Error as e:
        return TpccResult(protocol, "sim", 0, 0, 0, error=str(e))


def _sweep(
    tc: TpccConfig, per_region: Sequence[int], out: Path, seeds: Sequence[int], jobs: int
) -> int:
    """`--sweep`: every protocol at each concurrency and each of `seeds`; the per-run tables as
    they finish, then throughput against concurrency (see k2store/bench/sweep.py). In the
    simulator `jobs` runs go side by side, each in its own process (`seeds_from_args` has
    checked that)."""
    points: list[SweepPoint] = []
    plans = [replace(tc, clients_per_region=n, seed=seed) for n in per_region for seed in seeds]

    def label(t: TpccConfig) -> str:
        return f", {t.clients_per_region} clients/region" + (
            f", seed {t.seed}" if len(seeds) > 1 else ""
        )

    def done(t: TpccConfig, results: list[TpccResult]) -> None:
        if len(seeds) > 1:
            print(f"seed {t.seed}:")
        print(format_results(results) + "\n", flush=True)
        points.extend(sweep_point(r, t.clients_per_region, t.seed) for r in results)

    if tc.sim and jobs > 1:
        n_runs = len(plans) * len(tc.protocols)
        print(f"{n_runs} simulated runs, {jobs} at a time ...", file=sys.stderr)
        results = side_by_side(_sweep_run, [(p, t) for t in plans for p in tc.protocols], jobs)
        for t in plans:  # in plan order, so tables print whole
            done(t, [next(results) for _ in tc.protocols])
    else:
        for t in plans:
            done(t, _run_protocols(t, label(t)))
    mode = "sim" if tc.sim else "processes"
    title = (
        f"TPC-C-like ({mode}): {tc.regions} regions, {tc.warehouses_per_region} warehouses/region, "
        f"{tc.remote_fraction:.0%} cross-region new-orders, {tc.duration_s:g} s per run, "
        f"the first {tc.warmup_s:g} s not measured"
        f"{', split schema' if tc.split_schema else ''}"
        f"{', client time' if tc.client_time else ''}"
        + (f", seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else "")
    )
    print(title)
    print("\n".join(sweep_table(points, tc.protocols)))
    stamp = result_stamp()
    for path in write_sweep(points, asdict(tc), out / f"tpcc-sweep-{stamp}", title):
        print(f"wrote {path}")
    return 0 if all(not p.error for p in points) else 1


__all__ = [
    "FIVE_REGION_RTT_MS",
    "REGIONS",
    "TpccConfig",
    "TpccResult",
    "main",
    "run_processes",
    "run_sim",
]
