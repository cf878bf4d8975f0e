"""A benchmark that is killed stops the node processes it started (they run in sessions of their
own, so nothing else would). Marked slow (it starts a real cluster); CI runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from k2store import cluster as cluster_mod
from k2store import launcher
from k2store.cluster import ClusterConfig
from k2store.errors import K2Error

pytestmark = pytest.mark.slow


def bench_cluster(tmp_path: Path) -> ClusterConfig | None:
    """The benchmark's cluster (it lives in a temporary directory under tmp_path) once its file
    is written."""
    files = list(tmp_path.glob("k2-bench-*/run0/cluster.toml"))
    try:
        return cluster_mod.load(files[0]) if files else None
    except (OSError, K2Error):
        return None  # still being written


def healthy(tmp_path: Path) -> bool:
    cfg = bench_cluster(tmp_path)
    return cfg is not None and all(launcher.check_health(n.address, 0.5) for n in cfg.nodes)


def alive(pids: set[int]) -> set[int]:
    """Those of pids that still run (a node outlives its data directory, which the benchmark's
    cleanup removes, so its lock file cannot tell)."""
    return {p for p in pids if Path(f"/proc/{p}").exists()}


def wait_for(cond: object, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if callable(cond) and cond():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["term", "kill-9"])
def test_a_killed_benchmark_stops_its_cluster(tmp_path: Path, sig: signal.Signals) -> None:
    """SIGTERM: the CLI's interrupt path stops the nodes (exit 130). kill -9 leaves no path to
    run, so the nodes stop themselves: Linux's parent-death signal (launcher.stop_with_parent)."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the bench's cluster lives under here
    with (tmp_path / "stderr").open("wb") as stderr:
        argv = ["bench", "txn", "--quick", "--duration", "60", "--out", str(tmp_path / "out")]
        proc = subprocess.Popen(
            [sys.executable, "-m", "k2store", *argv],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,  # the child keeps its own copy of the file
        )
    started: set[int] = set()
    try:
        # Killed while it runs its load, not while its nodes start: every node answers health.
        assert wait_for(lambda: healthy(tmp_path), 90), "no cluster came up"
        cfg = bench_cluster(tmp_path)
        assert cfg is not None
        started = set(launcher.running_nodes(cfg).values())
        assert len(started) == 3
        proc.send_signal(sig)
        rc = proc.wait(timeout=60)
        err = (tmp_path / "stderr").read_text(errors="replace")[-3000:]
        # SIGTERM: 130 when the interrupt path finished; 143 when it hung and the CLI's
        # watchdog (cli.SIGTERM_GRACE_S) ended the process. Either way no node may be left.
        assert rc in ((130, 143) if sig == signal.SIGTERM else (-9,)), err
        assert wait_for(lambda: not alive(started), 30), "nodes left"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in alive(started):
            os.kill(pid, signal.SIGKILL)
