"""One Jepsen run: bring up a local cluster, drive a workload under a nemesis, heal, read,
check, report, tear down.

Flow
    1. `launcher.up` a three-region cluster (one node per region, loopback only) in a fresh
       temporary directory, with the chosen `[txn] protocol`, wide-area emulation on, and short
       transaction timeouts so a killed coordinator's intents resolve within seconds.
    2. Workers (`clients`, spread round-robin over the regions) loop on the workload's
       operations until `time` seconds have passed; the nemesis injects faults meanwhile.
    3. Stop: workers get `drain_s` to finish in-flight operations (later ones are cancelled and
       recorded ``info``); the nemesis heals everything; the cluster gets `settle_s` to resolve
       leftover intents; the workload's final reads run from every region.
    4. The workload's checkers run over the history. Outputs in `out`: ``history.jsonl``,
       ``results.json``, ``report.txt`` and ``latency.png`` (or ``.svg``), plus each node's log.
    5. The cluster is stopped (no process left behind) and the temporary directory removed.

Progress goes to stderr. `RunResult.exit_code`: 0 clean, 1 anomalies found, 3 undecided.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from jepsen_tests.anomalies import CheckResult
from jepsen_tests.history import History, write_jsonl
from jepsen_tests.nemesis import Nemesis, parse_nemesis
from jepsen_tests.plots import plot_latency
from jepsen_tests.workloads import WORKLOADS, Worker, Workload
from k2store import evloop, launcher
from k2store.client import AsyncClient, RetryPolicy, client_truetime
from k2store.cluster import (
    DEFAULT_REGIONS,
    UNSAFE_ENV,
    ClusterConfig,
    ClusterSettings,
    TxnSettings,
)
from truetime import ClockSkew

__all__ = ["PROTOCOLS", "RunOptions", "RunResult", "run"]

PROTOCOLS = ("k2-mvto", "d2pl-ttc", "mvto-hlc")


@dataclass
class RunOptions:
    workload: str = "append"
    nemesis: str = "none"
    """none | all | comma-separated kill, pause, partition, latency"""
    time_s: float = 30.0
    clients: int = 6
    protocol: str = "k2-mvto"
    out: Path = Path("jepsen-out")
    seed: int = 0
    wan: bool = True
    """Emulate DESIGN.md's wide-area latency between regions (partitions work either way)."""
    drain_s: float = 25.0
    settle_s: float = 3.0
    max_ops_per_client: int = 100_000
    fault_interval_s: tuple[float, float] = (2.0, 4.0)
    """Quiet time between two faults, drawn uniformly from this range."""
    fault_duration_s: tuple[float, float] = (2.0, 4.0)
    """How long each fault lasts, drawn uniformly from this range."""
    keep_data: bool = False
    unsafe: tuple[str, ...] = ()
    """Protocol-breaking settings to turn on (e.g. "txn.unsafe_skip_commit_wait",
    "cluster.unsafe_ignore_clock_bound"), to prove the checkers catch what they break. The nodes
    get K2_ALLOW_UNSAFE_SETTINGS=1."""
    txn_off: tuple[str, ...] = ()
    """Refinements of the [txn] table to switch off (e.g. "commit_with_writes"), for a broken
    setting that shows only when the refinement is off."""
    epsilon_us: int | None = None
    """The cluster's assumed clock error (None: the cluster default, 400 us)."""
    max_uncertainty_us: int | None = None
    """The uncertainty beyond which nodes refuse to issue timestamps (None: default, 5 ms)."""
    skew: tuple[tuple[str, float], ...] = ()
    """Clock skews kept for the whole load, (node or region, offset in ms), written to
    clock.toml before the workload starts and removed with every fault before the final
    reads. Nodes report them in their clock error bound (see jepsen_tests.nemesis)."""

    client_time: bool = False
    """Clients with client time (`AsyncClient(truetime=client_truetime(cfg))`, the host's
    clock): K2-MVTO stamps their transactions when they send them and they wait out the
    commit-wait themselves. The nemesis skews the nodes' clocks, not the clients'."""

    def validate(self) -> None:
        if self.workload not in WORKLOADS:
            raise ValueError(
                f"--workload must be one of {sorted(WORKLOADS)}, got {self.workload!r}"
            )
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"--protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if not 1 <= self.clients <= 256:
            raise ValueError(f"--clients must be in 1..256, got {self.clients}")
        if not 1 <= self.time_s <= 24 * 3600:
            raise ValueError(f"--time must be in 1..86400 seconds, got {self.time_s}")
        parse_nemesis(self.nemesis)
        names = {*DEFAULT_REGIONS, *(f"{r}-1" for r in DEFAULT_REGIONS)}
        for name, _ in self.skew:
            if name not in names:
                raise ValueError(f"--skew: {name!r} is not a node or region of {sorted(names)}")
        for flag, v in (
            ("--epsilon-us", self.epsilon_us),
            ("--max-uncertainty-us", self.max_uncertainty_us),
        ):
            if v is not None and v <= 0:
                raise ValueError(f"{flag} must be positive, got {v}")
        cluster_settings(self.protocol, self.unsafe, txn_off=self.txn_off)  # ValueError if unknown
        eps = self.epsilon_us or ClusterSettings().epsilon_us
        if self.max_uncertainty_us is not None and self.max_uncertainty_us < eps:
            raise ValueError(f"--max-uncertainty-us must be at least epsilon ({eps} us)")


@dataclass
class RunResult:
    options: dict[str, Any]
    checks: list[CheckResult]
    op_counts: dict[str, int]
    faults: list[dict[str, Any]]
    latency_ms: dict[str, float]
    duration_s: float
    files: dict[str, str] = field(default_factory=dict)
    client_clock_ahead: dict[str, int] = field(default_factory=dict)
    """With client time: per node, the transactions whose client's reading was ahead of the
    node's clock (their commit-waits stayed at the node), read at the end of the run (a node
    restarted by the kill nemesis counts from its restart)."""

    @property
    def valid(self) -> bool | None:
        if any(c.valid is False for c in self.checks):
            return False
        if any(c.valid is None for c in self.checks):
            return None
        return True

    @property
    def exit_code(self) -> int:
        return {True: 0, False: 1, None: 3}[self.valid]

    def to_json(self) -> dict[str, Any]:
        return {
            "valid": self.valid,
            "options": self.options,
            "checks": [c.to_json() for c in self.checks],
            "op_counts": self.op_counts,
            "faults": self.faults,
            "latency_ms": self.latency_ms,
            "duration_s": self.duration_s,
            "files": self.files,
            "client_clock_ahead": self.client_clock_ahead,
        }


def cluster_settings(
    protocol: str,
    unsafe: Sequence[str] = (),
    *,
    epsilon_us: int | None = None,
    max_uncertainty_us: int | None = None,
    txn_off: Sequence[str] = (),
) -> ClusterSettings:
    """Short timeouts, so a killed or paused coordinator's transactions expire (and their
    intents resolve) within a few seconds rather than the defaults' tens; the clock bounds if
    given; plus any protocol-breaking `unsafe` settings ("cluster.<field>", "txn.<field>" or
    "replication.<field>")."""
    clock: dict[str, Any] = {}
    if epsilon_us is not None:
        clock["epsilon_us"] = epsilon_us
    if max_uncertainty_us is not None:
        clock["max_uncertainty_us"] = max_uncertainty_us
    st = replace(
        ClusterSettings(request_timeout_s=3.0, **clock),
        txn=TxnSettings(
            protocol=protocol,
            heartbeat_s=0.2,
            expiry_s=1.5,
            push_after_s=0.05,
            client_timeout_s=10.0,
        ),
    )
    for name in txn_off:
        if name.startswith("unsafe_") or not isinstance(getattr(st.txn, name, None), bool):
            raise ValueError(f"unknown [txn] refinement {name!r}")
        off: dict[str, Any] = {name: False}
        st = replace(st, txn=replace(st.txn, **off))
    for name in unsafe:
        table, _, field_name = name.partition(".")
        if table not in ("cluster", "txn", "replication") or not field_name.startswith("unsafe_"):
            raise ValueError(f"unknown unsafe setting {name!r}")
        if table == "cluster":
            if not hasattr(st, field_name):
                raise ValueError(f"unknown unsafe setting {name!r}")
            flag: dict[str, Any] = {field_name: True}
            st = replace(st, **flag)
            continue
        section = getattr(st, table)
        if not hasattr(section, field_name):
            raise ValueError(f"unknown unsafe setting {name!r}")
        st = replace(st, **{table: replace(section, **{field_name: True})})
    return st


def _say(msg: str) -> None:
    print(f"[k2 jepsen] {msg}", file=sys.stderr, flush=True)


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the cluster is still torn down.
    raise SystemExit(128 + signum)


def run(opts: RunOptions, *, say: Callable[[str], None] = _say) -> RunResult:
    """Run one test end to end (see the module docstring); never leaves a node running."""
    opts.validate()
    out = opts.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = Path(tempfile.mkdtemp(prefix="k2-jepsen-"))
    say(f"starting a 3-region cluster ({opts.protocol}) in {data}")
    if opts.unsafe:
        say(f"BROKEN ON PURPOSE: {', '.join(opts.unsafe)}")
    saved = os.environ.get(UNSAFE_ENV)
    if opts.unsafe:
        os.environ[UNSAFE_ENV] = "1"  # inherited by the node processes started below
    try:
        return _run_cluster(opts, out, data, say)
    finally:
        if saved is None:
            os.environ.pop(UNSAFE_ENV, None)
        else:
            os.environ[UNSAFE_ENV] = saved


def _run_cluster(opts: RunOptions, out: Path, data: Path, say: Callable[[str], None]) -> RunResult:
    cfg = launcher.up(
        data,
        regions=DEFAULT_REGIONS,
        settings=cluster_settings(
            opts.protocol,
            opts.unsafe,
            epsilon_us=opts.epsilon_us,
            max_uncertainty_us=opts.max_uncertainty_us,
            txn_off=opts.txn_off,
        ),
        wan=opts.wan,
        progress=False,
        timeout_s=60,
    )
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        history = History()
        result = evloop.run(_drive(cfg, opts, history, say))
    finally:
        signal.signal(signal.SIGTERM, previous)
        logs = out / "logs"
        logs.mkdir(exist_ok=True)
        for n in cfg.nodes:
            src = n.data_dir / "node.log"
            if src.exists():
                shutil.copyfile(src, logs / f"{n.name}.log")
        ended = launcher.down(cfg)
        say(f"cluster stopped: {ended}")
        if not opts.keep_data:
            shutil.rmtree(data, ignore_errors=True)
    write_jsonl(history.ops, out / "history.jsonl")
    result.files["history"] = str(out / "history.jsonl")
    (out / "report.txt").write_text(report(result), encoding="utf-8")
    result.files["report"] = str(out / "report.txt")
    result.files["logs"] = str(out / "logs")
    (out / "results.json").write_text(json.dumps(result.to_json(), indent=2, default=str))
    return result


async def _drive(
    cfg: ClusterConfig, opts: RunOptions, history: History, say: Callable[[str], None]
) -> RunResult:
    rng = random.Random(opts.seed)
    regions = cfg.region_names()
    workload: Workload = WORKLOADS[opts.workload](regions, random.Random(opts.seed + 1))
    retry = RetryPolicy(max_attempts=3, initial_backoff_s=0.02, max_backoff_s=0.3)
    clients = [
        AsyncClient(
            cfg,
            region=regions[i % len(regions)],
            retry=retry,
            truetime=client_truetime(cfg) if opts.client_time else None,
        )
        for i in range(opts.clients)
    ]
    workers = [
        Worker(
            i,
            i,
            regions[i % len(regions)],
            clients[i],
            history,
            opts.clients,
            random.Random(opts.seed * 7919 + i),
        )
        for i in range(opts.clients)
    ]
    base_skews = {name: ClockSkew(round(ms * 1e6)) for name, ms in opts.skew}
    nemesis = Nemesis(
        cfg,
        history,
        parse_nemesis(opts.nemesis),
        rng,
        interval_s=opts.fault_interval_s,
        duration_s=opts.fault_duration_s,
        log=say,
        base_skews=base_skews,
    )
    try:
        if base_skews:
            launcher.write_clock_skews(cfg, base_skews)
            say(
                "clock skew for the whole load: "
                + ", ".join(
                    f"{k} {v.offset_ns / 1e6:+.1f} ms" for k, v in sorted(base_skews.items())
                )
            )
            await asyncio.sleep(0.5)  # nodes re-read clock.toml every 0.1 s
        await workload.setup(clients[0])
        say(
            f"running {opts.workload} with {opts.clients} clients for {opts.time_s:.0f} s, "
            f"nemesis {opts.nemesis}"
        )
        stop = asyncio.Event()

        async def loop(w: Worker) -> None:
            for _ in range(opts.max_ops_per_client):
                if stop.is_set():
                    return
                await workload.step(w)

        tasks = [asyncio.ensure_future(loop(w)) for w in workers]
        nem = asyncio.ensure_future(nemesis.run(max(opts.time_s - 1.0, 0.0)))
        started = history.elapsed_ns()
        while (history.elapsed_ns() - started) / 1e9 < opts.time_s:
            await asyncio.sleep(min(5.0, opts.time_s - (history.elapsed_ns() - started) / 1e9))
            n = Counter(op.type for op in history.ops if op.process != "nemesis")
            say(
                f"{(history.elapsed_ns() - started) / 1e9:5.1f} s: ok {n['ok']}, fail "
                f"{n['fail']}, info {n['info']}"
            )
            for t in tasks:
                if t.done() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        stop.set()
        await nem
        _, pending = await asyncio.wait(tasks, timeout=opts.drain_s)
        for t in pending:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for r in results:
            if isinstance(r, Exception):
                raise r
        say(f"healing ({len(pending)} operations still in flight were cancelled)")
        await nemesis.heal()
        await asyncio.sleep(opts.settle_s)
        say("final reads")
        unavailable = await workload.final(workers)
        ahead: dict[str, int] = {}
        if opts.client_time:
            statuses = await asyncio.to_thread(launcher.status, cfg)
            ahead = {s.name: s.client_clock_ahead for s in statuses if s.up}
    finally:
        await nemesis.heal()
        for c in clients:
            await c.close()
    say("checking")
    checks = workload.check(history.ops)
    availability = CheckResult("availability after the heal (final reads)")
    for why in unavailable:
        availability.add("final-read-failed", why)
    checks.append(availability)
    counts = Counter(
        f"{op.f}:{op.type}" for op in history.ops if op.type != "invoke" and op.process != "nemesis"
    )
    lat = sorted(x for w in workers for _, x, ty in w.latencies if ty == "ok")
    windows = [(w.kind, w.start_ns, w.end_ns or history.elapsed_ns()) for w in nemesis.windows]
    res = RunResult(
        options={k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
        checks=checks,
        op_counts=dict(sorted(counts.items())),
        faults=[
            {
                "kind": w.kind,
                "target": w.target,
                "start_s": w.start_ns / 1e9,
                "end_s": (w.end_ns or 0) / 1e9,
            }
            for w in nemesis.windows
        ],
        latency_ms={
            "p50": lat[len(lat) // 2] if lat else 0.0,
            "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else 0.0,
            "max": lat[-1] if lat else 0.0,
        },
        duration_s=history.elapsed_ns() / 1e9,
        client_clock_ahead=ahead,
    )
    points = [p for w in workers for p in w.latencies]
    title = f"{opts.workload} / {opts.nemesis} / {opts.protocol}: latency of each operation"
    res.files["plot"] = str(plot_latency(points, windows, opts.out.resolve() / "latency", title))
    return res


def report(r: RunResult) -> str:
    o = r.options
    lines = [
        f"K2 Jepsen run: workload {o['workload']}, nemesis {o['nemesis']}, protocol "
        f"{o['protocol']}, {o['time_s']:g} s, {o['clients']} clients over 3 regions, seed "
        f"{o['seed']}",
        f"duration {r.duration_s:.1f} s; operations: "
        + ", ".join(f"{k} {v}" for k, v in r.op_counts.items()),
        f"latency of ok operations: p50 {r.latency_ms['p50']:.0f} ms, p99 "
        f"{r.latency_ms['p99']:.0f} ms, max {r.latency_ms['max']:.0f} ms",
        f"faults: {len(r.faults)}",
    ]
    lines += [
        f"  {f['start_s']:6.1f}-{f['end_s']:6.1f} s  {f['kind']:<9} {f['target']}" for f in r.faults
    ]
    if r.client_clock_ahead:
        lines.append(
            "client time: transactions whose client read ahead of the node's clock (the node "
            "kept their commit-waits): "
            + ", ".join(f"{n} {c}" for n, c in sorted(r.client_clock_ahead.items()))
        )
    for c in r.checks:
        verdict = {True: "VALID", False: "INVALID", None: "UNKNOWN"}[c.valid]
        lines.append(f"checker {c.checker}: {verdict}")
        if c.stats:
            lines.append("  " + ", ".join(f"{k} {v}" for k, v in c.stats.items()))
        for kind, n in sorted(c.counts.items()):
            lines.append(f"  {kind}: {n}")
            for ex in c.anomalies[kind][:3]:
                lines.append(f"    - {ex['explain']}")
        lines += [f"  note: {n}" for n in c.notes]
    verdict = {
        True: "no anomalies found",
        False: "ANOMALIES FOUND",
        None: "UNDECIDED (see notes)",
    }[r.valid]
    lines.append(f"result: {verdict}")
    lines += [f"{k}: {v}" for k, v in r.files.items()]
    return "\n".join(lines) + "\n"
