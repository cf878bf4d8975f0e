"""`jepsen_tests.strategies` pointed at a live local cluster (slow): the public state machine
runs a few generated transaction sequences and finds no difference from its sequential model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from jepsen_tests.strategies import live_cluster_test
from k2store import launcher
from k2store.cluster import ClusterConfig


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ClusterConfig]:
    cfg = launcher.up(tmp_path, progress=False, wan=False, timeout_s=60)
    try:
        yield cfg
    finally:
        launcher.down(cfg)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_live_cluster_state_machine_agrees_with_its_model(cluster: ClusterConfig) -> None:
    assert cluster.path is not None
    case = live_cluster_test(cluster.path, max_examples=4, steps=8)
    outcome = case("runTest").run()
    assert outcome is not None
    assert outcome.wasSuccessful(), outcome.failures + outcome.errors
