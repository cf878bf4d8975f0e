"""The options of `k2 bench kvtier` (kvtier/blockbench.py), in a module of their own so that the
CLI can offer them without importing kvtier, which loads torch and takes a second."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=256, help="tokens per block (default 256)")
    p.add_argument("--blocks", type=int, default=16, help="blocks in the store tests")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--connector", action="store_true", help="also time retrieval over WAN")
    p.add_argument("--prefix", type=int, default=2048, help="prefix tokens for --connector")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="times the node's read paths and Redis are measured, one after the other (default "
        "3; 1 with --quick): the figures are the medians, each ratio's range over the rounds "
        "is printed beside it",
    )
    p.add_argument(
        "--quick", action="store_true", help="4 blocks of 64 tokens (CI smoke test, seconds)"
    )
