"""Helpers of the process tests: `k2 cluster up` (plain or `--secure`) of real processes, and the
tokens `k2 certs init` wrote for a secured cluster's principals."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from k2store import launcher
from k2store.certs import CERTS_DIR
from k2store.cluster import ClusterConfig


def token(cfg: ClusterConfig, principal: str) -> str:
    """The bearer token of `principal` (tokens/<principal>.token beside the cluster file)."""
    assert cfg.path is not None
    return (cfg.path.parent / CERTS_DIR / "tokens" / f"{principal}.token").read_text().strip()


@contextmanager
def cluster_up(data: Path, *args: str) -> Iterator[ClusterConfig]:
    """`k2 cluster up --data DATA ARGS...` as a user runs it; `k2 cluster down` after."""
    r = subprocess.run(
        [sys.executable, "-m", "k2store", "cluster", "up", "--data", str(data), *args],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr
    cfg = launcher.load_cluster(data, None)
    try:
        yield cfg
    finally:
        launcher.down(cfg)


def secured_cluster_up(data: Path, *args: str) -> AbstractContextManager[ClusterConfig]:
    """`cluster_up` with `--secure`."""
    return cluster_up(data, "--secure", *args)
