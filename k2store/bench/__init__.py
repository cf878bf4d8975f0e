"""Benchmarks that run against a real cluster of node processes (`k2 bench ...`).

Each benchmark brings up (or connects to) a cluster, drives it with closed-loop clients in every
region, prints a table, writes its results as JSON and, when matplotlib is installed, a plot.
Ratios are always measured side by side in one run (see DESIGN.md section 9).

- `k2store.bench.txn`: YCSB-T read-modify-write transactions (`k2 bench txn`), with an ablation
  of K2-MVTO's refinements.
"""

from k2store.bench.txn import (
    MIXES,
    PROTOCOLS,
    REFINEMENTS,
    BenchConfig,
    RunResult,
    TxnRecord,
    Zipfian,
    run_mix,
    summarize,
)

__all__ = [
    "MIXES",
    "PROTOCOLS",
    "REFINEMENTS",
    "BenchConfig",
    "RunResult",
    "TxnRecord",
    "Zipfian",
    "run_mix",
    "summarize",
]
