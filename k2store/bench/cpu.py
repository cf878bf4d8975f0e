"""How busy a benchmark run on node processes kept the machine's cores.

On node processes the protocols share the machine's cores with the benchmark's own clients. A
run whose processes keep every core busy measures the machine, not the protocol: its latencies
are mostly waits for a core, and a protocol whose gain is work done in parallel (K2-MVTO's
against d2PL-TTC's lock waits) loses most. So the benchmarks measure, over their measured
window, the CPU time of the node processes (user + system, from /proc/<pid>/stat) and of the
benchmark process itself (all its threads, `os.times`), and print them beside their figures:

    cpu: nodes 1.21 + benchmark 0.55 of 2 cores (88% busy), 2.6 ms per commit

`busy` near 100% says the run is beyond the concurrency these processes sustain on this
machine. The meter also reads the whole machine's busy time (/proc/stat, time stolen by the
hypervisor included) and reports what the run's own processes do not account for as other
work: a run that shared the machine says so beside its figures,

    cpu: nodes 0.99 + benchmark 0.27 of 2 cores (63% busy), 1.5 ms per commit; other work 0.61 cores

(session 19's process figures came out a third lower than session 20's for the same code on a
machine shared with other work, and nothing in their output showed it). Linux only: where /proc
cannot be read `CpuMeter.stop` returns None and nothing is printed. The meter does not read the
wall clock itself: it is handed the run's clock.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CpuMeter", "CpuUse", "machine_cpu_s", "process_cpu_s"]


@dataclass(frozen=True, slots=True)
class CpuUse:
    """CPU spent in one measured window."""

    window_s: float
    nodes_cores: float
    """CPU seconds of the node processes per second of the window."""
    bench_cores: float
    """The same for the benchmark process (its clients, event loop and gRPC threads)."""
    cores: int
    """The machine's cores (`os.cpu_count()`)."""
    commits: int
    """Commits that finished inside the window."""
    machine_cores: float | None = None
    """CPU seconds of the whole machine per second of the window (stolen time included), or
    None where /proc/stat could not be read."""

    OTHER_NOTED = 0.05
    """Other work below this many cores is not mentioned (the kernel, the meter itself)."""

    @property
    def busy(self) -> float:
        """The fraction of the machine's cores the run kept busy."""
        return (self.nodes_cores + self.bench_cores) / self.cores

    @property
    def other_cores(self) -> float | None:
        """Cores busy with work other than the run's processes during the window."""
        if self.machine_cores is None:
            return None
        return max(0.0, self.machine_cores - self.nodes_cores - self.bench_cores)

    @property
    def ms_per_commit(self) -> float:
        """CPU milliseconds (nodes and benchmark) per commit; NaN without commits."""
        if self.commits <= 0:
            return math.nan
        return (self.nodes_cores + self.bench_cores) * self.window_s * 1000 / self.commits

    def describe(self) -> str:
        per = "" if math.isnan(self.ms_per_commit) else f", {self.ms_per_commit:.1f} ms per commit"
        other = self.other_cores
        noted = (
            "" if other is None or other < self.OTHER_NOTED else f"; other work {other:.2f} cores"
        )
        return (
            f"cpu: nodes {self.nodes_cores:.2f} + benchmark {self.bench_cores:.2f} of "
            f"{self.cores} cores ({self.busy:.0%} busy){per}{noted}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "window_s": self.window_s,
            "nodes_cores": self.nodes_cores,
            "bench_cores": self.bench_cores,
            "cores": self.cores,
            "commits": self.commits,
            "busy": self.busy,
            "ms_per_commit": None if math.isnan(self.ms_per_commit) else self.ms_per_commit,
            "machine_cores": self.machine_cores,
            "other_cores": self.other_cores,
        }


def process_cpu_s(pid: int, proc: Path = Path("/proc")) -> float | None:
    """User + system CPU seconds of process `pid` (all its threads), or None if it is gone or
    /proc cannot be read."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or parentheses itself;
    # the fields after its last ')' start at field 3 (state): utime and stime are fields 14, 15.
    try:
        fields = stat.rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])
    except (IndexError, ValueError):
        return None
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_cpu_s(proc: Path = Path("/proc")) -> float | None:
    """Busy CPU seconds of the whole machine since boot, over all cores (/proc/stat's first
    line: user, nice, system, irq, softirq and steal; idle and iowait are not busy), or None
    where it cannot be read."""
    try:
        first = (proc / "stat").read_text().split("\n", 1)[0].split()
        if first[0] != "cpu":
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in first[1:9])
    except (OSError, IndexError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class CpuMeter:
    """CPU time of `pids` (the node processes) and of this process between `start` and
    `stop`, timed by `now_ns` (the run's monotonic clock)."""

    def __init__(
        self,
        pids: Mapping[str, int],
        now_ns: Callable[[], int],
        *,
        self_cpu_s: Callable[[], float] = _self_cpu_s,
        proc: Path = Path("/proc"),
        cores: int | None = None,
    ) -> None:
        self.pids = dict(pids)
        self._now_ns = now_ns
        self._self_cpu_s = self_cpu_s
        self._proc = proc
        self.cores = cores or os.cpu_count() or 1
        self._start: tuple[int, float | None, float, float | None] | None = None

    def _nodes_s(self) -> float | None:
        total = 0.0
        for pid in self.pids.values():
            s = process_cpu_s(pid, self._proc)
            if s is None:
                return None  # a node gone mid-window: its share is unknown
            total += s
        return total if self.pids else None

    def start(self) -> None:
        self._start = (
            self._now_ns(),
            self._nodes_s(),
            self._self_cpu_s(),
            machine_cpu_s(self._proc),
        )

    def stop(self, commits: int) -> CpuUse | None:
        """The window since `start`, or None if it was not started, had no length or a node's
        CPU time could not be read at either end."""
        if self._start is None:
            return None
        t0, nodes0, self0, machine0 = self._start
        nodes1 = self._nodes_s()
        machine1 = machine_cpu_s(self._proc)
        window_s = (self._now_ns() - t0) / 1e9
        if nodes0 is None or nodes1 is None or window_s <= 0:
            return None
        machine = None
        if machine0 is not None and machine1 is not None:
            machine = max(0.0, machine1 - machine0) / window_s
        return CpuUse(
            window_s=window_s,
            nodes_cores=max(0.0, nodes1 - nodes0) / window_s,
            bench_cores=max(0.0, self._self_cpu_s() - self0) / window_s,
            cores=self.cores,
            commits=commits,
            machine_cores=machine,
        )
