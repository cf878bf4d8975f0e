"""truetime: bounded-uncertainty time and K2-TB timestamp batching.

Purpose
    Give every K2 node a clock it can reason about (an interval that contains true time) and
    give coordinators commit timestamps that are unique cluster-wide and never below true time,
    without one oracle round trip per transaction.

Data flow
    ClockSource (SystemClock | ManualClock | SkewedClock)
        -> TrueTime: now() = [t - u, t + u], u = max(epsilon, source's error bound)
        -> TimestampOracle.issue(slot, count): TimestampBatch based at now().latest + ttl
        -> (gRPC, written elsewhere) -> BatchClient.next_timestamp() on the coordinator
        -> transaction commits at ts, then TrueTime.wait_until_after(ts) before acknowledging.

Invariants
    - Only `truetime.sysclock` reads the OS clock; everything else is handed a ClockSource.
    - `now()` contains true time while the clock error is within the uncertainty.
    - Timestamps are unique across oracles and slots: the low 12 bits encode (oracle, slot), and
      a slot's batches never overlap, even when the clock steps backwards.
    - A timestamp used within its batch TTL (from the request's send, on the coordinator's
      monotonic clock) is >= true time at use; with commit-wait this gives real-time order.
    - A BatchClient's timestamps are strictly increasing.

Failure modes
    - Uncertainty above `max_uncertainty_ns`: the oracle refuses (`UncertaintyExceeded`,
      retryable, counted in `TimestampOracle.refusals`); the node stops issuing rather than
      risk timestamps below true time.
    - A batch that outlives its TTL is dropped (`BatchClientStats.batches_expired_unused`); one
      that arrives already stale raises `BatchExpired` (retryable).
    - Oracle unreachable: the transport raises `OracleUnavailable` (retryable).
    - All coordinator slots of an oracle taken: `SlotsExhausted` (terminal).
    - Oracle restart: per-slot memory is lost; pass the persisted `high_water` back as
      `resume_after` to keep uniqueness.

HAZARDs (places where correctness depends on the clock bound; each is marked `# HAZARD:`)
    - `TrueTime.uncertainty_ns`: all real-time guarantees assume the real error <= this.
    - `TrueTime.after` / `before`: answer wrongly if the clock is off by more than the bound.
    - `TrueTime.wait_until_after`: commit-wait ends early if the clock is ahead too far.
    - `TimestampOracle.issue`: base = latest + ttl is >= true time at use only within the bound.
    - `BatchClient` TTL check: a slow monotonic clock lets a batch be used past its real TTL.
    - `SystemClock.error_bound_ns`: trusts the sync daemon's maxerror; epsilon is the floor.
    - `SkewedClock.error_bound_ns` (reported): vouches for the skew alone when the base has no
      bound; epsilon must cover the base's own error.

Fault injection
    `truetime.skew`: the ``clock.toml`` file through which the Jepsen clock nemesis skews a
    node's clock at run time (offset and drift, reported in the clock's error bound), and
    `TrueTime(unsafe_ignore_clock_bound=True)`, the test-only mode that ignores that report.
"""

from truetime.batch import SAFETY_MARGIN_NS, BatchClient, BatchClientStats
from truetime.clock import ClockSource, ManualClock, SkewedClock
from truetime.errors import (
    BatchExpired,
    OracleUnavailable,
    SlotsExhausted,
    TrueTimeError,
    UncertaintyExceeded,
)
from truetime.format import format_ts
from truetime.hlc import HybridLogicalClock
from truetime.interval import Timestamp, TTInterval
from truetime.oracle import (
    MAX_ORACLES,
    MAX_SLOTS_PER_ORACLE,
    SLOT_BITS,
    STEP_GRANULARITY,
    TimestampBatch,
    TimestampOracle,
    timestamp_origin,
)
from truetime.skew import ClockSkew, apply_skew, read_clock_skews, write_clock_skews
from truetime.sysclock import SystemClock
from truetime.truetime import TrueTime

__all__ = [
    "MAX_ORACLES",
    "MAX_SLOTS_PER_ORACLE",
    "SAFETY_MARGIN_NS",
    "SLOT_BITS",
    "STEP_GRANULARITY",
    "BatchClient",
    "BatchClientStats",
    "BatchExpired",
    "ClockSkew",
    "ClockSource",
    "HybridLogicalClock",
    "ManualClock",
    "OracleUnavailable",
    "SkewedClock",
    "SlotsExhausted",
    "SystemClock",
    "TTInterval",
    "Timestamp",
    "TimestampBatch",
    "TimestampOracle",
    "TrueTime",
    "TrueTimeError",
    "UncertaintyExceeded",
    "apply_skew",
    "format_ts",
    "read_clock_skews",
    "timestamp_origin",
    "write_clock_skews",
]
