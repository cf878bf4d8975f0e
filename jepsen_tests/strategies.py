"""Hypothesis strategies and a stateful test to point at a live K2 cluster.

Public API
    - `keys(prefix, regions)`, `values()`: keys under a run-private prefix, homed in any region.
    - `txn_programs(keys)`: transaction programs, lists of ``("get", k)``, ``("put", k, v)``,
      ``("delete", k)``.
    - `LiveClusterMachine`: a `RuleBasedStateMachine` that runs generated transactions against
      a cluster (through the synchronous `k2store.client.Client`) and holds every result
      against a sequential model (a dict): reads inside a transaction see the model plus the
      transaction's own writes; a committed transaction's writes become the model; an aborted
      one's never do; a read-only snapshot at a replica never shows a state the model never had.
    - `live_cluster_test(cluster_file, ...)`: a unittest TestCase class for pytest to collect.

Usage (a file in your own test suite)::

    from jepsen_tests.strategies import live_cluster_test
    TestMyCluster = live_cluster_test("k2-data/cluster.toml", max_examples=20)

The machine is single-client, so its model is exact: any difference is a bug (lost write, read
of an aborted or intermediate value, broken read-your-writes). Keys live under a fresh random
prefix per run, so it can share a cluster with other users. A commit whose outcome is unknown
(`CommitOutcomeUnknown`) is resolved by reading the keys back before the model moves on.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import TestCase

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from k2store.client import Client
from k2store.errors import CommitOutcomeUnknown, K2Error, TxnAborted

__all__ = ["LiveClusterMachine", "keys", "live_cluster_test", "txn_programs", "values"]

Program = list[tuple[Any, ...]]


def keys(prefix: str, regions: Sequence[str], n: int = 6) -> st.SearchStrategy[str]:
    """One of n keys per region under ``<region>/<prefix>/``."""
    return st.builds(
        lambda r, i: f"{r}/{prefix}/{i}", st.sampled_from(list(regions)), st.integers(0, n - 1)
    )


def values() -> st.SearchStrategy[bytes]:
    return st.binary(min_size=0, max_size=64)


def txn_programs(key_st: st.SearchStrategy[str], max_ops: int = 5) -> st.SearchStrategy[Program]:
    op = st.one_of(
        st.tuples(st.just("get"), key_st),
        st.tuples(st.just("put"), key_st, values()),
        st.tuples(st.just("delete"), key_st),
    )
    return st.lists(op, min_size=1, max_size=max_ops)


class LiveClusterMachine(RuleBasedStateMachine):
    """Set `cluster_file` (a class attribute) before running; see the module docstring."""

    cluster_file: str | Path = ""
    prefix_len = 8

    def __init__(self) -> None:
        super().__init__()
        if not self.cluster_file:
            raise ValueError("set LiveClusterMachine.cluster_file to a cluster file")
        self.client = Client.connect(str(self.cluster_file))
        self.regions = self.client.cluster.region_names()
        self.prefix = "hyp-" + secrets.token_hex(self.prefix_len // 2)
        self.model: dict[str, bytes] = {}
        self.history_of: dict[str, list[bytes | None]] = {}
        """Every state each key has had, for the replica rule."""
        self.key_st = keys(self.prefix, self.regions)

    def teardown(self) -> None:
        with contextlib.suppress(K2Error):
            for k in list(self.model):
                self.client.delete(k)
        self.client.close()

    def _set(self, k: str, v: bytes | None) -> None:
        self.history_of.setdefault(k, [None]).append(v)
        if v is None:
            self.model.pop(k, None)
        else:
            self.model[k] = v

    @rule(data=st.data())
    def transaction(self, data: st.DataObject) -> None:
        program = data.draw(txn_programs(self.key_st))
        writes: dict[str, bytes | None] = {}

        def body(tx: Any) -> list[bytes | None]:
            writes.clear()
            seen: list[bytes | None] = []
            for op in program:
                if op[0] == "get":
                    got = tx.get(op[1])
                    want = writes[op[1]] if op[1] in writes else self.model.get(op[1])
                    assert got == want, f"read {op[1]!r} = {got!r}, model says {want!r}"
                    seen.append(got)
                elif op[0] == "put":
                    tx.put(op[1], op[2])
                    writes[op[1]] = op[2]
                else:
                    tx.delete(op[1])
                    writes[op[1]] = None
            return seen

        try:
            self.client.run(body)
        except TxnAborted:
            return  # gave up after its retries: nothing it wrote may appear
        except CommitOutcomeUnknown:
            self._resolve(writes)
            return
        for k, v in writes.items():
            self._set(k, v)

    def _resolve(self, writes: dict[str, bytes | None]) -> None:
        """After an unknown commit: either all its writes are there or none are."""
        got = {k: self.client.get(k) for k in writes}
        if got == writes:
            for k, v in writes.items():
                self._set(k, v)
        else:
            before = {k: self.model.get(k) for k in writes}
            assert got == before, f"unknown commit applied partly: {got} vs {writes} / {before}"

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def replica_snapshot(self, data: st.DataObject) -> None:
        """A replica snapshot shows, for every key, some state the key has had."""
        snap = self.client.replica_snapshot()
        ks = sorted(self.history_of)
        try:
            got = snap.get_many(ks)
        except K2Error:
            return
        for k, v in zip(ks, got, strict=True):
            assert v in self.history_of[k], f"replica read {k!r} = {v!r}, never its value"

    @invariant()
    def leader_reads_match_the_model(self) -> None:
        if not self.model:
            return
        ks = sorted(self.history_of)

        def body(tx: Any) -> list[bytes | None]:
            return list(tx.get_many(ks))

        try:
            got = self.client.run(body, read_only=True)
        except K2Error:
            return
        assert got == [self.model.get(k) for k in ks]


def live_cluster_test(
    cluster_file: str | Path, *, max_examples: int = 20, steps: int = 20
) -> type[TestCase]:
    """A TestCase running `LiveClusterMachine` against the cluster of `cluster_file`."""

    class Machine(LiveClusterMachine):
        pass

    Machine.cluster_file = cluster_file
    case: type[TestCase] = Machine.TestCase
    case.settings = settings(max_examples=max_examples, stateful_step_count=steps, deadline=None)  # type: ignore[attr-defined]
    return case
