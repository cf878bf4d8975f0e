"""jepsen_tests: the real-cluster fault-injection suite (work of the consistency issue).

Will hold nemeses (kill -9 and restart, SIGSTOP, partitions, latency, clock skew within and beyond
the bound), workloads (list-append, rw-register, bank, replica reads), histories in JSON Lines with
Elle's field names, and checkers (Elle's dependency-graph anomalies, Wing-Gong-Lowe linearizability,
the bank invariant), driven by `k2 jepsen`.
"""
