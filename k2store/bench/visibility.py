"""`k2 bench visibility`: how long a committed write takes to become readable in every region,
under K2-VCR epochs against the watermark and the closed-timestamp baseline, side by side.

How a run goes::

    for each policy (vcr, at each --epoch-ms length L; watermark; closed-ts):
      a fresh three-region cluster with [replication] policy = <policy> and DESIGN's wide-area
      latencies (node processes on loopback; or, with --sim, the deterministic simulator)
      load: `k2 bench tpcc`'s TPC-C-like mix from closed-loop clients in every region for
            --duration seconds (new-order and payment; --remote-fraction of the new-orders also
            read a district of another region)
      collect: every node's visibility-delay histograms (commit at the shard leader -> readable
            at the region's visible timestamp), per (home region, reading region); seal aborts;
            transaction throughput and aborts
    report: p50/p99 per region pair and policy, each as a ratio to K2-VCR (L = 100 ms); seal
            traffic per second (seals logged, pushes to replicas, peer Seals queries), which is
            what a shorter epoch costs; JSON and a PNG

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
from pathlib import Path
from typing import Any

from k2store import evloop
from k2store.bench import tpcc
from k2store.bench.sweep import stamp as result_stamp
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
    epoch_ms: float = 0.0
    """K2-VCR's epoch length L (vcr runs only)."""
    committed: int = 0
    failed_attempts: Counter[str] = field(default_factory=Counter)
    seal_aborts: int = 0
    delays: list[PairDelay] = field(default_factory=list)
    seals: int = 0
    """Seals logged by every leader during the load."""
    seal_pushes: int = 0
    """Push calls (log through a new seal) sent to replicas during the load."""
    seal_queries: int = 0
    """Seals calls between nodes of a region during the load (visible-timestamp inputs)."""
    error: str = ""

    @property
    def label(self) -> str:
        return f"vcr L={self.epoch_ms:g}ms" if self.policy == "vcr" else self.policy

    def per_s(self, n: int) -> float:
        return n / self.duration_s if self.duration_s > 0 else 0.0

    def pair(self, home: str, reader: str) -> PairDelay | None:
        return next((d for d in self.delays if d.home == home and d.reader == reader), None)


@dataclass(frozen=True)
class VisibilityConfig:
    policies: tuple[str, ...] = ("vcr", "watermark", "closed-ts")
    epochs_ms: tuple[float, ...] = (100.0,)
    """K2-VCR epoch lengths to run (one vcr run each)."""
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
        if not self.epochs_ms or any(not 5 <= e <= 10_000 for e in self.epochs_ms):
            raise InvalidArgument(f"epoch lengths must be 5-10000 ms, got {list(self.epochs_ms)}")

    def runs(self) -> list[tuple[str, float]]:
        """(policy, epoch length) of each run: every epoch length for vcr, the default else."""
        default = ReplicationSettings().epoch_ms
        return [
            (p, e) for p in self.policies for e in (self.epochs_ms if p == "vcr" else (default,))
        ]


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


def seal_counts(statuses: Sequence[tuple[str, pb.ReplicationStatus]]) -> tuple[int, int, int]:
    """(seals logged, pushes sent, peer seal queries sent), summed over the nodes."""
    seals = sum(s.seals for _, rep in statuses for s in rep.shards if s.role == "leader")
    return (
        seals,
        sum(rep.seal_pushes for _, rep in statuses),
        sum(rep.seal_queries for _, rep in statuses),
    )


def collect(
    result: PolicyResult,
    statuses: Sequence[tuple[str, pb.ReplicationStatus]],
    before: tuple[int, int, int] = (0, 0, 0),
) -> None:
    """Delays and seal aborts from the nodes' status after the load; seal message counts as the
    difference from `before` (taken when the load started)."""
    after = seal_counts(statuses)
    result.seals, result.seal_pushes, result.seal_queries = (
        a - b for a, b in zip(after, before, strict=True)
    )
    for reader, rep in statuses:
        result.seal_aborts += sum(s.seal_aborts for s in rep.shards if s.role == "leader")
        for d in rep.delays:
            result.delays.append(
                PairDelay(d.from_region, reader, d.count, d.p50_ms, d.p99_ms, d.max_ms)
            )


def settings_for(policy: str, epoch_ms: float | None = None) -> ClusterSettings:
    base = ClusterSettings()
    rs = replace(ReplicationSettings(), policy=policy)
    if epoch_ms is not None:
        rs = replace(rs, epoch_ms=epoch_ms)
    return replace(base, replication=rs, network=replace(base.network, enabled=True))


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

    async def statuses() -> list[tuple[str, pb.ReplicationStatus]]:
        out = []
        for n in cfg.nodes:
            r = await clients[0]._transport.call(
                n.name, "/k2.v1.Admin/Status", pb.StatusRequest(), pb.StatusResponse, timeout_s=5
            )
            out.append((n.region, r.replication))
        return out

    before = seal_counts(await statuses())
    t0 = clock.monotonic_ns()
    tasks = [
        asyncio.create_task(tpcc.tpcc_client(c, i, stop, _workload(vc), load, now_ms))
        for i, c in enumerate(clients)
    ]
    await asyncio.sleep(vc.duration_s)
    stop.set()
    await asyncio.gather(*tasks)
    _count(result, load)
    await asyncio.sleep(1.0)  # the last epochs become visible
    result.duration_s = (clock.monotonic_ns() - t0) / 1e9  # the window the seal counts cover
    collect(result, await statuses(), before)
    for c in clients:
        await c.close()


def run_processes(
    policy: str, vc: VisibilityConfig, data: Path, progress: bool, epoch_ms: float = 100.0
) -> PolicyResult:
    result = PolicyResult(policy, "processes", vc.duration_s, epoch_ms)
    with local_cluster(data, settings_for(policy, epoch_ms), progress=progress) as cfg:
        evloop.run(_run_on(cfg, vc, result))
    return result


# -- simulator ------------------------------------------------------------------------------------


def run_sim(policy: str, vc: VisibilityConfig, epoch_ms: float = 100.0) -> PolicyResult:
    """The same mix in the deterministic simulator (virtual time; DESIGN's latencies)."""
    from k2store.cluster import local_cluster as make_cluster
    from k2store.sim import SimCluster, run_simulation

    result = PolicyResult(policy, "sim", vc.duration_s, epoch_ms)
    cfg = make_cluster(
        DEFAULT_REGIONS,
        [1, 2, 3],
        root=Path("/nonexistent-sim"),
        settings=settings_for(policy, epoch_ms),
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

        def statuses() -> list[tuple[str, pb.ReplicationStatus]]:
            out = []
            for node in cluster.nodes.values():
                if node.service is not None and node.service.replicator is not None:
                    out.append((node.region, node.service.replicator.status()))
            return out

        started = cluster.now_s
        before: list[tuple[int, int, int]] = []

        async def mark() -> None:  # seal counts as the load starts (the nodes are up by now)
            before.append(seal_counts(statuses()))

        await cluster.run([mark, *jobs], vc.duration_s + 30)
        _count(result, load)
        await asyncio.sleep(1.0)
        result.duration_s = cluster.now_s - started
        collect(result, statuses(), before[0] if before else (0, 0, 0))
        for c in clients:
            await c.close()

    run_simulation(main, seed=vc.seed)
    return result


# -- reporting -----------------------------------------------------------------------------------


def format_results(results: list[PolicyResult]) -> str:
    ok = [r for r in results if not r.error]
    base = next((r for r in ok if r.policy == "vcr" and r.epoch_ms == 100.0), None) or next(
        (r for r in ok if r.policy == "vcr"), None
    )
    lines = []
    for r in results:
        if r.error:
            lines.append(f"{r.label}: FAILED: {r.error}")
            continue
        attempts = r.committed + sum(r.failed_attempts.values())
        lines.append(
            f"{r.label} ({r.mode}, {r.duration_s:.0f} s): {r.committed} transactions committed, "
            f"{r.seal_aborts} writes refused by rule sealed "
            f"({r.seal_aborts / max(attempts, 1):.2%} of attempts); seal traffic "
            f"{r.per_s(r.seal_pushes + r.seal_queries):.0f} messages/s "
            f"({r.per_s(r.seals):.0f} seals/s logged, {r.per_s(r.seal_pushes):.0f} pushes/s to "
            f"replicas, {r.per_s(r.seal_queries):.0f} peer queries/s)"
        )
    lines.append("")
    head = f"{'home -> reader':<28}"
    for r in results:
        head += f" {r.label + ' p50':>19} {'p99':>7}"
    lines.append(head + "   (ms; x = ratio to " + (base.label if base else "vcr") + ")")
    pairs = sorted({(d.home, d.reader) for r in results for d in r.delays})
    for home, reader in pairs:
        row = f"{home + ' -> ' + reader:<28}"
        for r in results:
            d = r.pair(home, reader)
            if d is None:
                row += f" {'-':>19} {'-':>7}"
                continue
            ratio = ""
            b = base.pair(home, reader) if base is not None else None
            if b is not None and r is not base and b.p50_ms > 0:
                ratio = f" {d.p50_ms / b.p50_ms:.1f}x"
            row += f" {f'{d.p50_ms:.0f}{ratio}':>19} {d.p99_ms:>7.0f}"
        lines.append(row)
    return "\n".join(lines)


def write_results(results: list[PolicyResult], vc: VisibilityConfig, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    stamp = result_stamp()
    path = out / f"visibility-{stamp}.json"
    payload: dict[str, Any] = {
        "benchmark": "visibility",
        "config": asdict(vc),
        "results": [
            {
                **asdict(r),
                "label": r.label,
                "failed_attempts": dict(r.failed_attempts),
                "seals_per_s": r.per_s(r.seals),
                "seal_messages_per_s": r.per_s(r.seal_pushes + r.seal_queries),
            }
            for r in results
        ],
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
        ax.bar(xs, p50, width, label=f"{r.label} p50")
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
    p.add_argument(
        "--epoch-ms",
        default=None,
        metavar="L1,L2,...",
        help="K2-VCR epoch lengths to run, one vcr run each (default 100): shorter epochs "
        "make writes visible sooner and cost more seal messages, which the report counts",
    )
    p.add_argument("--duration", type=float, default=None, metavar="S", help="seconds per run")
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
    try:
        epochs = tuple(float(x) for x in args.epoch_ms.split(",")) if args.epoch_ms else (100.0,)
    except ValueError:
        raise InvalidArgument(f"--epoch-ms {args.epoch_ms!r}: comma-separated numbers") from None
    vc = VisibilityConfig(
        policies=tuple(args.policy or VisibilityConfig.policies),
        epochs_ms=epochs,
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
        for i, (policy, epoch_ms) in enumerate(vc.runs()):
            label = PolicyResult(policy, "", 0, epoch_ms).label
            t0 = clock.monotonic_ns()
            print(
                f"[{label}] {'simulating' if vc.sim else 'starting a local 3-region cluster'} "
                f"for {vc.duration_s:.0f} s ...",
                file=sys.stderr,
                flush=True,
            )
            try:
                r = (
                    run_sim(policy, vc, epoch_ms)
                    if vc.sim
                    else run_processes(policy, vc, Path(tmp) / f"run{i}", progress, epoch_ms)
                )
            except K2Error as e:
                r = PolicyResult(
                    policy, "sim" if vc.sim else "processes", vc.duration_s, epoch_ms, error=str(e)
                )
            results.append(r)
            print(f"[{label}] done in {(clock.monotonic_ns() - t0) / 1e9:.1f} s", file=sys.stderr)
    print(format_results(results))
    for path in write_results(results, vc, args.out):
        print(f"wrote {path}")
    return 0 if all(not r.error for r in results) else 1
