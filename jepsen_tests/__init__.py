"""jepsen_tests: the real-cluster fault-injection suite.

Purpose
    Find consistency bugs in K2 the way Jepsen does: real node processes, clients in every
    region, faults injected while they work, and a history of every operation checked
    afterwards by checkers that trust nothing but what clients were told.

Data flow
    runner (``k2 jepsen``, `command`) -> launcher.up a local cluster
        -> workloads (append | register | bank | replica): Workers record invoke/ok/fail/info
           into a `History`      <- nemesis (kill | pause | partition | latency | clock)
        -> heal, final reads -> history.jsonl
        -> checkers: `elle` (G0, G1a, G1b, G1c, G-single, G2-item, internal, real-time
           variants), `linearizable` (Wing-Gong-Lowe per key), `bank`, `replica`
        -> results.json, report.txt, latency plot; exit status 1 on any anomaly.

Invariants
    - Checkers are pure functions of a history (no I/O, no clock); each is property-tested:
      histories generated from a serial execution pass, planted anomalies are found.
    - ``info`` means unknown: checkers never assume an indeterminate operation failed.
    - Every fault heals before the final reads; every loop is bounded in count and time; the
      cluster is torn down even when the run fails (or gets SIGTERM).

Public API: the names below, `jepsen_tests.runner.run` / `RunOptions`, and
`jepsen_tests.strategies` (hypothesis strategies and a state machine for a live cluster; needs
hypothesis).
"""

from jepsen_tests.anomalies import CheckResult
from jepsen_tests.bank import check_bank
from jepsen_tests.elle import check_list_append, check_rw_register
from jepsen_tests.history import History, Op, Txn, read_jsonl, transactions, write_jsonl
from jepsen_tests.linearizable import check_linearizable, check_register
from jepsen_tests.replica import check_replica_reads

__all__ = [
    "CheckResult",
    "History",
    "Op",
    "Txn",
    "check_bank",
    "check_linearizable",
    "check_list_append",
    "check_register",
    "check_replica_reads",
    "check_rw_register",
    "read_jsonl",
    "transactions",
    "write_jsonl",
]
