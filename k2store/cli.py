"""`k2`: the command line of K2.

    k2 demo                                  the main job: a local 3-region cluster, used and torn down
    k2 cluster up|down|status                a local cluster of node processes on loopback
    k2 node --cluster FILE --node NAME       run one node (what `cluster up` starts per node)
    k2 kv get|put|delete|scan                talk to a cluster

Run any command with --help for its options. Exit status: 0 success, 1 failure, 2 bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from k2store.errors import InvalidArgument, K2Error

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

    n = sub.add_parser("node", help="run one node process from a cluster file")
    n.add_argument("--cluster", type=Path, required=True, help="cluster file (TOML)")
    n.add_argument("--node", required=True, help="name of this node in the cluster file")
    n.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

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
    down = csub.add_parser("down", help="stop every node of the cluster (SIGTERM, then SIGKILL)")
    down.add_argument("--data", type=Path, default=DEFAULT_DATA)
    down.add_argument("--cluster", type=Path, default=None, help="cluster file instead of --data")
    st = csub.add_parser(
        "status", help="show each node: up or down, shards, keys, clock uncertainty"
    )
    st.add_argument("--data", type=Path, default=DEFAULT_DATA)
    st.add_argument("--cluster", type=Path, default=None, help="cluster file instead of --data")

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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "node":
            return _node(args)
        if args.cmd == "cluster":
            return _cluster(args)
        if args.cmd == "kv":
            return _kv(args)
        if args.cmd == "demo":
            from k2store.demo import run_demo

            return run_demo(data=args.data, keep=args.keep)
        if args.cmd == "bench":
            from k2store.bench import txn as bench_txn

            return bench_txn.main(args)
    except K2Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, InvalidArgument) else 1
    except KeyboardInterrupt:
        return 130
    raise AssertionError(args.cmd)


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
    asyncio.run(serve(cfg, args.node))
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
        )
        print(
            f"cluster up: {len(cfg.nodes)} nodes in {len(cfg.regions)} regions, {len(cfg.shards)} shards"
        )
        for n in cfg.nodes:
            print(f"  {n.name:<20} {n.region:<14} {n.address:<21} log {n.data_dir / 'node.log'}")
        print(f"cluster file: {cfg.path}")
        return 0
    cfg = launcher.load_cluster(args.data, args.cluster)
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
    return 0 if all(s.up for s in rows) else 1


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

    with Client(cfg) as c:
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
