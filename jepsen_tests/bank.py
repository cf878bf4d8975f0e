"""The bank checker: money is neither made nor lost, and no account goes negative.

History shape (written by `workloads.BankWorkload`)
    - ``transfer``: value ``{"id": str, "from": acct, "to": acct, "amount": int}``; an ``ok``
      completion adds ``"result"``: ``moved`` | ``declined`` (not enough money) |
      ``already-applied`` (an earlier attempt had committed after all).
    - ``read``: a read-only transaction over every account; ``ok`` value ``{acct: balance}``.
    - ``final``: after every fault healed, one read of every balance and of the ledger (each
      transfer writes its id into a ledger row in the same transaction):
      ``{"balances": {acct: balance}, "ledger": {id: [from, to, amount]}}``.

Anomalies
    - wrong-total: a read's balances do not sum to the total (a snapshot saw half a transfer).
    - negative-balance / missing-account: a read saw an overdrawn or absent account.
    - lost-transfer: an acknowledged transfer is missing from the final ledger (a lost write).
    - aborted-transfer-applied: a transfer reported failed is in the ledger (G1a-like).
    - stray-ledger-entry: the ledger names a transfer nobody issued.
    - ledger-mismatch: final balances differ from the initial ones plus the ledger.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from jepsen_tests.anomalies import CheckResult
from jepsen_tests.history import Op, transactions

__all__ = ["check_bank"]


def check_bank(ops: Iterable[Op], *, initial: Mapping[str, int]) -> CheckResult:
    res = CheckResult("bank")
    total = sum(initial.values())
    txns = transactions(ops)
    reads = 0
    finals = 0
    for t in txns:
        if t.type != "ok" or t.f not in ("read", "final"):
            continue
        balances: dict[str, Any] = t.value if t.f == "read" else t.value["balances"]
        reads += 1
        _check_balances(res, t.id, balances, initial, total)
        if t.f == "final":
            finals += 1
            _check_ledger(res, txns_by_id={x.id: x for x in txns}, final=t.value, initial=initial)
    transfers = [t for t in txns if t.f == "transfer"]
    for t in transfers:
        if t.type == "ok" and t.value.get("result") == "missing-account":
            res.add("missing-account", f"transfer T{t.id} found an account absent", txn=t.id)
    res.stats.update(
        reads=reads,
        transfers=len(transfers),
        moved=sum(t.type == "ok" and t.value.get("result") == "moved" for t in transfers),
        declined=sum(t.type == "ok" and t.value.get("result") == "declined" for t in transfers),
        failed=sum(t.type == "fail" for t in transfers),
        indeterminate=sum(t.type == "info" for t in transfers),
    )
    if not finals:
        res.undecided("no final read: acknowledged transfers were not checked against the ledger")
    return res


def _check_balances(
    res: CheckResult, tid: int, balances: Mapping[str, Any], initial: Mapping[str, int], total: int
) -> None:
    missing = [a for a in initial if balances.get(a) is None]
    if missing:
        res.add("missing-account", f"T{tid} saw no balance for {missing}", txn=tid)
        return
    s = sum(int(balances[a]) for a in initial)
    if s != total:
        res.add(
            "wrong-total",
            f"T{tid} saw a total of {s}, not {total}",
            txn=tid,
            balances=dict(balances),
        )
    negative = {a: b for a, b in balances.items() if int(b) < 0}
    if negative:
        res.add("negative-balance", f"T{tid} saw {negative}", txn=tid)


def _check_ledger(
    res: CheckResult,
    *,
    txns_by_id: Mapping[int, Any],
    final: Mapping[str, Any],
    initial: Mapping[str, int],
) -> None:
    ledger: Mapping[str, list[Any]] = final["ledger"]
    issued = {t.value["id"]: t for t in txns_by_id.values() if t.f == "transfer"}
    for tid, entry in ledger.items():
        t = issued.get(tid)
        if t is None:
            res.add("stray-ledger-entry", f"ledger entry {tid} {entry}: no such transfer")
        elif t.type == "fail":
            res.add(
                "aborted-transfer-applied",
                f"transfer {tid} failed ({t.error}) but is in the ledger",
                transfer=t.value,
            )
    for tid, t in issued.items():
        acked = t.type == "ok" and t.value.get("result") in ("moved", "already-applied")
        if acked and tid not in ledger:
            res.add(
                "lost-transfer",
                f"acknowledged transfer {tid} is not in the final ledger",
                transfer=t.value,
            )
    expected = dict(initial)
    for src, dst, amount in ledger.values():
        expected[src] = expected.get(src, 0) - int(amount)
        expected[dst] = expected.get(dst, 0) + int(amount)
    balances = {a: int(b) for a, b in final["balances"].items() if b is not None}
    if balances != expected:
        diff = {
            a: (balances.get(a), expected.get(a))
            for a in expected
            if balances.get(a) != expected.get(a)
        }
        res.add(
            "ledger-mismatch",
            f"final balances differ from initial + ledger: {diff} (seen, expected)",
            diff=diff,
        )
