"""Throughput against concurrency (`--sweep`): the option's input checks, the table's ratios, and
both benchmarks' sweeps in the simulator end to end (deterministic figures)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from k2store.bench.sweep import (
    SweepPoint,
    average_seeds,
    parse_counts,
    ratio_ranges,
    ratios,
    sweep_table,
    write_sweep,
)
from k2store.cli import main
from k2store.errors import InvalidArgument


def point(protocol: str, n: int, tps: float, *, error: str = "") -> SweepPoint:
    return SweepPoint(protocol, n, 3 * n, tps, 10.0, 100.0, 0.02, 0.04, 0, error)


def test_parse_counts_sorts_dedups_and_refuses_bad_input() -> None:
    assert parse_counts("30, 10,100,10,") == [10, 30, 100]
    for bad in ("", ",", "10,x", "0", "-3", "1.5", ",".join(str(i) for i in range(1, 14))):
        with pytest.raises(InvalidArgument):
            parse_counts(bad)


def test_sweep_table_puts_k2_s_ratios_beside_each_concurrency() -> None:
    points = [
        point("k2-mvto", 10, 300.0),
        point("d2pl-ttc", 10, 100.0),
        point("mvto-hlc", 10, 250.0),
        point("k2-mvto", 3, 90.0),
        point("d2pl-ttc", 3, 60.0),
        point("mvto-hlc", 3, 0.0, error="cluster did not start"),
    ]
    assert ratios(points, "d2pl-ttc") == {3: 1.5, 10: 3.0}
    assert ratios(points, "mvto-hlc") == {10: 1.2}  # no ratio against a failed run
    lines = sweep_table(points, ["k2-mvto", "d2pl-ttc", "mvto-hlc"])
    rows = [line.split() for line in lines[1:3]]
    assert [r[0] for r in rows] == ["3", "10"]  # ascending, whatever the order of the runs
    assert rows[0][2:7] == ["90.0", "60.0", "-", "1.50x", "-"]
    assert rows[1][2:7] == ["300.0", "100.0", "250.0", "3.00x", "1.20x"]
    assert any("mvto-hlc at 3 clients/region: FAILED: cluster did not start" in x for x in lines)


def test_write_sweep_writes_json_without_nan_and_a_plot(tmp_path: Path) -> None:
    points = [point("k2-mvto", 1, 50.0), point("d2pl-ttc", 1, 25.0)]
    points.append(SweepPoint("mvto-hlc", 1, 3, math.nan, math.nan, math.nan, 0, 0, 0, "x"))
    written = write_sweep(points, {"seed": 1}, tmp_path / "s", "title")
    doc = json.loads(written[0].read_text())
    assert doc["k2_vs_d2pl"] == {"1": 2.0} and doc["points"][2]["throughput"] is None
    assert len(written) == 2 and written[1].suffix == ".png" and written[1].stat().st_size > 0


def test_tpcc_sweep_in_the_simulator(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "tpcc", "--sim", "--quick", "--duration", "1", "--out", str(tmp_path)]
    assert main([*argv, "--sweep", "2,6"]) == 0
    (out,) = tmp_path.glob("tpcc-sweep-*.json")
    doc = json.loads(out.read_text())
    got = {(p["protocol"], p["clients_per_region"]) for p in doc["points"]}
    assert got == {(p, n) for p in ("k2-mvto", "d2pl-ttc", "mvto-hlc") for n in (2, 6)}
    tps = {(p["protocol"], p["clients_per_region"]): p["throughput"] for p in doc["points"]}
    assert all(tps[p, 6] > tps[p, 2] for p in ("k2-mvto", "d2pl-ttc", "mvto-hlc"))  # not saturated
    assert set(doc["k2_vs_d2pl"]) == {"2", "6"} and doc["k2_vs_d2pl"]["6"] > 1.0
    assert "k2/d2pl" in capsys.readouterr().out
    assert (tmp_path / out.name.replace(".json", ".png")).exists()
    # The sweep decides the concurrency: one given beside it is a contradiction.
    assert main([*argv, "--sweep", "2", "--clients-per-region", "4"]) == 2
    assert main([*argv, "--sweep", "2,zero"]) == 2
    # Over two seeds in worker processes: every run kept, the points their means.
    seeded = tmp_path / "seeds"
    assert main([*argv[:-1], str(seeded), "--sweep", "2", "--seeds", "1,2", "--jobs", "2"]) == 0
    (out,) = seeded.glob("tpcc-sweep-*.json")
    doc = json.loads(out.read_text())
    assert {(r["protocol"], r["seed"]) for r in doc["runs"]} == {
        (p, s) for p in ("k2-mvto", "d2pl-ttc", "mvto-hlc") for s in (1, 2)
    }
    k2 = [r["throughput"] for r in doc["runs"] if r["protocol"] == "k2-mvto"]
    assert k2[0] != k2[1] and doc["points"][0]["throughput"] == pytest.approx(sum(k2) / 2)
    # Restamps (not aborts) are kept per run and summed on the averaged point.
    point = next(p for p in doc["points"] if p["protocol"] == "k2-mvto")
    assert point["restamps"] == sum(
        r["restamps"] for r in doc["runs"] if r["protocol"] == "k2-mvto"
    )
    assert main([*argv, "--seeds", "1,2"]) == 2  # seeds belong to a sweep
    assert main(["bench", "tpcc", "--quick", "--sweep", "2", "--jobs", "2"]) == 2  # processes


def test_txn_sweep_in_the_simulator(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "txn", "--sim", "--quick", "--duration", "3", "--out", str(tmp_path)]
    assert main([*argv, "--protocol", "k2-mvto", "--sweep", "1,3"]) == 0
    (out,) = tmp_path.glob("txn-sweep-*.json")
    doc = json.loads(out.read_text())
    assert [(p["protocol"], p["clients"]) for p in doc["points"]] == [
        ("k2-mvto", 3),
        ("k2-mvto", 9),
    ]
    assert doc["points"][1]["throughput"] > doc["points"][0]["throughput"] > 0
    assert doc["k2_vs_d2pl"] == {}  # no baseline ran
    printed = capsys.readouterr().out
    assert "clients/region" in printed and "k2/d2pl" in printed
    # --protocol is repeatable, as in `k2 bench tpcc` (it used to keep only the last).
    two = tmp_path / "two"
    argv2 = [*argv[:-1], str(two), "--protocol", "k2-mvto", "--protocol", "mvto-hlc"]
    assert main([*argv2, "--sweep", "1"]) == 0
    (out,) = two.glob("txn-sweep-*.json")
    doc = json.loads(out.read_text())
    assert [p["protocol"] for p in doc["points"]] == ["k2-mvto", "mvto-hlc"]
    assert set(doc["k2_vs_hlc"]) and doc["k2_vs_d2pl"] == {}
    with pytest.raises(SystemExit) as exit_info:  # argparse's usage error
        main([*argv, "--protocol", "no-such"])
    assert exit_info.value.code == 2
    assert main([*argv, "--sweep", "2", "--ablate"]) == 2


def test_seeds_average_the_runs_and_range_the_ratios() -> None:
    def at(protocol: str, seed: int, tps: float) -> SweepPoint:
        return SweepPoint(protocol, 10, 30, tps, 10.0, 100.0, 0.1 * seed, 0.2, seed, seed=seed)

    points = [
        at("k2-mvto", 1, 300.0),
        at("d2pl-ttc", 1, 100.0),
        at("k2-mvto", 2, 200.0),
        at("d2pl-ttc", 2, 200.0),
    ]
    (k2,) = [p for p in average_seeds(points) if p.protocol == "k2-mvto"]
    assert k2.throughput == 250.0 and k2.throughputs == (300.0, 200.0) and k2.seed is None
    assert k2.abort_rate == pytest.approx(0.15) and k2.gave_up == 3
    assert ratios(points, "d2pl-ttc") == {10: pytest.approx(250.0 / 150.0)}  # of the means
    assert ratio_ranges(points, "d2pl-ttc") == {10: (1.0, 3.0)}
    row = sweep_table(points, ["k2-mvto", "d2pl-ttc"])[1]
    assert "1.67x (1.00-3.00)" in row
    # A failed run at one seed fails the point rather than averaging the seeds that ran.
    broken = [*points[:3], SweepPoint("d2pl-ttc", 10, 30, 0, 0, 0, 0, 0, 0, "boom", seed=2)]
    assert ratios(broken, "d2pl-ttc") == {}
    assert ratio_ranges(points[:2], "d2pl-ttc") == {}  # one seed: no range


def test_txn_sweep_over_seeds_in_worker_processes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--seeds` runs every point at each seed; `--jobs 2` runs them in worker processes and
    gets the same deterministic figures as one at a time."""
    argv = ["bench", "txn", "--sim", "--quick", "--duration", "2", "--sweep", "2"]
    docs = []
    for jobs in ("1", "2"):
        out = tmp_path / jobs
        assert main([*argv, "--seeds", "1,2", "--jobs", jobs, "--out", str(out)]) == 0
        (path,) = out.glob("txn-sweep-*.json")
        docs.append(json.loads(path.read_text()))
    serial, parallel = docs
    assert serial["runs"] == parallel["runs"] and serial["seeds"] == [1, 2]
    assert len(serial["runs"]) == 6 and len(serial["points"]) == 3
    by_seed = {(r["protocol"], r["seed"]): r["throughput"] for r in serial["runs"]}
    assert by_seed["k2-mvto", 1] != by_seed["k2-mvto", 2]  # the seed reaches the run
    k2 = next(p for p in serial["points"] if p["protocol"] == "k2-mvto")
    assert k2["throughput"] == pytest.approx((by_seed["k2-mvto", 1] + by_seed["k2-mvto", 2]) / 2)
    lo, hi = serial["k2_vs_d2pl_range"]["2"]
    assert lo <= serial["k2_vs_d2pl"]["2"] <= hi
    assert "the per-seed ratios' range in brackets" in capsys.readouterr().out
    # Seeds belong to a sweep, and not beside --seed; workers only for simulated runs.
    assert main(["bench", "txn", "--sim", "--quick", "--seeds", "1,2"]) == 2
    assert main([*argv, "--seeds", "1,2", "--seed", "3"]) == 2
    assert main(["bench", "txn", "--quick", "--sweep", "2", "--jobs", "2"]) == 2
    assert main([*argv, "--jobs", "0"]) == 2
    assert main([*argv, "--seeds", "1,x"]) == 2


def test_tpcc_ablation_in_the_simulator(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`k2 bench tpcc --ablate`: the default and each refinement off, side by side; future
    timestamps are what keep cross-region new-orders from stalling the warehouses' lines
    (deterministic: the simulator)."""
    argv = ["bench", "tpcc", "--sim", "--quick", "--duration", "1", "--out", str(tmp_path)]
    assert main([*argv, "--ablate"]) == 0
    (out,) = tmp_path.glob("tpcc-ablation-*.json")
    variants = {v["label"]: v for v in json.loads(out.read_text())["variants"]}
    assert len(variants) == 12 and variants["default"]["vs_default"] == 1.0
    assert {"no commit_with_writes", "no early_resolve", "no restamp"} <= set(variants)
    assert {v["protocol"] for v in variants.values()} == {"k2-mvto"}
    assert variants["no future_ts"]["throughput"] < 0.8 * variants["default"]["throughput"]
    assert variants["no wait_for_lower"]["aborts_by_rule"].get("intent", 0) > 0
    assert variants["no restamp"]["restamps"] == 0 and variants["default"]["restamps"] >= 0
    assert "ablation (each row one refinement off" in capsys.readouterr().out
    # Only the MVTO protocols have the refinements, and one protocol at a time.
    assert main([*argv, "--ablate", "--protocol", "d2pl-ttc"]) == 2
    assert main([*argv, "--ablate", "--protocol", "k2-mvto", "--protocol", "mvto-hlc"]) == 2
