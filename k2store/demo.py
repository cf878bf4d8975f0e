"""`k2 demo`: the main job, for now the store alone.

Brings up a local three-region cluster (DESIGN's regions, one node each), writes a key homed in
each region through a node of *another* region (the node forwards to the leader), reads every key
back through every region's node, kills the node leading one key with SIGKILL, restarts it from its
data directory and reads the key again, scans the key space at one snapshot, and tears the
cluster down. Later issues grow this into the multi-region serving demo.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
from pathlib import Path

from k2store import launcher
from k2store.client import Client
from truetime import SystemClock


def _ms(clock: SystemClock, t0: int) -> float:
    return (clock.monotonic_ns() - t0) / 1e6


def run_demo(data: Path | None = None, keep: bool = False) -> int:
    clock = SystemClock()
    tmp = None
    if data is None:
        tmp = tempfile.TemporaryDirectory(prefix="k2-demo-")
        data = Path(tmp.name)
    print(f"starting a local cluster in {data} ...", flush=True)
    t0 = clock.monotonic_ns()
    cfg = launcher.up(data, progress=sys.stderr.isatty())
    print(
        f"  {len(cfg.nodes)} nodes in {len(cfg.regions)} regions healthy after {_ms(clock, t0):.0f} ms\n"
    )
    ok = True
    try:
        with Client(cfg) as c:
            regions = cfg.region_names()
            print(f"{'operation':<44} {'sent to':<16} {'served by':<16} {'ms':>7}")
            keys = {}
            for i, r in enumerate(regions):
                via = cfg.nodes_in(regions[(i + 1) % len(regions)])[0].name
                key = f"{r}/greeting"
                value = f"hello from {r}".encode()
                t = clock.monotonic_ns()
                w = c.put(key, value, via=via)
                print(f"{'put ' + key:<44} {via:<16} {w.served_by:<16} {_ms(clock, t):>7.2f}")
                keys[key] = value
            for key, value in keys.items():
                for n in cfg.nodes:
                    t = clock.monotonic_ns()
                    rr = c.get_versioned(key, via=n.name)
                    good = rr.value == value
                    ok &= good
                    print(
                        f"{'get ' + key:<44} {n.name:<16} {rr.served_by:<16} {_ms(clock, t):>7.2f}"
                        + ("" if good else f"  WRONG: {rr.value!r}")
                    )
            victim_key = next(iter(keys))
            leader = cfg.shard_for_key(victim_key.encode()).leader
            node = cfg.node(leader)
            pid = launcher.running_nodes(cfg)[leader]
            print(f"\nkill -9 {leader} (pid {pid}), the leader of {victim_key}; restarting it ...")
            os.kill(pid, signal.SIGKILL)
            while launcher._alive(pid):
                launcher._reap()
            proc = launcher.start_node(cfg, node)
            t = clock.monotonic_ns()
            launcher.wait_healthy(cfg, {leader: proc}, 30.0, progress=False)
            print(f"  {leader} healthy again after {_ms(clock, t):.0f} ms")
            rr = c.get_versioned(victim_key)
            good = rr.value == keys[victim_key]
            ok &= good
            print(
                f"  get {victim_key} -> {rr.value!r} (version {rr.version_ts}) {'ok' if good else 'WRONG'}"
            )
            rows = c.scan()
            print(f"\nscan of the whole key space at one timestamp: {len(rows)} keys")
            for k, v in rows:
                print(f"  {k.decode():<30} {v.decode()}")
            ok &= {k.decode(): v for k, v in rows} == keys
    finally:
        if keep:
            print(f"\ncluster left running; stop it with: k2 cluster down --data {data}")
        else:
            result = launcher.down(cfg)
            print(f"\ncluster down: {', '.join(f'{k} {v}' for k, v in result.items())}")
            if tmp is not None:
                with contextlib.suppress(OSError):
                    tmp.cleanup()
    print("demo:", "all reads returned what was written" if ok else "MISMATCH (see above)")
    return 0 if ok else 1
