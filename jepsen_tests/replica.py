"""The replica-read checker: snapshots served by local replicas are exact, atomic and as fresh
as promised.

History shape (written by `workloads.ReplicaWorkload`)
    - ``insert``: value ``{"key": k, "value": v}``: a leader transaction that creates key k
      (every key is written once, so its versions are just "absent" then v); ``ok`` carries the
      transaction's `commit_ts`.
    - ``replica-read``: a `ReplicaSnapshot.get_many` of a group of keys homed in different
      regions. Invocation value ``{"keys": [...], "region": r, "mode": "visible" | "bounded" |
      "fresh", "bound_ms": float or null, "wall_ns": int}`` (`wall_ns`: the client's real time at
      invocation; optional ``"groups"``: the key groups a read of several groups covers);
      ``ok`` adds ``"reads": {k: v or null}`` and carries the snapshot timestamp as `ts`.

Checks, for every ok replica read at timestamp S
    - exact state at S (given commit timestamps): a key is present iff an ok insert of it
      committed at or below S. Present with commit_ts > S is ``future-read`` (the replica showed
      state newer than its visible timestamp allows: a seal shipped too early); absent with
      commit_ts <= S is ``snapshot-gap`` (the visible timestamp ran ahead of the data).
    - ``aborted-read``: a value whose insert failed; ``unexpected-value``: one nobody wrote.
    - ``long-fork``: two reads of one group that each saw an insert the other did not. With
      write-once keys every consistent snapshot of a group is a prefix of one order, so the sets
      of keys seen must be totally ordered by inclusion; this check uses no timestamps at all.
    - ``staleness-exceeded``: a bounded read whose S is older than its bound (plus `slack_ns`
      for clock uncertainty) at invocation.
    - fresh reads: ``fresh-read-stale`` (S below the invocation's real time minus `slack_ns`) and
      ``fresh-read-missed-write`` (an insert acknowledged before the read was invoked is absent).
    Staleness of plain visible reads (invocation real time minus S) is reported in the stats:
    it is the visibility delay, a metric rather than a promise.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from jepsen_tests.anomalies import CheckResult
from jepsen_tests.history import Op, Txn, transactions

__all__ = ["check_replica_reads"]


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def check_replica_reads(ops: Iterable[Op], *, slack_ns: int = 10_000_000) -> CheckResult:
    res = CheckResult("replica reads (exact snapshot, long fork, staleness)")
    txns = transactions(ops)
    inserts: dict[Any, Txn] = {}
    for t in txns:
        if t.f == "insert":
            k = t.value["key"]
            if k in inserts:
                res.add("duplicate-insert", f"key {k!r} inserted twice", key=k)
            inserts[k] = t
    staleness_ms: dict[str, list[float]] = defaultdict(list)
    groups: dict[tuple[Any, ...], list[tuple[Txn, frozenset[Any]]]] = defaultdict(list)
    reads = [t for t in txns if t.f == "replica-read" and t.type == "ok"]
    for r in reads:
        s = r.ts
        if s is None:
            res.add("missing-ts", f"T{r.id}: an ok replica read without its timestamp", txn=r.id)
            continue
        v = r.value
        seen: set[Any] = set()
        for k, got in v["reads"].items():
            w = inserts.get(k)
            if got is not None:
                seen.add(k)
                if w is None or w.value["value"] != got:
                    res.add(
                        "unexpected-value",
                        f"T{r.id} read {k!r} = {got!r}, never written",
                        txn=r.id,
                        key=k,
                    )
                    continue
                if w.type == "fail":
                    res.add(
                        "aborted-read",
                        f"T{r.id} at {s} read {k!r} = {got!r}, whose insert "
                        f"T{w.id} failed ({w.error})",
                        txn=r.id,
                        key=k,
                    )
                elif w.commit_ts is not None and w.commit_ts > s:
                    res.add(
                        "future-read",
                        f"T{r.id} at ts {s} saw {k!r}, committed later at {w.commit_ts}",
                        txn=r.id,
                        key=k,
                        region=v.get("region"),
                    )
            elif w is not None and w.type == "ok" and w.commit_ts is not None and w.commit_ts <= s:
                res.add(
                    "snapshot-gap",
                    f"T{r.id} at ts {s} missed {k!r}, committed at {w.commit_ts}",
                    txn=r.id,
                    key=k,
                    region=v.get("region"),
                )
            if (
                got is None
                and v.get("mode") == "fresh"
                and w is not None
                and w.type == "ok"
                and w.complete is not None
                and w.complete < r.invoke
            ):
                res.add(
                    "fresh-read-missed-write",
                    f"fresh T{r.id} missed {k!r}, acknowledged before it began",
                    txn=r.id,
                    key=k,
                )
        for g in v.get("groups") or [list(v["reads"])]:
            groups[tuple(sorted(g))].append((r, frozenset(seen & set(g))))
        lag_ms = (v["wall_ns"] - s) / 1e6
        mode = v.get("mode", "visible")
        staleness_ms[mode].append(lag_ms)
        bound = v.get("bound_ms")
        if mode == "bounded" and bound is not None and lag_ms > bound + slack_ns / 1e6:
            res.add(
                "staleness-exceeded",
                f"T{r.id} read at {lag_ms:.1f} ms old, bound {v['bound_ms']} ms",
                txn=r.id,
            )
        if mode == "fresh" and lag_ms > slack_ns / 1e6:
            res.add("fresh-read-stale", f"fresh T{r.id} read {lag_ms:.1f} ms in the past", txn=r.id)
    forks = 0
    for key_group, rs in groups.items():
        ordered = sorted(rs, key=lambda x: (len(x[1]), x[0].id))
        for (a, sa), (b, sb) in itertools.pairwise(ordered):
            if not sa <= sb:
                forks += 1
                res.add(
                    "long-fork",
                    f"T{a.id} ({a.value.get('region')}, ts {a.ts}) saw {sorted(sa - sb)} but not "
                    f"{sorted(sb - sa)}; T{b.id} ({b.value.get('region')}, ts {b.ts}) the reverse",
                    group=list(key_group),
                )
    res.stats.update(
        reads=len(reads),
        inserts=len(inserts),
        staleness_ms={
            m: {
                "n": len(xs),
                "p50": _percentile(xs, 0.5),
                "p99": _percentile(xs, 0.99),
                "max": max(xs),
            }
            for m, xs in staleness_ms.items()
        },
    )
    return res
