"""The coordinator's side of K2-TB: hand out timestamps from batches fetched from the oracle.

    next_timestamp() ──> current batch still fresh and not used up? ──yes──> next timestamp
                              │ no
                              v
                         one shared fetch(count) ──> new batch, TTL clock started at SEND
                         (or fetch_now(count) in-line, on the oracle's own node)

A batch may be used for `ttl_ns - safety_margin_ns` after its request was sent, measured on the
coordinator's monotonic clock (see the HAZARD note in `truetime.oracle`). `count` is
`batch_size` at first, then what spans half a batch's usable lifetime (see `_install`: the
oracle starts a slot's next batch past the last one's end, so a longer batch would run the
timestamps ahead of true time). Concurrent callers that find the batch empty or stale wait on
the same fetch rather than each sending one.
Timestamps handed out by one client are strictly increasing, even across batches from an
oracle that restarted or failed over.

Failures: an exception from `fetch` (for example `OracleUnavailable`, `UncertaintyExceeded`)
reaches every caller waiting on that fetch; the next call fetches again. A batch that arrives
already stale (the round trip took longer than the usable TTL: a loaded machine, a slow
scheduler) is fetched again, up to `stale_retries` more times within the same call, before
`BatchExpired` is raised: one slow round trip is common under load, several in a row mean the
oracle is too far or the TTL too short for this deployment.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from truetime.clock import ClockSource
from truetime.errors import BatchExpired
from truetime.interval import Timestamp
from truetime.oracle import TimestampBatch

SAFETY_MARGIN_NS = 100_000
"""`BatchClient`'s default safety margin: a batch whose lifetime is no longer than this is
never usable."""


@dataclass(slots=True)
class BatchClientStats:
    """Counters for metrics; only ever increase."""

    batches_fetched: int = 0
    timestamps_issued: int = 0
    batches_expired_unused: int = 0
    """Batches dropped with timestamps left because their TTL ran out (or that arrived stale)."""
    timestamps_skipped: int = 0
    """Timestamps not handed out because they were not above the last one this client issued."""


class BatchClient:
    """Hands out timestamps to one coordinator, fetching batches as needed.

    `fetch(count)` asks the oracle for a batch (it is the transport: gRPC in production, a
    direct call to a `TimestampOracle` in tests). `fetch_now(count)`, for a coordinator on the
    oracle's own node, issues one in-line: the batch is installed and a timestamp taken from it
    before anything else runs, so even a lifetime of a few hundred microseconds (the
    `oracle_local_ttl_us` default) cannot lapse between the issue and the take, however loaded
    the event loop. (Through `fetch` a batch passes through a task and the waiter's wake-up,
    which on a busy loop can take longer than that.) An issue that itself outlasts the lifetime
    (an fsync inside it) is retried like a stale fetch. `clock` is the coordinator's own clock; only
    its monotonic reading is used. `safety_margin_ns` is subtracted from the batch TTL to cover
    the coordinator's monotonic clock running slow and the gap between taking a timestamp and
    using it.

    `batch_size` is the most timestamps asked for at once; fewer once a batch's lifetime is
    known, so that a batch never spans more than can be used before it expires (see `_install`).

    The caller must use a timestamp as soon as it gets it: the guarantee that it is at least
    true time holds at the moment it is returned, not later.
    """

    def __init__(
        self,
        fetch: Callable[[int], Awaitable[TimestampBatch]],
        clock: ClockSource,
        batch_size: int = 256,
        safety_margin_ns: int = SAFETY_MARGIN_NS,
        stale_retries: int = 3,
        *,
        fetch_now: Callable[[int], TimestampBatch] | None = None,
    ) -> None:
        if stale_retries < 0:
            raise ValueError(f"stale_retries must be >= 0, got {stale_retries}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if safety_margin_ns < 0:
            raise ValueError(f"safety_margin_ns must be >= 0, got {safety_margin_ns}")
        self._fetch = fetch
        self._fetch_now = fetch_now
        self._ask = batch_size
        self._clock = clock
        self.batch_size = batch_size
        self.safety_margin_ns = safety_margin_ns
        self.stale_retries = stale_retries
        self.stats = BatchClientStats()
        self._batch: TimestampBatch | None = None
        self._next_index = 0
        self._requested_at = 0
        self._last_issued: Timestamp | None = None
        self._inflight: asyncio.Task[None] | None = None

    async def next_timestamp(self) -> Timestamp:
        """The next timestamp, greater than any this client returned before.

        Fetches a new batch when the current one is used up or its usable TTL has passed, and
        again (up to `stale_retries` times) when a fetched batch arrives already stale.
        """
        stale = 0
        while True:
            ts = self._take()
            if ts is not None:
                return ts
            if self._fetch_now is not None:
                requested_at = self._clock.monotonic_ns()
                batch = self._fetch_now(self._ask)
                self._install(batch, requested_at)
                if self._batch is None:
                    # Stale already: the issue itself outlasted the usable lifetime (the oracle
                    # waited for an fsync of its durable ceiling, as the first issue after a
                    # start does), or the lifetime is within the margin. Issued again, it is
                    # usually fresh: the ceiling is then ahead.
                    stale += 1
                    if stale > self.stale_retries:
                        raise BatchExpired(self._stale_message(batch, requested_at))
                continue
            if self._inflight is None:
                task = asyncio.get_running_loop().create_task(self._refill())
                # Retrieve the outcome even if every waiter was cancelled, so a failed fetch
                # is not reported as "exception never retrieved".
                task.add_done_callback(_consume_outcome)
                self._inflight = task
            # shield: one waiter being cancelled must not cancel the fetch the others share.
            try:
                await asyncio.shield(self._inflight)
            except BatchExpired:
                stale += 1
                if stale > self.stale_retries:
                    raise

    def _take(self) -> Timestamp | None:
        """A timestamp from the current batch, or None if it is used up or stale (and drop it)."""
        batch = self._batch
        if batch is None:
            return None
        if not self._fresh(batch):
            if self._next_index < batch.count:
                self.stats.batches_expired_unused += 1
            self._batch = None
            return None
        if self._next_index >= batch.count:
            self._batch = None
            return None
        ts = batch.timestamp(self._next_index)
        self._next_index += 1
        self._last_issued = ts
        self.stats.timestamps_issued += 1
        return ts

    def _fresh(self, batch: TimestampBatch) -> bool:
        # HAZARD: a timestamp from a batch is at least true time only within ttl of the request
        # being sent in real time. The check uses local elapsed time; if the monotonic clock runs
        # slower than real time by more than the safety margin covers, the batch is used past its
        # real TTL and timestamps can fall below true time (real-time order breaks).
        elapsed = self._clock.monotonic_ns() - self._requested_at
        return elapsed < batch.ttl_ns - self.safety_margin_ns

    async def _refill(self) -> None:
        try:
            # The TTL runs from the send, so read the clock before awaiting the round trip.
            requested_at = self._clock.monotonic_ns()
            batch = await self._fetch(self._ask)
        finally:
            self._inflight = None
        self._install(batch, requested_at)
        if self._batch is None:
            raise BatchExpired(self._stale_message(batch, requested_at))

    def _install(self, batch: TimestampBatch, requested_at: int) -> None:
        """Make batch the current one (dropped at once, and counted, if already stale)."""
        self.stats.batches_fetched += 1
        # Ask next time for no more timestamps than span half the batch's usable lifetime. The
        # oracle starts a slot's next batch past this one's last timestamp, used or not (it
        # cannot know which were), so batches spanning more than their usable lifetime would
        # put the slot's timestamps further ahead of true time at every refetch, and every
        # commit-wait with them (256 timestamps 4096 ns apart, 1.05 ms, on a 200-300 us local
        # lifetime grew commit-waits to 10-30 ms within seconds). At half, a lead left over
        # (by the first batch, asked for before its lifetime was known) shrinks by at least
        # half a lifetime per refetch.
        span = (batch.ttl_ns - self.safety_margin_ns) // 2
        self._ask = max(1, min(self.batch_size, span // batch.step))
        start = 0 if self._last_issued is None else batch.index_after(self._last_issued)
        self.stats.timestamps_skipped += start
        self._batch = batch
        self._next_index = start
        self._requested_at = requested_at
        if not self._fresh(batch):
            self._batch = None
            self.stats.batches_expired_unused += 1

    def _stale_message(self, batch: TimestampBatch, requested_at: int) -> str:
        return (
            f"timestamp batch from oracle {batch.oracle_id} slot {batch.slot} arrived "
            f"stale: the round trip took {self._clock.monotonic_ns() - requested_at} ns, "
            f"the batch is usable for {batch.ttl_ns} ns minus a "
            f"{self.safety_margin_ns} ns safety margin"
        )


def _consume_outcome(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()
