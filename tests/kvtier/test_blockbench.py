"""`k2 bench kvtier`'s report over several rounds: medians, and each ratio's range over the
rounds (kvtier/blockbench.py)."""

from __future__ import annotations

import argparse

import pytest

from k2store.errors import InvalidArgument
from kvtier.blockbench import main_args, ratios


def test_ratios_over_rounds_give_the_medians_and_the_rounds_range() -> None:
    rounds = [
        {"grpc.get_sequential_MBps": 500.0, "bulk.get_sequential_MBps": 1800.0,
         "redis.get_sequential_MBps": 1500.0},
        {"grpc.get_sequential_MBps": 600.0, "bulk.get_sequential_MBps": 1000.0,
         "redis.get_sequential_MBps": 1250.0},
        {"grpc.get_sequential_MBps": 700.0, "bulk.get_sequential_MBps": 2000.0,
         "redis.get_sequential_MBps": 1000.0},
    ]  # fmt: skip
    figures = {
        "grpc.get_sequential_MBps": 600.0,
        "bulk.get_sequential_MBps": 1800.0,
        "redis.get_sequential_MBps": 1250.0,
        "rounds": rounds,
    }
    lines = ratios(figures)
    bulk = next(line for line in lines if "bulk TCP port" in line)
    assert "1800 MB/s (1.44x Redis; 0.80-2.00x over 3 rounds)" in bulk
    grpc = next(line for line in lines if "over gRPC" in line)
    assert "(0.48x; 0.33-0.70x over 3 rounds)" in grpc
    # One round: no range.
    one = ratios({k: v for k, v in figures.items() if k != "rounds"})
    assert all("rounds" not in line for line in one)


def test_rounds_out_of_range_are_refused() -> None:
    a = argparse.Namespace(quick=False, tokens=4, blocks=1, rounds=0, connector=False, json=None)
    with pytest.raises(InvalidArgument, match="--rounds must be 1 to 50"):
        main_args(a)
