"""Clusters of more than DESIGN's three regions: the simulator takes its latency matrix from the
cluster file's [network] table, so `k2 bench tpcc --sim --regions 5` runs on the matrix the
coordinators use for their RTT priors."""

from __future__ import annotations

from pathlib import Path

import pytest

from k2store.bench.tpcc import FIVE_REGION_RTT_MS, REGIONS, TpccConfig, run_sim, settings_for
from k2store.cluster import local_cluster
from k2store.errors import InvalidArgument
from k2store.sim import SimCluster, run_simulation


def test_the_sim_network_follows_the_cluster_files_matrix() -> None:
    cfg = local_cluster(
        REGIONS, ports=range(1, 6), root=Path("/nonexistent-sim"), settings=settings_for("k2-mvto")
    )

    async def main() -> dict[frozenset[str], float]:
        net = SimCluster(cfg).network
        return {
            frozenset({a, b}): net.rtt_s(a, b) * 1000
            for i, a in enumerate(REGIONS)
            for b in REGIONS[i + 1 :]
        }

    rtts = run_simulation(main, seed=0)
    assert len(rtts) == 10  # every pair of the five regions has its own entry
    assert rtts == pytest.approx(dict(FIVE_REGION_RTT_MS))
    assert rtts == pytest.approx(
        {p: cfg.settings.network.rtt_of(*sorted(p)) for p in rtts}
    )  # what coordinators assume


def test_tpcc_runs_on_five_regions() -> None:
    tc = TpccConfig(
        protocols=("k2-mvto",), clients_per_region=2, duration_s=0.5, warmup_s=0.0, regions=5
    )
    result = run_sim("k2-mvto", tc)
    assert list(result.regions) == list(REGIONS)
    assert all(r.committed > 0 for r in result.regions.values())
    assert result.clients == 10


def test_region_count_is_checked() -> None:
    with pytest.raises(InvalidArgument):
        TpccConfig(regions=6).validate()
    with pytest.raises(InvalidArgument):
        TpccConfig(regions=0).validate()
