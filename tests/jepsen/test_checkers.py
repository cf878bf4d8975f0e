"""The checkers themselves, checked: histories generated from a serial execution pass, and a
planted anomaly of each kind is found, whatever serializable noise surrounds it.

Generated histories: transactions take effect one at a time at distinct "commit points"; each
is invoked up to 30 ticks before its point and completes up to 30 ticks after, so operations
overlap, yet the history is strictly serializable by construction. Some transactions fail (no
effect) and some end ``info`` (effect or not, chosen at random).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jepsen_tests.bank import check_bank
from jepsen_tests.elle import check_list_append, check_rw_register, classify_cycle
from jepsen_tests.history import NEMESIS, History, Op, read_jsonl, transactions, write_jsonl
from jepsen_tests.linearizable import RegisterOp, check_linearizable, check_register
from jepsen_tests.replica import check_replica_reads

KEYS = ["a", "b", "c"]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

Spec = tuple[str, Any, int, int | None, int | None]
"""(type, value, invoke time, complete time or None, commit_ts or None)"""


def build(specs: list[Spec], f: str = "txn", extra: dict[int, Any] | None = None) -> list[Op]:
    """A history from per-transaction specs; each transaction gets its own process. `extra`:
    index -> the invocation's value when it differs from the completion's."""
    events: list[tuple[int, int, Op]] = []
    for i, (typ, value, inv, comp, cts) in enumerate(specs):
        inv_value = (extra or {}).get(i, _blank(value))
        events.append((inv, 0, Op("invoke", i, f, inv_value)))
        if comp is not None:
            events.append((comp, 1, Op(typ, i, f, value, commit_ts=cts, ts=cts)))
        elif typ != "info":
            raise ValueError("only info operations may lack a completion")
    events.sort(key=lambda e: (e[0], e[1]))
    out = []
    for n, (t, _, op) in enumerate(events):
        op.index, op.time = n, t
        out.append(op)
    return out


def _blank(value: Any) -> Any:
    if isinstance(value, list):
        return [[m[0], m[1], None if m[0] == "r" else m[2]] for m in value]
    return value


@st.composite
def serial_history(draw: st.DrawFn, kind: str) -> list[Spec]:
    """Specs of a strictly serializable list-append ("append") or rw-register ("register")
    history on KEYS."""
    n = draw(st.integers(1, 20))
    lists: dict[str, list[int]] = {k: [] for k in KEYS}
    regs: dict[str, int | None] = dict.fromkeys(KEYS)
    counter = 0
    specs: list[Spec] = []
    for i in range(n):
        point = 100 * (i + 1)
        inv = point - draw(st.integers(1, 90))
        comp = point + draw(st.integers(1, 90))
        outcome = draw(st.sampled_from(["ok", "ok", "ok", "fail", "info"]))
        applied = outcome == "ok" or (outcome == "info" and draw(st.booleans()))
        mops: list[list[Any]] = []
        local_l = {k: list(v) for k, v in lists.items()}
        local_r = dict(regs)
        for _ in range(draw(st.integers(1, 4))):
            k = draw(st.sampled_from(KEYS))
            counter += 1
            if draw(st.booleans()):
                if kind == "append":
                    local_l[k].append(counter)
                    mops.append(["append", k, counter])
                else:
                    local_r[k] = counter
                    mops.append(["w", k, counter])
            else:
                v: Any = list(local_l[k]) if kind == "append" else local_r[k]
                mops.append(["r", k, v])
        if applied:
            lists, regs = local_l, local_r
        specs.append((outcome, mops, inv, comp if outcome != "info" else None, point))
    return specs


# -- generated histories pass --------------------------------------------------------------------


@FAST
@given(serial_history("append"))
def test_serial_list_append_histories_pass(specs: list[Spec]) -> None:
    res = check_list_append(build(specs))
    assert res.valid, res.to_json()


@FAST
@given(serial_history("register"))
def test_serial_register_histories_pass_every_checker(specs: list[Spec]) -> None:
    ops = build(specs)
    for order in ("wfr", "commit-ts"):
        res = check_rw_register(ops, version_order=order)
        assert res.valid, res.to_json()
    lin = check_linearizable(ops)
    assert lin.valid, lin.to_json()


# -- planted anomalies are found -----------------------------------------------------------------

PLANTS: dict[str, list[Spec]] = {
    # ww on p and ww on q in opposite directions.
    "G0": [
        ("ok", [["append", "p", 1], ["append", "q", 1]], 5000, 5100, None),
        ("ok", [["append", "p", 2], ["append", "q", 2]], 5000, 5100, None),
        ("ok", [["r", "p", [1, 2]], ["r", "q", [2, 1]]], 5000, 5100, None),
    ],
    "G1a": [
        ("fail", [["append", "p", 1]], 5000, 5100, None),
        ("ok", [["r", "p", [1]]], 5000, 5100, None),
    ],
    "G1b": [
        ("ok", [["append", "p", 1], ["append", "p", 2]], 5000, 5100, None),
        ("ok", [["r", "p", [1]]], 5000, 5100, None),
        ("ok", [["r", "p", [1, 2]]], 5200, 5300, None),
    ],
    "G1c": [
        ("ok", [["append", "p", 1], ["r", "q", [1]]], 5000, 5100, None),
        ("ok", [["append", "q", 1], ["r", "p", [1]]], 5000, 5100, None),
    ],
    "G-single": [
        ("ok", [["r", "p", []], ["r", "q", [1]]], 5000, 5100, None),
        ("ok", [["append", "p", 1], ["append", "q", 1]], 5000, 5100, None),
        ("ok", [["r", "p", [1]]], 5200, 5300, None),
    ],
    "G2-item": [
        ("ok", [["r", "p", []], ["append", "q", 1]], 5000, 5100, None),
        ("ok", [["r", "q", []], ["append", "p", 1]], 5000, 5100, None),
        ("ok", [["r", "p", [1]], ["r", "q", [1]]], 5200, 5300, None),
    ],
    "internal": [("ok", [["append", "p", 1], ["r", "p", []]], 5000, 5100, None)],
    "G-single-realtime": [
        ("ok", [["append", "p", 1]], 5000, 5010, None),
        ("ok", [["r", "p", []]], 5020, 5030, None),
        ("ok", [["r", "p", [1]]], 5040, 5050, None),
    ],
    "incompatible-order": [
        ("ok", [["append", "p", 1], ["append", "p", 2]], 5000, 5100, None),
        ("ok", [["r", "p", [2, 1]]], 5200, 5300, None),
        ("ok", [["r", "p", [1, 2]]], 5200, 5300, None),
    ],
}


def _shift(specs: list[Spec], by: int) -> list[Spec]:
    return [(t, v, i + by, None if c is None else c + by, ts) for t, v, i, c, ts in specs]


@FAST
@given(serial_history("append"), st.sampled_from(sorted(PLANTS)), st.integers(-3000, 3000))
def test_planted_list_append_anomalies_are_found(
    background: list[Spec], kind: str, offset: int
) -> None:
    res = check_list_append(build(background + _shift(PLANTS[kind], offset)))
    assert res.valid is False
    assert kind in res.kinds, res.to_json()


def test_cycle_names() -> None:
    assert classify_cycle(["ww", "ww"]) == "G0"
    assert classify_cycle(["ww", "wr"]) == "G1c"
    assert classify_cycle(["wr", "rw"]) == "G-single"
    assert classify_cycle(["rw", "rw"]) == "G2-item"
    assert classify_cycle(["rt", "rw"]) == "G-single-realtime"


def test_realtime_anomaly_is_serializable_but_not_strict() -> None:
    ops = build(PLANTS["G-single-realtime"])
    assert check_list_append(ops, realtime=False).valid
    assert "G-single-realtime" in check_list_append(ops).kinds
    assert "lost-append" in check_list_append(ops).kinds


REGISTER_PLANTS: dict[str, list[Spec]] = {
    "G1a": [("fail", [["w", "p", 1]], 5000, 5100, None), ("ok", [["r", "p", 1]], 5000, 5100, 9)],
    "G1b": [
        ("ok", [["w", "p", 1], ["w", "p", 2]], 5000, 5100, 8),
        ("ok", [["r", "p", 1]], 5000, 5100, 9),
    ],
    # T0 wrote p and q; T1 saw T0's p but not its q.
    "G-single": [
        ("ok", [["w", "p", 1], ["w", "q", 1]], 5000, 5100, 8),
        ("ok", [["r", "p", 1], ["r", "q", None]], 5000, 5100, 9),
    ],
    "internal": [("ok", [["w", "p", 1], ["r", "p", 7]], 5000, 5100, 8)],
    "G-single-realtime": [
        ("ok", [["w", "p", 1]], 5000, 5010, 8),
        ("ok", [["r", "p", None]], 5020, 5030, 9),
    ],
}


@FAST
@given(
    serial_history("register"),
    st.sampled_from(sorted(REGISTER_PLANTS)),
    st.integers(-3000, 3000),
    st.sampled_from(["wfr", "commit-ts"]),
)
def test_planted_register_anomalies_are_found(
    background: list[Spec], kind: str, offset: int, order: str
) -> None:
    res = check_rw_register(
        build(background + _shift(REGISTER_PLANTS[kind], offset)), version_order=order
    )
    assert kind in res.kinds, res.to_json()


def test_register_g0_from_write_follows_read() -> None:
    # T0 read p=3 (T1's) then wrote p=1; T1 read q=2 (T0's) then wrote q=4: each before the other.
    ops = build(
        [
            ("ok", [["r", "p", 3], ["w", "p", 1], ["w", "q", 2]], 0, 100, None),
            ("ok", [["r", "q", 2], ["w", "q", 4], ["w", "p", 3]], 0, 100, None),
        ]
    )
    assert "G0" in check_rw_register(ops, version_order="wfr").kinds


def test_commit_ts_order_catches_a_read_that_ignored_a_lower_commit() -> None:
    # T1 committed p=2 above T0's p=1 and read p absent: fine by wfr, wrong by timestamps.
    ops = build(
        [
            ("ok", [["w", "p", 1]], 0, 100, 10),
            ("ok", [["r", "q", None], ["w", "p", 2]], 0, 100, 20),
            ("ok", [["w", "q", 5], ["r", "p", 1]], 0, 100, 30),
        ]
    )
    assert check_rw_register(ops, version_order="wfr", realtime=False).valid
    assert check_rw_register(ops, version_order="commit-ts", realtime=False).valid is False


# -- linearizability -----------------------------------------------------------------------------


@FAST
@given(serial_history("register"), st.integers(0, 5000))
def test_stale_read_is_not_linearizable(background: list[Spec], at: int) -> None:
    plant: list[Spec] = [
        ("ok", [["w", "p", 1]], at, at + 10, None),
        ("ok", [["r", "p", None]], at + 20, at + 30, None),
    ]
    res = check_linearizable(build(background + plant))
    assert "nonlinearizable" in res.kinds


def test_register_search_respects_info_and_concurrency() -> None:
    w = RegisterOp(0, "w", 0, None, write=1)  # indeterminate: may or may not have happened
    assert check_register([w, RegisterOp(1, "r", 10, 20, read=1)]) is True
    assert check_register([w, RegisterOp(1, "r", 10, 20, read=None)]) is True
    # Overlapping write and reads: both orders are possible, but not both results at once.
    w2 = RegisterOp(0, "w", 0, 100, write=1)
    r_new = RegisterOp(1, "r", 10, 20, read=1)
    r_old = RegisterOp(2, "r", 30, 40, read=None)
    assert check_register([w2, r_new]) is True
    assert check_register([w2, r_old]) is True
    assert check_register([w2, r_new, r_old]) is False
    assert check_register([RegisterOp(0, "rw", 0, 10, read=None, write=2)], None) is True
    assert check_register([RegisterOp(0, "rw", 0, 10, read=1, write=2)], None) is False


# -- bank ----------------------------------------------------------------------------------------

ACCTS = {"x": 10, "y": 10, "z": 10}


@st.composite
def bank_history(draw: st.DrawFn) -> tuple[list[Spec], list[Spec], dict[int, Any]]:
    bal = dict(ACCTS)
    ledger: dict[str, list[Any]] = {}
    transfers: list[Spec] = []
    reads: list[Spec] = []
    for i in range(draw(st.integers(0, 15))):
        a, b = draw(st.permutations(list(ACCTS)))[:2]
        amount = draw(st.integers(1, 8))
        outcome = draw(st.sampled_from(["ok", "ok", "fail", "info"]))
        value = {"id": f"t{i}", "from": a, "to": b, "amount": amount}
        applied = outcome == "ok" or (outcome == "info" and draw(st.booleans()))
        result = "declined"
        if applied and bal[a] >= amount:
            bal[a] -= amount
            bal[b] += amount
            ledger[f"t{i}"] = [a, b, amount]
            result = "moved"
        done = {**value, "result": result} if outcome == "ok" else value
        transfers.append((outcome, done, 100 * i, 100 * i + 50, None))
        if draw(st.booleans()):
            reads.append(("ok", dict(bal), 100 * i + 60, 100 * i + 70, None))
    reads.append(("ok", {"balances": dict(bal), "ledger": ledger}, 10**6, 10**6 + 1, None))
    return transfers, reads, {}


def _bank_ops(transfers: list[Spec], reads: list[Spec]) -> list[Op]:
    ops = build(transfers, f="transfer")
    rest = build(reads, f="read")
    for op in rest:
        op.process = f"r{op.process}"
        if isinstance(op.value, dict) and "ledger" in op.value:
            op.f = "final"
    merged = sorted(ops + rest, key=lambda o: (o.time, o.type != "invoke"))
    for n, op in enumerate(merged):
        op.index = n
    return merged


@FAST
@given(bank_history())
def test_serial_bank_histories_pass(h: tuple[list[Spec], list[Spec], dict[int, Any]]) -> None:
    transfers, reads, _ = h
    res = check_bank(_bank_ops(transfers, reads), initial=ACCTS)
    assert res.valid, res.to_json()


@FAST
@given(bank_history(), st.sampled_from(["wrong-total", "lost-transfer", "negative-balance"]))
def test_planted_bank_anomalies_are_found(
    h: tuple[list[Spec], list[Spec], dict[int, Any]], kind: str
) -> None:
    transfers, reads, _ = h
    if kind == "wrong-total":
        reads.insert(0, ("ok", {"x": 11, "y": 10, "z": 10}, 1, 2, None))
    elif kind == "negative-balance":
        reads.insert(0, ("ok", {"x": -1, "y": 21, "z": 10}, 1, 2, None))
    else:
        moved = {"id": "lost", "from": "x", "to": "y", "amount": 1, "result": "moved"}
        transfers.append(("ok", moved, 10**5, 10**5 + 1, None))
    res = check_bank(_bank_ops(transfers, reads), initial=ACCTS)
    assert kind in res.kinds, res.to_json()


# -- replica reads -------------------------------------------------------------------------------

GROUP = ["g/0", "g/1", "g/2"]


def _replica_ops(
    inserts: list[tuple[str, int, int]], reads: list[tuple[int, dict[str, Any], str]]
) -> list[Op]:
    """inserts: (key, commit_ts, complete time); reads: (ts, what it saw, mode)."""
    h = History(now_ns=iter(range(0, 10**9, 1)).__next__)
    for k, cts, _ in inserts:
        inv = h.invoke(f"w{k}", "insert", {"key": k, "value": f"v-{k}"})
        h.complete(inv, "ok", ts=cts, commit_ts=cts)
    for n, (ts, seen, mode) in enumerate(reads):
        value = {
            "keys": GROUP,
            "region": f"r{n % 3}",
            "mode": mode,
            "bound_ms": 50.0,
            "wall_ns": ts + 1_000_000,
        }
        inv = h.invoke(n, "replica-read", value)
        h.complete(inv, "ok", {**value, "reads": {k: seen.get(k) for k in GROUP}}, ts=ts)
    return h.ops


@FAST
@given(
    st.lists(st.integers(1, 1000), min_size=3, max_size=3, unique=True),
    st.lists(st.integers(0, 1100), max_size=8),
)
def test_exact_replica_snapshots_pass(commits: list[int], read_ts: list[int]) -> None:
    inserts = [(k, c, 0) for k, c in zip(GROUP, commits, strict=False)]
    reads = [(s, {k: f"v-{k}" for k, c, _ in inserts if c <= s}, "visible") for s in read_ts]
    res = check_replica_reads(_replica_ops(inserts, reads))
    assert res.valid, res.to_json()


def test_planted_replica_anomalies_are_found() -> None:
    inserts = [("g/0", 10, 0), ("g/1", 20, 0), ("g/2", 30, 0)]
    v = {k: f"v-{k}" for k in GROUP}
    fork = _replica_ops(
        inserts, [(25, {"g/0": v["g/0"]}, "visible"), (25, {"g/1": v["g/1"]}, "visible")]
    )
    kinds = check_replica_reads(fork).kinds
    assert "long-fork" in kinds
    assert "snapshot-gap" in kinds
    future = _replica_ops(inserts, [(15, {"g/0": v["g/0"], "g/2": v["g/2"]}, "visible")])
    assert "future-read" in check_replica_reads(future).kinds
    stale = _replica_ops(inserts, [(5, {}, "bounded")])
    stale[-1].value["wall_ns"] = 5 + 200_000_000
    stale[-2].value["wall_ns"] = 5 + 200_000_000
    assert "staleness-exceeded" in check_replica_reads(stale).kinds


# -- the history format --------------------------------------------------------------------------


def test_history_round_trips_through_json_lines(tmp_path: Path) -> None:
    ticks = iter(range(0, 1000, 7))
    h = History(now_ns=ticks.__next__)
    inv = h.invoke(0, "txn", [["append", "k", 1], ["r", "k", None]])
    h.nemesis("start-kill", {"node": "us-east-1"})
    h.complete(inv, "ok", [["append", "k", 1], ["r", "k", [1]]], ts=5, commit_ts=5)
    inv2 = h.invoke(1, "txn", [["r", "k", None]])
    h.complete(inv2, "info", error="CommitOutcomeUnknown")
    path = tmp_path / "history.jsonl"
    write_jsonl(h.ops, path)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["type"] for x in lines] == ["invoke", "info", "ok", "invoke", "info"]
    assert lines[1]["process"] == NEMESIS
    assert set(lines[2]) == {"index", "time", "type", "process", "f", "value", "ts", "commit_ts"}
    back = read_jsonl(path)
    assert [o.to_json() for o in back] == [o.to_json() for o in h.ops]
    txns = transactions(back)
    assert [t.type for t in txns] == ["ok", "info"]
    assert txns[0].value[1] == ["r", "k", [1]]


def test_the_package_exports_its_checkers() -> None:
    import jepsen_tests

    for name in jepsen_tests.__all__:
        assert getattr(jepsen_tests, name) is not None
