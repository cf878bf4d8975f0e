"""The benchmarks' CPU meter (k2store/bench/cpu.py): /proc parsing, the window's arithmetic, and
what it reports when it cannot know."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from k2store.bench.cpu import CpuMeter, CpuUse, machine_cpu_s, process_cpu_s
from k2store.bench.sweep import SweepPoint, average_seeds, sweep_table, write_sweep

TICK = os.sysconf("SC_CLK_TCK")


def write_stat(proc: Path, pid: int, utime: int, stime: int, comm: str = "python3") -> None:
    d = proc / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    # Fields 3-13 (state .. cmajflt), then utime (14) and stime (15), then the rest.
    rest = "S 1 2 3 4 5 6 7 8 9 10 " + f"{utime} {stime} 0 0 20 0 1 0 100 0 0"
    (d / "stat").write_text(f"{pid} ({comm}) {rest}\n")


def test_process_cpu_reads_utime_and_stime_past_an_awkward_command_name(tmp_path: Path) -> None:
    write_stat(tmp_path, 7, 3 * TICK, TICK, comm="k2 (node) x")
    assert process_cpu_s(7, tmp_path) == pytest.approx(4.0)
    assert process_cpu_s(8, tmp_path) is None  # gone
    (tmp_path / "9").mkdir()
    (tmp_path / "9" / "stat").write_text("9 (x) S 1 2\n")
    assert process_cpu_s(9, tmp_path) is None  # truncated


def test_process_cpu_of_this_process_grows_with_work() -> None:
    before = process_cpu_s(os.getpid())
    assert before is not None
    start = os.times()
    while (lambda t: t.user + t.system)(os.times()) - (start.user + start.system) < 0.05:
        sum(range(1000))
    after = process_cpu_s(os.getpid())
    assert after is not None and after - before >= 0.03


class ManualClock:
    def __init__(self) -> None:
        self.ns = 0

    def __call__(self) -> int:
        return self.ns


def test_meter_reports_cores_busy_and_cpu_per_commit_over_its_window(tmp_path: Path) -> None:
    clock, mine = ManualClock(), [10.0]
    write_stat(tmp_path, 1, 100 * TICK, 0)
    write_stat(tmp_path, 2, 50 * TICK, 0)
    meter = CpuMeter({"a": 1, "b": 2}, clock, self_cpu_s=lambda: mine[0], proc=tmp_path, cores=2)
    assert meter.stop(10) is None  # never started
    meter.start()
    clock.ns += 4_000_000_000
    write_stat(tmp_path, 1, 103 * TICK, 1 * TICK)  # 4 s of CPU
    write_stat(tmp_path, 2, 52 * TICK, 0)  # 2 s
    mine[0] = 12.0  # 2 s
    use = meter.stop(commits=4000)
    assert use is not None
    assert use.nodes_cores == pytest.approx(1.5) and use.bench_cores == pytest.approx(0.5)
    assert use.busy == pytest.approx(1.0)
    assert use.ms_per_commit == pytest.approx(2.0)  # 8 CPU seconds over 4,000 commits
    assert use.describe() == (
        "cpu: nodes 1.50 + benchmark 0.50 of 2 cores (100% busy), 2.0 ms per commit"
    )
    assert use.to_json()["busy"] == pytest.approx(1.0)


def write_machine(proc: Path, busy: int, idle: int, steal: int = 0) -> None:
    """/proc/stat's first line: user nice system idle iowait irq softirq steal guest guest_nice
    (busy ticks spread over user, system and irq; guest time is inside user)."""
    u, sy, irq = busy // 2, busy // 4, busy - busy // 2 - busy // 4
    (proc / "stat").write_text(
        f"cpu  {u} 0 {sy} {idle} 7 {irq} 0 {steal} 5 0\ncpu0 1 2 3 4 5 6 7 8 9 10\nintr 1\n"
    )


def test_meter_reports_other_work_on_the_machine_beside_the_run(tmp_path: Path) -> None:
    """Work the run's processes do not account for (another job, a noisy neighbour's stolen
    time) is reported beside the figures, which it makes lower than the protocol allows."""
    clock, mine = ManualClock(), [0.0]
    write_stat(tmp_path, 1, 0, 0)
    write_machine(tmp_path, busy=1000 * TICK, idle=50 * TICK)
    assert machine_cpu_s(tmp_path) == pytest.approx(1000.0)
    meter = CpuMeter({"a": 1}, clock, self_cpu_s=lambda: mine[0], proc=tmp_path, cores=2)
    meter.start()
    clock.ns += 2_000_000_000
    write_stat(tmp_path, 1, 2 * TICK, 0)  # the node: 1 core
    mine[0] = 0.4  # the benchmark: 0.2 cores
    # The machine: 3 s busy (1.5 cores) of which 0.4 s stolen by the hypervisor.
    write_machine(tmp_path, busy=1002 * TICK + TICK * 3 // 5, idle=51 * TICK, steal=TICK * 2 // 5)
    use = meter.stop(commits=100)
    assert use is not None and use.machine_cores is not None
    assert use.machine_cores == pytest.approx(1.5, abs=0.02)
    assert use.other_cores == pytest.approx(0.3, abs=0.02)
    assert use.describe().endswith("; other work 0.30 cores")
    assert use.to_json()["other_cores"] == pytest.approx(0.3, abs=0.02)
    # A quiet machine (the run's own work only) says nothing more; unreadable, neither.
    quiet = CpuUse(2.0, 1.0, 0.2, 2, 100, machine_cores=1.22)
    assert "other work" not in quiet.describe() and quiet.other_cores == pytest.approx(0.02)
    assert CpuUse(2.0, 1.0, 0.2, 2, 100).other_cores is None
    (tmp_path / "stat").write_text("intr 1 2 3\n")
    assert machine_cpu_s(tmp_path) is None


def test_meter_reports_nothing_when_a_node_vanished_or_there_are_none(tmp_path: Path) -> None:
    clock = ManualClock()
    write_stat(tmp_path, 1, 100, 0)
    meter = CpuMeter({"a": 1}, clock, self_cpu_s=lambda: 0.0, proc=tmp_path, cores=2)
    meter.start()
    clock.ns += 10**9
    (tmp_path / "1" / "stat").unlink()
    assert meter.stop(5) is None
    empty = CpuMeter({}, clock, self_cpu_s=lambda: 0.0, proc=tmp_path, cores=2)
    empty.start()
    clock.ns += 10**9
    assert empty.stop(5) is None
    no_commits = CpuUse(1.0, 0.5, 0.5, 2, 0)
    assert math.isnan(no_commits.ms_per_commit) and "per commit" not in no_commits.describe()
    assert no_commits.to_json()["ms_per_commit"] is None


def pt(protocol: str, n: int, tps: float, busy: float = math.nan, seed: int = 1) -> SweepPoint:
    return SweepPoint(protocol, n, 3 * n, tps, 1.0, 9.0, 0.0, 0.0, 0, seed=seed, cpu_busy=busy)


def test_sweep_table_shows_the_busiest_run_only_when_processes_measured_it() -> None:
    sim = sweep_table([pt("k2-mvto", 1, 10.0), pt("d2pl-ttc", 1, 5.0)], ["k2-mvto", "d2pl-ttc"])
    assert "cpu busy" not in sim[0] and "cpu busy" not in sim[-1]
    lines = sweep_table(
        [pt("k2-mvto", 1, 10.0, 0.45), pt("d2pl-ttc", 1, 5.0, 0.3),
         pt("k2-mvto", 10, 90.0, 0.97), pt("d2pl-ttc", 10, 20.0, math.nan)],
        ["k2-mvto", "d2pl-ttc"],
    )  # fmt: skip
    assert lines[0].split()[-2:] == ["cpu", "busy"]
    assert [line.split()[-1] for line in lines[1:3]] == ["45%", "97%"]
    assert "cpu busy:" in lines[-1]
    # Over seeds the busiest seed stands for the point.
    (avg,) = average_seeds([pt("k2-mvto", 3, 1.0, 0.5, seed=1), pt("k2-mvto", 3, 2.0, 0.8, 2)])
    assert avg.cpu_busy == pytest.approx(0.8)


def png_width(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[16:20], "big")  # the IHDR chunk's width


def test_a_processes_sweep_plots_cpu_beside_throughput_and_keeps_it_in_the_json(
    tmp_path: Path,
) -> None:
    sim = [pt("k2-mvto", 1, 10.0), pt("d2pl-ttc", 1, 5.0)]
    procs = [pt("k2-mvto", 1, 10.0, 0.45), pt("d2pl-ttc", 1, 5.0, 0.3)]
    wrote_sim = write_sweep(sim, {}, tmp_path / "sim", "t")
    wrote_procs = write_sweep(procs, {}, tmp_path / "procs", "t")
    assert png_width(wrote_procs[1]) > png_width(wrote_sim[1])  # a fourth panel
    doc = json.loads(wrote_procs[0].read_text())
    assert [p["cpu_busy"] for p in doc["points"]] == [0.45, 0.3]
    assert json.loads(wrote_sim[0].read_text())["points"][0]["cpu_busy"] is None
