"""Speed: the simulator must run protocol workloads far faster than real time."""

from __future__ import annotations

import random
import time

from k2store.cluster import DEFAULT_REGIONS, ClusterConfig
from k2store.sim import SimCluster, run_simulation

NUM_OPS = 2000


def test_two_thousand_single_key_operations(cfg: ClusterConfig) -> None:
    async def main() -> float:
        cluster = SimCluster(cfg)
        rng = random.Random("speed")
        clients = {r: cluster.client(r) for r in DEFAULT_REGIONS}
        for i in range(NUM_OPS):
            region = rng.choice(DEFAULT_REGIONS)
            key = f"{region}/k{rng.randrange(100)}"  # homed where the client is: ~1 ms each
            if i % 2:
                await clients[region].put(key, b"x" * 100)
            else:
                await clients[region].get(key)
        return cluster.now_s

    wall_start = time.perf_counter()  # tests may read the OS clock; k2store may not
    virtual_s = run_simulation(main, seed=0)
    wall_s = time.perf_counter() - wall_start
    print(
        f"{NUM_OPS} ops: {virtual_s:.3f} s virtual, {wall_s:.3f} s wall, "
        f"{NUM_OPS / wall_s:,.0f} simulated ops per wall-second"
    )
    assert virtual_s > 0
