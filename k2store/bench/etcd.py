"""`k2 bench etcd`: reads from every region, K2's replica reads side by side with a real etcd
cluster's linearizable reads, on the same emulated wide-area links.

Target (DESIGN.md, benchmarks): a replica read from every region is faster than etcd's
linearizable read from that region by at least the region's RTT to the etcd leader.

How a run goes::

    links  one link proxy process (k2store/bench/linkproxy.py) with K2's own region RTT matrix
           (k2store/wan.py NetworkSettings: DESIGN's three regions, half the RTT each way)
    etcd   one member per region (Debian's etcd-server), peers talking through the proxies:
           member A -> member B pays RTT(A, B) / 2 each way (the proxy in front of B tells the
           sender by the X-PeerURLs header etcd puts on every raft request); clients in region
           R reach R's member through a proxy with the intra-region delay; leadership is moved
           to --etcd-leader (or left where the election put it)
    K2     a local three-region cluster of node processes with the same matrix
    data   --keys keys written to both; K2's are homed in the etcd leader's region, so K2's
           strong reads travel as far as etcd's
    reads  one closed-loop reader per region, all regions at once; each round reads one key
           four ways, the order rotating every round:
             etcd linearizable   etcd's default read: a follower asks the leader for a read
                                 index, the leader confirms it still leads with a quorum
                                 heartbeat round, the follower waits to apply that index
             etcd serializable   the member's local state (may be stale, no guarantee)
             K2 replica          a snapshot at the region's visible timestamp (K2-VCR):
                                 consistent, served by the region's own replica
             K2 strong           a read at the key's shard leader (reference)
    report per region: p50/p99 of each; its RTT to the etcd leader; the margin (etcd
           linearizable p50 - K2 replica p50) and PASS when margin >= RTT to the leader;
           JSON, and a PNG when matplotlib is installed

Needs the etcd binary (`apt-get install etcd-server`; --etcd names another). Everything listens
on 127.0.0.1 and stops with the run (members are also killed if this process dies). Timing
reads `truetime.SystemClock` (the one OS-clock reader in K2).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ctypes
import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from k2store import evloop, launcher
from k2store.bench.linkproxy import LOOPBACK, LinkDelay
from k2store.bench.sweep import json_safe, stamp
from k2store.bench.txn import local_cluster, percentile, pyplot
from k2store.client import AsyncClient
from k2store.cluster import DEFAULT_REGIONS, ClusterConfig, ClusterSettings
from k2store.errors import InvalidArgument, K2Error
from k2store.wan import NetworkSettings
from truetime import SystemClock

__all__ = [
    "KINDS",
    "EtcdBenchConfig",
    "EtcdCluster",
    "EtcdError",
    "EtcdGateway",
    "EtcdRun",
    "RegionResult",
    "find_etcd",
    "main",
    "run",
]

DESCRIPTION = (__doc__ or "").replace("How a run goes::", "How a run goes:")
"""`--help`'s text."""

KINDS: tuple[str, ...] = ("etcd-linearizable", "etcd-serializable", "k2-replica", "k2-strong")
"""The reads timed in every region, in this order in tables and plots."""

ELECTED = "elected"
"""--etcd-leader value: leave leadership where the election put it."""

_CLOCK = SystemClock()


class EtcdError(K2Error):
    """etcd could not be started, did not answer, or answered with an error."""

    reason = "etcd"


# -- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EtcdBenchConfig:
    """One run. Defaults give ~200 samples of each read per region in a few minutes."""

    reads: int = 200
    """Rounds per region; each round times one read of every kind."""
    warmup: int = 5
    """Rounds per region run first and not counted (connections, caches)."""
    keys: int = 16
    value_bytes: int = 100
    etcd_leader: str = "us-east"
    """The region whose member should lead etcd, or `ELECTED` to leave the election's choice."""
    jitter_ms: float = 0.0
    """Extra one-way delay, uniform in [0, jitter_ms], on every link: K2's and etcd's."""
    max_seconds: float = 300.0
    """The reading phase stops after this long even if rounds remain (each region's reader
    checks before every round)."""
    heartbeat_ms: int = 100
    """etcd's --heartbeat-interval: about the largest RTT, as etcd's tuning guide advises."""
    election_ms: int = 2000
    """etcd's --election-timeout: well above the 210 ms RTT, so no election while we read."""
    etcd: str = ""
    """The etcd binary; empty: `find_etcd()`."""

    @staticmethod
    def quick(**overrides: Any) -> EtcdBenchConfig:
        return replace(EtcdBenchConfig(reads=20, warmup=2, keys=4, max_seconds=60.0), **overrides)

    def validate(self, regions: Sequence[str]) -> None:
        if self.reads < 1 or self.warmup < 0 or self.keys < 1:
            raise InvalidArgument(
                f"reads and keys must be at least 1, warmup at least 0; got reads={self.reads}, "
                f"keys={self.keys}, warmup={self.warmup}"
            )
        if self.value_bytes < 1 or self.value_bytes > 1 << 20:
            raise InvalidArgument(f"value-bytes must be in [1, 1 MiB], got {self.value_bytes}")
        if self.etcd_leader != ELECTED and self.etcd_leader not in regions:
            raise InvalidArgument(
                f"--etcd-leader {self.etcd_leader!r}: expected one of {', '.join(regions)} "
                f"or {ELECTED}"
            )
        if not (math.isfinite(self.jitter_ms) and self.jitter_ms >= 0):
            raise InvalidArgument(f"jitter-ms must be a finite number >= 0, got {self.jitter_ms}")
        if not (math.isfinite(self.max_seconds) and self.max_seconds > 0):
            raise InvalidArgument(f"max-seconds must be positive, got {self.max_seconds}")
        if self.heartbeat_ms < 1 or self.election_ms < 5 * self.heartbeat_ms:
            raise InvalidArgument(
                "election-ms must be at least 5x heartbeat-ms (etcd refuses less), got "
                f"{self.election_ms} and {self.heartbeat_ms}"
            )


def find_etcd(explicit: str = "") -> str | None:
    """The etcd binary: `explicit`, else `etcd` on PATH, else Debian's /usr/bin/etcd."""
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else shutil.which(explicit)
    found = shutil.which("etcd")
    if found:
        return found
    return "/usr/bin/etcd" if os.access("/usr/bin/etcd", os.X_OK) else None


# -- etcd's JSON gateway ------------------------------------------------------------------------


class EtcdGateway:
    """etcd's v3 JSON gateway (``/v3/kv/range`` etc., keys and values base64) over one kept-alive
    HTTP/1.1 connection to a loopback port: in process and without dependencies, so a timed
    read is one request on a warm connection. One request at a time (callers do not overlap
    on one gateway). Errors: `EtcdError`, naming the port and path."""

    def __init__(self, port: int, *, timeout_s: float = 5.0) -> None:
        self.port = port
        self.timeout_s = timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        w, self._reader, self._writer = self._writer, None, None
        if w is not None:
            w.close()
            with contextlib.suppress(OSError):
                await w.wait_closed()

    async def call(self, path: str, body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """POST `body` as JSON (GET when None); the decoded reply. A gRPC error in the reply
        (``{"error": ..., "code": ...}``) or a status other than 200 raises EtcdError."""
        data = b"" if body is None else json.dumps(body).encode()
        status, reply = await self._exchange("GET" if body is None else "POST", path, data)
        try:
            doc = json.loads(reply) if reply else {}
        except ValueError:
            doc = {"error": reply[:200].decode("latin-1")}
        if status != 200 or not isinstance(doc, dict) or "error" in doc:
            err = doc.get("error") if isinstance(doc, dict) else doc
            raise EtcdError(f"etcd 127.0.0.1:{self.port}{path}: HTTP {status}: {err}")
        return doc

    async def range(self, key: bytes, *, serializable: bool = False) -> bytes | None:
        """The value of `key`: a linearizable read unless `serializable`."""
        req: dict[str, Any] = {"key": _b64(key)}
        if serializable:
            req["serializable"] = True
        kvs = (await self.call("/v3/kv/range", req)).get("kvs") or []
        return base64.b64decode(kvs[0]["value"]) if kvs and "value" in kvs[0] else None

    async def put(self, key: bytes, value: bytes) -> None:
        await self.call("/v3/kv/put", {"key": _b64(key), "value": _b64(value)})

    async def status(self) -> dict[str, Any]:
        return await self.call("/v3/maintenance/status", {})

    async def members(self) -> list[dict[str, Any]]:
        members: list[dict[str, Any]] = (await self.call("/v3/cluster/member/list", {}))["members"]
        return members

    async def healthy(self) -> bool:
        try:
            return (await self.call("/health")).get("health") == "true"
        except EtcdError:
            return False

    async def _exchange(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {LOOPBACK}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        for attempt in range(2):
            fresh = self._writer is None
            try:
                async with asyncio.timeout(self.timeout_s):
                    if self._writer is None:
                        self._reader, self._writer = await asyncio.open_connection(
                            LOOPBACK, self.port
                        )
                    assert self._reader is not None
                    self._writer.write(head + body)
                    status, reply, keep = await _read_response(self._reader)
            except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                await self.close()
                if fresh or attempt:
                    raise EtcdError(f"etcd 127.0.0.1:{self.port}{path}: {e!r}") from None
                continue  # a kept-alive connection the server had closed: once more, anew
            except TimeoutError:
                await self.close()
                raise EtcdError(
                    f"etcd 127.0.0.1:{self.port}{path}: no answer in {self.timeout_s} s"
                ) from None
            if not keep:
                await self.close()
            return status, reply
        raise AssertionError("unreachable")


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


async def _read_response(r: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """Status, body and whether the connection stays open, of one HTTP/1.1 response."""
    status_line = await r.readuntil(b"\r\n")
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ValueError(f"not an HTTP response: {status_line[:80]!r}")
    status = int(parts[1])
    headers: dict[bytes, bytes] = {}
    while (line := await r.readuntil(b"\r\n")) != b"\r\n":
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    keep = headers.get(b"connection", b"").lower() != b"close"
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = bytearray()
        while size := int((await r.readuntil(b"\r\n")).split(b";")[0], 16):
            body += await r.readexactly(size)
            await r.readexactly(2)
        while await r.readuntil(b"\r\n") != b"\r\n":  # trailers
            pass
        return status, bytes(body), keep
    if b"content-length" in headers:
        return status, await r.readexactly(int(headers[b"content-length"])), keep
    return status, await r.read(), False  # delimited by the close


# -- the etcd cluster ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Member:
    """One etcd member and the ports around it (all on 127.0.0.1)."""

    region: str
    client_port: int
    """Where the member serves clients (what setup and leadership calls use, undelayed)."""
    client_link_port: int
    """The proxy that region `region`'s clients go through (the intra-region delay)."""
    peer_port: int
    peer_link_port: int
    """The proxy every other member reaches this one through (its advertised peer URL)."""
    data_dir: Path

    @property
    def peer_url(self) -> str:
        return f"http://{LOOPBACK}:{self.peer_link_port}"


def _pdeathsig(sig: signal.Signals) -> Callable[[], None] | None:
    """A preexec_fn that has the child sent `sig` when the benchmark dies (Linux's
    PR_SET_PDEATHSIG), or None where there is no prctl. Looked up here, in the parent, so the
    forked child only makes the call."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def set_pdeathsig() -> None:
        prctl(1, int(sig))  # PR_SET_PDEATHSIG = 1

    return set_pdeathsig


class EtcdCluster:
    """Three etcd members (one per region) behind link proxies, started by `start()` and
    stopped by `stop()` (or use it as a context manager): members first (SIGTERM, then SIGKILL
    after 3 s), then the proxy process. Only processes this object started are signalled."""

    def __init__(
        self,
        binary: str,
        regions: Sequence[str],
        network: NetworkSettings,
        root: Path,
        *,
        heartbeat_ms: int = 100,
        election_ms: int = 2000,
        lifetime_s: float = 900.0,
    ) -> None:
        self.binary = binary
        self.regions = list(regions)
        self.network = network
        self.root = root
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.lifetime_s = lifetime_s
        ports = launcher.free_ports(4 * len(self.regions))
        self.members: dict[str, Member] = {}
        for i, r in enumerate(self.regions):
            client, client_link, peer, peer_link = ports[4 * i : 4 * i + 4]
            self.members[r] = Member(r, client, client_link, peer, peer_link, root / f"etcd-{r}")
        self.link_stats: dict[str, Any] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._proxy: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> EtcdCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def delay(self, a: str, b: str) -> LinkDelay:
        return LinkDelay.between(self.network, a, b)

    def link_spec(self) -> dict[str, Any]:
        """The proxy process's spec: one client link and one peer link per member."""
        links = []
        for m in self.members.values():
            local = self.delay(m.region, m.region)
            links.append(
                {
                    "name": f"clients in {m.region} -> {m.region}",
                    "listen_port": m.client_link_port,
                    "target_port": m.client_port,
                    "one_way_ms": local.one_way_ms,
                    "jitter_ms": local.jitter_ms,
                }
            )
            others = [o for o in self.members.values() if o is not m]
            routes = {o.peer_url: self.delay(o.region, m.region).one_way_ms for o in others}
            links.append(
                {
                    "name": f"peers -> {m.region}",
                    "listen_port": m.peer_link_port,
                    "target_port": m.peer_port,
                    # A peer request that names no sender (health probes, version checks) pays
                    # the longest delay into this member: never less than the real link.
                    "one_way_ms": max(routes.values(), default=local.one_way_ms),
                    "jitter_ms": self.network.jitter_ms,
                    "route_header": "X-PeerURLs",
                    "routes": routes,
                }
            )
        return {"lifetime_s": self.lifetime_s, "links": links}

    def member_command(self, m: Member, token: str) -> list[str]:
        cluster = ",".join(f"{o.region}={o.peer_url}" for o in self.members.values())
        return [
            self.binary,
            f"--name={m.region}",
            f"--data-dir={m.data_dir}",
            f"--listen-client-urls=http://{LOOPBACK}:{m.client_port}",
            f"--advertise-client-urls=http://{LOOPBACK}:{m.client_link_port}",
            f"--listen-peer-urls=http://{LOOPBACK}:{m.peer_port}",
            f"--initial-advertise-peer-urls={m.peer_url}",
            f"--initial-cluster={cluster}",
            "--initial-cluster-state=new",
            f"--initial-cluster-token={token}",
            f"--heartbeat-interval={self.heartbeat_ms}",
            f"--election-timeout={self.election_ms}",
            "--logger=zap",
            "--log-level=warn",
            "--log-outputs=stderr",
        ]

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        spec = self.root / "links.json"
        spec.write_text(json.dumps(self.link_spec(), indent=1) + "\n")
        proxy_log = (self.root / "linkproxy.log").open("wb")
        with proxy_log:
            self._proxy = subprocess.Popen(
                [
                    *(sys.executable, "-m", "k2store.bench.linkproxy"),
                    *("--spec", str(spec), "--stats-out", str(self.root / "links-stats.json")),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=proxy_log,
                preexec_fn=_pdeathsig(signal.SIGTERM),
            )
        assert self._proxy.stdout is not None
        ready, _, _ = select.select([self._proxy.stdout], [], [], 60.0)
        if not ready or self._proxy.stdout.readline() != b"ready\n":
            raise EtcdError(f"the link proxy did not start: {_tail(self.root / 'linkproxy.log')}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        token = f"k2-bench-{os.getpid()}-{self.members[self.regions[0]].peer_port}"
        for m in self.members.values():
            with (self.root / f"etcd-{m.region}.log").open("wb") as log:
                self._procs[m.region] = subprocess.Popen(
                    self.member_command(m, token),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    # Throwaway data, and a leader sent SIGTERM lingers: kill outright.
                    preexec_fn=_pdeathsig(signal.SIGKILL),
                )

    def stop(self) -> None:
        for p in self._procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self._procs.values():
            try:
                # A leader told to stop first tries to hand leadership to a follower that is
                # stopping too (~9 s of redialing); its data is thrown away, so do not wait.
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self._proxy is not None:
            if self._proxy.stdin is not None:
                self._proxy.stdin.close()  # the proxy's cue to stop and write its stats
            try:
                self._proxy.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proxy.kill()
                self._proxy.wait()
            if self._proxy.stdout is not None:
                self._proxy.stdout.close()
            self._proxy = None
            stats = self.root / "links-stats.json"
            with contextlib.suppress(OSError, ValueError):
                self.link_stats = json.loads(stats.read_text())

    def check_alive(self) -> None:
        for region, p in self._procs.items():
            if p.poll() is not None:
                raise EtcdError(
                    f"etcd member {region} exited with status {p.returncode}: "
                    f"{_tail(self.root / f'etcd-{region}.log')}"
                )

    def admin(self, region: str) -> EtcdGateway:
        """A gateway straight to `region`'s member (no emulated delay): setup, not timing."""
        return EtcdGateway(self.members[region].client_port)

    def client(self, region: str) -> EtcdGateway:
        """A gateway for a client in `region`, through the intra-region link."""
        return EtcdGateway(self.members[region].client_link_port)

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until every member answers /health (which needs an elected leader)."""
        gateways = [self.admin(r) for r in self.regions]
        deadline = _CLOCK.monotonic_ns() + timeout_s * 1e9
        try:
            while True:
                self.check_alive()
                if all([await g.healthy() for g in gateways]):
                    return
                if _CLOCK.monotonic_ns() > deadline:
                    raise EtcdError(
                        f"etcd did not become healthy in {timeout_s:.0f} s: "
                        f"{_tail(self.root / f'etcd-{self.regions[0]}.log')}"
                    )
                await asyncio.sleep(0.2)
        finally:
            for g in gateways:
                await g.close()

    async def leader(self, timeout_s: float = 30.0) -> str:
        """The region whose member leads, once every member names the same one (asked
        directly, polled for up to `timeout_s`: an election or a transfer may be under way)."""
        deadline = _CLOCK.monotonic_ns() + timeout_s * 1e9
        while True:
            gateways = {r: self.admin(r) for r in self.regions}
            try:
                ids = {m["ID"]: m["name"] for m in await gateways[self.regions[0]].members()}
                seen = {ids.get((await g.status())["leader"], "?") for g in gateways.values()}
            except EtcdError as e:
                seen = {f"? ({e})"}
            finally:
                for g in gateways.values():
                    await g.close()
            if len(seen) == 1 and not next(iter(seen)).startswith("?"):
                return str(seen.pop())
            if _CLOCK.monotonic_ns() > deadline:
                raise EtcdError(f"etcd members name no single leader: {sorted(seen)}")
            await asyncio.sleep(0.1)

    async def move_leader(self, region: str, timeout_s: float = 30.0) -> None:
        """Make `region`'s member the leader (etcd's MoveLeader, asked of the leader)."""
        deadline = _CLOCK.monotonic_ns() + timeout_s * 1e9
        while (current := await self.leader()) != region:
            if _CLOCK.monotonic_ns() > deadline:
                raise EtcdError(f"etcd leadership did not move to {region} (still {current})")
            g = self.admin(current)
            try:
                ids = {m["name"]: m["ID"] for m in await g.members()}
                with contextlib.suppress(EtcdError):  # a leader change under way: ask again
                    await g.call("/v3/maintenance/transfer-leadership", {"targetID": ids[region]})
            finally:
                await g.close()
            await asyncio.sleep(0.2)

    def version(self) -> str:
        try:
            out = subprocess.run(
                [self.binary, "--version"], capture_output=True, timeout=10, check=False
            ).stdout.decode(errors="replace")
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        first = out.splitlines()[0] if out else "?"
        return first.removeprefix("etcd Version:").strip()


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- results ------------------------------------------------------------------------------------


@dataclass
class KindLatency:
    count: int
    errors: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    first_error: str = ""

    @staticmethod
    def of(samples_ms: Sequence[float], errors: int, first_error: str = "") -> KindLatency:
        s = sorted(samples_ms)
        mean = sum(s) / len(s) if s else math.nan
        return KindLatency(
            len(s), errors, percentile(s, 50), percentile(s, 99), mean, first_error[:300]
        )


@dataclass
class RegionResult:
    region: str
    rtt_to_leader_ms: float
    """Round trip from this region to the etcd leader's region (K2's matrix)."""
    latency: dict[str, KindLatency]
    samples_ms: dict[str, list[float]] = field(default_factory=dict)

    @property
    def margin_ms(self) -> float:
        """etcd linearizable p50 - K2 replica p50."""
        return self.latency["etcd-linearizable"].p50_ms - self.latency["k2-replica"].p50_ms

    @property
    def target_met(self) -> bool:
        return self.margin_ms >= self.rtt_to_leader_ms

    def to_json(self) -> dict[str, Any]:
        return {
            "region": self.region,
            "rtt_to_leader_ms": self.rtt_to_leader_ms,
            "margin_ms": self.margin_ms,
            "target_met": self.target_met,
            "latency": {k: asdict(v) for k, v in self.latency.items()},
            "samples_ms": {k: [round(x, 3) for x in v] for k, v in self.samples_ms.items()},
        }


@dataclass
class EtcdRun:
    config: EtcdBenchConfig
    etcd_version: str
    regions: list[str]
    leader: str
    """The etcd leader's region while reading."""
    elected: str
    """Where the election first put it."""
    network: NetworkSettings
    results: list[RegionResult] = field(default_factory=list)
    leader_after: str = ""
    """The leader once reading was done: a change means some reads paid an election."""
    elapsed_s: float = 0.0
    link_stats: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": "etcd",
            "config": asdict(self.config),
            "etcd_version": self.etcd_version,
            "regions": self.regions,
            "leader": self.leader,
            "elected_leader": self.elected,
            "leader_after": self.leader_after,
            "elapsed_s": self.elapsed_s,
            "network": {
                "rtt_ms": {
                    f"{a}<->{b}": self.network.rtt_of(a, b)
                    for i, a in enumerate(self.regions)
                    for b in self.regions[i + 1 :]
                },
                "intra_region_rtt_ms": self.network.intra_region_rtt_ms,
                "jitter_ms": self.network.jitter_ms,
            },
            "target": "margin_ms (etcd linearizable p50 - K2 replica p50) >= rtt_to_leader_ms",
            "all_targets_met": all(r.target_met for r in self.results),
            "results": [r.to_json() for r in self.results],
            "links": self.link_stats,
        }


# -- the run ------------------------------------------------------------------------------------


def _ms_since(t0_ns: int) -> float:
    return (_CLOCK.monotonic_ns() - t0_ns) / 1e6


def etcd_key(i: int) -> bytes:
    return f"k2-bench/etcd/{i}".encode()


def k2_key(home: str, i: int) -> bytes:
    return f"{home}/bench-etcd/{i}".encode()


def value_of(i: int, size: int) -> bytes:
    return (f"v{i}:".encode() + b"." * size)[:size]


Read = Callable[[int], Awaitable["bytes | None"]]


async def _reader(
    region: str,
    reads: Mapping[str, Read],
    bc: EtcdBenchConfig,
    deadline_ns: float,
) -> RegionResult:
    """One region's closed loop: every round reads key `round % keys` once per kind, rotating
    the order so no kind always goes first (or always right after another)."""
    samples: dict[str, list[float]] = {k: [] for k in reads}
    errors = dict.fromkeys(reads, 0)
    first_error = dict.fromkeys(reads, "")
    kinds = list(reads)
    for i in range(bc.warmup + bc.reads):
        if _CLOCK.monotonic_ns() > deadline_ns:
            break
        i_key = i % bc.keys
        want = value_of(i_key, bc.value_bytes)
        for j in range(len(kinds)):
            kind = kinds[(i + j) % len(kinds)]
            t0 = _CLOCK.monotonic_ns()
            try:
                got = await reads[kind](i_key)
                problem = "" if got == want else f"read {got!r:.60}, expected {want!r:.60}"
            except K2Error as e:
                problem = f"{type(e).__name__}: {e}"
            ms = _ms_since(t0)
            if i < bc.warmup:
                continue
            if problem:
                errors[kind] += 1
                first_error[kind] = first_error[kind] or problem
            else:
                samples[kind].append(ms)
    return RegionResult(
        region,
        0.0,
        {k: KindLatency.of(samples[k], errors[k], first_error[k]) for k in reads},
        samples,
    )


async def _load(etcd: EtcdCluster, leader: str, k2: AsyncClient, bc: EtcdBenchConfig) -> None:
    """Write the keys to both stores, then wait until K2's replicas in every region serve them."""
    g = etcd.admin(leader)
    try:
        for i in range(bc.keys):
            await g.put(etcd_key(i), value_of(i, bc.value_bytes))
    finally:
        await g.close()
    for i in range(bc.keys):
        await k2.put(k2_key(leader, i), value_of(i, bc.value_bytes))


async def _wait_replicated(
    clients: Mapping[str, AsyncClient], leader: str, bc: EtcdBenchConfig
) -> None:
    keys = [k2_key(leader, i) for i in range(bc.keys)]
    want = [value_of(i, bc.value_bytes) for i in range(bc.keys)]
    deadline = _CLOCK.monotonic_ns() + 30e9
    for region, c in clients.items():
        while await c.replica_snapshot().get_many(keys) != want:
            if _CLOCK.monotonic_ns() > deadline:
                raise EtcdError(f"K2's replicas in {region} did not serve the keys in 30 s")
            await asyncio.sleep(0.05)


async def measure(cfg: ClusterConfig, etcd: EtcdCluster, bc: EtcdBenchConfig) -> EtcdRun:
    """Everything after the processes are up: leader, data, reads, the leader again."""
    await etcd.wait_ready()
    elected = await etcd.leader()
    if bc.etcd_leader != ELECTED:
        await etcd.move_leader(bc.etcd_leader)
    leader = await etcd.leader()
    regions = etcd.regions
    run = EtcdRun(bc, etcd.version(), regions, leader, elected, etcd.network)
    k2 = {r: AsyncClient(cfg, region=r) for r in regions}
    gateways = {r: etcd.client(r) for r in regions}
    try:
        await _load(etcd, leader, k2[leader], bc)
        await _wait_replicated(k2, leader, bc)

        def reads_for(r: str) -> dict[str, Read]:
            g, c = gateways[r], k2[r]

            async def linearizable(i: int) -> bytes | None:
                return await g.range(etcd_key(i))

            async def serializable(i: int) -> bytes | None:
                return await g.range(etcd_key(i), serializable=True)

            async def replica(i: int) -> bytes | None:
                return await c.replica_snapshot().get(k2_key(leader, i))

            async def strong(i: int) -> bytes | None:
                return await c.get(k2_key(leader, i))

            return dict(zip(KINDS, (linearizable, serializable, replica, strong), strict=True))

        t0 = _CLOCK.monotonic_ns()
        deadline = t0 + bc.max_seconds * 1e9
        results = await asyncio.gather(*(_reader(r, reads_for(r), bc, deadline) for r in regions))
        run.elapsed_s = _ms_since(t0) / 1000
        for res in results:
            res.rtt_to_leader_ms = etcd.network.rtt_of(res.region, leader)
        run.results = list(results)
        try:
            run.leader_after = await etcd.leader(timeout_s=10)
        except EtcdError as e:
            run.leader_after = f"unknown ({e})"
    finally:
        for g in gateways.values():
            await g.close()
        for c in k2.values():
            await c.close()
    return run


def settings_for(bc: EtcdBenchConfig) -> ClusterSettings:
    """K2 with DESIGN's wide-area latencies (and the run's jitter): what etcd's links copy."""
    base = ClusterSettings()
    return replace(base, network=replace(base.network, enabled=True, jitter_ms=bc.jitter_ms))


@contextlib.contextmanager
def _clusters(
    binary: str, bc: EtcdBenchConfig, data: Path, progress: bool
) -> Iterator[tuple[ClusterConfig, EtcdCluster]]:
    settings = settings_for(bc)
    lifetime = bc.max_seconds + 600  # setup and teardown on a loaded machine
    etcd = EtcdCluster(
        binary,
        DEFAULT_REGIONS,
        settings.network,
        data / "etcd",
        heartbeat_ms=bc.heartbeat_ms,
        election_ms=bc.election_ms,
        lifetime_s=lifetime,
    )
    with etcd, local_cluster(data / "k2", settings, progress=progress) as cfg:
        yield cfg, etcd


def run(bc: EtcdBenchConfig, data: Path, *, progress: bool = False) -> EtcdRun:
    """One full run on fresh clusters under `data` (both stopped before this returns)."""
    bc.validate(DEFAULT_REGIONS)
    binary = find_etcd(bc.etcd)
    if binary is None:
        raise EtcdError(
            f"etcd binary not found ({bc.etcd or 'etcd on PATH, /usr/bin/etcd'}): "
            "apt-get install etcd-server, or pass --etcd PATH"
        )
    with _clusters(binary, bc, data, progress) as (cfg, etcd):
        result = evloop.run(measure(cfg, etcd, bc))
    result.link_stats = etcd.link_stats
    return result


# -- reporting ----------------------------------------------------------------------------------


def _p(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.1f}"


def format_run(r: EtcdRun) -> str:
    bc = r.config
    moved = "" if r.elected == r.leader else f" (moved from {r.elected})"
    lines = [
        f"etcd {r.etcd_version}, leader {r.leader}{moved}; {bc.reads} rounds per region "
        f"({bc.warmup} warm-up), {bc.keys} keys of {bc.value_bytes} B, {r.elapsed_s:.1f} s",
        "links: "
        + ", ".join(
            f"{a}<->{b} {r.network.rtt_of(a, b):g} ms"
            for i, a in enumerate(r.regions)
            for b in r.regions[i + 1 :]
        )
        + f" RTT, {r.network.intra_region_rtt_ms:g} ms inside a region, "
        f"jitter {r.network.jitter_ms:g} ms",
        "",
        f"{'region':<14} {'RTT to':>7} {'etcd lin':>13} {'etcd ser':>13} {'K2 replica':>13} "
        f"{'K2 strong':>13} {'margin':>7}  target (margin >= RTT to leader)",
        f"{'':<14} {'leader':>7} " + " ".join(f"{'p50 / p99':>13}" for _ in KINDS) + f" {'ms':>7}",
    ]
    for res in r.results:
        cells = " ".join(
            f"{_p(res.latency[k].p50_ms) + ' / ' + _p(res.latency[k].p99_ms):>15}" for k in KINDS
        )
        verdict = "PASS" if res.target_met else "FAIL"
        lines.append(
            f"{res.region:<14} {res.rtt_to_leader_ms:>7g} {cells} {_p(res.margin_ms):>7}  "
            f"{verdict} ({_p(res.margin_ms)} vs {res.rtt_to_leader_ms:g})"
        )
    errs = [
        f"{res.region} {k}: {res.latency[k].errors} ({res.latency[k].first_error})"
        for res in r.results
        for k in KINDS
        if res.latency[k].errors
    ]
    lines.append("failed reads: " + ("; ".join(errs) if errs else "none"))
    if r.leader_after and r.leader_after != r.leader:
        lines.append(
            f"WARNING: etcd's leader changed from {r.leader} to {r.leader_after} while reading"
        )
    met = sum(res.target_met for res in r.results)
    lines.append(f"target met in {met} of {len(r.results)} regions")
    return "\n".join(lines)


def plot(r: EtcdRun, path: Path) -> bool:
    """Bars: p50 of each read per region (ticks: p99); a dashed line marks K2 replica p50 + the
    region's RTT to the leader, which etcd's linearizable bar must reach for the target.
    False, drawing nothing, without matplotlib."""
    plt = pyplot()
    if plt is None or not r.results:
        return False
    fig, ax = plt.subplots(figsize=(max(6.0, 2.6 * len(r.results)) + 3.0, 4.2))
    width = 0.8 / len(KINDS)
    for j, kind in enumerate(KINDS):
        xs = [i + j * width for i in range(len(r.results))]
        p50 = [res.latency[kind].p50_ms for res in r.results]
        p99 = [res.latency[kind].p99_ms for res in r.results]
        ax.bar(xs, p50, width, label=f"{kind} p50")
        ax.scatter(xs, p99, marker="_", s=200, color="black")
    for i, res in enumerate(r.results):
        need = res.latency["k2-replica"].p50_ms + res.rtt_to_leader_ms
        ax.hlines(need, i - width / 2, i + width / 2, colors="black", linestyles="dashed")
    ax.plot([], [], color="black", linestyle="dashed", label="K2 replica p50 + RTT to leader")
    ax.set_xticks([i + width * (len(KINDS) - 1) / 2 for i in range(len(r.results))])
    ax.set_xticklabels(
        [f"{res.region}\n(RTT to leader {res.rtt_to_leader_ms:g} ms)" for res in r.results],
        fontsize=8,
    )
    ax.set_ylabel("read latency, ms (bar p50, tick p99)")
    ax.set_yscale("log")
    ax.set_title(f"reads by region; etcd leader in {r.leader}")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_results(r: EtcdRun, out: Path) -> tuple[Path, Path | None]:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"etcd-{stamp()}"
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(json_safe(r.to_json()), indent=1, allow_nan=False) + "\n")
    png = stem.with_suffix(".png")
    return json_path, png if plot(r, png) else None


# -- command line -------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `k2 bench etcd` (None: EtcdBenchConfig's default, or --quick's)."""
    d = EtcdBenchConfig()
    q = EtcdBenchConfig.quick()
    p.add_argument(
        "--reads",
        type=int,
        default=None,
        metavar="N",
        help=f"rounds per region, one read of each kind per round (default {d.reads}, "
        f"--quick {q.reads})",
    )
    p.add_argument("--warmup", type=int, default=None, metavar="N", help="uncounted first rounds")
    p.add_argument("--keys", type=int, default=None, metavar="N", help=f"default {d.keys}")
    p.add_argument("--value-bytes", type=int, default=None, metavar="B")
    p.add_argument(
        "--etcd-leader",
        default=d.etcd_leader,
        metavar="REGION",
        help=f"move etcd's leadership to this region's member, or '{ELECTED}' to leave it "
        "(default %(default)s)",
    )
    p.add_argument(
        "--jitter-ms",
        type=float,
        metavar="MS",
        default=d.jitter_ms,
        help="extra one-way delay, uniform in [0, J], on every link of both stores",
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        metavar="S",
        help=f"stop reading after this long (default {d.max_seconds:g}, --quick {q.max_seconds:g})",
    )
    p.add_argument(
        "--heartbeat-ms",
        type=int,
        default=d.heartbeat_ms,
        metavar="MS",
        help="etcd's --heartbeat-interval (default %(default)s)",
    )
    p.add_argument(
        "--election-ms",
        type=int,
        default=d.election_ms,
        metavar="MS",
        help="etcd's --election-timeout (default %(default)s)",
    )
    p.add_argument(
        "--etcd", default="", metavar="PATH", help="the etcd binary (default: etcd on PATH)"
    )
    p.add_argument(
        "--quick", action="store_true", help="a short run (CI smoke test, about a minute)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench-results"),
        help="directory for the JSON and PNG (default: %(default)s)",
    )


def config_from_args(args: argparse.Namespace) -> EtcdBenchConfig:
    overrides = {
        k: v
        for k, v in {
            "reads": args.reads,
            "warmup": args.warmup,
            "keys": args.keys,
            "value_bytes": args.value_bytes,
            "etcd_leader": args.etcd_leader,
            "jitter_ms": args.jitter_ms,
            "max_seconds": args.max_seconds,
            "heartbeat_ms": args.heartbeat_ms,
            "election_ms": args.election_ms,
            "etcd": args.etcd,
        }.items()
        if v is not None
    }
    return EtcdBenchConfig.quick(**overrides) if args.quick else EtcdBenchConfig(**overrides)


def main(args: argparse.Namespace) -> int:
    """`k2 bench etcd`: run, print the table, write JSON (and a PNG). 0 when the run completed
    (whether or not every target was met: the table says), 1 when it could not run."""
    bc = config_from_args(args)
    bc.validate(DEFAULT_REGIONS)
    print(
        "[etcd] starting three etcd members behind link proxies and a local 3-region K2 "
        "cluster ...",
        file=sys.stderr,
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="k2-bench-etcd-") as tmp:
        result = run(bc, Path(tmp), progress=sys.stderr.isatty())
    print(format_run(result), flush=True)
    json_path, png = write_results(result, args.out)
    print(f"results: {json_path}")
    print(f"plot:    {png}" if png else "plot:    skipped (matplotlib is not installed)")
    return 0
