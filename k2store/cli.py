"""`k2`: the command line of K2.

    k2 demo                                  the main job: multi-region chat served through the KV tier
    k2 serve --cluster FILE --region R       an OpenAI-compatible serving node (engine + KV tier)
    k2 bench engine [--quick]                time to first token: recompute vs local vs remote hit
    k2 cluster up|down|status                a local cluster of node processes on loopback
    k2 cluster net show|set|partition|heal|reset   its emulated wide-area network, at run time
    k2 node --cluster FILE --node NAME       run one node (what `cluster up` starts per node)
    k2 blockstore --region R --port P --data DIR   run one KV-cache block store node
    k2 kv get|put|delete|scan                talk to a cluster
    k2 router --broker URL --node NAME=REGION ...   the cache-aware router (kvtier events)
    k2 jepsen --workload W --nemesis N --time S   fault-injection consistency test (jepsen_tests)

Run any command with --help for its options. Exit status: 0 success, 1 failure, 2 bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from k2store import evloop
from k2store.errors import InvalidArgument, K2Error

if TYPE_CHECKING:
    from k2store.cluster import ClusterConfig

DEFAULT_DATA = Path(os.environ.get("K2_DATA", "k2-data"))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="k2",
        description="K2: a TrueTime-ordered multi-region transactional key-value store "
        "with a KV-cache tier for LLM serving.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="bring up a local three-region cluster, use it, tear it down")
    d.add_argument(
        "--data", type=Path, default=None, help="data directory (default: a temporary one)"
    )
    d.add_argument("--keep", action="store_true", help="leave the cluster running afterwards")
    d.add_argument(
        "--store-only",
        action="store_true",
        help="the store-only demo (no model): writes, reads, kill -9",
    )
    d.add_argument("--model", default=None, help="model directory or GGUF (default: SmolLM2-135M)")
    d.add_argument("--max-tokens", type=int, default=24, help="tokens per reply (default: 24)")
    d.add_argument(
        "--plot", type=Path, default=Path("k2-demo-ttft.svg"), help="where to save the TTFT chart"
    )

    sv = sub.add_parser(
        "serve", help="an OpenAI-compatible serving node: engine + KV tier (kvtier)"
    )
    sv.add_argument("--cluster", type=Path, default=None, help="cluster file (TOML)")
    sv.add_argument("--data", type=Path, default=None, help="or the data dir of `k2 cluster up`")
    sv.add_argument("--region", required=True, help="region this serving node runs in")
    sv.add_argument("--port", type=int, default=8000, help="HTTP port on 127.0.0.1 (default 8000)")
    sv.add_argument("--model", default=None, help="model directory or GGUF (default: SmolLM2-135M)")
    sv.add_argument("--tenant", default="default", help="tenant of this node's KV blocks")
    sv.add_argument("--block-tokens", type=int, default=64, help="tokens per KV block (64)")
    sv.add_argument("--kv-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    sv.add_argument("--max-tokens", type=int, default=128, help="default max_tokens (128)")
    sv.add_argument(
        "--client-time",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="this node's K2 client holds time on the host's clock (default on; the host's "
        "clock must be held to the cluster's bound, as the nodes' are): its transactions are "
        "stamped at the send and it waits out the commit-wait itself, a round trip's worth "
        "sooner (README, Client time). A node whose clock reads ahead of the coordinator's "
        "keeps the wait at the coordinator and warns",
    )
    sv.add_argument(
        "--router",
        default=None,
        metavar="URL",
        help="register with the router at URL (e.g. http://127.0.0.1:8100 from `k2 router`), "
        "renewing every ttl/3 s with this node's load, and leave it on shutdown",
    )
    sv.add_argument(
        "--name", default=None, help="name to register under (default serve-REGION-PORT)"
    )
    sv.add_argument(
        "--router-ttl",
        type=float,
        default=10.0,
        help="seconds the router keeps this node without hearing from it (default 10)",
    )
    sv.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    n = sub.add_parser("node", help="run one node process from a cluster file")
    n.add_argument("--cluster", type=Path, required=True, help="cluster file (TOML)")
    n.add_argument("--node", required=True, help="name of this node in the cluster file")
    n.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    bs = sub.add_parser("blockstore", help="run one KV-cache block store node (kvtier)")
    bs.add_argument("--cluster", type=Path, default=None, help="cluster file: register there")
    bs.add_argument("--region", required=True, help="region this block store serves")
    bs.add_argument("--port", type=int, required=True, help="loopback port to serve on")
    bs.add_argument("--data", type=Path, required=True, help="data directory (RocksDB tier)")
    bs.add_argument("--memory-mb", type=int, default=256, help="memory tier (default: 256)")
    bs.add_argument("--disk-mb", type=int, default=4096, help="disk tier (default: 4096)")
    bs.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    ro = sub.add_parser("router", help="run the cache-aware KV router (kvtier)")
    ro.add_argument("--broker", required=True, help="MQTT broker URL, e.g. mqtt://127.0.0.1:1883")
    ro.add_argument(
        "--node",
        action="append",
        default=[],
        metavar="NAME=REGION",
        help="a serving node known in advance (serving nodes started with `k2 serve --router` "
        "register themselves over HTTP: POST /register)",
    )
    ro.add_argument(
        "--region", action="append", default=None, help="only this region's events (repeatable)"
    )
    ro.add_argument(
        "--rtt", action="append", default=[], metavar="A:B=MS", help="a region pair's RTT"
    )
    ro.add_argument("--port", type=int, default=0, help="HTTP port on 127.0.0.1 (default: any)")
    ro.add_argument(
        "--cluster",
        type=Path,
        default=None,
        help="a cluster file: after an event gap, re-read the holder's blocks from the store "
        "(default: forget them until new events arrive)",
    )
    ro.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    c = sub.add_parser("cluster", help="a local cluster of node processes on loopback")
    csub = c.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = csub.add_parser("up", help="start a local cluster and wait until every node is healthy")
    up.add_argument(
        "--regions",
        default="us-east,eu-west,ap-southeast",
        help="comma-separated region names (default: %(default)s)",
    )
    up.add_argument("--nodes-per-region", type=int, default=1, metavar="N")
    up.add_argument("--shards-per-region", type=int, default=1, metavar="K")
    up.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="data directory (default: %(default)s)"
    )
    up.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for health (default: 60)"
    )
    up.add_argument(
        "--blockstores",
        action="store_true",
        help="also start one KV-cache block store per region (kvtier; `k2 blockstore`)",
    )
    up.add_argument(
        "--no-wan",
        action="store_true",
        help="no emulated wide-area latency between regions (default: DESIGN.md's round trips "
        "and 1 Gbit/s links; `k2 cluster net` can still add latency or partitions later)",
    )
    up.add_argument(
        "--secure",
        action="store_true",
        help="mutual TLS between nodes, TLS and bearer tokens for clients (certs in <data>/certs)",
    )
    up.add_argument(
        "--tenant", action="append", default=[], help="with --secure: a tenant principal (repeat)"
    )
    down = csub.add_parser("down", help="stop every node of the cluster (SIGTERM, then SIGKILL)")
    down.add_argument("--data", type=Path, default=DEFAULT_DATA)
    down.add_argument("--cluster", type=Path, default=None, help="cluster file instead of --data")
    st = csub.add_parser(
        "status", help="show each node: up or down, shards, keys, clock uncertainty"
    )
    st.add_argument("--data", type=Path, default=DEFAULT_DATA)
    st.add_argument("--cluster", type=Path, default=None, help="cluster file instead of --data")

    _add_net_parser(csub)

    ce = sub.add_parser("certs", help="certificates and tokens for a secured cluster")
    cesub = ce.add_subparsers(dest="action", required=True, metavar="ACTION")
    ci = cesub.add_parser(
        "init", help="a local CA, node and client certificates and tokens; secures the file"
    )
    ci.add_argument("--cluster", type=Path, required=True, help="cluster file to secure")
    ci.add_argument("--tenant", action="append", default=[], help="a tenant principal (repeat)")

    kv = sub.add_parser("kv", help="read and write keys")
    kv.add_argument(
        "--cluster", type=Path, default=None, help="cluster file (default: <data>/cluster.toml)"
    )
    kv.add_argument("--data", type=Path, default=DEFAULT_DATA)
    kv.add_argument(
        "--via", default=None, help="send the request to this node (it forwards to the leader)"
    )
    kv.add_argument(
        "--hex", action="store_true", help="keys and values are given and printed in hex"
    )
    kv.add_argument(
        "--region",
        default=None,
        help="act as a client in this region, paying the emulated latency from there "
        "(default: the cluster's first region)",
    )
    ksub = kv.add_subparsers(dest="op", required=True, metavar="OP")
    g = ksub.add_parser("get", help="print the value of KEY")
    g.add_argument("key")
    g.add_argument(
        "--at", type=int, default=None, help="read at this timestamp (ns) instead of the latest"
    )
    pu = ksub.add_parser("put", help="set KEY to VALUE ('-' reads the value from stdin)")
    pu.add_argument("key")
    pu.add_argument("value")
    de = ksub.add_parser("delete", help="delete KEY")
    de.add_argument("key")
    sc = ksub.add_parser("scan", help="list keys in [START, END) at one timestamp")
    sc.add_argument("start", nargs="?", default="")
    sc.add_argument("end", nargs="?", default=None)
    sc.add_argument("--limit", type=int, default=None)
    sc.add_argument("--at", type=int, default=None)

    te = sub.add_parser(
        "tenant", help="register a KV-tier tenant: quota, sharing (an operator's command)"
    )
    te.add_argument(
        "--cluster", type=Path, default=None, help="cluster file (default: <data>/cluster.toml)"
    )
    te.add_argument("--data", type=Path, default=DEFAULT_DATA)
    tsub = te.add_subparsers(dest="op", required=True, metavar="OP")
    tr = tsub.add_parser(
        "register",
        help="create TENANT or change its quota and sharing in every region (admin token: a "
        "tenant's serving node cannot register itself on a secured cluster)",
    )
    tr.add_argument("tenant")
    tr.add_argument(
        "--quota-bytes", type=int, default=16 << 30, help="bytes of KV blocks per region"
    )
    tr.add_argument(
        "--share", action="store_true", help="the tenant opts in to namespaces shared by tenants"
    )
    ts = tsub.add_parser("show", help="TENANT's quota and its usage in each region")
    ts.add_argument("tenant")

    from k2store.bench import txn as bench_txn

    be = sub.add_parser("bench", help="benchmarks against a real cluster of node processes")
    bsub = be.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    bench_txn.add_arguments(
        bsub.add_parser(
            "txn",
            help="YCSB-T transactions: throughput, latency, aborts by rule and region",
            description=(bench_txn.__doc__ or "").split("\n\n", 1)[0],
        )
    )
    from k2store.bench import tpcc as bench_tpcc

    bench_tpcc.add_arguments(
        bsub.add_parser(
            "tpcc",
            help="TPC-C-like new-order/payment: K2-MVTO vs d2PL-TTC vs MVTO-HLC, side by side",
            description=(bench_tpcc.__doc__ or "").split("\n\n", 1)[0],
        )
    )
    bk = bsub.add_parser(
        "kvtier",
        help="block store node vs Redis vs a memory copy; frame codecs; WAN retrieval",
        description="Block-path throughput, side by side with Redis and a plain memory copy.",
    )
    from k2store.bench import kvtier_options as bench_kvtier_options

    bench_kvtier_options.add_arguments(bk)
    from k2store.bench import visibility as bench_visibility

    # kvtier (and torch) load only when the benchmark runs: its options are spelled out here,
    # not in kvtier.enginebench (importing kvtier takes a second).
    eb = bsub.add_parser(
        "engine",
        help="time to first token: recompute vs local vs cross-region KV hits (kvtier)",
        description="Time to first token for cached prefixes of 256 to 4096 tokens: recompute, "
        "local hit and cross-region hit, side by side, with ratios to recompute (JSON out).",
    )
    eb.add_argument("--quick", action="store_true", help="256, 1024 and 2048 tokens, 2 reps")
    eb.add_argument("--sizes", default=None, help="comma-separated prefix lengths")
    eb.add_argument("--reps", type=int, default=None, help="requests per hit measurement (3)")
    which = eb.add_mutually_exclusive_group()
    which.add_argument("--model", default=None, help="model directory or GGUF (default SmolLM2)")
    which.add_argument(
        "--architecture", default=None,
        choices=["smollm2-135m", "llama-1b", "llama-8b"],
        help="instead of a model: random weights in this model's shape (TTFT depends on the "
        "shape, not the weights; measures a larger model or a GPU with nothing to download)",
    )  # fmt: skip
    eb.add_argument(
        "--device", default=None,
        help="torch device for the model: cpu, cuda, cuda:1 ... (default: cuda when torch "
        "sees one, else cpu)",
    )  # fmt: skip
    eb.add_argument("--block-tokens", type=int, default=64)
    eb.add_argument("--kv-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    eb.add_argument(
        "--remote-codec", default=None, choices=["none", "zlib"],
        help="compression of cross-region block transfers (default: the connector's)",
    )  # fmt: skip
    eb.add_argument(
        "--rtts", default=None, metavar="MS,MS,...",
        help="instead: where fetching stops paying. For each prefix length (--sizes, default "
        "256,1024,2048), TTFT in eu-west of a prefix cached in us-east at each of these "
        "us-east<->eu-west round trips: always fetched, recomputed, and as the cost model "
        "chooses (e.g. 25,75,300,1000,3000)",
    )  # fmt: skip
    eb.add_argument(
        "--out", type=Path, default=None,
        help="JSON (default k2-bench-engine.json, or k2-bench-engine-crossover.json with "
        "--rtts); the plot goes beside it (.png)",
    )  # fmt: skip
    eb.add_argument("--data", type=Path, default=None, help="cluster data dir (default: temp)")
    bench_visibility.add_arguments(
        bsub.add_parser(
            "visibility",
            help="visibility delay per region pair: K2-VCR vs watermark vs closed timestamps",
            description=(bench_visibility.__doc__ or "").split("\n\n", 1)[0],
        )
    )
    from k2store.bench import etcd as bench_etcd

    bench_etcd.add_arguments(
        bsub.add_parser(
            "etcd",
            help="reads per region: K2 replica reads vs a real etcd's linearizable reads",
            description=bench_etcd.DESCRIPTION,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    # jepsen_tests sits above k2store: imported here only for its (light) option definitions.
    from jepsen_tests import command as jepsen_command

    jepsen_command.add_arguments(
        sub.add_parser(
            "jepsen",
            help="fault-injection consistency test on a fresh local cluster (jepsen_tests)",
            description=jepsen_command.DESCRIPTION,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    return p


_NET_HELP = """\
Every node and client of a cluster made by `k2 cluster up` delays each message to another region
by half the pair's round-trip time, plus size / bandwidth, plus jitter (uniform in [0, jitter]),
so a call across regions costs one round trip. The base values are the cluster file's [network]
table. These commands write overrides to net.toml beside the cluster file (atomically); every
process re-reads it within about 0.1 s, so changes apply to a running cluster and its clients.

Partitions: a call whose request is cut fails at once with Unavailable (nothing was sent); one
whose reply is cut (a one-way partition) fails with DeadlineExceeded at its timeout, as the
request may have run.

examples:
  k2 cluster net show
  k2 cluster net set us-east eu-west --rtt-ms 150 --jitter-ms 5
  k2 cluster net set --jitter-ms 2                 every inter-region link
  k2 cluster net set us-east --rtt-ms 5            inside us-east
  k2 cluster net partition ap-southeast            isolate a region (or a node) from the rest
  k2 cluster net partition us-east eu-west --one-way   drop us-east -> eu-west only
  k2 cluster net heal                              remove every partition, keep latencies
  k2 cluster net reset                             back to the cluster file's [network] table
"""


def _add_net_parser(csub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--data", type=Path, default=DEFAULT_DATA)
    where.add_argument("--cluster", type=Path, default=None, help="cluster file instead of --data")
    net = csub.add_parser(
        "net",
        help="show or change the emulated wide-area network (latency, jitter, partitions)",
        description=_NET_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    nsub = net.add_subparsers(dest="net_action", required=True, metavar="NET_ACTION")
    nsub.add_parser("show", parents=[where], help="the links and partitions in force now")
    st = nsub.add_parser(
        "set",
        parents=[where],
        help="change a link: two regions (a pair), one (inside it), none (every inter-region pair)",
    )
    st.add_argument("regions", nargs="*", metavar="REGION")
    st.add_argument("--rtt-ms", type=float, default=None, help="round-trip time")
    st.add_argument("--jitter-ms", type=float, default=None, help="extra one-way delay, at most")
    st.add_argument(
        "--bandwidth-mbit", type=float, default=None, help="per direction; 0 = unlimited"
    )
    pa = nsub.add_parser(
        "partition", parents=[where], help="cut A from B, or isolate A (a region or a node)"
    )
    pa.add_argument("a", metavar="A")
    pa.add_argument("b", metavar="B", nargs="?", default=None)
    pa.add_argument("--one-way", action="store_true", help="cut only messages from A to B")
    he = nsub.add_parser(
        "heal", parents=[where], help="remove every partition, or those of A, or A<->B"
    )
    he.add_argument("a", metavar="A", nargs="?", default=None)
    he.add_argument("b", metavar="B", nargs="?", default=None)
    nsub.add_parser("reset", parents=[where], help="remove every override (delete net.toml)")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd in _OWNS_PROCESSES:
        with _sigterm_as_interrupt():
            return _dispatch(args)
    return _dispatch(args)


_OWNS_PROCESSES = ("bench", "demo", "jepsen")
"""Commands that start clusters, block stores or peers of their own and stop them when done."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (kill, a CI job's timeout) ends the command as Ctrl-C does, so the finally blocks
    that stop what it started run: without this, a killed `k2 bench` left its node processes
    running (they sit in sessions of their own). The previous handler is restored afterwards;
    only the main thread can install one."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        # If the orderly path hangs (a worker thread that never returns, a lock taken when the
        # interrupt landed), the process still ends; what it started ends with it (the
        # parent-death signal of launcher.stop_with_parent).
        threading.Thread(target=_exit_later, args=(SIGTERM_GRACE_S,), daemon=True).start()
        # As SIGINT exactly: inside asyncio.run that cancels the main task (asyncio's own SIGINT
        # handler), so the interrupt never lands inside a coroutine's native code. Raising
        # KeyboardInterrupt here instead killed a `k2 bench txn` signalled just as its gRPC
        # client started with SIGSEGV, its finally blocks unrun.
        signal.raise_signal(signal.SIGINT)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


SIGTERM_GRACE_S = 20.0
"""How long a command that owns processes may take to stop them after SIGTERM before it exits
anyway (status 143)."""


def _exit_later(seconds: float) -> None:
    threading.Event().wait(seconds)
    print(f"error: still stopping {seconds:.0f} s after SIGTERM; exiting now", file=sys.stderr)
    os._exit(143)


def _dispatch(args: argparse.Namespace) -> int:
    try:
        if args.cmd == "node":
            return _node(args)
        if args.cmd == "blockstore":
            return _blockstore(args)
        if args.cmd == "router":
            return _router(args)
        if args.cmd == "cluster":
            return _cluster(args)
        if args.cmd == "kv":
            return _kv(args)
        if args.cmd == "certs":
            return _certs(args)
        if args.cmd == "tenant":
            return _tenant(args)
        if args.cmd == "jepsen":
            from jepsen_tests import command as jepsen_command

            return jepsen_command.main(args)
        if args.cmd == "demo" and args.store_only:
            from k2store.demo import run_demo

            return run_demo(data=args.data, keep=args.keep)
        if args.cmd == "demo":
            from kvtier.demo import run_demo as run_chat_demo

            return run_chat_demo(
                args.data, keep=args.keep, model=args.model, max_tokens=args.max_tokens,
                plot=args.plot,
            )  # fmt: skip
        if args.cmd == "serve":
            from kvtier.serve import main as serve_main

            return serve_main(args)
        if args.cmd == "bench" and args.bench == "engine":
            from kvtier import enginebench as bench_engine

            return bench_engine.main(args)
        if args.cmd == "bench" and args.bench == "kvtier":
            from kvtier import blockbench

            return blockbench.main_args(args)
        if args.cmd == "bench" and args.bench == "tpcc":
            from k2store.bench import tpcc as bench_tpcc

            return bench_tpcc.main(args)
        if args.cmd == "bench" and args.bench == "visibility":
            from k2store.bench import visibility as bench_visibility

            return bench_visibility.main(args)
        if args.cmd == "bench" and args.bench == "etcd":
            from k2store.bench import etcd as bench_etcd

            return bench_etcd.main(args)
        if args.cmd == "bench" and args.bench == "txn":
            from k2store.bench import txn as bench_txn

            return bench_txn.main(args)
    except K2Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, InvalidArgument) else 1
    except KeyboardInterrupt:
        return 130
    raise AssertionError(args.cmd)


def _certs(args: argparse.Namespace) -> int:
    from k2store import cluster as cluster_mod
    from k2store.certs import CERTS_DIR, secure_cluster
    from truetime import SystemClock

    cfg = secure_cluster(
        cluster_mod.load(args.cluster), now_ns=SystemClock().now_ns(), tenants=args.tenant
    )
    assert cfg.path is not None
    print(f"certificates and tokens in {cfg.path.parent / CERTS_DIR} (files 0600)")
    for p in cfg.settings.security.principals:
        print(
            f"  principal {p.name:<12} token file {cfg.path.parent / CERTS_DIR}/tokens/{p.name}.token"
        )
    print(f"cluster file secured: {cfg.path} ([security] tls = true)")
    return 0


def _node(args: argparse.Namespace) -> int:
    from k2store import cluster as cluster_mod
    from k2store.node import serve

    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    cfg = cluster_mod.load(args.cluster)
    cfg.node(args.node)  # UnknownNode before anything starts
    from k2store.launcher import stop_with_parent

    stop_with_parent()  # a benchmark's node: stops when the benchmark does, even on kill -9
    evloop.run(serve(cfg, args.node))
    return 0


def _blockstore(args: argparse.Namespace) -> int:
    # kvtier sits above k2store; the import is deferred so k2store never loads it otherwise.
    from kvtier.blocknode import serve_blockstore
    from kvtier.blockstore import BlockStoreConfig

    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.cluster is not None:
        from k2store import cluster as cluster_mod

        cluster_mod.load(args.cluster).region(args.region)  # bad input before anything starts
    from k2store.launcher import stop_with_parent

    stop_with_parent()  # a benchmark's or demo's block store stops with it
    config = BlockStoreConfig(
        memory_bytes=args.memory_mb * 1024 * 1024, disk_bytes=args.disk_mb * 1024 * 1024
    )
    evloop.run(
        serve_blockstore(
            args.region,
            f"127.0.0.1:{args.port}",
            args.data,
            config=config,
            cluster_file=args.cluster,
        )
    )
    return 0


def _router(args: argparse.Namespace) -> int:
    from kvtier.router import (
        DEFAULT_REGION_RTT_MS,
        RouterConfig,
        parse_node_spec,
        parse_rtt_spec,
        serve_router,
    )

    logging.basicConfig(level=args.log_level, stream=sys.stderr)
    nodes = [parse_node_spec(n) for n in args.node]
    rtt = dict(DEFAULT_REGION_RTT_MS)
    rtt.update(parse_rtt_spec(r) for r in args.rtt)

    def started(port: int) -> None:
        print(
            f"router: http://127.0.0.1:{port}/route  (events from {args.broker}; serving nodes "
            f"register at http://127.0.0.1:{port}/register)",
            flush=True,
        )

    async def main() -> None:
        from k2store import cluster as cluster_mod
        from k2store.client import AsyncClient
        from kvtier.router import forget_holder, metadata_snapshotter

        client = None if args.cluster is None else AsyncClient(cluster_mod.load(args.cluster))
        try:
            await serve_router(
                args.broker,
                nodes,
                port=args.port,
                regions=args.region,
                config=RouterConfig(region_rtt_ms=rtt),
                snapshot=forget_holder if client is None else metadata_snapshotter(client),
                started=started,
            )
        finally:
            if client is not None:
                await client.close()

    evloop.run(main())
    return 0


def _cluster(args: argparse.Namespace) -> int:
    from k2store import launcher

    if args.action == "up":
        regions = [r.strip() for r in args.regions.split(",") if r.strip()]
        cfg = launcher.up(
            args.data,
            regions=regions,
            nodes_per_region=args.nodes_per_region,
            shards_per_region=args.shards_per_region,
            timeout_s=args.timeout,
            progress=sys.stderr.isatty(),
            wan=not args.no_wan,
            blockstores=args.blockstores,
            secure=args.secure,
            tenants=args.tenant,
        )
        print(
            f"cluster up: {len(cfg.nodes)} nodes in {len(cfg.regions)} regions, {len(cfg.shards)} shards"
        )
        for n in cfg.nodes:
            print(f"  {n.name:<20} {n.region:<14} {n.address:<21} log {n.data_dir / 'node.log'}")
        if args.blockstores and cfg.path is not None:
            stores = json.loads((cfg.path.parent / launcher.BLOCKSTORES_FILE).read_text())
            for region, entry in stores.items():
                name = f"blockstore-{region}"
                print(f"  {name:<20} {region:<14} {entry['address']:<21} pid {entry['pid']}")
        print(f"cluster file: {cfg.path}")
        return 0
    cfg = launcher.load_cluster(args.data, args.cluster)
    if args.action == "net":
        return _net(cfg, args)
    if args.action == "down":
        result = launcher.down(cfg)
        for name, how in result.items():
            print(f"  {name:<20} {how}")
        return 0
    rows = launcher.status(cfg)
    print(
        f"{'node':<20} {'region':<14} {'address':<21} {'state':<6} {'pid':>7} {'shards':<12} {'keys':>6} {'eps us':>7}"
    )
    for s in rows:
        shards = ",".join(map(str, s.shards)) or "-"
        state = "up" if s.up else "DOWN"
        print(
            f"{s.name:<20} {s.region:<14} {s.address:<21} {state:<6} {s.pid or '-':>7} {shards:<12} "
            f"{s.keys if s.up else '-':>6} {f'{s.uncertainty_us:.0f}' if s.up else '-':>7}"
            + (" oracle" if s.oracle else "")
        )
    for s in rows:
        if s.client_clock_ahead:
            print(
                f"WARNING {s.name}: {s.client_clock_ahead} transactions came from clients whose "
                "clocks read ahead of this node's (client time); their commit-waits stayed at "
                "the node. Check those hosts' clock synchronisation."
            )
    _print_replication(rows)
    return 0 if all(s.up for s in rows) else 1


def _print_replication(rows: list[Any]) -> None:
    """Per node: the region's visible timestamp (as staleness), each led shard's log and seal,
    each replica's lag, and visibility delay by home region."""
    up = [s for s in rows if s.up and s.replication is not None and s.replication.enabled]
    if not up:
        return
    print(f"\nreplication ({up[0].replication.policy})")
    print(f"{'node':<20} {'shard':>5} {'role':<8} {'lsn':>8} {'sealed ago ms':>13} {'lag':>12}")
    for s in up:
        r = s.replication
        visible_ms = (s.now_latest - r.visible_ts) / 1e6 if r.visible_ts else float("nan")
        print(f"{s.name:<20} {'-':>5} {'visible':<8} {'':>8} {visible_ms:>13.0f}")
        for sh in r.shards:
            ago = (s.now_latest - sh.sealed_ts) / 1e6 if sh.sealed_ts else float("nan")
            lag = (
                f"{sh.lag_entries} / {sh.lag_ms:.0f}ms"
                if sh.role == "replica"
                else f"aborts {sh.seal_aborts}"
            )
            print(f"{'':<20} {sh.shard_id:>5} {sh.role:<8} {sh.next_lsn:>8} {ago:>13.0f} {lag:>12}")
    print("\nvisibility delay (commit at the leader -> readable here), ms")
    print(f"{'region':<14} {'from':<14} {'count':>7} {'p50':>7} {'p99':>7} {'max':>7}")
    for s in up:
        for d in s.replication.delays:
            print(
                f"{s.region:<14} {d.from_region:<14} {d.count:>7} {d.p50_ms:>7.0f} "
                f"{d.p99_ms:>7.0f} {d.max_ms:>7.0f}"
            )


def _kv(args: argparse.Namespace) -> int:
    from k2store import launcher
    from k2store.client import Client

    cfg = launcher.load_cluster(args.data, args.cluster)

    def dec(s: str) -> bytes:
        if args.hex:
            try:
                return bytes.fromhex(s)
            except ValueError:
                raise InvalidArgument(f"not hex: {s!r}") from None
        return s.encode()

    def enc(b: bytes) -> str:
        return b.hex() if args.hex else b.decode("utf-8", errors="backslashreplace")

    with Client(cfg, region=args.region) as c:
        if args.op == "get":
            r = c.get_versioned(dec(args.key), at_ts=args.at, via=args.via)
            if r.value is None:
                print(f"(not found at {r.read_ts}, served by {r.served_by})", file=sys.stderr)
                return 1
            print(enc(r.value))
            print(
                f"(version {r.version_ts}, read at {r.read_ts}, served by {r.served_by})",
                file=sys.stderr,
            )
        elif args.op == "put":
            value = sys.stdin.buffer.read() if args.value == "-" else dec(args.value)
            w = c.put(dec(args.key), value, via=args.via)
            print(f"ok: committed at {w.commit_ts} by {w.served_by}")
        elif args.op == "delete":
            w = c.delete(dec(args.key), via=args.via)
            print(
                f"{'deleted' if w.existed else 'not found'}: committed at {w.commit_ts} by {w.served_by}"
            )
        else:
            rows = c.scan(
                dec(args.start),
                None if args.end is None else dec(args.end),
                limit=args.limit,
                at_ts=args.at,
            )
            for k, v in rows:
                print(f"{enc(k)}\t{enc(v)}")
            print(f"({len(rows)} keys)", file=sys.stderr)
    return 0


def _tenant(args: argparse.Namespace) -> int:
    from k2store import launcher
    from k2store.client import AsyncClient
    from kvtier.metadata import BlockMetadata

    cfg = launcher.load_cluster(args.data, args.cluster)

    async def run() -> None:
        async with AsyncClient(cfg) as client:
            md = BlockMetadata(client)
            if args.op == "register":
                await md.register_tenant(
                    args.tenant, quota_bytes=args.quota_bytes, share=args.share
                )
            for r in cfg.region_names():
                t = await md.tenant(args.tenant, region=r)
                print(
                    f"{t.tenant}\t{r}\tquota {t.quota_bytes}\tused {t.used_bytes}\t"
                    f"blocks {t.blocks}\tshare {'yes' if t.share else 'no'}"
                )

    evloop.run(run())
    return 0


def _net(cfg: ClusterConfig, args: argparse.Namespace) -> int:
    from k2store import launcher
    from k2store.wan import LinkOverride

    o = launcher.read_net_overrides(cfg)
    act = args.net_action
    if act == "set":
        if len(args.regions) > 2:
            raise InvalidArgument(f"set takes at most two regions, got {args.regions}")
        for r in args.regions:
            cfg.region(r)  # UnknownNode names the cluster's regions
        change = LinkOverride(args.rtt_ms, args.jitter_ms, args.bandwidth_mbit)
        if change.is_empty():
            raise InvalidArgument("give at least one of --rtt-ms, --jitter-ms, --bandwidth-mbit")
        for name in ("rtt_ms", "jitter_ms", "bandwidth_mbit"):
            v = getattr(args, name)
            if v is not None and not 0 <= v < float("inf"):
                flag = "--" + name.replace("_", "-")
                raise InvalidArgument(f"{flag} must be a finite number >= 0, got {v}")
        a, b = [*args.regions, None, None][:2]
        o = o.with_link(a, b, change)
    elif act == "partition":
        if args.b is None:
            if args.one_way:
                raise InvalidArgument("--one-way needs two sides: partition A B --one-way")
            o = o.with_isolated(args.a)
        elif args.a == args.b:
            raise InvalidArgument(f"cannot cut {args.a!r} from itself")
        else:
            o = o.with_cut(args.a, args.b, one_way=args.one_way)
    elif act == "heal":
        o = o.healed(args.a, args.b)
    elif act == "reset":
        o = type(o)()
    if act != "show":
        launcher.write_net_overrides(cfg, o)
    _print_net(cfg)
    return 0


def _print_net(cfg: ClusterConfig) -> None:
    from k2store import launcher

    model = launcher.net_model(cfg)
    path = launcher.net_overrides_path(cfg)
    base = "on" if cfg.settings.network.enabled else "off"
    print(f"emulation: {base} in the cluster file; overrides: {path if path.exists() else 'none'}")
    print(f"{'link':<32} {'rtt ms':>8} {'jitter ms':>10} {'bandwidth':>12}")
    for a, b, p in model.describe(cfg.region_names()):
        link = f"inside {a}" if a == b else f"{a} <-> {b}"
        bw = "unlimited" if p.bandwidth_mbit <= 0 else f"{p.bandwidth_mbit:g} Mbit/s"
        print(f"{link:<32} {p.rtt_ms:>8g} {p.jitter_ms:>10g} {bw:>12}")
    o = model.overrides
    for name in sorted(o.isolated):
        print(f"partition: {name} is isolated from the rest")
    for a, b in sorted(o.cuts):
        both = (b, a) in o.cuts
        if both and a > b:
            continue
        print(f"partition: {a} {'<->' if both else '->'} {b} cut")
    if not o.isolated and not o.cuts:
        print("partitions: none")
