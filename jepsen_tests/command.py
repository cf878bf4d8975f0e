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
           off, or random halves), latency (slow inter-region links), all, or a list: kill,pause
           (clock skew is not supported yet: it needs a node option for a clock offset)

example:
  k2 jepsen --workload append --nemesis kill --time 30 --out jepsen-out
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", default="append", help="append | register | bank | replica")
    p.add_argument(
        "--nemesis", default="none", help="none | kill | pause | partition | latency | all | a,b"
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


def main(args: argparse.Namespace) -> int:
    from jepsen_tests.runner import RunOptions, run

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
    )
    try:
        opts.validate()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = run(opts)
    print((opts.out / "report.txt").read_text(), end="")
    return result.exit_code
