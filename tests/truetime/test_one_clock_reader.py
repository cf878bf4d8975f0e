"""K2 has one OS-clock reader, truetime/sysclock.py; every other module is handed a ClockSource.

That keeps tests deterministic (a ManualClock sees every read) and leaves one file to audit.
tests/ and jepsen_tests/ are exempt.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("truetime", "txn", "replication", "k2store", "kvtier")
ALLOWED = REPO / "truetime" / "sysclock.py"
CLOCK_READS = (
    "time.time(",
    "time.time_ns(",
    "time.monotonic(",
    "time.monotonic_ns(",
    "time.perf_counter",
    "datetime.now(",
    "datetime.utcnow(",
)
# The same reads imported by name, which the substrings above would miss.
FROM_TIME_IMPORT = re.compile(
    r"^\s*from\s+time\s+import\s+[^#\n]*\b(time|time_ns|monotonic|monotonic_ns|perf_counter\w*)\b",
    re.MULTILINE,
)


def offending_lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    hits = [
        f"{path.relative_to(REPO)}:{n}: {line.strip()}"
        for n, line in enumerate(text.splitlines(), start=1)
        if any(read in line for read in CLOCK_READS)
    ]
    hits += [
        f"{path.relative_to(REPO)}: {m.group(0).strip()}" for m in FROM_TIME_IMPORT.finditer(text)
    ]
    return hits


def test_only_sysclock_reads_the_os_clock() -> None:
    offenders: list[str] = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if path != ALLOWED:
                offenders += offending_lines(path)
    assert not offenders, "read the clock through a truetime.ClockSource:\n" + "\n".join(offenders)


def test_the_scan_sees_the_one_reader() -> None:
    # Guards the guard: if the patterns stopped matching, the test above would pass vacuously.
    assert offending_lines(ALLOWED)
