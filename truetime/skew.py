"""Clock skew injected at run time: the ``clock.toml`` file the Jepsen clock nemesis writes.

Purpose
    A local cluster's nodes share one machine clock, so every clock is perfect. To test what
    K2 does when a clock is wrong, each node wraps its system clock in a
    `SkewedClock(reported=True)` and watches ``clock.toml`` beside the cluster file (as it watches
    ``net.toml`` for the network): an entry for the node, or for its region, sets that clock's
    offset and drift from then on; no entry (or no file) means no skew.

Format::

    # every field is optional; offset_ms and offset_ns add up
    [skew.eu-west-1]            # a node name, or a region name (a node's own entry wins)
    offset_ms = -250.0          # the clock reads this far from true time
    drift_ppm = 0.0             # and runs this fast (+) or slow (-) from the moment it is set

What it means for the protocol
    The skew is *reported*: the node's clock source adds ``|skew|`` to its error bound, as a
    synchronisation daemon that measured the offset would. So a skew up to epsilon changes
    nothing; up to ``max_uncertainty_us`` the node widens its TrueTime intervals (longer
    commit-waits, still correct); beyond it the node refuses to issue timestamps until the
    skew is gone (DESIGN section 3). Only with ``[cluster] unsafe_ignore_clock_bound`` (a test
    setting) does a node ignore the report and serve with a clock off by more than its bound,
    which is what the checkers must then catch.

This module parses and formats the file and applies an entry to a clock; it reads no clock.
The two functions at the end are its only I/O (read, and replace atomically).
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from truetime.clock import SkewedClock

__all__ = [
    "CLOCK_FILE",
    "ClockSkew",
    "apply_skew",
    "clock_skews_to_toml",
    "parse_clock_skews",
    "read_clock_skews",
    "skew_for",
    "write_clock_skews",
]

CLOCK_FILE = "clock.toml"
"""Name of the run-time clock skew file, in the cluster file's directory."""

Fail = Callable[[str, str], Exception]


@dataclass(frozen=True, slots=True)
class ClockSkew:
    """How wrong one clock is told to be: `offset_ns` now, growing at `drift_ppm`."""

    offset_ns: int = 0
    drift_ppm: float = 0.0

    def is_zero(self) -> bool:
        return self.offset_ns == 0 and self.drift_ppm == 0.0


NO_SKEW = ClockSkew()


def _value_error(field_name: str, msg: str) -> Exception:
    return ValueError(f"{field_name}: {msg}")


def _number(v: Any, where: str, fail: Fail) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise fail(where, f"expected a finite number, got {v!r}")
    return float(v)


def parse_clock_skews(raw: Mapping[str, Any], *, fail: Fail = _value_error) -> dict[str, ClockSkew]:
    """Validate the file's content: skews by node or region name."""
    for k in raw:
        if k != "skew":
            raise fail(k, "unknown section; expected [skew.<node or region>]")
    table = raw.get("skew", {})
    if not isinstance(table, Mapping):
        raise fail("skew", "must be a table of [skew.<name>] tables")
    out: dict[str, ClockSkew] = {}
    for name, t in table.items():
        where = f"skew.{name}"
        if not isinstance(t, Mapping):
            raise fail(where, "must be a table")
        for k in t:
            if k not in ("offset_ms", "offset_ns", "drift_ppm"):
                raise fail(
                    f"{where}.{k}", "unknown field; expected offset_ms, offset_ns, drift_ppm"
                )
        offset = 0
        if "offset_ms" in t:
            offset += round(_number(t["offset_ms"], f"{where}.offset_ms", fail) * 1e6)
        if "offset_ns" in t:
            v = t["offset_ns"]
            if isinstance(v, bool) or not isinstance(v, int):
                raise fail(f"{where}.offset_ns", f"expected an integer, got {v!r}")
            offset += v
        drift = _number(t.get("drift_ppm", 0.0), f"{where}.drift_ppm", fail)
        if not -1e5 <= drift <= 1e5:
            raise fail(f"{where}.drift_ppm", f"must be within +-100000 ppm, got {drift}")
        out[str(name)] = ClockSkew(offset, drift)
    return out


def clock_skews_to_toml(skews: Mapping[str, ClockSkew]) -> str:
    """The file's text; `parse_clock_skews(tomllib.loads(text))` gives `skews` back."""
    out = [
        "# Run-time clock skew, written by the Jepsen clock nemesis (truetime/skew.py). Every node",
        "# re-reads this file within ~0.1 s of a change; delete it to end every skew.",
    ]
    for name in sorted(skews):
        s = skews[name]
        if s.is_zero():
            continue
        out += ["", f"[skew.{_key(name)}]", f"offset_ns = {s.offset_ns}"]
        if s.drift_ppm:
            out.append(f"drift_ppm = {s.drift_ppm!r}")
    return "\n".join(out) + "\n"


def _key(s: str) -> str:
    if s and all(c.isalnum() or c in "-_" for c in s):
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def skew_for(skews: Mapping[str, ClockSkew], node: str, region: str) -> ClockSkew:
    """The skew that applies to `node` of `region`: its own entry, else its region's, else none."""
    return skews.get(node) or skews.get(region) or NO_SKEW


def apply_skew(clock: SkewedClock, skew: ClockSkew) -> None:
    """Make `clock` read exactly `skew.offset_ns` from its base now, drifting from here on."""
    clock.set_offset(skew.offset_ns)
    clock.set_drift_ppm(skew.drift_ppm)


# -- the skew file (the only I/O in this module) ------------------------------------------------


def read_clock_skews(path: Path) -> dict[str, ClockSkew]:
    """The skews in `path`; none if it does not exist. ValueError naming the file and the field
    if it is malformed."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None
    return parse_clock_skews(raw, fail=lambda f, m: ValueError(f"{path}: {f}: {m}"))


def write_clock_skews(path: Path, skews: Mapping[str, ClockSkew]) -> None:
    """Replace `path` atomically (a reader sees the old or the new file, never half of one); no
    skew at all removes the file."""
    if all(s.is_zero() for s in skews.values()):
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(clock_skews_to_toml(skews))
    tmp.replace(path)
