"""Per-key linearizability sanity: concurrent clients in three regions, checked against history.

Every get must return the value of the committed write with the largest commit timestamp at or
below its read timestamp, and a get that starts after a put was acknowledged (in true, virtual
time) must read at a timestamp above that put's. Clocks are skewed within the configured
epsilon (400 us), where K2 promises both.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import pytest

from k2store.cluster import DEFAULT_REGIONS, ClusterConfig
from k2store.errors import WriteTooOld
from k2store.sim import SimCluster, SimNetwork, run_simulation

KEYS = [f"{r}/reg" for r in DEFAULT_REGIONS] + ["us-east/hot"]


@dataclass(frozen=True, slots=True)
class Op:
    kind: str
    key: str
    value: bytes | None
    ts: int
    """commit_ts for a put, read_ts for a get."""
    version_ts: int
    invoked: float
    completed: float


def _history(cfg: ClusterConfig, seed: int) -> tuple[list[Op], int]:
    async def main() -> tuple[list[Op], int]:
        skew = {"us-east-1": 300_000, "eu-west-1": -300_000, "ap-southeast-1": 150_000}
        cluster = SimCluster(cfg, network=SimNetwork(jitter_s=0.002), clock_skew_ns=skew)
        ops: list[Op] = []
        aborted = 0

        async def worker(region: str, n: int) -> None:
            nonlocal aborted
            rng = random.Random(f"{seed}:{region}:{n}")
            client = cluster.client(region)
            for i in range(30):
                key = rng.choice(KEYS)
                start = cluster.now_s
                if rng.random() < 0.5:
                    value = f"{region}-{n}-{i}".encode()
                    try:
                        w = await client.put(key, value)
                    except WriteTooOld:
                        aborted += 1  # never installed: every attempt was refused
                        continue
                    ops.append(Op("put", key, value, w.commit_ts, 0, start, cluster.now_s))
                else:
                    r = await client.get_versioned(key)
                    ops.append(
                        Op("get", key, r.value, r.read_ts, r.version_ts, start, cluster.now_s)
                    )

        finished = await cluster.run(
            [functools.partial(worker, r, n) for r in DEFAULT_REGIONS for n in range(2)],
            duration_s=3600,
        )
        assert finished
        assert not cluster.network.internal_errors
        return ops, aborted

    return run_simulation(main, seed=seed)


def check(ops: list[Op]) -> int:
    """Assert the two properties; return the number of gets checked."""
    puts: dict[str, list[Op]] = {k: [] for k in KEYS}
    for op in ops:
        if op.kind == "put":
            puts[op.key].append(op)
    commit_tss = [p.ts for ps in puts.values() for p in ps]
    assert len(commit_tss) == len(set(commit_tss)), "commit timestamps must be unique"
    gets = [op for op in ops if op.kind == "get"]
    for g in gets:
        below = [p for p in puts[g.key] if p.ts <= g.ts]
        latest = max(below, key=lambda p: p.ts, default=None)
        expected = (latest.value, latest.ts) if latest else (None, 0)
        assert (g.value, g.version_ts) == expected, f"{g} should have read {latest}"
        for p in puts[g.key]:
            if p.completed < g.invoked:
                assert g.ts > p.ts, f"{g} started after {p} was acknowledged but reads below it"
    return len(gets)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_gets_see_the_latest_write_below_their_timestamp(cfg: ClusterConfig, seed: int) -> None:
    ops, aborted = _history(cfg, seed)
    assert sum(op.kind == "put" for op in ops) > 30
    assert check(ops) > 30
    print(f"seed {seed}: {len(ops)} ops checked, {aborted} puts aborted after retries")


def test_the_checker_catches_a_stale_read() -> None:
    # Guards the guard: a history where a get misses an earlier acknowledged put must fail.
    key = KEYS[0]
    ops = [
        Op("put", key, b"a", 100, 0, 0.0, 1.0),
        Op("put", key, b"b", 200, 0, 1.0, 2.0),
        Op("get", key, b"a", 150, 100, 3.0, 4.0),
    ]
    with pytest.raises(AssertionError, match="reads below it"):
        check(ops)
    ops[2] = Op("get", key, b"a", 250, 100, 3.0, 4.0)
    with pytest.raises(AssertionError, match="should have read"):
        check(ops)
