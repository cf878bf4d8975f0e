"""Local clusters: start, inspect and stop K2 node processes on loopback.

`up` writes a cluster file into the data directory, starts one `k2 node` process per node in its
own session (so a Ctrl-C in the terminal does not reach it), sends each node's output to
``<data>/<node>/node.log``, and returns only once every node answers gRPC health checks. If any
node fails to come up, `up` stops the others and raises with the tail of that node's log.

`down` finds the nodes through the lock files in their data directories (each holds its owner's
pid, and a node restarted by hand with `k2 node` is found the same way), sends SIGTERM, waits, and
SIGKILLs stragglers: no process is left behind. `status` asks each node's Admin service.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from k2store import cluster as cluster_mod
from k2store.certs import CERTS_DIR, open_channel, secure_cluster
from k2store.cluster import DEFAULT_REGIONS, ClusterConfig, ClusterSettings, NodeConfig
from k2store.errors import ClusterFileError, K2Error, Unavailable
from k2store.proto import k2_pb2 as pb
from k2store.security import bearer_metadata, client_token
from k2store.wan import OVERRIDES_FILE, LinkModel, NetOverrides, read_overrides, write_overrides
from truetime import ClockSkew, SystemClock
from truetime.skew import CLOCK_FILE
from truetime.skew import write_clock_skews as write_skew_file

CLUSTER_FILE = "cluster.toml"
_CLOCK = SystemClock()


class LaunchError(K2Error):
    reason = "launch"


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together while choosing, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def node_command(cluster_file: Path, node: str) -> list[str]:
    return [sys.executable, "-m", "k2store", "node", "--cluster", str(cluster_file), "--node", node]


_children: dict[int, subprocess.Popen[bytes]] = {}
"""Node processes this process started. Kept so they are reaped (`down`, `_reap`) rather than
garbage-collected while running: a node outlives the `up` call that started it."""


PARENT_ENV = "K2_STOP_WITH_PARENT"
"""Set by a command that owns the nodes it starts (`k2 bench`) to its own pid: such a node stops
when that process ends, even by kill -9 (see `stop_with_parent`)."""


def stop_with_parent() -> None:
    """In a node started with `start_node(..., with_parent=True)`: ask Linux to send this
    process SIGTERM (the signal `down` sends) when its parent dies, and stop now if the parent
    is already gone. Nodes sit in sessions of their own, so nothing else would stop them when a
    benchmark is killed. Elsewhere (no prctl) it does nothing."""
    want = os.environ.pop(PARENT_ENV, "")
    if not want.isdigit() or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0) != 0:
        return
    if os.getppid() != int(want):  # it died before the prctl took effect
        raise SystemExit(f"parent process {want} is gone; not starting")


def _child_env(with_parent: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.pop(PARENT_ENV, None)
    if with_parent:
        env[PARENT_ENV] = str(os.getpid())
    return env


def start_node(
    cfg: ClusterConfig, node: NodeConfig, *, with_parent: bool = False
) -> subprocess.Popen[bytes]:
    """Start `k2 node` for node in its own session, appending its output to <data_dir>/node.log.
    `with_parent`: the node stops when this process ends (`stop_with_parent`). Linux sends that
    signal when the *thread* that started the node ends, so only a long-lived thread (the main
    one) may ask for it."""
    assert cfg.path is not None
    node.data_dir.mkdir(parents=True, exist_ok=True)
    log = open(node.data_dir / "node.log", "ab")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(
            node_command(cfg.path, node.name),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=_child_env(with_parent),
        )
    finally:
        log.close()
    _children[proc.pid] = proc
    return proc


def check_health(
    address: str, timeout_s: float = 1.0, cluster: ClusterConfig | None = None
) -> bool:
    """Whether the node at `address` answers SERVING (over TLS when `cluster` is secured)."""
    ch = open_channel(cluster, address) if cluster is not None else grpc.insecure_channel(address)
    with ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
        return bool(r.status == health_pb2.HealthCheckResponse.SERVING)


def log_tail(node: NodeConfig, lines: int = 15) -> str:
    try:
        text = (node.data_dir / "node.log").read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + ln for ln in text[-lines:])


def wait_healthy(
    cfg: ClusterConfig,
    procs: dict[str, subprocess.Popen[bytes]],
    timeout_s: float,
    progress: bool = True,
) -> None:
    from tqdm import tqdm

    pending = {n.name: n for n in cfg.nodes if n.name in procs}
    deadline = _CLOCK.monotonic_ns() / 1e9 + timeout_s
    with tqdm(
        total=len(pending), desc="nodes healthy", unit="node", disable=not progress, leave=False
    ) as bar:
        while pending:
            for name, n in list(pending.items()):
                code = procs[name].poll()
                if code is not None:
                    raise LaunchError(
                        f"node {name} exited with status {code} while starting:\n{log_tail(n)}"
                    )
                if check_health(n.address, 0.5, cfg):
                    del pending[name]
                    bar.update(1)
            if pending and _CLOCK.monotonic_ns() / 1e9 > deadline:
                names = ", ".join(sorted(pending))
                raise LaunchError(
                    f"nodes not healthy after {timeout_s:.0f}s: {names}\n"
                    + "\n".join(f"  {m}:\n{log_tail(pending[m])}" for m in sorted(pending))
                )
            if pending:
                time.sleep(0.1)


def up(
    data: Path,
    *,
    regions: Sequence[str] = DEFAULT_REGIONS,
    nodes_per_region: int = 1,
    shards_per_region: int = 1,
    timeout_s: float = 60.0,
    progress: bool = True,
    settings: ClusterSettings | None = None,
    wan: bool = True,
    blockstores: bool = False,
    secure: bool = False,
    tenants: Sequence[str] = (),
    with_parent: bool = False,
    blockstore_memory_mb: int | None = None,
) -> ClusterConfig:
    """Start a local cluster in data; `settings` (e.g. the [txn] protocol) go into its file.

    `wan`: emulate DESIGN.md's wide-area latency and bandwidth between regions (sets `[network]
    enabled`, keeping the other `[network]` values of `settings`). Stale run-time overrides
    (net.toml) of an earlier cluster in `data` are removed.

    `blockstores`: also start one KV-cache block store per region (`k2 blockstore`, see
    `start_blockstores`) once the nodes are healthy, each with a memory tier of
    `blockstore_memory_mb` (default: `k2 blockstore`'s).

    `secure`: mutual TLS and client tokens (`k2store/certs.py`): a fresh CA, node and client
    certificates and tokens under ``<data>/certs`` (an ``operator`` admin, one principal per name
    in `tenants`); tools started from the cluster file use the operator's token.

    `with_parent`: every process started stops when this one ends (a benchmark's or a demo's
    cluster; see `stop_with_parent`); `k2 cluster up` leaves its cluster running instead."""
    data = data.resolve()
    cluster_file = data / CLUSTER_FILE
    if cluster_file.exists():
        running = running_nodes(cluster_mod.load(cluster_file))
        if running:
            raise LaunchError(
                f"a cluster is already running from {data} (nodes {', '.join(sorted(running))}); "
                f"run `k2 cluster down --data {data}` first"
            )
    data.mkdir(parents=True, exist_ok=True)
    (data / OVERRIDES_FILE).unlink(missing_ok=True)
    st = settings or ClusterSettings()
    st = replace(st, network=replace(st.network, enabled=wan))
    ports = free_ports(len(regions) * nodes_per_region)
    cfg = cluster_mod.local_cluster(
        regions,
        ports,
        nodes_per_region=nodes_per_region,
        shards_per_region=shards_per_region,
        root=data,
        settings=st,
    ).write(cluster_file)
    if secure:
        shutil.rmtree(data / CERTS_DIR, ignore_errors=True)  # a new cluster: new credentials
        cfg = secure_cluster(cfg, now_ns=_CLOCK.now_ns(), tenants=tenants)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for n in cfg.nodes:
            procs[n.name] = start_node(cfg, n, with_parent=with_parent)
        wait_healthy(cfg, procs, timeout_s, progress)
        if blockstores:
            start_blockstores(
                cfg, timeout_s=timeout_s, with_parent=with_parent, memory_mb=blockstore_memory_mb
            )
    except BaseException:
        for p in procs.values():
            with contextlib.suppress(ProcessLookupError):
                p.kill()
        for p in procs.values():
            p.wait()
        raise
    (data / "pids.json").write_text(json.dumps({k: p.pid for k, p in procs.items()}))
    return cfg


def _node_pid(node: NodeConfig) -> int | None:
    """The pid holding the node's data-dir lock, if that process is alive and is a K2 node."""
    try:
        text = (node.data_dir / "LOCK.k2").read_text().strip()
        pid = int(text)
    except (OSError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if b"k2" not in cmdline or node.name.encode() not in cmdline:
        return None  # a recycled pid that belongs to someone else
    return pid


def running_nodes(cfg: ClusterConfig) -> dict[str, int]:
    out = {}
    for n in cfg.nodes:
        pid = _node_pid(n)
        if pid is not None and _alive(pid):
            out[n.name] = pid
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def down(cfg: ClusterConfig, *, timeout_s: float = 15.0) -> dict[str, str]:
    """Stop every node of cfg; returns node -> how it ended ("stopped", "killed", "not running")."""
    result = {n.name: "not running" for n in cfg.nodes}
    pids = running_nodes(cfg)
    if cfg.path is not None:
        with contextlib.suppress(OSError, ValueError):
            for name, pid in json.loads((cfg.path.parent / "pids.json").read_text()).items():
                node = next((n for n in cfg.nodes if n.name == name), None)
                if (
                    node is not None
                    and name not in pids
                    and _alive(pid)
                    and _node_pid(node) in (None, pid)
                ):
                    cmd = (
                        Path(f"/proc/{pid}/cmdline").read_bytes()
                        if Path(f"/proc/{pid}/cmdline").exists()
                        else b""
                    )
                    if name.encode() in cmd:
                        pids[name] = pid
    for name, pid in pids.items():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)  # a paused node cannot handle SIGTERM
            os.kill(pid, signal.SIGTERM)
            result[name] = "stopped"
    deadline = _CLOCK.monotonic_ns() / 1e9 + timeout_s
    while any(_alive(p) for p in pids.values()) and _CLOCK.monotonic_ns() / 1e9 < deadline:
        _reap()
        time.sleep(0.05)
    for name, pid in pids.items():
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            result[name] = "killed"
    for pid in pids.values():
        while _alive(pid):
            _reap()
            time.sleep(0.01)
    _reap(pids.values())
    if cfg.path is not None:
        with contextlib.suppress(FileNotFoundError):
            (cfg.path.parent / "pids.json").unlink()
    result.update(stop_blockstores(cfg, timeout_s=timeout_s))
    return result


def _reap(stopped: Iterable[int] = ()) -> None:
    """Collect exit statuses of our own node children, so killed ones do not linger as zombies.
    `stopped`: pids known to have ended (`_alive` counts a zombie as gone before `poll` has
    collected it): waited for, so no Popen of ours is left unreaped (Python warns about those
    at exit)."""
    for pid in stopped:
        proc = _children.pop(pid, None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
    for pid, proc in list(_children.items()):
        if proc.poll() is not None:
            del _children[pid]


@dataclass(frozen=True, slots=True)
class NodeStatus:
    name: str
    region: str
    address: str
    up: bool
    pid: int | None = None
    shards: tuple[int, ...] = ()
    keys: int = 0
    uncertainty_us: float = 0.0
    uptime_s: float = 0.0
    oracle: bool = False
    error: str = ""
    now_latest: int = 0
    replication: pb.ReplicationStatus | None = None
    """Seals, log positions, replica lag and visibility delays (None when down)."""
    client_clock_ahead: int = 0
    """Transactions whose client's clock read ahead of this node's (StatusResponse)."""
    restamps: int = 0
    """Requests its shards restamped instead of aborting (TxnSettings.restamp)."""


def status(cfg: ClusterConfig, timeout_s: float = 2.0) -> list[NodeStatus]:
    out = []
    token = client_token(cfg.settings.security) if cfg.settings.security.tls else None
    metadata = bearer_metadata(token) if token else None
    for n in cfg.nodes:
        with open_channel(cfg, n.address) as ch:
            stub: Any = ch.unary_unary(
                "/k2.v1.Admin/Status",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=pb.StatusResponse.FromString,
            )
            try:
                r: pb.StatusResponse = stub(
                    pb.StatusRequest(), timeout=timeout_s, metadata=metadata
                )
            except grpc.RpcError as e:
                detail = e.details() if isinstance(e, grpc.Call) else str(e)
                out.append(
                    NodeStatus(n.name, n.region, n.address, False, error=detail or "unreachable")
                )
                continue
        out.append(
            NodeStatus(
                n.name,
                n.region,
                n.address,
                True,
                pid=r.pid,
                shards=tuple(s.id for s in r.shards),
                keys=sum(s.keys_estimate for s in r.shards),
                uncertainty_us=r.uncertainty_ns / 1000,
                uptime_s=r.uptime_s,
                oracle=r.is_oracle,
                now_latest=r.now_latest,
                replication=r.replication,
                client_clock_ahead=r.client_clock_ahead,
                restamps=sum(s.restamps for s in r.shards),
            )
        )
    return out


def load_cluster(data: Path | None, cluster_file: Path | None) -> ClusterConfig:
    if cluster_file is not None:
        return cluster_mod.load(cluster_file)
    assert data is not None
    path = data / CLUSTER_FILE
    if not path.exists():
        raise Unavailable(
            f"no cluster at {data.resolve()} (no {CLUSTER_FILE}); start one with `k2 cluster up`"
        )
    return cluster_mod.load(path)


# -- run-time network overrides (`k2 cluster net`) -----------------------------------------------


def net_overrides_path(cfg: ClusterConfig) -> Path:
    """The overrides file every node and client of `cfg` watches: net.toml beside the file."""
    if cfg.path is None:
        raise Unavailable("the cluster has no cluster file, so no network overrides file")
    return cfg.path.parent / OVERRIDES_FILE


def net_model(cfg: ClusterConfig) -> LinkModel:
    """The link model the cluster's processes are (or will be within ~0.1 s) using."""
    return LinkModel(cfg.settings.network, read_net_overrides(cfg))


def read_net_overrides(cfg: ClusterConfig) -> NetOverrides:
    try:
        return read_overrides(net_overrides_path(cfg))
    except ValueError as e:
        raise ClusterFileError(str(e)) from None


def write_net_overrides(cfg: ClusterConfig, overrides: NetOverrides) -> None:
    """Atomically replace the overrides file (or remove it when `overrides` is empty); every
    name in it must be a region or a node of `cfg`, so a typo fails here, not silently."""
    known = set(cfg.region_names()) | {n.name for n in cfg.nodes}
    names = {x for c in overrides.cuts for x in c} | set(overrides.isolated)
    names |= {x for key in overrides.links for x in key}
    unknown = sorted(names - known)
    if unknown:
        raise ClusterFileError(
            f"unknown region or node {', '.join(map(repr, unknown))}; the cluster has regions "
            f"{cfg.region_names()} and nodes {[n.name for n in cfg.nodes]}"
        )
    write_overrides(net_overrides_path(cfg), overrides)


# -- run-time clock skew (the Jepsen clock nemesis; truetime/skew.py) -----------------------------


def clock_skews_path(cfg: ClusterConfig) -> Path:
    """The skew file every node of `cfg` watches: clock.toml beside the cluster file."""
    if cfg.path is None:
        raise Unavailable("the cluster has no cluster file, so no clock skew file")
    return cfg.path.parent / CLOCK_FILE


def write_clock_skews(cfg: ClusterConfig, skews: Mapping[str, ClockSkew]) -> None:
    """Atomically replace the skew file (or remove it when nothing is skewed); every name must
    be a node or a region of `cfg`. The nodes apply it within ~0.1 s."""
    known = set(cfg.region_names()) | {n.name for n in cfg.nodes}
    unknown = sorted(set(skews) - known)
    if unknown:
        raise ClusterFileError(
            f"unknown region or node {', '.join(map(repr, unknown))}; the cluster has regions "
            f"{cfg.region_names()} and nodes {[n.name for n in cfg.nodes]}"
        )
    write_skew_file(clock_skews_path(cfg), skews)


# -- KV-cache block stores (kvtier), one per region ----------------------------------------------

BLOCKSTORES_FILE = "blockstores.json"
_BLOCKSTORE_STATS = "/k2.kvtier.v1.BlockStore/Stats"


def blockstore_command(
    cluster_file: Path, region: str, port: int, data_dir: Path, memory_mb: int | None = None
) -> list[str]:
    return [
        *(sys.executable, "-m", "k2store", "blockstore", "--cluster", str(cluster_file)),
        *("--region", region, "--port", str(port), "--data", str(data_dir)),
        *(("--memory-mb", str(memory_mb)) if memory_mb is not None else ()),
    ]


def _blockstore_answers(cfg: ClusterConfig, address: str, timeout_s: float = 0.5) -> bool:
    # A raw call (empty StatsRequest, response left unparsed): k2store does not import kvtier.
    # Secured: TLS and the operator's token (Stats needs the admin role).
    tok = client_token(cfg.settings.security) if cfg.settings.security.tls else None
    with open_channel(cfg, address) as ch:
        stub: Any = ch.unary_unary(
            _BLOCKSTORE_STATS,
            request_serializer=lambda _: b"",
            response_deserializer=lambda b: b,
        )
        try:
            stub(None, timeout=timeout_s, metadata=bearer_metadata(tok) if tok else None)
        except grpc.RpcError as e:
            # A refusal (a token without the admin role) still means the store is serving.
            code = e.code() if isinstance(e, grpc.Call) else None
            return code not in (
                None,
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
        return True


def start_blockstores(
    cfg: ClusterConfig,
    *,
    timeout_s: float = 60.0,
    with_parent: bool = False,
    memory_mb: int | None = None,
) -> dict[str, str]:
    """Start one block store process per region (data in <data>/blockstore-<region>, output in
    its blockstore.log) and wait until each answers. A block store registers its address in its
    region's metadata row before it serves, so once this returns connectors can find it.
    Returns region -> address; on failure stops the ones it started and raises LaunchError."""
    assert cfg.path is not None
    root = cfg.path.parent
    ports = free_ports(len(cfg.regions))
    started: dict[str, tuple[subprocess.Popen[bytes], str, Path]] = {}
    try:
        for region, port in zip(cfg.region_names(), ports, strict=True):
            d = root / f"blockstore-{region}"
            d.mkdir(parents=True, exist_ok=True)
            with open(d / "blockstore.log", "ab") as log:
                proc = subprocess.Popen(
                    blockstore_command(cfg.path, region, port, d, memory_mb),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env=_child_env(with_parent),
                )
            _children[proc.pid] = proc
            started[region] = (proc, f"127.0.0.1:{port}", d)
        deadline = _CLOCK.monotonic_ns() / 1e9 + timeout_s
        pending = dict(started)
        while pending:
            for region, (proc, address, d) in list(pending.items()):
                if proc.poll() is not None:
                    tail = (d / "blockstore.log").read_text(errors="replace").splitlines()[-15:]
                    raise LaunchError(
                        f"block store for {region} exited with status {proc.returncode}:\n"
                        + "\n".join("    " + ln for ln in tail)
                    )
                if _blockstore_answers(cfg, address):
                    del pending[region]
            if pending and _CLOCK.monotonic_ns() / 1e9 > deadline:
                raise LaunchError(f"block stores not up after {timeout_s:.0f}s: {sorted(pending)}")
            if pending:
                time.sleep(0.1)
    except BaseException:
        for proc, _, _ in started.values():
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        raise
    (root / BLOCKSTORES_FILE).write_text(
        json.dumps({r: {"pid": p.pid, "address": a} for r, (p, a, _) in started.items()})
    )
    return {r: a for r, (_, a, _) in started.items()}


def stop_blockstores(cfg: ClusterConfig, *, timeout_s: float = 15.0) -> dict[str, str]:
    """Stop the block stores `start_blockstores` recorded for cfg (SIGTERM, then SIGKILL);
    returns "blockstore-<region>" -> how it ended. Only processes whose command line is that
    region's block store are signalled (a recycled pid is left alone)."""
    if cfg.path is None:
        return {}
    path = cfg.path.parent / BLOCKSTORES_FILE
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    result: dict[str, str] = {}
    pids: dict[str, int] = {}
    for region, entry in recorded.items():
        name = f"blockstore-{region}"
        result[name] = "not running"
        pid = int(entry.get("pid", 0))
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"blockstore" in cmd and region.encode() in cmd and _alive(pid):
            pids[name] = pid
    for name, pid in pids.items():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGTERM)
            result[name] = "stopped"
    deadline = _CLOCK.monotonic_ns() / 1e9 + timeout_s
    while any(_alive(p) for p in pids.values()) and _CLOCK.monotonic_ns() / 1e9 < deadline:
        _reap()
        time.sleep(0.05)
    for name, pid in pids.items():
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            result[name] = "killed"
        while _alive(pid):
            _reap()
            time.sleep(0.01)
    _reap(pids.values())
    path.unlink(missing_ok=True)
    return result
