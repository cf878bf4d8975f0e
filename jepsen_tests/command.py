"""The ``k2 jepsen`` command: its options and entry point.

Imports nothing heavy at module level, so `k2store.cli` can build its parser cheaply; the run
itself lives in `jepsen_tests.runner`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["DESCRIPTION", "add_arguments", "main"]

DESCRIPTION = """\
Bring up a local three-region cluster (loopback, in a temporary directory), run a workload from
clients in every region while a nemesis injects faults, heal every fault, do final reads, check
the history, write history.jsonl, results.json, report.txt and a latency plot to --out, and tear
the cluster down. Exit status: 0 no anomaly, 1 anomalies found, 2 bad arguments, 3 undecided.

workloads: append (Elle list-append), register (rw-register + per-key linearizability),
           bank (total and ledger), replica (replica reads: exact snapshots, long fork, staleness)
nemeses:   none, kill (SIGKILL + restart), pause (SIGSTOP/SIGCONT), partition (a region cut
           off, random halves, or a majorities ring), latency (slow inter-region links), clock
           (one or two nodes' clocks skewed within the bound, or beyond it: then they must
           refuse to issue timestamps), all, or a list: kill,pause,clock

protocol-breaking settings (--unsafe, repeatable; the run must then find anomalies):
  txn.unsafe_skip_commit_wait, txn.unsafe_ignore_read_marks,
  replication.unsafe_seal_before_resolve, cluster.unsafe_ignore_clock_bound

examples:
  k2 jepsen --workload append --nemesis kill --time 30 --out jepsen-out
  k2 jepsen --workload register --skew eu-west=-300 --unsafe cluster.unsafe_ignore_clock_bound
  k2 jepsen --workload append --epsilon-us 150000 --max-uncertainty-us 300000 --skew us-east=+120
            --skew eu-west=-120 --unsafe txn.unsafe_skip_commit_wait
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", default="append", help="append | register | bank | replica")
    p.add_argument(
        "--nemesis",
        default="none",
        help="none | kill | pause | partition | latency | clock | all | a,b",
    )
    p.add_argument("--time", type=float, default=30.0, help="seconds of load (default 30)")
    p.add_argument("--clients", type=int, default=6, help="clients, round-robin over regions")
    p.add_argument("--protocol", default="k2-mvto", help="k2-mvto | d2pl-ttc | mvto-hlc")
    p.add_argument("--out", type=Path, default=Path("jepsen-out"), help="output directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the generators and the nemesis")
    p.add_argument(
        "--no-wan", action="store_true", help="no wide-area latency emulation between regions"
    )
    p.add_argument("--keep-data", action="store_true", help="keep the cluster's data directory")
    p.add_argument(
        "--skew",
        action="append",
        default=[],
        metavar="NAME=MS",
        help="skew a node's or region's clock by MS milliseconds for the whole load (repeatable)",
    )
    p.add_argument(
        "--client-time",
        action="store_true",
        help="clients hold time themselves on this host's clock (K2-MVTO stamps when they send "
        "and they wait out the commit-wait; see README, Client time)",
    )
    p.add_argument("--epsilon-us", type=int, help="assumed clock error (default 400)")
    p.add_argument(
        "--max-uncertainty-us", type=int, help="refuse timestamps beyond this (default 5000)"
    )
    p.add_argument(
        "--unsafe",
        action="append",
        default=[],
        metavar="SETTING",
        help="turn on a protocol-breaking setting (repeatable; see above)",
    )


def _parse_skew(specs: list[str]) -> tuple[tuple[str, float], ...]:
    out = []
    for spec in specs:
        name, sep, ms = spec.partition("=")
        try:
            out.append((name.strip(), float(ms)))
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ValueError(f"--skew expects NAME=MILLISECONDS (e.g. eu-west=-250), got {spec!r}")
    return tuple(out)


def main(args: argparse.Namespace) -> int:
    from jepsen_tests.runner import RunOptions, run

    try:
        skew = _parse_skew(args.skew)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    opts = RunOptions(
        workload=args.workload,
        nemesis=args.nemesis,
        time_s=args.time,
        clients=args.clients,
        protocol=args.protocol,
        out=args.out,
        seed=args.seed,
        wan=not args.no_wan,
        keep_data=args.keep_data,
        unsafe=tuple(args.unsafe),
        epsilon_us=args.epsilon_us,
        max_uncertainty_us=args.max_uncertainty_us,
        skew=skew,
        client_time=args.client_time,
    )
    try:
        opts.validate()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = run(opts)
    print((opts.out / "report.txt").read_text(), end="")
    return result.exit_code
