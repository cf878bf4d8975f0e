"""A benchmark that is killed stops the node processes it started (they run in sessions of their
own, so nothing else would). Marked slow (it starts a real cluster); CI runs it."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from k2store import cluster as cluster_mod
from k2store import launcher
from k2store.cluster import ClusterConfig

pytestmark = pytest.mark.slow


def bench_cluster(tmp_path: Path) -> ClusterConfig:
    """The benchmark's cluster (it lives in a temporary directory under tmp_path)."""
    (path,) = tmp_path.glob("k2-bench-*/run0/cluster.toml")
    return cluster_mod.load(path)


class Stderr:
    """The benchmark's stderr, read as it comes: `until` waits (select, bounded) for a text."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        self.fd = proc.stderr.fileno()
        self.text = b""

    def until(self, needle: bytes, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while needle not in self.text:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return False
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return False  # it exited
            self.text += chunk
        return True

    def rest(self) -> str:
        while chunk := os.read(self.fd, 65536):
            self.text += chunk
        return self.text.decode(errors="replace")[-3000:]


def all_exit(pids: set[int], timeout_s: float) -> bool:
    """Wait (select on pidfds, bounded) until every one of pids has exited. The nodes are not
    our children, and they outlive their data directories, which the benchmark's cleanup
    removes, so neither waitpid nor their lock files can tell."""
    fds = []
    for pid in pids:
        try:
            fds.append(os.pidfd_open(pid))
        except ProcessLookupError:
            continue  # already gone
    try:
        deadline = time.monotonic() + timeout_s
        pending = set(fds)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready, _, _ = select.select(list(pending), [], [], left)
            pending -= set(ready)
        return True
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["term", "kill-9"])
def test_a_killed_benchmark_stops_its_cluster(tmp_path: Path, sig: signal.Signals) -> None:
    """SIGTERM: the CLI's interrupt path stops the nodes (exit 130). kill -9 leaves no path to
    run, so the nodes stop themselves: Linux's parent-death signal (launcher.stop_with_parent)."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the bench's cluster lives under here
    argv = ["bench", "txn", "--quick", "--duration", "60", "--out", str(tmp_path / "out")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "k2store", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    err = Stderr(proc)
    started: set[int] = set()
    try:
        # Killed while it runs its load, not while its nodes start: it says when they are up.
        assert err.until(b"cluster up; running the mix", 90), err.rest()
        started = set(launcher.running_nodes(bench_cluster(tmp_path)).values())
        assert len(started) == 3
        proc.send_signal(sig)
        rc = proc.wait(timeout=60)
        # SIGTERM: 130 when the interrupt path finished; 143 when it hung and the CLI's
        # watchdog (cli.SIGTERM_GRACE_S) ended the process. Either way no node may be left.
        assert rc in ((130, 143) if sig == signal.SIGTERM else (-9,)), err.rest()
        assert all_exit(started, 30), "nodes left"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc.stderr is not None:
            proc.stderr.close()
