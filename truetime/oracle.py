"""K2-TB: the timestamp oracle, handing out batches of timestamps instead of one per request.

This is the I/O-free core; the gRPC service only calls `register` and `issue` and ships the
`TimestampBatch` back. Layout of a timestamp:

    ts = base + i * step + oracle_id * MAX_SLOTS_PER_ORACLE + slot
         '--- multiple of 4096 ----'   '---- low SLOT_BITS = 12 bits ----'

`base` and `step` are multiples of 4096, so the low 12 bits of every timestamp name the oracle
(high 4 of them) and the coordinator slot (low 8). Two oracles, or two slots of one oracle,
can therefore never issue the same timestamp, and ordering by the full integer breaks ties
between regions by oracle id. Within one slot the oracle remembers the last timestamp it gave
out and starts the next batch strictly after it, so a slot's batches never overlap, even if
the clock steps backwards.

Why `base = now().latest + ttl`: see the HAZARD note on `TimestampOracle.issue`. In short, a
coordinator uses a batch for at most `ttl_ns` after it asked for it, so every timestamp is at
least the true time at which it is used, as the single-timestamp `now().latest` rule of
Spanner would give; commit-wait then turns that into real-time order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from truetime.errors import SlotsExhausted, UncertaintyExceeded
from truetime.interval import Timestamp
from truetime.truetime import TrueTime

SLOT_BITS = 12
"""Low bits of every timestamp that hold (oracle_id, coordinator slot)."""
MAX_ORACLES = 16
MAX_SLOTS_PER_ORACLE = 256
STEP_GRANULARITY = 1 << SLOT_BITS
"""Bases and steps are multiples of this, so the low bits are free for the origin."""

_LOW_MASK = STEP_GRANULARITY - 1


def timestamp_origin(ts: Timestamp) -> tuple[int, int]:
    """`(oracle_id, slot)` encoded in the low bits of an oracle-issued timestamp."""
    low = ts & _LOW_MASK
    return low // MAX_SLOTS_PER_ORACLE, low % MAX_SLOTS_PER_ORACLE


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


@dataclass(frozen=True, slots=True)
class TimestampBatch:
    """`count` timestamps `base + i*step + oracle_id*256 + slot`, usable for `ttl_ns`.

    The TTL runs from the moment the coordinator *sent* its request, on the coordinator's
    monotonic clock; the batch does not carry a deadline because the two machines' clocks are
    not comparable. `issued_latest` is the oracle's `now().latest` at issue, kept for logs and
    checkers.
    """

    oracle_id: int
    slot: int
    base: Timestamp
    step: int
    count: int
    ttl_ns: int
    issued_latest: Timestamp

    def __post_init__(self) -> None:
        # A batch rebuilt from the wire must still keep the low-bit encoding intact.
        if not 0 <= self.oracle_id < MAX_ORACLES:
            raise ValueError(f"oracle_id must be in [0, {MAX_ORACLES}), got {self.oracle_id}")
        if not 0 <= self.slot < MAX_SLOTS_PER_ORACLE:
            raise ValueError(f"slot must be in [0, {MAX_SLOTS_PER_ORACLE}), got {self.slot}")
        if self.step <= 0 or self.step % STEP_GRANULARITY:
            raise ValueError(
                f"step must be a positive multiple of {STEP_GRANULARITY}, got {self.step}"
            )
        if self.base % STEP_GRANULARITY:
            raise ValueError(f"base must be a multiple of {STEP_GRANULARITY}, got {self.base}")
        if self.count < 1:
            raise ValueError(f"count must be >= 1, got {self.count}")
        if self.ttl_ns < 0:
            raise ValueError(f"ttl_ns must be >= 0, got {self.ttl_ns}")

    @property
    def offset(self) -> int:
        """The low-bit origin, `oracle_id * MAX_SLOTS_PER_ORACLE + slot`."""
        return self.oracle_id * MAX_SLOTS_PER_ORACLE + self.slot

    def timestamp(self, i: int) -> Timestamp:
        """The i-th timestamp; `IndexError` outside `[0, count)`."""
        if not 0 <= i < self.count:
            raise IndexError(f"batch index {i} outside [0, {self.count})")
        return self.base + i * self.step + self.offset

    @property
    def first(self) -> Timestamp:
        return self.base + self.offset

    @property
    def last(self) -> Timestamp:
        return self.base + (self.count - 1) * self.step + self.offset

    def index_after(self, t: Timestamp) -> int:
        """Index of the first timestamp strictly greater than `t` (`count` if there is none)."""
        if t < self.first:
            return 0
        return min(self.count, (t - self.first) // self.step + 1)


class TimestampOracle:
    """Issues `TimestampBatch`es for one region; one instance per oracle process.

    `oracle_id` must be unique across the cluster (it is in every timestamp). `ttl_ns` is how
    long a coordinator may use a batch; it is also how far in the future timestamps start, so it
    trades commit-wait length against oracle round trips. `step_ns` spaces the timestamps of a
    batch (a positive multiple of 4096). `max_batch` caps `count` per request.

    `resume_after`: every timestamp this instance issues is greater than it. Per-slot memory
    lives in this object only, so an oracle restarted with the same id could reissue timestamps
    from a batch whose end still lies in the future; the service keeps uniqueness across
    restarts by persisting `high_water` and passing it back here.

    `slots`: the coordinator slots an earlier incarnation assigned (`slots` of that one,
    persisted by the service before any batch of a new slot left). A coordinator keeps its slot
    across restarts: its slot's timestamps need not stay below the high water (a coordinator
    makes future timestamps, client timestamps and restamps above its batches' bases, up to a
    one-way delay ahead of the clock), so a slot handed to another coordinator after a restart
    could repeat one of them exactly.

    Metrics (plain counters, read by the service): `refusals` (requests refused because the
    uncertainty exceeded the bound), `batches_issued`, `timestamps_issued`.
    """

    def __init__(
        self,
        oracle_id: int,
        truetime: TrueTime,
        ttl_ns: int = 2_000_000,
        step_ns: int = 1 << SLOT_BITS,
        max_batch: int = 10_000,
        *,
        resume_after: Timestamp | None = None,
        slots: Mapping[str, int] | None = None,
    ) -> None:
        if not 0 <= oracle_id < MAX_ORACLES:
            raise ValueError(f"oracle_id must be in [0, {MAX_ORACLES}), got {oracle_id}")
        if ttl_ns <= 0:
            raise ValueError(f"ttl_ns must be > 0, got {ttl_ns}")
        if step_ns <= 0 or step_ns % STEP_GRANULARITY:
            raise ValueError(
                f"step_ns must be a positive multiple of {STEP_GRANULARITY}, got {step_ns}"
            )
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.oracle_id = oracle_id
        self.truetime = truetime
        self.ttl_ns = ttl_ns
        self.step_ns = step_ns
        self.max_batch = max_batch
        self.refusals = 0
        self.batches_issued = 0
        self.timestamps_issued = 0
        self._resume_after = resume_after
        self._high_water = resume_after
        self._slots: dict[str, int] = {}
        for name, slot in (slots or {}).items():
            if not 0 <= slot < MAX_SLOTS_PER_ORACLE:
                raise ValueError(
                    f"slot of {name!r} must be in [0, {MAX_SLOTS_PER_ORACLE}), got {slot}"
                )
            if slot in self._slots.values():
                raise ValueError(f"slot {slot} is assigned twice (to {name!r} among others)")
            self._slots[name] = slot
        self._last_issued: dict[int, Timestamp] = {}

    @property
    def high_water(self) -> Timestamp | None:
        """The largest timestamp issued (or `resume_after`); None before either exists."""
        return self._high_water

    @property
    def slots(self) -> dict[str, int]:
        """Coordinator name -> slot, as assigned so far (a copy, for the service to persist)."""
        return dict(self._slots)

    def register(self, coordinator: str) -> int:
        """The slot for `coordinator`: the same one every time it asks, for this oracle's life
        and, with `slots` passed back, across restarts; a new coordinator gets the lowest free.

        Raises `SlotsExhausted` (a `TrueTimeError`) when all `MAX_SLOTS_PER_ORACLE` are taken.
        Two coordinators never share a slot: a slot's batches never overlap, but a coordinator
        makes timestamps of its own in its slot above a batch's base (see `slots` in the class
        docstring), which only its own memory keeps unique.
        """
        slot = self._slots.get(coordinator)
        if slot is not None:
            return slot
        if len(self._slots) >= MAX_SLOTS_PER_ORACLE:
            raise SlotsExhausted(
                f"oracle {self.oracle_id} has no free coordinator slot for {coordinator!r}: "
                f"all {MAX_SLOTS_PER_ORACLE} are registered"
            )
        taken = set(self._slots.values())
        slot = next(s for s in range(MAX_SLOTS_PER_ORACLE) if s not in taken)
        self._slots[coordinator] = slot
        return slot

    def issue(self, slot: int, count: int, *, ttl_ns: int | None = None) -> TimestampBatch:
        """A batch of `count` timestamps for `slot`, all later than any this slot had before.
        `ttl_ns`: a shorter lifetime than the oracle's for this batch (a coordinator on the
        oracle's own node has no round trip to cover: its timestamps then lead true time, and
        its transactions commit-wait, by less).

        Raises `ValueError` for a count outside `[1, max_batch]` or a slot outside
        `[0, MAX_SLOTS_PER_ORACLE)`, and `UncertaintyExceeded` (counted in `refusals`) while the
        clock's uncertainty exceeds the TrueTime bound.
        """
        if not 1 <= count <= self.max_batch:
            raise ValueError(f"count must be in [1, {self.max_batch}], got {count}")
        if not 0 <= slot < MAX_SLOTS_PER_ORACLE:
            raise ValueError(f"slot must be in [0, {MAX_SLOTS_PER_ORACLE}), got {slot}")
        try:
            interval = self.truetime.checked_now()
        except UncertaintyExceeded:
            self.refusals += 1
            raise
        # HAZARD: the batch invariant. A coordinator may use a batch only for ttl_ns after it
        # asked for it, measured on its own monotonic clock. The request left at true time r and
        # was served at s >= r, when latest >= s, so base >= s + ttl >= r + ttl >= the true time
        # of any use: every timestamp t used satisfies true_time <= t. That holds only while
        # (1) this clock's error stays within the TrueTime uncertainty (else latest < s is
        # possible, and a clock behind true time by more than the bound hands out timestamps
        # below true time) and (2) the coordinator's elapsed time is not slower than real time.
        # With commit-wait (wait_until_after(ts) before acknowledging) it gives real-time order;
        # if it breaks, a transaction that starts after another was acknowledged can be ordered
        # before it, and reads at its timestamp can miss acknowledged writes.
        ttl = self.ttl_ns if ttl_ns is None else max(1, min(ttl_ns, self.ttl_ns))
        base = _round_up(interval.latest + ttl, self.step_ns)
        offset = self.oracle_id * MAX_SLOTS_PER_ORACLE + slot
        floor = self._last_issued.get(slot, self._resume_after)
        if floor is not None:
            # The clock may have gone backwards (NTP step, failover to a worse source): never
            # let a slot's batches overlap; start one step-aligned base past the floor instead.
            base = max(base, _round_up(floor - offset + 1, self.step_ns))
        batch = TimestampBatch(
            oracle_id=self.oracle_id,
            slot=slot,
            base=base,
            step=self.step_ns,
            count=count,
            ttl_ns=ttl,
            issued_latest=interval.latest,
        )
        self._last_issued[slot] = batch.last
        if self._high_water is None or batch.last > self._high_water:
            self._high_water = batch.last
        self.batches_issued += 1
        self.timestamps_issued += count
        return batch
