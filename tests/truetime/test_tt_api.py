"""The package's public face: everything in __all__ exists and is typed."""

from __future__ import annotations

from pathlib import Path

import truetime


def test_all_names_resolve() -> None:
    for name in truetime.__all__:
        assert getattr(truetime, name) is not None, name
    assert sorted(truetime.__all__) == sorted(set(truetime.__all__))


def test_contract_names_are_exported() -> None:
    required = {
        "Timestamp",
        "TTInterval",
        "ClockSource",
        "ManualClock",
        "SkewedClock",
        "SystemClock",
        "TrueTime",
        "TrueTimeError",
        "UncertaintyExceeded",
        "BatchExpired",
        "OracleUnavailable",
        "SLOT_BITS",
        "MAX_ORACLES",
        "MAX_SLOTS_PER_ORACLE",
        "TimestampBatch",
        "TimestampOracle",
        "BatchClient",
        "format_ts",
    }
    assert required <= set(truetime.__all__)


def test_package_is_marked_typed() -> None:
    assert (Path(truetime.__file__).parent / "py.typed").is_file()


def test_every_hazard_is_listed_in_the_overview() -> None:
    package = Path(truetime.__file__).parent
    hazards = sum(p.read_text().count("# HAZARD:") for p in package.glob("*.py"))
    assert hazards >= 6
    assert "HAZARD" in (truetime.__doc__ or "")
