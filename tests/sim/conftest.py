"""Fixtures shared by the simulator tests: a three-region cluster config that is never dialled."""

from __future__ import annotations

from pathlib import Path

import pytest

from k2store.cluster import DEFAULT_REGIONS, ClusterConfig, local_cluster


@pytest.fixture(scope="session")
def cfg() -> ClusterConfig:
    """One node per region, DESIGN.md's regions; keys under "<region>/" are homed there."""
    return local_cluster(DEFAULT_REGIONS, ports=[1, 2, 3], root=Path("/nonexistent-sim"))


@pytest.fixture(scope="session")
def cfg2() -> ClusterConfig:
    """Two nodes per region: the second node of each region fetches batches over the network."""
    return local_cluster(
        DEFAULT_REGIONS,
        ports=[1, 2, 3, 4, 5, 6],
        nodes_per_region=2,
        shards_per_region=2,
        root=Path("/nonexistent-sim"),
    )
