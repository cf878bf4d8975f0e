"""Fixtures shared by the simulator tests: a three-region cluster config that is never dialled.

These clusters run without replication, so the network tests see only the traffic they cause;
tests/sim/test_sim_replication.py builds replicated ones."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from k2store.cluster import (
    DEFAULT_REGIONS,
    ClusterConfig,
    ClusterSettings,
    ReplicationSettings,
    local_cluster,
)

QUIET = replace(ClusterSettings(), replication=ReplicationSettings(enabled=False))


@pytest.fixture(scope="session")
def cfg() -> ClusterConfig:
    """One node per region, DESIGN.md's regions; keys under "<region>/" are homed there."""
    return local_cluster(
        DEFAULT_REGIONS, ports=[1, 2, 3], root=Path("/nonexistent-sim"), settings=QUIET
    )


@pytest.fixture(scope="session")
def cfg2() -> ClusterConfig:
    """Two nodes per region: the second node of each region fetches batches over the network."""
    return local_cluster(
        DEFAULT_REGIONS,
        ports=[1, 2, 3, 4, 5, 6],
        nodes_per_region=2,
        shards_per_region=2,
        root=Path("/nonexistent-sim"),
        settings=QUIET,
    )
