"""Histories: what clients asked for and what they were told, as JSON Lines with Elle's names.

Format
    One JSON object per line, in the order events happened::

        {"index": 0, "time": 1200345, "type": "invoke", "process": 3, "f": "txn",
         "value": [["append", "eu-west/la/4", 17], ["r", "us-east/la/2", null]]}
        {"index": 1, "time": 9800121, "type": "ok", "process": 3, "f": "txn",
         "value": [["append", "eu-west/la/4", 17], ["r", "us-east/la/2", [3, 9]]],
         "ts": 1764633600123456789, "commit_ts": 1764633600123456789}

    - `type`: ``invoke`` when a client starts an operation; its completion is ``ok`` (it took
      effect, and `value` says what it read), ``fail`` (it certainly did not take effect) or
      ``info`` (unknown: e.g. the commit request was lost, Jepsen's indeterminate ``:info``).
    - `process`: the logical client. As in Jepsen, a process whose operation ended ``info``
      never issues another one (the operation may still be in flight); its worker continues as a
      new process. Nemesis events use the process ``"nemesis"``, type ``info``.
    - `f`: the operation (``txn``, ``transfer``, ``read``, ``insert``, ``replica-read``, ...).
    - `time`: nanoseconds since the history began, on a monotonic clock.
    - `index`: position in the history (0-based, dense).
    - K2's own fields, absent when unknown: `ts` (the transaction's start timestamp), `commit_ts`
      (its commit timestamp) and `error` (why a fail/info ended).

    A micro-operation of a transaction is ``[f, key, value]`` as in Elle: ``["r", k, v]`` reads,
    ``["w", k, v]`` writes a register, ``["append", k, v]`` appends to a list. An invocation
    carries ``null`` for values it will read; the completion fills them in.

Contract
    `History.invoke` and `History.complete` append events in call order; `pairs` matches every
    invocation with its completion (None while in flight, which checkers treat like ``info``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from truetime import SystemClock

__all__ = ["NEMESIS", "History", "Op", "Txn", "read_jsonl", "transactions", "write_jsonl"]

NEMESIS = "nemesis"
"""The `process` of nemesis events."""

_TYPES = ("invoke", "ok", "fail", "info")


@dataclass(slots=True)
class Op:
    """One event of a history (see the module docstring for the fields)."""

    type: str
    process: int | str
    f: str
    value: Any
    time: int = 0
    index: int = -1
    ts: int | None = None
    commit_ts: int | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "index": self.index,
            "time": self.time,
            "type": self.type,
            "process": self.process,
            "f": self.f,
            "value": self.value,
        }
        for name in ("ts", "commit_ts", "error"):
            v = getattr(self, name)
            if v is not None:
                d[name] = v
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Op:
        if d.get("type") not in _TYPES:
            raise ValueError(f"op {d.get('index')}: type must be one of {_TYPES}, got {d!r}")
        return cls(
            type=d["type"],
            process=d["process"],
            f=d["f"],
            value=d.get("value"),
            time=int(d.get("time", 0)),
            index=int(d.get("index", -1)),
            ts=d.get("ts"),
            commit_ts=d.get("commit_ts"),
            error=d.get("error"),
        )


class History:
    """An append-only history; `now_ns` (monotonic nanoseconds) is injected for tests."""

    def __init__(self, now_ns: Callable[[], int] | None = None) -> None:
        self._now = now_ns or SystemClock().monotonic_ns
        self._t0 = self._now()
        self.ops: list[Op] = []

    def elapsed_ns(self) -> int:
        return self._now() - self._t0

    def _add(self, op: Op) -> Op:
        op.index = len(self.ops)
        op.time = self.elapsed_ns()
        self.ops.append(op)
        return op

    def invoke(self, process: int | str, f: str, value: Any) -> Op:
        return self._add(Op("invoke", process, f, value))

    def complete(
        self,
        invocation: Op,
        type: str,
        value: Any = None,
        *,
        ts: int | None = None,
        commit_ts: int | None = None,
        error: str | None = None,
    ) -> Op:
        """Record the completion of `invocation`: `type` is ok, fail or info."""
        if type not in ("ok", "fail", "info"):
            raise ValueError(f"a completion is ok, fail or info, not {type!r}")
        if value is None:
            value = invocation.value
        op = Op(type, invocation.process, invocation.f, value, ts=ts, commit_ts=commit_ts)
        op.error = error
        return self._add(op)

    def nemesis(self, f: str, value: Any) -> Op:
        return self._add(Op("info", NEMESIS, f, value))

    def __iter__(self) -> Iterator[Op]:
        return iter(self.ops)

    def __len__(self) -> int:
        return len(self.ops)


def write_jsonl(ops: Iterable[Op], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for op in ops:
            f.write(json.dumps(op.to_json(), separators=(",", ":")) + "\n")


def read_jsonl(path: Path) -> list[Op]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                try:
                    out.append(Op.from_json(json.loads(line)))
                except (ValueError, KeyError) as e:
                    raise ValueError(f"{path}:{n}: {e}") from None
    return out


@dataclass(slots=True)
class Txn:
    """An invocation paired with its completion: the unit every checker reasons about.

    `type` is the completion's (``info`` when the history ends with it in flight); `value` is the
    completion's for ``ok`` and the invocation's otherwise (reads of a fail/info are unknown);
    `complete` is None unless ``ok`` or ``fail``."""

    id: int
    process: int | str
    f: str
    type: str
    value: Any
    invoke: int
    complete: int | None
    ts: int | None = None
    commit_ts: int | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def transactions(ops: Iterable[Op]) -> list[Txn]:
    """Pair each client invocation with its completion (nemesis events are skipped), in
    invocation order; `Txn.id` is the invocation's index."""
    open_: dict[int | str, Txn] = {}
    out: list[Txn] = []
    for op in ops:
        if op.process == NEMESIS:
            continue
        if op.type == "invoke":
            if op.process in open_:
                raise ValueError(f"op {op.index}: process {op.process} invoked twice")
            t = Txn(op.index, op.process, op.f, "info", op.value, op.time, None)
            open_[op.process] = t
            out.append(t)
            continue
        t_open = open_.pop(op.process, None)
        if t_open is None:
            raise ValueError(f"op {op.index}: completion of process {op.process} without invoke")
        t_open.type = op.type
        t_open.ts, t_open.commit_ts, t_open.error = op.ts, op.commit_ts, op.error
        if op.type == "ok":
            t_open.value = op.value
        if op.type in ("ok", "fail"):
            t_open.complete = op.time
    return out
