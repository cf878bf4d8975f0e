"""Real node processes: `k2 cluster up`, kill -9 and restart, the CLI, `k2 cluster down`.

This is the Foundation issue's acceptance check, automated. Marked slow (it starts processes);
CI runs it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from k2store import launcher
from k2store.client import Client
from k2store.cluster import ClusterConfig
from k2store.errors import KeyTooLarge

pytestmark = pytest.mark.slow


def k2(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "k2store", *args],
        input=input.decode() if input else None,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterConfig]:
    data = tmp_path_factory.mktemp("cluster")
    r = k2("cluster", "up", "--data", str(data))
    assert r.returncode == 0, r.stderr
    cfg = launcher.load_cluster(data, None)
    try:
        yield cfg
    finally:
        launcher.down(cfg)


def test_put_then_get_from_every_region_survives_kill_9(cluster: ClusterConfig) -> None:
    assert [r.name for r in cluster.regions] == ["us-east", "eu-west", "ap-southeast"]
    with Client(cluster) as c:
        w = c.put("eu-west/doc", b"survives", via="us-east-1")
        for n in cluster.nodes:
            assert c.get("eu-west/doc", via=n.name) == b"survives"

        leader = cluster.shard_for_key(b"eu-west/doc").leader
        pid = launcher.running_nodes(cluster)[leader]
        os.kill(pid, signal.SIGKILL)
        while launcher._alive(pid):
            launcher._reap()
        # What an operator runs: `k2 node --cluster FILE --node NAME` (cluster down finds it too).
        proc = launcher.start_node(cluster, cluster.node(leader))
        assert proc.args[-4:] == ["--cluster", str(cluster.path), "--node", leader]  # type: ignore[index]
        launcher.wait_healthy(cluster, {leader: proc}, 60, progress=False)
        r = c.get_versioned("eu-west/doc", via="ap-southeast-1")
        assert (r.value, r.version_ts) == (b"survives", w.commit_ts)
        with pytest.raises(KeyTooLarge):
            c.put(b"eu-west/" + b"x" * 5000, b"v")


def test_cli_kv_and_status(cluster: ClusterConfig) -> None:
    f = str(cluster.path)
    r = k2("kv", "--cluster", f, "put", "us-east/cli", "hello")
    assert r.returncode == 0 and "committed at" in r.stdout, r.stderr
    r = k2("kv", "--cluster", f, "--via", "ap-southeast-1", "get", "us-east/cli")
    assert r.returncode == 0 and r.stdout.strip() == "hello" and "served by us-east-1" in r.stderr
    r = k2("kv", "--cluster", f, "put", "us-east/stdin", "-", input=b"from stdin")
    assert r.returncode == 0
    r = k2("kv", "--cluster", f, "scan", "us-east/", "us-east0")
    assert (
        r.returncode == 0
        and "us-east/cli\thello" in r.stdout
        and "us-east/stdin\tfrom stdin" in r.stdout
    )
    r = k2("kv", "--cluster", f, "put", "us-east/" + "k" * 5000, "v")
    assert r.returncode == 2 and "exceeds the limit of 4096 bytes" in r.stderr
    r = k2("kv", "--cluster", f, "get", "us-east/missing")
    assert r.returncode == 1 and "not found" in r.stderr
    r = k2("cluster", "status", "--cluster", f)
    assert r.returncode == 0, r.stdout + r.stderr
    assert all(n.name in r.stdout for n in cluster.nodes) and "DOWN" not in r.stdout


def test_malformed_cluster_file_and_unknown_node(tmp_path: Path, cluster: ClusterConfig) -> None:
    assert cluster.path is not None
    bad = tmp_path / "bad.toml"
    bad.write_text(cluster.path.read_text().replace('leader = "eu-west-1"', 'leader = "nobody"'))
    r = k2("node", "--cluster", str(bad), "--node", "eu-west-1")
    assert (
        r.returncode == 2
        and "shards[" in r.stderr
        and ".leader" in r.stderr
        and "nobody" in r.stderr
    )
    r = k2("node", "--cluster", str(cluster.path), "--node", "mars-1")
    assert r.returncode == 2 and "unknown node 'mars-1'" in r.stderr
    # A second process for a running node: its data directory is locked.
    r = k2("node", "--cluster", str(cluster.path), "--node", "us-east-1")
    assert r.returncode != 0 and "locked by another process" in r.stderr


def test_up_twice_is_refused_and_down_leaves_no_process(tmp_path: Path) -> None:
    data = tmp_path / "c2"
    r = k2("cluster", "up", "--data", str(data), "--regions", "a,b", "--nodes-per-region", "2")
    assert r.returncode == 0, r.stderr
    cfg = launcher.load_cluster(data, None)
    pids = launcher.running_nodes(cfg)
    assert len(pids) == 4
    os.kill(pids["b-2"], signal.SIGSTOP)  # down must also stop a paused node
    r = k2("cluster", "up", "--data", str(data))
    assert r.returncode == 1 and "already running" in r.stderr
    r = k2("cluster", "down", "--data", str(data))
    assert r.returncode == 0, r.stderr
    for pid in pids.values():
        assert not launcher._alive(pid)
    r = k2("cluster", "status", "--data", str(data))
    assert r.returncode == 1 and r.stdout.count("DOWN") == 4


def test_down_reaps_the_processes_this_process_started(tmp_path: Path) -> None:
    """Nodes and block stores started in-process (as benchmarks and the demo start them) are
    waited for by `down`: none is left a zombie or an unreaped Popen (Python warns about those
    at exit)."""
    cfg = launcher.up(
        tmp_path / "c3", regions=["a", "b"], progress=False, wan=False, blockstores=True
    )
    pids = [*launcher.running_nodes(cfg).values()]
    pids += [
        int(e["pid"])
        for e in json.loads((tmp_path / "c3" / "blockstores.json").read_text()).values()
    ]
    assert len(pids) == 4
    launcher.down(cfg)
    for pid in pids:
        with pytest.raises(ChildProcessError):  # already waited for: not our child any more
            os.waitpid(pid, os.WNOHANG)
