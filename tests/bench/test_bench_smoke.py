"""Smoke tests of the benchmarks (`k2 bench ... --sim --quick`): they run, write their JSON, and
the simulator's deterministic figures keep the ordering the design promises."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from k2store.bench import tpcc, txn, visibility
from k2store.cli import main
from k2store.cluster import TxnSettings
from k2store.errors import InvalidArgument


def test_bench_tpcc_sim_quick_ranks_k2_mvto_first(tmp_path: Path) -> None:
    rc = main(["bench", "tpcc", "--sim", "--quick", "--duration", "2", "--out", str(tmp_path)])
    assert rc == 0
    (out,) = tmp_path.glob("tpcc-*.json")
    rows = {r["protocol"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"k2-mvto", "d2pl-ttc", "mvto-hlc"}
    assert all(r["throughput"] > 0 and not r["error"] for r in rows.values())
    assert rows["k2-mvto"]["throughput"] > 3 * rows["d2pl-ttc"]["throughput"]
    assert rows["k2-mvto"]["throughput"] >= rows["mvto-hlc"]["throughput"]
    assert rows["k2-mvto"]["client_time"] is True  # the default since session 16


def test_bench_tpcc_client_time_brings_k2_mvto_level_with_mvto_hlc_at_one_client(
    tmp_path: Path,
) -> None:
    # One client per region: nothing contends and each protocol runs at one local transaction's
    # latency. Without client time K2-MVTO adds its commit-wait to the round trip; with it (the
    # default) the wait passes during the round trip (README, "Client time").
    args = ["bench", "tpcc", "--sim", "--duration", "4", "--warmup", "1", "--clients-per-region",
            "1", "--protocol", "k2-mvto", "--protocol", "mvto-hlc"]  # fmt: skip
    p50 = {}
    for client_time in (False, True):
        out = tmp_path / str(client_time)
        flag = "--client-time" if client_time else "--no-client-time"
        assert main([*args, "--out", str(out), flag]) == 0
        (path,) = out.glob("tpcc-*.json")
        rows = {r["protocol"]: r for r in json.loads(path.read_text())["results"]}
        assert rows["k2-mvto"]["client_time"] is client_time
        ratio = rows["k2-mvto"]["throughput"] / rows["mvto-hlc"]["throughput"]
        p50[client_time] = rows["k2-mvto"]["p50_ms"]
        if client_time:
            assert ratio >= 1.0
            assert p50[True] == rows["mvto-hlc"]["p50_ms"]  # one round trip each
        else:
            assert ratio < 0.95
    assert p50[True] < p50[False]


def test_bench_tpcc_interactive_mode_is_slower_than_one_shot() -> None:
    cfg = tpcc.TpccConfig(
        protocols=("k2-mvto",), duration_s=2.0, warmup_s=0.5, clients_per_region=5
    )
    one_shot = tpcc.run_sim("k2-mvto", cfg)
    interactive = tpcc.run_sim("k2-mvto", tpcc.TpccConfig(**{**cfg.__dict__, "interactive": True}))
    assert one_shot.throughput > interactive.throughput


def test_split_schema_removes_2pl_s_read_write_conflict() -> None:
    """Payment's columns on rows of their own: new-order's reads no longer block payments, so
    d2PL-TTC commits more and wounds far fewer transactions (deterministic: the simulator)."""
    cfg = tpcc.TpccConfig(
        protocols=("d2pl-ttc",),
        duration_s=4.0,
        warmup_s=1.0,
        clients_per_region=10,  # five per region was too few to queue payments behind reads
        warehouses_per_region=1,
    )
    standard = tpcc.run_sim("d2pl-ttc", cfg)
    split = tpcc.run_sim("d2pl-ttc", tpcc.TpccConfig(**{**cfg.__dict__, "split_schema": True}))
    assert split.split_schema and not standard.split_schema
    assert split.throughput > 1.3 * standard.throughput
    wounded_per_commit = {
        r.split_schema: r.rules["wounded"] / r.committed for r in (standard, split)
    }
    assert wounded_per_commit[True] < wounded_per_commit[False] / 2


def test_bench_visibility_sim_quick(tmp_path: Path) -> None:
    rc = main(
        ["bench", "visibility", "--sim", "--quick", "--duration", "4", "--out", str(tmp_path)]
    )
    assert rc == 0
    (out,) = tmp_path.glob("visibility-*.json")
    results = {r["policy"]: r for r in json.loads(out.read_text())["results"]}
    vcr = {(d["home"], d["reader"]): d["p50_ms"] for d in results["vcr"]["delays"]}
    closed = {(d["home"], d["reader"]): d["p50_ms"] for d in results["closed-ts"]["delays"]}
    assert len(vcr) == 9 and set(vcr) == set(closed)
    assert all(closed[p] > 5 * vcr[p] for p in vcr)


def test_bad_bench_input_is_refused() -> None:
    assert main(["bench", "tpcc", "--sim", "--remote-fraction", "2"]) == 2
    assert main(["bench", "tpcc", "--sim", "--epsilon-us", "-5"]) == 2
    assert main(["bench", "tpcc", "--sim", "--epsilon-us", "0"]) == 2  # nodes refuse 0: say so
    # Offsets beyond the bound (nodes would refuse), or without the simulator.
    assert main(["bench", "tpcc", "--sim", "--clock-offset-us", "500"]) == 2
    assert main(["bench", "tpcc", "--clock-offset-us", "100"]) == 2
    assert main(["bench", "tpcc", "--sim", "--oracle-ttl-us", "10"]) == 2
    assert main(["bench", "txn", "--regions", "5"]) == 2  # --regions needs --sim
    assert visibility.VisibilityConfig(duration_s=1).policies == ("vcr", "watermark", "closed-ts")


def test_wait_places_cut_k2_mvto_aborts_on_tpcc() -> None:
    """`[txn] wait_places` (the refinement `--ablate` can switch off): with it, a waiting
    payment keeps later new-orders from read-marking its district under it (deterministic).
    Twenty clients per region: at ten, since intents resolve without waiting out the
    commit-wait (`early_resolve`), there are too few aborts left for places to cut."""
    cfg = tpcc.TpccConfig(
        protocols=("k2-mvto",), duration_s=2.0, warmup_s=0.5, clients_per_region=20
    )
    with_places = tpcc.run_sim("k2-mvto", cfg)
    without_places = tpcc.run_sim("k2-mvto", replace(cfg, off=("wait_places",)))
    assert with_places.abort_rate() < 0.6 * without_places.abort_rate()
    assert with_places.rules["read-mark"] < without_places.rules["read-mark"]


def test_bench_kvtier_quick_reads_through_grpc_bulk_and_shared_memory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "kvtier.json"
    assert main(["bench", "kvtier", "--quick", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    for path in ("grpc", "bulk", "shm"):
        for mode in ("sequential", "parallel"):
            assert figures[f"{path}.get_{mode}_MBps"] > 0
    assert figures["memcopy_MBps"] > 0
    printed = capsys.readouterr().out
    assert "same host through shared memory" in printed
    assert "the node's bulk TCP port" in printed


def test_bench_txn_sim_quick_runs_the_three_protocols_side_by_side(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "txn", "--sim", "--quick", "--out", str(tmp_path)]) == 0
    (out,) = tmp_path.glob("txn-*.json")
    runs = {r["protocol"]: r for r in json.loads(out.read_text())["runs"]}
    assert set(runs) == {"k2-mvto", "d2pl-ttc", "mvto-hlc"}
    assert all(
        r["mode"] == "sim" and r["summary"]["overall"]["committed"] > 0 for r in runs.values()
    )
    assert "vs d2pl" in capsys.readouterr().out


def test_reads_for_update_cut_k2_mvto_aborts_on_ycsb_rmw() -> None:
    """The read-modify-write mix in the simulator with and without `[txn] for_update`: with
    it, cross-region writes are no longer read-marked under, and the retries saved are not paid
    for in throughput (deterministic)."""
    bc = txn.BenchConfig(duration_s=6.0)
    on = txn.run_sim(bc)
    off = txn.run_sim(bc, txn=TxnSettings(protocol="k2-mvto", for_update=False))
    assert on.summary["overall"]["abort_rate"] < 0.3 * off.summary["overall"]["abort_rate"]
    assert on.summary["overall"]["throughput_tps"] > off.summary["overall"]["throughput_tps"]


def test_clock_offsets_reach_the_simulated_nodes() -> None:
    from k2store.cluster import local_cluster

    tc = tpcc.TpccConfig(sim=True, clock_offset_us=300)
    cfg = local_cluster(list(tc.region_names), [1, 2, 3], root=Path("/nonexistent-sim"))
    offsets = tpcc.clock_offsets_ns(cfg, tc)
    by_region = {n.region: offsets[n.name] for n in cfg.nodes}
    assert by_region == {"us-east": -300_000, "eu-west": 0, "ap-southeast": 300_000}
    assert tpcc.clock_offsets_ns(cfg, tpcc.TpccConfig(sim=True)) == {}


@pytest.mark.slow
def test_bench_txn_quick_on_node_processes(tmp_path: Path) -> None:
    """`k2 bench txn --quick` as CI's smoke test: local clusters of node processes, the
    read-modify-write mix under the three protocols side by side, each with a result that
    committed transactions in every region."""
    assert main(["bench", "txn", "--quick", "--out", str(tmp_path)]) == 0
    (out,) = tmp_path.glob("txn-*.json")
    runs = json.loads(out.read_text())["runs"]
    assert [r["protocol"] for r in runs] == ["k2-mvto", "d2pl-ttc", "mvto-hlc"]
    for run in runs:
        assert run["mode"] == "processes"
        by_region = run["summary"]["by_region"]
        assert set(by_region) == {"us-east", "eu-west", "ap-southeast"}
        assert all(g["committed"] > 0 for g in by_region.values())
        # The window's CPU: the three nodes and the benchmark did work, on this machine's cores.
        cpu = run["cpu"]
        assert cpu["nodes_cores"] > 0 and cpu["bench_cores"] > 0 and cpu["ms_per_commit"] > 0
        assert cpu["busy"] <= 1.05  # /proc's 10 ms ticks can round a saturated window up a little


@pytest.mark.slow
def test_bench_tpcc_and_visibility_quick_on_node_processes(tmp_path: Path) -> None:
    """`k2 bench tpcc --quick` and `k2 bench visibility --quick` on node processes (CI's smoke
    tests of the process benchmarks): every protocol and policy ran and measured something."""
    assert main(["bench", "tpcc", "--quick", "--out", str(tmp_path / "t")]) == 0
    (out,) = (tmp_path / "t").glob("tpcc-*.json")
    rows = {r["protocol"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"k2-mvto", "d2pl-ttc", "mvto-hlc"}
    assert all(r["mode"] == "processes" and r["throughput"] > 0 for r in rows.values())
    assert all(r["cpu"]["nodes_cores"] > 0 and r["cpu"]["commits"] > 0 for r in rows.values())
    assert main(["bench", "visibility", "--quick", "--out", str(tmp_path / "v")]) == 0
    (vout,) = (tmp_path / "v").glob("visibility-*.json")
    results = {r["policy"]: r for r in json.loads(vout.read_text())["results"]}
    assert "vcr" in results and not results["vcr"]["error"]
    delays = results["vcr"]["delays"]
    assert len(delays) == 9 and all(d["count"] > 0 and d["p50_ms"] > 0 for d in delays)
    assert results["vcr"]["seal_messages_per_s"] > 0


def test_ycsb_throughput_counts_only_commits_inside_the_window() -> None:
    """Transactions in flight when the window closes still finish (latency, aborts) but are not
    throughput: dividing by the drain's end, or counting them, would misstate a saturated run."""

    def rec(finished_s: float, *, committed: bool = True, total_ms: float = 5.0) -> txn.TxnRecord:
        return txn.TxnRecord("us-east", False, committed, 1, (), total_ms, total_ms, finished_s)

    records = [
        rec(1.0),
        rec(9.5),
        rec(10.0),
        rec(24.0, total_ms=15_000.0),
        rec(3.0, committed=False),
    ]
    overall = txn.summarize(records, 10.0, ["us-east"])["overall"]
    assert overall["committed"] == 4
    assert overall["committed_in_window"] == 3
    assert overall["throughput_tps"] == pytest.approx(0.3)
    assert overall["p99_ms"] == 15_000.0  # the drained transaction's latency still counts


def test_ycsb_warmup_is_not_measured() -> None:
    """Commits that finish in the warm-up are not throughput, and transactions that began in it
    count in neither latencies nor abort rates: all clients start at once with empty queues, a
    burst far above the steady rate."""

    def rec(began_s: float, total_ms: float, *, failures: tuple[str, ...] = ()) -> txn.TxnRecord:
        return txn.TxnRecord(
            "us-east",
            False,
            True,
            1 + len(failures),
            failures,
            5.0,
            total_ms,
            began_s + total_ms / 1e3,
        )

    records = [
        rec(0.0, 10.0, failures=("read-mark",)),  # began and ended in the warm-up
        rec(1.5, 1_000.0, failures=("read-mark", "read-mark")),  # began in it, ends after
        rec(3.0, 10.0),
        rec(6.0, 20.0),
    ]
    s = txn.summarize(records, 10.0, ["us-east"], warmup_s=2.0)
    overall = s["overall"]
    assert overall["committed_in_window"] == 3  # finished after the warm-up, in the window
    assert overall["throughput_tps"] == pytest.approx(3 / 8.0)
    assert overall["committed"] == 2  # began after it: the ones with latencies
    assert overall["p99_ms"] == 20.0
    assert overall["abort_rate"] == 0.0
    assert s["aborts_by_rule"] == {}
    assert s["warmup_s"] == 2.0
    assert s["commits_per_second"] == [1, 0, 1, 1, 0, 0, 1, 0, 0, 0]  # the plot's timeline
    everything = txn.summarize(records, 10.0, ["us-east"])["overall"]
    assert everything["throughput_tps"] == pytest.approx(0.4)
    assert everything["abort_rate"] == pytest.approx(3 / 7)


@pytest.mark.parametrize(("initial", "cap"), [(0.0, 1.0), (0.5, 0.1), (0.005, 61.0)])
def test_ycsb_backoff_must_be_ordered_and_bounded(initial: float, cap: float) -> None:
    with pytest.raises(InvalidArgument, match="backoff"):
        txn.BenchConfig(initial_backoff_s=initial, max_backoff_s=cap).validate()
    assert main(["bench", "txn", "--sim", "--max-backoff", "0.001"]) == 2  # below the initial


@pytest.mark.parametrize("warmup", [-1.0, 6.0, 7.0])
def test_ycsb_warmup_must_leave_a_window(warmup: float) -> None:
    with pytest.raises(InvalidArgument, match="warm-up"):
        txn.BenchConfig(duration_s=6.0, warmup_s=warmup).validate()


def test_tpcc_warmup_is_not_measured() -> None:
    """The same simulated run (the warm-up changes what is counted, not what happens): commits
    in the warm-up leave throughput, and transactions that began in it leave latencies, abort
    rates and the rules; the timeline still holds every commit."""
    cfg = tpcc.TpccConfig(
        protocols=("d2pl-ttc",), duration_s=2.0, warmup_s=0.0, clients_per_region=10
    )
    whole = tpcc.run_sim("d2pl-ttc", cfg)
    warm = tpcc.run_sim("d2pl-ttc", replace(cfg, warmup_s=0.5))

    def total(r: tpcc.TpccResult, field: str) -> int:
        return sum(getattr(g, field) for g in r.regions.values())

    assert total(warm, "warming") > 0 and total(whole, "warming") == 0
    assert total(warm, "committed") + total(warm, "warming") == total(whole, "committed")
    assert total(warm, "drained") == total(whole, "drained")
    assert sum(warm.commits_by_second.values()) == sum(whole.commits_by_second.values())
    assert warm.throughput == pytest.approx(total(warm, "committed") / 1.5)
    latencies = sum(len(g.latencies_ms) for g in warm.regions.values())
    assert latencies == total(warm, "succeeded") < total(whole, "succeeded")
    assert 0 < total(warm, "attempts") < total(whole, "attempts")
    assert sum(warm.rules.values()) < sum(whole.rules.values())
    assert tpcc.commits_per_second(warm) == [warm.commits_by_second[0], warm.commits_by_second[1]]


@pytest.mark.parametrize("warmup", ["-1", "4", "5"])
def test_tpcc_warmup_must_leave_a_window(warmup: str) -> None:
    assert main(["bench", "tpcc", "--sim", "--duration", "4", "--warmup", warmup]) == 2


def test_tpcc_throughput_leaves_out_the_drain() -> None:
    """Each terminal's last transaction starts before the window closes and ends after it: it is
    counted as drained, not as throughput, and still counts in the latencies."""
    cfg = tpcc.TpccConfig(
        protocols=("k2-mvto",), duration_s=1.0, warmup_s=0.0, clients_per_region=4
    )
    r = tpcc.run_sim("k2-mvto", cfg)
    committed = sum(g.committed for g in r.regions.values())
    drained = sum(g.drained for g in r.regions.values())
    assert 0 < drained <= 12
    assert committed > 10 * drained
    assert r.throughput == pytest.approx(committed / 1.0)
    assert sum(len(g.latencies_ms) for g in r.regions.values()) == committed + drained
