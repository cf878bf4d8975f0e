"""The checkers on histories recorded from real runs (tests/jepsen/testdata), untouched and with
one fact falsified, so the checkers are known to bite on real-sized, real-shaped data.

- append-kill-k2mvto.jsonl: `k2 jepsen --workload append --nemesis kill --time 30` (K2-MVTO).
- register-all-d2pl.jsonl: `k2 jepsen --workload register --nemesis all --protocol d2pl-ttc
  --time 25` (latency spikes, a pause and a kill).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from jepsen_tests.elle import check_list_append, check_rw_register
from jepsen_tests.history import Op, read_jsonl, transactions
from jepsen_tests.linearizable import check_linearizable

DATA = Path(__file__).parent / "testdata"


@pytest.fixture(scope="module")
def append_ops() -> list[Op]:
    return read_jsonl(DATA / "append-kill-k2mvto.jsonl")


@pytest.fixture(scope="module")
def register_ops() -> list[Op]:
    return read_jsonl(DATA / "register-all-d2pl.jsonl")


def _completion(ops: list[Op], invoke_index: int) -> Op:
    inv = ops[invoke_index]
    return next(o for o in ops[invoke_index + 1 :] if o.process == inv.process)


def test_recorded_histories_are_clean(append_ops: list[Op], register_ops: list[Op]) -> None:
    res = check_list_append(append_ops)
    assert res.valid, res.to_json()
    assert res.stats["ok"] >= 50
    for order in ("wfr", "commit-ts"):
        assert check_rw_register(register_ops, version_order=order).valid
    assert check_linearizable(register_ops).valid


def test_an_aborted_append_that_was_read_is_g1a(append_ops: list[Op]) -> None:
    ops = copy.deepcopy(append_ops)
    txns = transactions(ops)
    read_values = {
        (m[1], v) for t in txns if t.type == "ok" for m in t.value if m[0] == "r" for v in m[2]
    }
    victim = next(
        t
        for t in txns
        if t.type == "ok" and any(m[0] == "append" and (m[1], m[2]) in read_values for m in t.value)
    )
    _completion(ops, victim.id).type = "fail"
    assert "G1a" in check_list_append(ops).kinds


def test_reordered_list_is_incompatible(append_ops: list[Op]) -> None:
    ops = copy.deepcopy(append_ops)
    done = next(
        o
        for o in reversed(ops)
        if o.type == "ok" and any(m[0] == "r" and len(m[2] or []) >= 2 for m in o.value)
    )
    mop = next(m for m in done.value if m[0] == "r" and len(m[2] or []) >= 2)
    mop[2][-1], mop[2][-2] = mop[2][-2], mop[2][-1]
    assert "incompatible-order" in check_list_append(ops).kinds


def test_a_final_read_missing_its_last_append_is_a_realtime_anomaly(append_ops: list[Op]) -> None:
    ops = copy.deepcopy(append_ops)
    final = next(
        o for o in reversed(ops) if o.type == "ok" and any(m[0] == "r" and m[2] for m in o.value)
    )
    mop = next(m for m in final.value if m[0] == "r" and m[2])
    mop[2].pop()
    kinds = check_list_append(ops).kinds
    assert "lost-append" in kinds
    # The same read saw newer appends to other keys, so it is a plain G-single too.
    assert kinds & {"G-single", "G-single-realtime", "G2-item-realtime"}


def test_a_read_of_a_failed_write_is_g1a(register_ops: list[Op]) -> None:
    ops = copy.deepcopy(register_ops)
    txns = transactions(ops)
    failed = next(t for t in txns if t.type == "fail" and any(m[0] == "w" for m in t.value))
    k, v = next((m[1], m[2]) for m in failed.value if m[0] == "w")
    reader = next(
        o
        for o in ops
        if o.type == "ok" and any(m[0] == "r" and m[1] == k for m in o.value)
        and not any(m[0] == "w" and m[1] == k for m in o.value)
    )  # fmt: skip
    next(m for m in reader.value if m[0] == "r" and m[1] == k)[2] = v
    assert "G1a" in check_rw_register(ops).kinds


def test_a_stale_final_register_read_is_not_linearizable(register_ops: list[Op]) -> None:
    ops = copy.deepcopy(register_ops)
    # The last ok read of a key that has been written at least twice: make it return the first
    # value (older than at least one acknowledged write that completed before it began).
    txns = transactions(ops)
    written: dict[str, list[tuple[int, int]]] = {}
    for t in txns:
        if t.type == "ok" and t.complete is not None:
            for m in t.value:
                if m[0] == "w":
                    written.setdefault(m[1], []).append((t.complete, m[2]))
    for o in reversed(ops):
        if o.type != "ok":
            continue
        hit = next((m for m in o.value if m[0] == "r" and len(written.get(m[1], [])) >= 2), None)
        if hit is not None:
            first = min(written[hit[1]])[1]
            if hit[2] != first:
                hit[2] = first
                break
    else:
        pytest.skip("no key written twice and read after")
    assert "nonlinearizable" in check_linearizable(ops).kinds
