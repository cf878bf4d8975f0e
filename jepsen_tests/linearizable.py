"""Per-key linearizability of a register, by Wing & Gong's search with Lowe's memoization.

Model
    A register holding a value (None: absent). Operations: ``read v`` (legal iff the register
    holds v), ``write v`` (always legal) and ``read a, then write b`` atomically (a transaction
    that read a key and then wrote it). Strict serializability of transactions implies that the
    projection of a history onto one key is linearizable (each transaction takes effect at one
    point inside its real-time interval), so checking each key separately (linearizability is
    compositional) is sound.

Algorithm (Lowe, "Testing for linearizability", 2017)
    Events (invocations and returns) form a doubly linked list in time order. Walking it, at an
    invocation the search tries to linearize that operation now: if it is legal in the current
    state and the pair (set of linearized operations, new state) has not been seen before, it
    is applied, its two events are lifted out of the list, and the walk restarts at the head. At
    a return whose operation is not yet linearized the current choice was wrong: backtrack (undo
    the latest linearization, continue after its invocation). Success when every ``ok``
    operation is linearized. ``info`` operations have no return event: they may be linearized at
    any point after their invocation, or never. Bounded by `max_steps`; when the bound is hit the
    verdict is "unknown", never a guess.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from jepsen_tests.anomalies import CheckResult
from jepsen_tests.history import Op, Txn, transactions

__all__ = ["RegisterOp", "check_linearizable", "check_register", "register_ops"]


@dataclass(frozen=True, slots=True)
class RegisterOp:
    """kind: "r" (read `read`), "w" (write `write`) or "rw" (read `read`, then write `write`).
    `complete` None: indeterminate (may have happened after `invoke`, or never)."""

    id: int
    kind: str
    invoke: int
    complete: int | None
    read: Any = None
    write: Any = None


@dataclass
class _Entry:
    op: RegisterOp
    slot: int
    is_call: bool
    match: _Entry | None = None
    prev: _Entry | None = None
    next: _Entry | None = None


def _step(state: Any, op: RegisterOp) -> tuple[bool, Any]:
    if op.kind == "w":
        return True, op.write
    if state != op.read:
        return False, state
    return True, (op.write if op.kind == "rw" else state)


def check_register(
    ops: Sequence[RegisterOp], initial: Any = None, max_steps: int = 2_000_000
) -> bool | None:
    """True if `ops` are linearizable as one register starting at `initial`, False if not,
    None if the search gave up after `max_steps`."""
    events: list[tuple[int, int, _Entry]] = []
    for slot, op in enumerate(ops):
        call = _Entry(op, slot, True)
        events.append((op.invoke, 0, call))
        if op.complete is not None:
            ret = _Entry(op, slot, False)
            call.match = ret
            events.append((op.complete, 1, ret))
    # At equal times, calls go first: two operations that touch at an instant may be concurrent.
    events.sort(key=lambda e: (e[0], e[1], e[2].slot))
    head = _Entry(RegisterOp(-1, "r", 0, 0), -1, True)
    prev = head
    for _, _, e in events:
        prev.next, e.prev = e, prev
        prev = e

    def lift(e: _Entry) -> None:
        assert e.prev is not None
        e.prev.next = e.next
        if e.next is not None:
            e.next.prev = e.prev
        m = e.match
        if m is not None:
            assert m.prev is not None
            m.prev.next = m.next
            if m.next is not None:
                m.next.prev = m.prev

    def unlift(e: _Entry) -> None:
        m = e.match
        if m is not None:
            assert m.prev is not None
            m.prev.next = m
            if m.next is not None:
                m.next.prev = m
        assert e.prev is not None
        e.prev.next = e
        if e.next is not None:
            e.next.prev = e

    remaining = sum(op.complete is not None for op in ops)
    linearized = 0
    state = initial
    cache: set[tuple[int, Any]] = set()
    stack: list[tuple[_Entry, Any]] = []
    entry = head.next
    steps = 0
    while remaining:
        steps += 1
        if steps > max_steps:
            return None
        if entry is None:
            return False  # unreachable while an ok operation's return is still listed
        if entry.is_call:
            legal, new_state = _step(state, entry.op)
            if legal:
                key = (linearized | (1 << entry.slot), _hashable(new_state))
                if key not in cache:
                    cache.add(key)
                    stack.append((entry, state))
                    linearized |= 1 << entry.slot
                    state = new_state
                    lift(entry)
                    if entry.match is not None:
                        remaining -= 1
                    entry = head.next
                    continue
            entry = entry.next
        else:
            if not stack:
                return False
            top, state = stack.pop()
            linearized &= ~(1 << top.slot)
            unlift(top)
            if top.match is not None:
                remaining += 1
            entry = top.next
    return True


def _hashable(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def register_ops(txns: Iterable[Txn]) -> dict[Any, list[RegisterOp]]:
    """Project rw-register transactions onto keys: per key, the transaction's first read (if
    it read before writing) and its last write. Failed transactions did nothing; an info
    transaction's reads are unknown, so only its write is kept."""
    out: dict[Any, list[RegisterOp]] = defaultdict(list)
    for t in txns:
        if t.f != "txn" or t.type == "fail":
            continue
        first: dict[Any, Any] = {}
        last_w: dict[Any, Any] = {}
        for f, k, v in t.value or []:
            if f == "r" and k not in first and k not in last_w:
                first[k] = v
            elif f == "w":
                last_w[k] = v
                first.setdefault(k, _NO_READ)
        ok = t.type == "ok"
        complete = t.complete if ok else None
        for k in first.keys() | last_w.keys():
            r = first.get(k, _NO_READ)
            if k in last_w:
                kind = "rw" if ok and r is not _NO_READ else "w"
                out[k].append(RegisterOp(t.id, kind, t.invoke, complete, r, last_w[k]))
            elif ok:
                out[k].append(RegisterOp(t.id, "r", t.invoke, complete, r))
    return out


_NO_READ: Any = object()


def check_linearizable(ops: Iterable[Op], *, max_steps: int = 2_000_000) -> CheckResult:
    """Every key of an rw-register history, checked as a linearizable register."""
    res = CheckResult("linearizable register (Wing-Gong-Lowe, per key)")
    per_key = register_ops(transactions(ops))
    unknown = 0
    for k, kops in sorted(per_key.items(), key=lambda kv: str(kv[0])):
        verdict = check_register(kops, None, max_steps)
        if verdict is None:
            unknown += 1
            res.undecided(f"key {k!r}: search gave up after {max_steps} steps ({len(kops)} ops)")
        elif not verdict:
            res.add(
                "nonlinearizable",
                f"key {k!r}: no order of its {len(kops)} operations respects real time and "
                "register semantics",
                key=k,
                ops=[
                    {
                        "id": o.id,
                        "kind": o.kind,
                        "read": _show(o.read),
                        "write": _show(o.write),
                        "invoke": o.invoke,
                        "complete": o.complete,
                    }
                    for o in sorted(kops, key=lambda o: o.invoke)[:40]
                ],
            )
    res.stats.update(keys=len(per_key), undecided_keys=unknown)
    return res


def _show(v: Any) -> Any:
    return None if v is _NO_READ else v
