"""Both storage engines against a plain model, step by step (hypothesis state machine).

The model is a dict of {key: {ts: value}} plus dicts of intents and metadata, written here
independently of `plan_batch`, so a shared bug in the engines' validation still shows up. Every
rule runs the same operation on the model, the `MemoryEngine` and a `RocksEngine` in a temporary
directory, and demands the same result or the same error from all three. The RocksDB engine is
also closed and reopened (and dropped without close) between steps, so recovery from its files
is checked against the model too.

The key alphabet is small and hostile on purpose: 0x00 and 0xFF bytes, the empty key, and keys
that are prefixes of each other are exactly where an order-preserving key encoding goes wrong.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from k2store.memengine import MemoryEngine
from k2store.rocksengine import RocksEngine
from txn.storage import (
    MAX_TS,
    BelowRetentionHorizon,
    GcStats,
    Intent,
    Mutation,
    PutIntent,
    PutMeta,
    PutVersion,
    ResolveIntent,
    StorageError,
    Version,
    VersionedStore,
)

SCRATCH_DIR = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None

KEYS = [
    b"",
    b"\x00",
    b"\x00\x00",
    b"\x00\xff",
    b"a",
    b"a\x00",
    b"a\x00\x00",
    b"a\x00\x01",
    b"a\x00\xff",
    b"a\x01",
    b"a\xff",
    b"ab",
    b"b",
    b"\xff",
    b"\xff\xff",
]
# Scan bounds may fall between stored keys, too.
BOUNDS = [*KEYS, b"a\x00\x02", b"aa", b"\x01", b"\xff\xff\xff"]
TXNS = [b"t1", b"t2", b"t3"]
META_NAMES = [b"", b"apply", b"x\x00"]

keys = st.sampled_from(KEYS)
bounds = st.sampled_from(BOUNDS)
# MAX_TS (the largest timestamp the encoding holds) now and then, not half of the time as
# one_of would make it.
write_ts = st.integers(1, 21).map(lambda t: MAX_TS if t == 21 else t)
read_ts = st.integers(0, 23).map(lambda t: MAX_TS if t == 23 else t)
values = st.one_of(st.none(), st.sampled_from([b"", b"\x00", b"x", b"yy", b"\xff" * 3]))
intents = st.builds(
    Intent, txn_id=st.sampled_from(TXNS), ts=write_ts, value=values, record_key=keys
)
mutations: st.SearchStrategy[Mutation] = st.one_of(
    st.builds(PutVersion, key=keys, ts=write_ts, value=values),
    st.builds(PutIntent, key=keys, intent=intents),
    st.builds(
        ResolveIntent,
        key=keys,
        txn_id=st.sampled_from(TXNS),
        commit_ts=st.one_of(st.none(), write_ts),
    ),
    st.builds(PutMeta, name=st.sampled_from(META_NAMES), value=values),
)
put_versions: st.SearchStrategy[Mutation] = st.builds(
    PutVersion, key=keys, ts=write_ts, value=values
)


class ModelRefused(Exception):
    """The model refuses a batch (the engines must raise StorageError)."""


class Model:
    def __init__(self) -> None:
        self.versions: dict[bytes, dict[int, bytes | None]] = {}
        self.intents: dict[bytes, Intent] = {}
        self.meta: dict[bytes, bytes] = {}
        self.horizon = 0

    def apply(self, batch: Sequence[Mutation]) -> None:
        versions = {k: dict(v) for k, v in self.versions.items()}
        intents = dict(self.intents)
        meta = dict(self.meta)
        for m in batch:
            if isinstance(m, PutVersion):
                versions.setdefault(m.key, {})[m.ts] = m.value
            elif isinstance(m, PutIntent):
                held = intents.get(m.key)
                if held is not None and held.txn_id != m.intent.txn_id:
                    raise ModelRefused
                intents[m.key] = m.intent
            elif isinstance(m, ResolveIntent):
                held = intents.get(m.key)
                if held is None or held.txn_id != m.txn_id:
                    continue
                del intents[m.key]
                if m.commit_ts is not None:
                    versions.setdefault(m.key, {})[m.commit_ts] = held.value
            else:
                if m.value is None:
                    meta.pop(m.name, None)
                else:
                    meta[m.name] = m.value
        self.versions, self.intents, self.meta = versions, intents, meta

    def check_ts(self, ts: int) -> None:
        if ts < self.horizon:
            raise ModelRefused

    def get(self, key: bytes, ts: int) -> Version | None:
        self.check_ts(ts)
        history = self.versions.get(key, {})
        older = [t for t in history if t <= ts]
        if not older:
            return None
        return Version(max(older), history[max(older)])

    def all_versions(self, key: bytes) -> list[Version]:
        history = self.versions.get(key, {})
        return [Version(t, history[t]) for t in sorted(history, reverse=True)]

    def scan(
        self, start: bytes, end: bytes | None, ts: int, limit: int | None
    ) -> list[tuple[bytes, Version]]:
        self.check_ts(ts)
        rows = []
        for key in sorted(self.versions):
            if key < start or (end is not None and key >= end):
                continue
            version = self.get(key, ts)
            if version is not None and version.value is not None:
                rows.append((key, version))
        return rows if limit is None else rows[: max(limit, 0)]

    def gc(self, horizon: int) -> GcStats:
        if horizon < self.horizon:
            return GcStats(0, 0)
        self.horizon = horizon
        removed = 0
        scanned = len(self.versions)
        for key in list(self.versions):
            history = self.versions[key]
            below = sorted(t for t in history if t < horizon)
            if not below:
                continue
            newest = below[-1]
            drop = below if history[newest] is None else below[:-1]
            for t in drop:
                del history[t]
            removed += len(drop)
            if not history:
                del self.versions[key]
        return GcStats(removed, scanned)


class StorageMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.model = Model()
        # tmpfs where there is one: each example opens RocksDB (often several times), and a
        # failing example is re-run hundreds of times while hypothesis shrinks it. Durability
        # across power loss is not what this test checks; recovery from the files is.
        self.dir = tempfile.mkdtemp(prefix="k2-storage-model-", dir=SCRATCH_DIR)
        self.memory = MemoryEngine()
        self.rocks = RocksEngine(self.dir)

    def teardown(self) -> None:
        self.memory.close()
        self.rocks.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def engines(self) -> tuple[VersionedStore, VersionedStore]:
        return (self.memory, self.rocks)

    @initialize(batch=st.lists(put_versions, min_size=4, max_size=20))
    def populate(self, batch: list[Mutation]) -> None:
        # Start every example with some history, so that reads and scans have something to
        # find from the first step.
        self.apply_everywhere(batch, sync=False)

    def interesting_ts(self, data: st.DataObject, label: str, *, cap: int = MAX_TS) -> int:
        """A timestamp worth reading or collecting at (at most `cap`): mostly on, just above or
        just below a stored version or the horizon, where off-by-one errors live, and mostly at
        or above the horizon, where reads return data rather than an error."""
        horizon = self.model.horizon
        near = {horizon, 0, 1, MAX_TS}
        for history in self.model.versions.values():
            for t in history:
                near.update((t - 1, t, t + 1))
        candidates = sorted(t for t in near if 0 <= t <= cap)
        readable = [t for t in candidates if t >= horizon] or [horizon]
        choice = data.draw(st.integers(0, 5), label=f"{label} kind")
        if choice <= 3:
            return data.draw(st.sampled_from(readable), label=label)
        if choice == 4:
            return data.draw(st.sampled_from(candidates), label=label)
        return data.draw(read_ts.filter(lambda t: t <= cap), label=label)

    def apply_everywhere(self, batch: list[Mutation], sync: bool) -> None:
        try:
            self.model.apply(batch)
            refused = False
        except ModelRefused:
            refused = True
        for engine in self.engines:
            try:
                engine.apply(batch, sync=sync)
                assert not refused, f"{type(engine).__name__} accepted a batch the model refuses"
            except StorageError:
                assert refused, f"{type(engine).__name__} refused a batch the model accepts"

    @rule(batch=st.lists(mutations, min_size=1, max_size=6), sync=st.booleans())
    def apply(self, batch: list[Mutation], sync: bool) -> None:
        self.apply_everywhere(batch, sync)

    @rule(batch=st.lists(put_versions, min_size=1, max_size=8))
    def apply_versions(self, batch: list[Mutation]) -> None:
        # Committed versions only: builds up histories faster than the mixed rule.
        self.apply_everywhere(batch, sync=False)

    @rule(key=keys, data=st.data())
    def get(self, key: bytes, data: st.DataObject) -> None:
        ts = self.interesting_ts(data, "ts")
        try:
            expected: Version | str | None = self.model.get(key, ts)
        except ModelRefused:
            expected = "below horizon"
        for engine in self.engines:
            try:
                got: Version | str | None = engine.get(key, ts)
            except BelowRetentionHorizon as exc:
                assert (exc.key, exc.ts, exc.horizon) == (key, ts, self.model.horizon)
                got = "below horizon"
            assert got == expected, (type(engine).__name__, key, ts)

    @rule(
        start=bounds,
        end=st.one_of(st.none(), bounds),
        limit=st.none() | st.integers(0, 4),
        data=st.data(),
    )
    def scan(self, start: bytes, end: bytes | None, limit: int | None, data: st.DataObject) -> None:
        if end is not None and end < start:
            start, end = end, start  # inverted ranges are a unit test; here, find rows
        ts = self.interesting_ts(data, "ts")
        try:
            expected: object = self.model.scan(start, end, ts, limit)
        except ModelRefused:
            expected = "below horizon"
        for engine in self.engines:
            try:
                got: object = engine.scan(start, end, ts, limit)
            except BelowRetentionHorizon:
                got = "below horizon"
            assert got == expected, (type(engine).__name__, start, end, ts, limit)

    @rule(start=bounds, end=st.one_of(st.none(), bounds), max_keys=st.integers(0, 4))
    def scan_versions(self, start: bytes, end: bytes | None, max_keys: int) -> None:
        keys = [
            k
            for k in sorted(self.model.versions)
            if self.model.versions[k] and k >= start and (end is None or k < end)
        ]
        expected = [(k, self.model.all_versions(k)) for k in keys[:max_keys]]
        for engine in self.engines:
            assert engine.scan_versions(start, end, max_keys) == expected, type(engine).__name__

    @rule(start=bounds, end=st.one_of(st.none(), bounds))
    def scan_intents(self, start: bytes, end: bytes | None) -> None:
        expected = [
            (k, self.model.intents[k])
            for k in sorted(self.model.intents)
            if k >= start and (end is None or k < end)
        ]
        for engine in self.engines:
            assert engine.scan_intents(start, end) == expected

    @rule(data=st.data())
    def gc(self, data: st.DataObject) -> None:
        # The horizon creeps up a few ticks at a time (or tries to go down): one leap to the
        # end of time would turn the rest of the example into refused reads.
        horizon = self.interesting_ts(data, "horizon", cap=self.model.horizon + 4)
        expected = self.model.gc(horizon)
        for engine in self.engines:
            assert engine.gc(horizon) == expected, type(engine).__name__

    @rule(close_first=st.booleans())
    def reopen(self, close_first: bool) -> None:
        """Recovery: every applied batch must be found by a fresh engine on the same files.

        Without `close_first` it is a crash-like stop: the engine object just goes away, so the
        lock must be released by its destructor (CPython frees it on the spot; a reference cycle
        keeping it alive would show up here as DataDirLocked)."""
        if close_first:
            self.rocks.close()
        del self.rocks
        self.rocks = RocksEngine(self.dir, create=False)

    @invariant()
    def state_agrees(self) -> None:
        """After every step the whole stored state matches: histories, intents, metadata."""
        intents = sorted(self.model.intents.items())
        for engine in self.engines:
            name = type(engine).__name__
            assert engine.horizon == self.model.horizon, name
            for key in KEYS:
                expected = self.model.all_versions(key)
                assert engine.versions(key) == expected, (name, key)
                assert engine.latest_version(key) == (expected[0] if expected else None), name
                assert engine.get_intent(key) == self.model.intents.get(key), (name, key)
            assert engine.scan_intents(b"", None) == intents, name
            for meta_name in META_NAMES:
                assert engine.get_meta(meta_name) == self.model.meta.get(meta_name), name


StorageMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,  # fsync and RocksDB opens vary with the disk; the step count bounds runtime
    derandomize=True,  # same examples every run: deterministic CI
    suppress_health_check=[HealthCheck.too_slow],
)
# A failing run spends minutes shrinking (each attempt opens RocksDB); let it finish and print
# the minimal example instead of being cut off by the suite-wide timeout.
TestStorageModel = pytest.mark.timeout(400)(StorageMachine.TestCase)
