"""Jepsen runs on real node processes (slow, still in CI), and the proof that the checkers bite.

Each run brings up its own three-region cluster in a temporary directory, drives clients in
every region under a nemesis, heals, does final reads and checks. Bounded: the load by its time,
each operation by its timeout, the drain by `drain_s`, the whole test by pytest-timeout.

- CI: every workload without faults (`QUIET_S` of load) and under a fault mix of every nemesis
  (`MIX_S`, about five faults: kill, pause, partition, latency and clock, one each); then each
  protocol-breaking setting, which the checkers must catch, and the same clock skew without it,
  which the nodes must refuse.
- Long runs, by environment: ``K2_JEPSEN_MINUTES=5 python -m pytest tests/jepsen -m slow -k
  long`` runs every workload for that many minutes under every nemesis (skipped otherwise).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from jepsen_tests.runner import RunOptions, RunResult, run

QUIET_S = 10.0
MIX_S = 20.0
BROKEN_S = 15.0
LONG_MINUTES = float(os.environ.get("K2_JEPSEN_MINUTES", "0") or 0)
WORKLOADS = ("append", "register", "bank", "replica")
AVAILABILITY = "availability after the heal (final reads)"
FAULT_MIX = "all"
"""kill, pause, partition (isolated region, halves, majorities ring), latency and clock."""


def _run(tmp_path: Path, workload: str, nemesis: str, time_s: float, **kw: Any) -> RunResult:
    opts = RunOptions(
        workload=workload,
        nemesis=nemesis,
        time_s=time_s,
        clients=6,
        out=tmp_path / "out",
        seed=kw.pop("seed", 1),
        drain_s=12.0,
        settle_s=2.0,
        **kw,
    )
    result = run(opts, say=print)
    print((tmp_path / "out" / "report.txt").read_text())
    return result


def _assert_clean(result: RunResult, min_ok: int) -> None:
    """No consistency anomaly, enough successful operations, and every final read served."""
    bad = {c.checker: dict(c.counts) for c in result.checks if c.valid is not True}
    consistency = {k: v for k, v in bad.items() if k != AVAILABILITY}
    assert not consistency, f"anomalies or undecided checks: {consistency}"
    ok = sum(n for k, n in result.op_counts.items() if k.endswith(":ok"))
    assert ok >= min_ok, f"only {ok} operations succeeded: {result.op_counts}"
    assert AVAILABILITY not in bad, f"the cluster did not serve every final read: {bad}"


def _assert_clean_or_known_replica_bug(result: RunResult, workload: str, min_ok: int) -> None:
    unavailable = next(c for c in result.checks if c.checker == AVAILABILITY)
    if workload == "replica" and unavailable.valid is False:
        # Consistency must hold regardless; only the availability verdict is excused.
        result.checks.remove(unavailable)
        _assert_clean(result, min_ok)
        pytest.xfail(
            "known bug, not in jepsen_tests: a region's visible timestamp can stay 0 from startup "
            f"(replica reads there fail NotVisibleYet): {unavailable.anomalies}"
        )
    _assert_clean(result, min_ok)


def _kinds(result: RunResult) -> set[str]:
    return {k for c in result.checks for k in c.kinds}


# -- every workload, without faults and under a fault mix ------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("workload", WORKLOADS)
def test_without_faults_every_workload_is_clean(tmp_path: Path, workload: str) -> None:
    result = _run(tmp_path, workload, "none", QUIET_S)
    _assert_clean_or_known_replica_bug(result, workload, min_ok=15)
    assert not result.faults


@pytest.mark.slow
@pytest.mark.timeout(200)
@pytest.mark.parametrize(("workload", "seed"), [(w, i + 1) for i, w in enumerate(WORKLOADS)])
def test_under_a_fault_mix_every_workload_is_clean(
    tmp_path: Path, workload: str, seed: int
) -> None:
    result = _run(
        tmp_path,
        workload,
        FAULT_MIX,
        MIX_S,
        seed=seed,
        fault_interval_s=(0.5, 1.5),
        fault_duration_s=(1.5, 2.5),
    )
    kinds = {f["kind"] for f in result.faults}
    assert len(result.faults) >= 3 and len(kinds) >= 3, f"too few faults: {result.faults}"
    assert all(f["end_s"] >= f["start_s"] for f in result.faults), "a fault never healed"
    assert (tmp_path / "out" / "history.jsonl").exists()
    assert (tmp_path / "out" / "results.json").exists()
    if workload == "bank":
        assert result.op_counts.get("final:ok") == 1
    _assert_clean_or_known_replica_bug(result, workload, min_ok=15)


# -- proof that the checkers bite (issue 5, item 4) ----------------------------------------------

# The clock cases run without wide-area emulation: transactions are then stamped from their
# region's batch and dispatched at once (no future timestamps, whose aligned dispatch already
# waits out the uncertainty), so what commit-wait and the clock bound protect shows up within a
# few hundred milliseconds, and many more transactions run.
WITHIN_CLOCKS = {"wan": False, "epsilon_us": 300_000, "max_uncertainty_us": 600_000}
"""A large uncertainty (300 ms, refusing beyond 600 ms), so that skews within the bound are
large enough to see. The K2-VCR grace (25 ms) is far below them, so cross-region writes from a
skewed region are often sealed out and retried: that costs liveness only."""
WITHIN = (("us-east", 250.0), ("eu-west", -250.0))
"""Two clocks 500 ms apart, each within its 300 ms uncertainty."""
BEYOND = (("us-east", 1000.0),)
"""us-east 1 s ahead, far beyond the default 5 ms bound (and 0.4 ms uncertainty)."""
REALTIME = {"G-single-realtime", "G2-item-realtime", "G1c-realtime", "nonlinearizable"}


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_skipping_commit_wait_is_caught_as_a_realtime_anomaly(tmp_path: Path) -> None:
    # Clocks within the bound but apart: us-east stamps up to 555 ms ahead of true time (its
    # skew, the uncertainty and the batch TTL), eu-west 55 ms. Acknowledged at once, without
    # waiting out its timestamp, a us-east write is missed for about half a second by readers
    # elsewhere that begin after the acknowledgement: stale reads. (With commit-wait the same
    # clocks give a clean history: `k2 jepsen --workload register --no-wan --epsilon-us 300000
    # --max-uncertainty-us 600000 --skew us-east=250 --skew eu-west=-250`; the clock nemesis
    # in the fault-mix runs skews clocks within the bound with commit-wait on.)
    result = _run(
        tmp_path,
        "register",
        "none",
        BROKEN_S,
        skew=WITHIN,
        unsafe=("txn.unsafe_skip_commit_wait",),
        **WITHIN_CLOCKS,
    )
    assert _kinds(result) & REALTIME, f"not caught: {_kinds(result)}"


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_client_time_is_clean_with_the_same_clocks(tmp_path: Path) -> None:
    # The clocks of the case above with every safeguard on, and clients that hold time
    # themselves (README, Client time): their transactions are stamped from the host's clock
    # (exact, so within any bound) where that lies inside the coordinator's now(), and they wait
    # out the commit-wait themselves; the coordinators do not. Nothing may be stale. Where a
    # node's clock runs behind the host's by more than the request's trip, the clients' readings
    # are ahead of its now().latest, and that node keeps their commit-waits and counts them.
    result = _run(
        tmp_path, "register", "none", BROKEN_S, skew=WITHIN, client_time=True, **WITHIN_CLOCKS
    )
    _assert_clean(result, min_ok=15)
    behind = {f"{region}-1" for region, ms in WITHIN if ms < 0}  # eu-west-1
    counts = result.client_clock_ahead
    assert behind and set(counts) >= behind, counts
    assert all((counts[n] > 0) == (n in behind) for n in counts), counts


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_ignoring_read_marks_is_caught_as_g_single_or_g2(tmp_path: Path) -> None:
    # The participant's write rule skips the read-mark check, so a write below a later
    # reader's timestamp is installed under it (the reader's snapshot is no longer repeatable).
    result = _run(tmp_path, "append", "none", 18.0, unsafe=("txn.unsafe_ignore_read_marks",))
    # A write installed under a later read loses appends, which list-append exposes as reads
    # whose orders cannot be reconciled, or as acknowledged appends missing from later reads.
    assert _kinds(result) & {"G-single", "G2-item", "incompatible-order", "lost-append"}


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_clock_skew_beyond_the_bound_without_refusal_is_caught(tmp_path: Path) -> None:
    # us-east's clock is 1 s ahead and knows it (its error bound says so), but the node
    # ignores the bound: its oracle stamps a second ahead of true time and its commit-wait
    # (0.4 ms of uncertainty) ends at once, so readers elsewhere miss its acknowledged writes
    # for about a second.
    result = _run(
        tmp_path,
        "register",
        "none",
        BROKEN_S,
        skew=BEYOND,
        wan=False,
        unsafe=("cluster.unsafe_ignore_clock_bound",),
    )
    assert _kinds(result) & REALTIME, f"not caught: {_kinds(result)}"


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("protocol", ["k2-mvto", "mvto-hlc"])
def test_a_clock_skewed_beyond_the_bound_is_refused(tmp_path: Path, protocol: str) -> None:
    # The same clock with the bound honoured: us-east refuses to issue timestamps (its clients'
    # transactions fail with ClockUncertain), the other regions serve, and the history is clean.
    # MVTO-HLC stamps from its hybrid clock, not the oracle: its coordinator must refuse too
    # (it did not, and a stale read followed).
    result = _run(tmp_path, "register", "none", BROKEN_S, skew=BEYOND, wan=False, protocol=protocol)
    _assert_clean(result, min_ok=15)
    lines = (tmp_path / "out" / "history.jsonl").read_text().splitlines()
    history = [json.loads(line) for line in lines]
    refused = [
        op for op in history if op["type"] == "fail" and "ClockUncertain" in (op.get("error") or "")
    ]
    assert refused, "the node with a clock beyond the bound did not refuse"
    assert all("us-east-1" in op["error"] for op in refused), refused[:3]


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_sealing_before_intents_resolve_is_caught_by_replica_reads(tmp_path: Path) -> None:
    # The leader ships SEAL(e) without waiting for epoch e's intents to resolve, so a region's
    # visible timestamp covers a transaction whose writes have not reached it. The workload's
    # one-key inserts lay their intent and resolve it in the same request when writes are held
    # for the commit (no window for the early seal): here they are sent first, committed after.
    result = _run(
        tmp_path,
        "replica",
        "none",
        18.0,
        unsafe=("replication.unsafe_seal_before_resolve",),
        txn_off=("commit_with_writes",),
    )
    assert _kinds(result) & {"snapshot-gap", "long-fork", "future-read"}


# -- long runs (by environment) --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not LONG_MINUTES, reason="long runs: set K2_JEPSEN_MINUTES (e.g. 5)")
@pytest.mark.timeout(int(LONG_MINUTES * 60 + 600))
@pytest.mark.parametrize("workload", WORKLOADS)
def test_long_run_under_every_nemesis_is_clean(tmp_path: Path, workload: str) -> None:
    result = _run(tmp_path, workload, "all", LONG_MINUTES * 60, seed=11)
    kinds = {f["kind"] for f in result.faults}
    assert kinds == {"kill", "pause", "partition", "latency", "clock"}, kinds
    _assert_clean_or_known_replica_bug(result, workload, min_ok=50)
