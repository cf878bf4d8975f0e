"""Short Jepsen runs on real node processes (slow), and the tests that will prove the checkers
bite once the node has settings that break the protocol on purpose (skipped until then).

Each run brings up its own three-region cluster in a temporary directory, drives clients in
every region under a nemesis for `LOAD_S` seconds, heals, does final reads and checks. Bounded:
the load by its time, each operation by its timeout, the drain by `drain_s`, the whole test by
pytest-timeout.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from jepsen_tests.runner import RunOptions, RunResult, run

LOAD_S = 18.0


def _run(tmp_path: Path, workload: str, nemesis: str, **kw: object) -> RunResult:
    opts = RunOptions(
        workload=workload,
        nemesis=nemesis,
        time_s=LOAD_S,
        clients=6,
        out=tmp_path / "out",
        seed=1,
        drain_s=12.0,
        settle_s=2.0,
        **kw,  # type: ignore[arg-type]
    )
    result = run(opts, say=print)
    print((tmp_path / "out" / "report.txt").read_text())
    return result


AVAILABILITY = "availability after the heal (final reads)"


def _assert_clean(result: RunResult, min_ok: int) -> None:
    """No consistency anomaly, enough successful operations, and every final read served."""
    bad = {c.checker: dict(c.counts) for c in result.checks if c.valid is not True}
    consistency = {k: v for k, v in bad.items() if k != AVAILABILITY}
    assert not consistency, f"anomalies or undecided checks: {consistency}"
    ok = sum(n for k, n in result.op_counts.items() if k.endswith(":ok"))
    assert ok >= min_ok, f"only {ok} operations succeeded: {result.op_counts}"
    assert AVAILABILITY not in bad, f"the cluster did not serve every final read: {bad}"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_list_append_under_kill_is_strict_serializable(tmp_path: Path) -> None:
    result = _run(tmp_path, "append", "kill")
    _assert_clean(result, min_ok=30)
    assert result.faults, "the nemesis injected nothing"
    assert (tmp_path / "out" / "history.jsonl").exists()
    assert (tmp_path / "out" / "results.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bank_under_kill_keeps_the_total_and_every_acknowledged_transfer(tmp_path: Path) -> None:
    result = _run(tmp_path, "bank", "kill")
    _assert_clean(result, min_ok=30)
    assert result.op_counts.get("final:ok") == 1


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_replica_reads_under_partition_are_exact_and_never_fork(tmp_path: Path) -> None:
    result = _run(tmp_path, "replica", "partition")
    unavailable = next(c for c in result.checks if c.checker == AVAILABILITY)
    if unavailable.valid is False:
        # Consistency must hold regardless; only the availability verdict is excused.
        result.checks.remove(unavailable)
        _assert_clean(result, min_ok=30)
        pytest.xfail(
            "known bug, not in jepsen_tests: a region's visible timestamp can stay 0 from startup "
            f"(replica reads there fail NotVisibleYet): {unavailable.anomalies}"
        )
    _assert_clean(result, min_ok=30)
    assert result.op_counts.get("replica-read:ok", 0) >= 10


# -- proof that the checkers bite (issue 5, item 4) ----------------------------------------------
# Each needs a node setting that breaks one protocol rule, refused unless the cluster file also
# says `unsafe_for_testing = true`, and a way for RunOptions to put it into the cluster file
# (e.g. RunOptions.settings: a ClusterSettings to start from). When the hook exists, drop the
# skip mark and pass the setting.

BROKEN = "needs a protocol-breaking node setting that does not exist yet (issue 5, item 4)"


@pytest.mark.slow
@pytest.mark.skip(
    reason="not observable here: timestamps are at most the oracle TTL (5 ms) ahead of real time "
    "for local transactions, below any client round trip, and future-stamped ones are "
    "dispatched to arrive at their timestamp, so their acknowledgement comes after it anyway; "
    "skipping commit-wait needs clock error beyond the bound to show (the clock hook)"
)
def test_skipping_commit_wait_is_caught_as_a_realtime_anomaly(tmp_path: Path) -> None:
    # The coordinator acknowledges a commit without TrueTime.wait_until_after(commit_ts) (and a
    # read-only commit without waiting past max_version_ts). A client in another region then
    # begins with a lower timestamp than an acknowledged write and misses it.
    result = _run(tmp_path, "append", "none", unsafe=("txn.unsafe_skip_commit_wait",))
    kinds = {k for c in result.checks for k in c.kinds}
    assert kinds & {"lost-append", "G-single-realtime", "G2-item-realtime", "G1c-realtime"}


@pytest.mark.slow
def test_ignoring_read_marks_is_caught_as_g_single_or_g2(tmp_path: Path) -> None:
    # The participant's write rule skips the read-mark check, so a write below a later
    # reader's timestamp is installed under it (the reader's snapshot is no longer repeatable).
    result = _run(tmp_path, "append", "none", unsafe=("txn.unsafe_ignore_read_marks",))
    kinds = {k for c in result.checks for k in c.kinds}
    # A write installed under a later read loses appends, which list-append exposes as reads
    # whose orders cannot be reconciled, or as acknowledged appends missing from later reads.
    assert kinds & {"G-single", "G2-item", "incompatible-order", "lost-append"}


@pytest.mark.slow
@pytest.mark.skip(reason=f"{BROKEN}: a per-node clock offset and [cluster] refuse_beyond_bound")
def test_clock_skew_beyond_the_bound_without_refusal_is_caught(tmp_path: Path) -> None:
    # Hook: a node option that wraps its SystemClock in truetime.SkewedClock(offset_ns=...)
    # (settable at run time for a clock nemesis, like net.toml), plus a test-only switch that
    # keeps the oracle issuing timestamps when the skew exceeds max_uncertainty_us. One region's
    # oracle then runs 50 ms behind: its transactions are ordered before writes they follow.
    result = _run(tmp_path, "register", "none")
    kinds = {k for c in result.checks for k in c.kinds}
    assert kinds & {"G-single-realtime", "nonlinearizable", "lost-append"}


@pytest.mark.slow
def test_sealing_before_intents_resolve_is_caught_by_replica_reads(tmp_path: Path) -> None:
    # The leader ships SEAL(e) without waiting for epoch e's intents to resolve, so a region's
    # visible timestamp covers a transaction whose writes have not reached it.
    result = _run(tmp_path, "replica", "none", unsafe=("replication.unsafe_seal_before_resolve",))
    kinds = {k for c in result.checks for k in c.kinds}
    assert kinds & {"snapshot-gap", "long-fork", "future-read"}
