"""`k2 bench visibility`: how long a committed write takes to become readable in every region,
under K2-VCR epochs against the watermark and the closed-timestamp baseline, side by side.

How a run goes::

    for each policy (vcr, watermark, closed-ts):
      a fresh three-region cluster with [replication] policy = <policy> and DESIGN's wide-area
      latencies (node processes on loopback; or, with --sim, the deterministic simulator)
      load: `k2 bench tpcc`'s TPC-C-like mix from closed-loop clients in every region for
            --duration seconds (new-order and payment; --remote-fraction of the new-orders also
            read a district of another region)
      collect: every node's visibility-delay histograms (commit at the shard leader -> readable
            at the region's visible timestamp), per (home region, reading region); seal aborts;
            transaction throughput and aborts
    report: p50/p99 per region pair and policy, each as a ratio to K2-VCR; JSON and a PNG

Timing reads `truetime.SystemClock` (the one OS-clock reader in K2); the delays themselves are
measured inside the nodes (replication/visibility.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from k2store.bench import tpcc
from k2store.bench.txn import local_cluster, pyplot
from k2store.client import AsyncClient
from k2store.cluster import (
    DEFAULT_REGIONS,
    REPLICATION_POLICIES,
    ClusterConfig,
    ClusterSettings,
    ReplicationSettings,
)
from k2store.errors import InvalidArgument, K2Error
from k2store.proto import k2_pb2 as pb
from truetime import SystemClock


@dataclass
class PairDelay:
    home: str
    reader: str
    count: int
    p50_ms: float
    p99_ms: float
    max_ms: float


@dataclass
class PolicyResult:
    policy: str
    mode: str
    duration_s: float
    committed: int = 0
    failed_attempts: Counter[str] = field(default_factory=Counter)
    seal_aborts: int = 0
    delays: list[PairDelay] = field(default_factory=list)
    error: str = ""

    def pair(self, home: str, reader: str) -> PairDelay | None:
        return next((d for d in self.delays if d.home == home and d.reader == reader), None)


@dataclass(frozen=True)
class VisibilityConfig:
    policies: tuple[str, ...] = ("vcr", "watermark", "closed-ts")
    duration_s: float = 20.0
    clients_per_region: int = 2
    remote_fraction: float = 0.1
    sim: bool = False
    seed: int = 1

    def validate(self) -> None:
        for p in self.policies:
            if p not in REPLICATION_POLICIES:
                raise InvalidArgument(
                    f"unknown policy {p!r}; available: {', '.join(REPLICATION_POLICIES)}"
                )
        if self.duration_s <= 0 or self.clients_per_region < 1:
            raise InvalidArgument("duration must be positive and clients-per-region at least 1")
        if not 0 <= self.remote_fraction <= 1:
            raise InvalidArgument(f"remote-fraction must be in [0, 1], got {self.remote_fraction}")


# -- the workload (any AsyncClient: processes or the simulator) ----------------------------------


def _workload(vc: VisibilityConfig) -> tpcc.TpccConfig:
    """The load: `k2 bench tpcc`'s mix (one warehouse per region, one-shot transactions)."""
    return tpcc.TpccConfig(
        clients_per_region=vc.clients_per_region,
        remote_fraction=vc.remote_fraction,
        duration_s=vc.duration_s,
        seed=vc.seed,
    )


def _count(result: PolicyResult, load: tpcc.TpccResult) -> None:
    result.committed = load.committed
    attempts = sum(r.attempts for r in load.regions.values())
    result.failed_attempts = Counter(load.rules)
    other = attempts - load.committed - sum(load.rules.values())
    if other > 0:
        result.failed_attempts["other"] += other


def collect(result: PolicyResult, statuses: Sequence[tuple[str, pb.ReplicationStatus]]) -> None:
    for reader, rep in statuses:
        result.seal_aborts += sum(s.seal_aborts for s in rep.shards if s.role == "leader")
        for d in rep.delays:
            result.delays.append(
                PairDelay(d.from_region, reader, d.count, d.p50_ms, d.p99_ms, d.max_ms)
            )


def settings_for(policy: str) -> ClusterSettings:
    base = ClusterSettings()
    return replace(
        base,
        replication=replace(ReplicationSettings(), policy=policy),
        network=replace(base.network, enabled=True),
    )


# -- processes ------------------------------------------------------------------------------------


async def _run_on(cfg: ClusterConfig, vc: VisibilityConfig, result: PolicyResult) -> None:
    retry = tpcc.RETRY
    clients = [
        AsyncClient(cfg, region=r, retry=retry)
        for r in cfg.region_names()
        for _ in range(vc.clients_per_region)
    ]
    stop = asyncio.Event()
    load = tpcc.TpccResult(result.policy, "processes", len(clients), vc.remote_fraction, 0)
    clock = SystemClock()

    def now_ms() -> float:
        return clock.monotonic_ns() / 1e6

    tasks = [
        asyncio.create_task(tpcc.tpcc_client(c, i, stop, _workload(vc), load, now_ms))
        for i, c in enumerate(clients)
    ]
    await asyncio.sleep(vc.duration_s)
    stop.set()
    await asyncio.gather(*tasks)
    _count(result, load)
    await asyncio.sleep(1.0)  # the last epochs become visible
    statuses = []
    for n in cfg.nodes:
        r = await clients[0]._transport.call(
            n.name, "/k2.v1.Admin/Status", pb.StatusRequest(), pb.StatusResponse, timeout_s=5
        )
        statuses.append((n.region, r.replication))
    collect(result, statuses)
    for c in clients:
        await c.close()


def run_processes(policy: str, vc: VisibilityConfig, data: Path, progress: bool) -> PolicyResult:
    result = PolicyResult(policy, "processes", vc.duration_s)
    with local_cluster(data, settings_for(policy), progress=progress) as cfg:
        asyncio.run(_run_on(cfg, vc, result))
    return result


# -- simulator ------------------------------------------------------------------------------------


def run_sim(policy: str, vc: VisibilityConfig) -> PolicyResult:
    """The same mix in the deterministic simulator (virtual time; DESIGN's latencies)."""
    from k2store.cluster import local_cluster as make_cluster
    from k2store.sim import SimCluster, run_simulation

    result = PolicyResult(policy, "sim", vc.duration_s)
    cfg = make_cluster(
        DEFAULT_REGIONS, [1, 2, 3], root=Path("/nonexistent-sim"), settings=settings_for(policy)
    )

    async def main() -> None:
        cluster = SimCluster(cfg, seed=vc.seed)
        retry = tpcc.RETRY
        clients = [
            cluster.txn_client(r, retry=retry)
            for r in DEFAULT_REGIONS
            for _ in range(vc.clients_per_region)
        ]
        stop = asyncio.Event()

        async def stopper() -> None:
            await asyncio.sleep(vc.duration_s)
            stop.set()

        load = tpcc.TpccResult(policy, "sim", len(clients), vc.remote_fraction, 0)

        def now_ms() -> float:
            return cluster.now_s * 1000

        jobs = [stopper] + [
            (lambda i=i, c=c: tpcc.tpcc_client(c, i, stop, _workload(vc), load, now_ms))
            for i, c in enumerate(clients)
        ]
        await cluster.run(jobs, vc.duration_s + 30)
        _count(result, load)
        await asyncio.sleep(1.0)
        statuses = []
        for node in cluster.nodes.values():
            assert node.service is not None and node.service.replicator is not None
            statuses.append((node.region, node.service.replicator.status()))
        collect(result, statuses)
        for c in clients:
            await c.close()

    run_simulation(main, seed=vc.seed)
    return result


# -- reporting -----------------------------------------------------------------------------------


def format_results(results: list[PolicyResult]) -> str:
    base = next((r for r in results if r.policy == "vcr" and not r.error), None)
    lines = []
    for r in results:
        if r.error:
            lines.append(f"{r.policy}: FAILED: {r.error}")
            continue
        attempts = r.committed + sum(r.failed_attempts.values())
        lines.append(
            f"{r.policy} ({r.mode}, {r.duration_s:.0f} s): {r.committed} transactions committed, "
            f"{r.seal_aborts} writes refused by rule sealed "
            f"({r.seal_aborts / max(attempts, 1):.2%} of attempts)"
        )
    lines.append("")
    head = f"{'home -> reader':<28}"
    for r in results:
        head += f" {r.policy + ' p50':>15} {'p99':>7}"
    lines.append(head + "   (ms; x = ratio to vcr)")
    pairs = sorted({(d.home, d.reader) for r in results for d in r.delays})
    for home, reader in pairs:
        row = f"{home + ' -> ' + reader:<28}"
        for r in results:
            d = r.pair(home, reader)
            if d is None:
                row += f" {'-':>15} {'-':>7}"
                continue
            ratio = ""
            b = base.pair(home, reader) if base is not None else None
            if b is not None and r is not base and b.p50_ms > 0:
                ratio = f" {d.p50_ms / b.p50_ms:.1f}x"
            row += f" {f'{d.p50_ms:.0f}{ratio}':>15} {d.p99_ms:>7.0f}"
        lines.append(row)
    return "\n".join(lines)


def write_results(results: list[PolicyResult], vc: VisibilityConfig, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.fromtimestamp(SystemClock().now_ns() / 1e9, UTC).strftime("%Y%m%dT%H%M%SZ")
    path = out / f"visibility-{stamp}.json"
    payload: dict[str, Any] = {
        "benchmark": "visibility",
        "config": asdict(vc),
        "results": [{**asdict(r), "failed_attempts": dict(r.failed_attempts)} for r in results],
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    written = [path]
    plt = pyplot()
    if plt is None:
        return written
    pairs = sorted({(d.home, d.reader) for r in results for d in r.delays})
    fig, ax = plt.subplots(figsize=(max(6, len(pairs) * 1.2), 4))
    width = 0.8 / max(len(results), 1)
    for i, r in enumerate(results):
        p50 = [(r.pair(h, rd).p50_ms if r.pair(h, rd) else 0) for h, rd in pairs]  # type: ignore[union-attr]
        p99 = [(r.pair(h, rd).p99_ms if r.pair(h, rd) else 0) for h, rd in pairs]  # type: ignore[union-attr]
        xs = [x + i * width for x in range(len(pairs))]
        ax.bar(xs, p50, width, label=f"{r.policy} p50")
        ax.scatter(xs, p99, marker="_", s=200, color="black")
    ax.set_xticks([x + width * (len(results) - 1) / 2 for x in range(len(pairs))])
    ax.set_xticklabels([f"{h}\n->{rd}" for h, rd in pairs], fontsize=7)
    ax.set_ylabel("visibility delay, ms (bar p50, tick p99)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    written.append(png)
    return written


# -- command line --------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = VisibilityConfig()
    p.add_argument(
        "--policy",
        action="append",
        choices=REPLICATION_POLICIES,
        help="a seal policy to run (repeatable; default: all three)",
    )
    p.add_argument("--duration", type=float, default=None, metavar="S", help="seconds per policy")
    p.add_argument("--clients-per-region", type=int, default=d.clients_per_region, metavar="N")
    p.add_argument(
        "--remote-fraction",
        type=float,
        default=d.remote_fraction,
        help="fraction of new-orders that also read another region (default %(default)s)",
    )
    p.add_argument(
        "--sim", action="store_true", help="run in the deterministic simulator (virtual time)"
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--quick", action="store_true", help="short runs (CI smoke test)")
    p.add_argument("--out", type=Path, default=Path("bench-results"))


def main(args: argparse.Namespace) -> int:
    duration = args.duration or (4.0 if args.quick else VisibilityConfig.duration_s)
    vc = VisibilityConfig(
        policies=tuple(args.policy or VisibilityConfig.policies),
        duration_s=duration,
        clients_per_region=args.clients_per_region,
        remote_fraction=args.remote_fraction,
        sim=args.sim,
        seed=args.seed,
    )
    vc.validate()
    progress = sys.stderr.isatty()
    clock = SystemClock()
    results = []
    with tempfile.TemporaryDirectory(prefix="k2-bench-vis-") as tmp:
        for i, policy in enumerate(vc.policies):
            t0 = clock.monotonic_ns()
            print(
                f"[{policy}] {'simulating' if vc.sim else 'starting a local 3-region cluster'} "
                f"for {vc.duration_s:.0f} s ...",
                file=sys.stderr,
                flush=True,
            )
            try:
                r = (
                    run_sim(policy, vc)
                    if vc.sim
                    else run_processes(policy, vc, Path(tmp) / f"run{i}", progress)
                )
            except K2Error as e:
                r = PolicyResult(
                    policy, "sim" if vc.sim else "processes", vc.duration_s, error=str(e)
                )
            results.append(r)
            print(f"[{policy}] done in {(clock.monotonic_ns() - t0) / 1e9:.1f} s", file=sys.stderr)
    print(format_results(results))
    for path in write_results(results, vc, args.out):
        print(f"wrote {path}")
    return 0 if all(not r.error for r in results) else 1
