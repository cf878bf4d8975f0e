"""K2-VCR sealing, and the watermark and closed-timestamp alternatives, as a step function.

Purpose
    A shard leader promises replicas, by logging SEAL(t), that it holds every version with
    `ts <= t` it will ever hold. A region's visible timestamp is the minimum seal over the shards
    it replicates; reads at or below it on local replicas see whole transactions or nothing.
    `Sealer.step` decides, from the leader's TrueTime interval and the oldest intent it holds,
    how far writes are *closed* (refused from now on) and how far the log may be *sealed*.

Policies (`SealPolicy.kind`)
    ``vcr``       K2-VCR epochs of `epoch_ns`: epoch e covers `[eL, (e+1)L)`. Once
                  `now.earliest >= (e+1)L + grace` the leader closes through `(e+1)L - 1`; once no
                  intent at or below that remains, it seals it. Seals move in whole epochs: an
                  unresolved intent holds back its own epoch and the later ones, not the earlier. The
                  grace is what separates a write that arrives a little late (allowed) from one
                  that must retry; with future timestamps writes arrive before their timestamp,
                  so a grace of a few epsilon suffices.
    ``watermark`` closes at `now.earliest - max_txn_lifetime` (a transaction older than that
                  cannot still be writing: it meets the closed range and aborts) and seals just
                  below the oldest intent: nothing waits, the seal trails in-flight writers.
    ``closed-ts`` CockroachDB's closed timestamps: closes at `now.earliest - target_lag` (3 s by
                  default) and seals just below the oldest intent. The baseline.

Invariants
    - `closed` and `sealed` never decrease, and `sealed <= closed`.
    - `sealed` never passes an intent: a seal is logged only when no intent at or below it
      exists, and since no new write at or below `closed` is accepted, none can appear later.

HAZARD (clock bound): closing uses `now.earliest`, so a write whose timestamp was taken from a
correct clock is late, not early, when it meets the closed range; with clock error beyond the
bound a node may stamp writes below another leader's closed range and see them all refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from truetime import TTInterval

__all__ = ["POLICIES", "SealPolicy", "SealStep", "Sealer"]

POLICIES = ("vcr", "watermark", "closed-ts")


@dataclass(frozen=True, slots=True)
class SealPolicy:
    kind: str = "vcr"
    epoch_ns: int = 100_000_000
    grace_ns: int = 25_000_000
    max_txn_lifetime_ns: int = 1_000_000_000
    target_lag_ns: int = 3_000_000_000

    def __post_init__(self) -> None:
        if self.kind not in POLICIES:
            raise ValueError(f"unknown seal policy {self.kind!r}; one of {', '.join(POLICIES)}")
        for name in ("epoch_ns", "max_txn_lifetime_ns", "target_lag_ns"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.grace_ns < 0:
            raise ValueError("grace_ns must be >= 0")


@dataclass(frozen=True, slots=True)
class SealStep:
    closed: int
    """Refuse writes at or below this from now on."""
    seal: int | None
    """Log SEAL(seal) now (None: nothing new to seal)."""
    waiting_on_intent: bool
    """The seal is held back by an unresolved intent at or below the closed timestamp."""


class Sealer:
    """One shard's seal state. Pure: feed it time and the oldest intent, act on the answer."""

    def __init__(self, policy: SealPolicy, *, closed: int = 0, sealed: int = 0) -> None:
        self.policy = policy
        self.closed = max(closed, sealed)
        self.sealed = sealed

    def target(self, now: TTInterval) -> int:
        """How far the policy would close at `now` (before looking at intents)."""
        p = self.policy
        if p.kind == "vcr":
            done = (now.earliest - p.grace_ns) // p.epoch_ns  # epochs whose end+grace passed
            return done * p.epoch_ns - 1
        lag = p.max_txn_lifetime_ns if p.kind == "watermark" else p.target_lag_ns
        return now.earliest - lag

    def step(self, now: TTInterval, oldest_intent_ts: int | None) -> SealStep:
        self.closed = max(self.closed, self.target(now))
        if self.policy.kind == "vcr":
            # Whole epochs only: every closed epoch below the oldest intent's epoch.
            blocked = oldest_intent_ts is not None and oldest_intent_ts <= self.closed
            candidate = self.closed
            if blocked and oldest_intent_ts is not None:
                epoch_ns = self.policy.epoch_ns
                candidate = (oldest_intent_ts // epoch_ns) * epoch_ns - 1
        else:
            below = self.closed if oldest_intent_ts is None else oldest_intent_ts - 1
            candidate = min(self.closed, below)
            blocked = candidate < self.closed
        if candidate > self.sealed:
            self.sealed = candidate
            return SealStep(self.closed, candidate, blocked)
        return SealStep(self.closed, None, blocked)

    def epoch_of(self, ts: int) -> int:
        return ts // self.policy.epoch_ns
