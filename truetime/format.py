"""Human-readable timestamps for logs and the CLI.

`format_ts(1_700_000_000_000_004_866)` gives `2023-11-14T22:13:20.000004866Z#3.2`: the instant
in ISO-8601 UTC with nanoseconds (the full integer, low bits included, so the text sorts and
round-trips like the number), then `#oracle.slot` decoded from the low 12 bits.
"""

from __future__ import annotations

from datetime import UTC, datetime

from truetime.interval import Timestamp
from truetime.oracle import timestamp_origin

_NS_PER_S = 1_000_000_000


def format_ts(ts: Timestamp) -> str:
    """`YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ#oracle.slot`; the bare integer outside years 1..9999."""
    oracle_id, slot = timestamp_origin(ts)
    seconds, nanos = divmod(ts, _NS_PER_S)
    try:
        instant = datetime.fromtimestamp(seconds, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return f"{ts}#{oracle_id}.{slot}"
    date = f"{instant.year:04d}-{instant.month:02d}-{instant.day:02d}"
    clock = f"{instant.hour:02d}:{instant.minute:02d}:{instant.second:02d}.{nanos:09d}"
    return f"{date}T{clock}Z#{oracle_id}.{slot}"
