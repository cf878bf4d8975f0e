"""The package's public face: every exported name is importable."""

from __future__ import annotations

import kvtier


def test_every_exported_name_exists() -> None:
    missing = [n for n in kvtier.__all__ if not hasattr(kvtier, n)]
    assert not missing
    assert len(set(kvtier.__all__)) == len(kvtier.__all__)
