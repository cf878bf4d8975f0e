"""Elle's dependency-graph checker (Kingsbury & Alvaro, VLDB 2020) for list-append and
rw-register histories. Pure functions over a history; no I/O.

Method
    1. Pair invocations with completions (`history.transactions`). Only ``ok`` transactions
       are known to have committed with the values they report; ``fail`` ones certainly did not
       commit; ``info`` ones may have (their writes count if someone observed them).
    2. Infer each key's **version order**.
       - list-append: every read returns the whole list, so the longest read of a key is its
         version order and every other read must be a prefix of it (else `incompatible-order`).
       - rw-register: writes are unique per key, so a read names its writer exactly, but the
         order of versions is not in the reads. Two sources, never mixed silently (the result
         says which was used): ``wfr`` (write-follows-read: a transaction that read a and then
         wrote b puts a before b; the initial absent value precedes every write) and
         ``commit-ts`` (K2's commit timestamps order the writes of ok transactions: this trusts
         the store's own timestamps, so it checks the store against its claimed serial order).
    3. Build the **dependency graph** over transactions:
       - ``ww`` T1 -> T2: T2 installed the version right after T1's;
       - ``wr`` T1 -> T2: T2 read the version T1 installed;
       - ``rw`` T1 -> T2 (anti-dependency): T1 read a version, T2 installed the next one;
       - ``rt`` T1 -> T2 (real time, only when checking strict serializability): T1 completed
         before T2 was invoked (kept sparse: T2's predecessors are the completed transactions
         not already implied by another predecessor, as Elle does).
    4. Find cycles: strongly connected components (Tarjan) of the graph restricted to each edge
       set, then one shortest cycle per component by breadth-first search, in this order:
       ww only; ww+wr; exactly one rw (for each rw edge b->a, a path a->b without rw); all.
       Then the same again with rt edges.

Anomalies (Adya's names, as Elle reports them)
    - G0 (write cycle): a cycle of ww edges: two transactions' writes interleave.
    - G1a (aborted read): a committed transaction read a value written by one that failed.
    - G1b (intermediate read): it read a value its writer overwrote later in the same
      transaction.
    - G1c (circular information flow): a cycle of ww and wr edges with at least one wr.
    - G-single (read skew): a cycle with exactly one rw edge.
    - G2-item (write skew and friends): a cycle with two or more rw edges.
    - ``-realtime`` suffix: the cycle needs an rt edge, so the history is serializable (as far as
      this cycle goes) but not strictly serializable (a stale read, a lost real-time order).
    - internal: a transaction's read disagrees with its own earlier reads and writes.
    - incompatible-order, duplicate-elements, duplicate-appends/writes, unexpected-value: the
      reads cannot come from any sequence of the recorded writes (or the workload broke its
      own uniqueness rule).
    - lost-append (strict only): a read invoked after an append was acknowledged lacks it.
"""

from __future__ import annotations

import itertools
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from jepsen_tests.anomalies import CheckResult
from jepsen_tests.history import Op, Txn, transactions

__all__ = [
    "RT",
    "RW",
    "WR",
    "WW",
    "DepGraph",
    "check_list_append",
    "check_rw_register",
    "classify_cycle",
    "strongly_connected",
]

WW, WR, RW, RT = "ww", "wr", "rw", "rt"
_PREFERENCE = (WW, WR, RW, RT)
"""When two transactions are linked by several relations, a cycle is named by the weakest."""

Key = Any
MAX_SEARCHES = 500
"""Bound on the breadth-first searches of one level, so a huge component cannot stall a run."""


@dataclass
class DepGraph:
    """Directed graph of transaction ids; each edge carries the set of relations behind it and,
    for reports, the key that produced each relation."""

    out: dict[int, dict[int, set[str]]] = field(default_factory=lambda: defaultdict(dict))
    keys: dict[tuple[int, int, str], Key] = field(default_factory=dict)
    nodes: set[int] = field(default_factory=set)

    def add(self, a: int, b: int, rel: str, key: Key = None) -> None:
        if a == b:
            return
        self.nodes.update((a, b))
        self.out[a].setdefault(b, set()).add(rel)
        self.keys.setdefault((a, b, rel), key)

    def successors(self, a: int, allowed: frozenset[str]) -> Iterable[int]:
        for b, rels in self.out.get(a, {}).items():
            if rels & allowed:
                yield b

    def label(self, a: int, b: int, allowed: frozenset[str]) -> str:
        rels = self.out[a][b] & allowed
        return next(r for r in _PREFERENCE if r in rels)

    def edge_count(self) -> dict[str, int]:
        c: dict[str, int] = defaultdict(int)
        for succ in self.out.values():
            for rels in succ.values():
                for r in rels:
                    c[r] += 1
        return dict(c)


def strongly_connected(
    nodes: Iterable[int], succ: Callable[[int], Iterable[int]]
) -> list[list[int]]:
    """Tarjan's algorithm (iterative): the components with more than one node."""
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    on_stack: set[int] = set()
    stack: list[int] = []
    out: list[list[int]] = []
    counter = 0
    for root in sorted(nodes):
        if root in index:
            continue
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        work = [(root, iter(succ(root)))]
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(succ(w))))
                    advanced = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(comp)
    return out


def _path(
    g: DepGraph, src: int, dst: int, within: set[int], allowed: frozenset[str]
) -> list[int] | None:
    """Shortest path src -> ... -> dst (src == dst: a cycle) over `allowed` edges in `within`;
    returns the nodes from src up to the node before dst."""
    prev: dict[int, int | None] = {src: None}
    q = deque([src])
    while q:
        u = q.popleft()
        for w in g.successors(u, allowed):
            if w not in within:
                continue
            if w == dst:
                path = [u]
                while (p := prev[path[-1]]) is not None:
                    path.append(p)
                return path[::-1]
            if w not in prev:
                prev[w] = u
                q.append(w)
    return None


def classify_cycle(labels: Sequence[str]) -> str:
    """Name a cycle by the relations on its edges (see the module docstring)."""
    rw = sum(1 for r in labels if r == RW)
    if rw == 0:
        base = "G1c" if WR in labels else "G0"
    elif rw == 1:
        base = "G-single"
    else:
        base = "G2-item"
    return base + ("-realtime" if RT in labels else "")


def _describe(txn: Txn | None, tid: int) -> dict[str, Any]:
    if txn is None:
        return {"id": tid}
    return {
        "id": tid,
        "type": txn.type,
        "process": txn.process,
        "value": txn.value,
        "ts": txn.ts,
        "commit_ts": txn.commit_ts,
    }


def _check_source(
    res: CheckResult, t: Txn, k: Key, v: Any, w: Txn | None, read: str, verb: str
) -> bool:
    """A value read must come from a write that happened: report one nobody wrote
    (unexpected-value) or a failed transaction wrote (G1a). True if reported."""
    if w is None:
        res.add("unexpected-value", f"T{t.id} {read}, never {verb}", txn=t.id, key=k, value=v)
        return True
    if w.type == "fail":
        res.add(
            "G1a",
            f"T{t.id} {read}, {verb} by failed T{w.id}",
            reader=_describe(t, t.id),
            writer=_describe(w, w.id),
            key=k,
        )
        return True
    return False


def find_cycles(g: DepGraph, res: CheckResult, by_id: dict[int, Txn], *, realtime: bool) -> None:
    """Add one anomaly per distinct cycle found (see the module docstring for the levels)."""
    base = [WW, WR, RW]
    sets = [(frozenset({WW}), False), (frozenset({WW, WR}), False), (frozenset(base), True)]
    sets.append((frozenset(base), False))
    if realtime:
        sets += [(s | {RT}, single) for s, single in sets]
    seen: set[frozenset[int]] = set()
    for allowed, single in sets:
        searches = 0
        for comp in strongly_connected(g.nodes, lambda n, a=allowed: g.successors(n, a)):  # type: ignore[misc]
            within = set(comp)
            cycles: list[list[tuple[int, int, str]]] = []
            if single:
                no_rw = allowed - {RW}
                for a in sorted(comp):
                    for b in g.successors(a, frozenset({RW})):
                        if b not in within or searches >= MAX_SEARCHES:
                            continue
                        searches += 1
                        p = _path(g, b, a, within, no_rw)
                        if p is not None:
                            steps = [(x, y, g.label(x, y, no_rw)) for x, y in itertools.pairwise(p)]
                            steps += [(p[-1], a, g.label(p[-1], a, no_rw)), (a, b, RW)]
                            cycles.append(steps)
                            break
                    if cycles:
                        break
            else:
                if searches >= MAX_SEARCHES:
                    break
                searches += 1
                p = _path(g, min(comp), min(comp), within, allowed)
                if p is not None:
                    ring = [*p, p[0]]
                    cycles.append(
                        [(x, y, g.label(x, y, allowed)) for x, y in itertools.pairwise(ring)]
                    )
            for steps in cycles:
                members = frozenset(x for x, _, _ in steps)
                if members in seen:
                    continue
                seen.add(members)
                kind = classify_cycle([r for _, _, r in steps])
                text = (
                    " ".join(f"T{x} -{r}({g.keys.get((x, y, r))})->" for x, y, r in steps)
                    + f" T{steps[0][0]}"
                )
                res.add(
                    kind,
                    f"cycle {text}",
                    cycle=[
                        {**_describe(by_id.get(x), x), "edge": r, "key": g.keys.get((x, y, r))}
                        for x, y, r in steps
                    ],
                )


def realtime_edges(g: DepGraph, txns: Sequence[Txn], members: set[int]) -> None:
    """rt edges among `members`: ok transactions to everything invoked after they completed,
    kept sparse (a predecessor implied through another is left out)."""
    events: list[tuple[int, int, Txn]] = []
    for t in txns:
        if t.id not in members:
            continue
        events.append((t.invoke, 0, t))
        if t.type == "ok" and t.complete is not None:
            events.append((t.complete, 1, t))
    events.sort(key=lambda e: (e[0], e[1], e[2].id))
    frontier: set[int] = set()
    preds: dict[int, frozenset[int]] = {}
    for _, kind, t in events:
        if kind == 0:
            preds[t.id] = frozenset(frontier)
            for p in frontier:
                g.add(p, t.id, RT)
        else:
            frontier -= preds.get(t.id, frozenset())
            frontier.add(t.id)


def _mops(t: Txn) -> list[tuple[str, Key, Any]]:
    return [(m[0], m[1], m[2]) for m in (t.value or [])]


# -- list-append ---------------------------------------------------------------------------------


def check_list_append(ops: Iterable[Op], *, realtime: bool = True) -> CheckResult:
    """Elle's list-append check. Each ``txn`` value is a list of ``["append", k, v]`` (v unique
    per key across the history) and ``["r", k, list-or-null]``."""
    txns = [t for t in transactions(ops) if t.f == "txn"]
    model = "strict-serializable" if realtime else "serializable"
    res = CheckResult(f"elle list-append ({model})")
    by_id = {t.id: t for t in txns}
    appender: dict[tuple[Key, Any], Txn] = {}
    appends_of: dict[tuple[int, Key], list[Any]] = defaultdict(list)
    for t in txns:
        for f, k, v in _mops(t):
            if f == "append":
                if (k, v) in appender:
                    res.add("duplicate-appends", f"{v!r} appended to {k!r} twice", key=k, value=v)
                appender[(k, v)] = t
                appends_of[(t.id, k)].append(v)
    oks = [t for t in txns if t.type == "ok"]

    # Reads: (txn, key, list, external = before the transaction appended to the key).
    reads: list[tuple[Txn, Key, list[Any], bool]] = []
    longest: dict[Key, list[Any]] = {}
    for t in oks:
        _internal_append(t, res)
        appended: set[Key] = set()
        for f, k, v in _mops(t):
            if f == "append":
                appended.add(k)
            elif f == "r":
                lst = list(v or [])
                reads.append((t, k, lst, k not in appended))
                if len(set(map(repr, lst))) != len(lst):
                    res.add("duplicate-elements", f"T{t.id} read {k!r} = {lst}", txn=t.id, key=k)
                if len(lst) >= len(longest.get(k, [])):
                    longest[k] = lst
    bad_keys: set[Key] = set()
    for t, k, lst, _ in reads:
        if longest[k][: len(lst)] != lst:
            bad_keys.add(k)
            res.add(
                "incompatible-order",
                f"T{t.id} read {k!r} = {lst}, not a prefix of {longest[k]}",
                txn=t.id,
                key=k,
                read=lst,
                longest=longest[k],
            )
    for t, k, lst, ext in reads:
        for v in lst:
            w = appender.get((k, v))
            _check_source(res, t, k, v, w, f"read {v!r} in {k!r}", "appended")
        if lst and ext:
            w = appender.get((k, lst[-1]))
            if w is not None and w.id != t.id:
                mine = appends_of[(w.id, k)]
                if mine.index(lst[-1]) < len(mine) - 1:
                    res.add(
                        "G1b",
                        f"T{t.id} read {k!r} ending in {lst[-1]!r}, which T{w.id} followed with "
                        f"{mine[mine.index(lst[-1]) + 1 :]}",
                        reader=_describe(t, t.id),
                        writer=_describe(w, w.id),
                        key=k,
                    )
    if realtime:
        _lost_appends(oks, reads, res)

    g = DepGraph()
    for k, order in longest.items():
        if k in bad_keys:
            continue
        writers = [appender.get((k, v)) for v in order]
        for w1, w2 in itertools.pairwise(writers):
            if w1 is not None and w2 is not None and "fail" not in (w1.type, w2.type):
                g.add(w1.id, w2.id, WW, k)
    for t, k, lst, ext in reads:
        if not ext or k in bad_keys:
            continue
        order = longest[k]
        if lst:
            w = appender.get((k, lst[-1]))
            if w is not None and w.type != "fail":
                g.add(w.id, t.id, WR, k)
        if len(order) > len(lst):
            w2 = appender.get((k, order[len(lst)]))
            if w2 is not None and w2.type != "fail":
                g.add(t.id, w2.id, RW, k)
    _finish(g, res, txns, by_id, realtime)
    return res


def _internal_append(t: Txn, res: CheckResult) -> None:
    known: dict[Key, list[Any]] = {}
    pending: dict[Key, list[Any]] = defaultdict(list)
    for f, k, v in _mops(t):
        if f == "append":
            if k in known:
                known[k] = [*known[k], v]
            else:
                pending[k].append(v)
        elif f == "r":
            lst = list(v or [])
            if k in known:
                ok = lst == known[k]
            else:
                mine = pending.pop(k, [])
                ok = not mine or lst[-len(mine) :] == mine
            if not ok:
                res.add(
                    "internal",
                    f"T{t.id} read {k!r} = {lst} against its own earlier operations {t.value}",
                    txn=_describe(t, t.id),
                )
            known[k] = lst


def _lost_appends(
    oks: list[Txn], reads: list[tuple[Txn, Key, list[Any], bool]], res: CheckResult
) -> None:
    by_key: dict[Key, list[tuple[Txn, set[Any]]]] = defaultdict(list)
    for t, k, lst, _ in reads:
        by_key[k].append((t, set(map(repr, lst))))
    for w in oks:
        assert w.complete is not None
        for f, k, v in _mops(w):
            if f != "append":
                continue
            for r, seen in by_key.get(k, []):
                if r.invoke > w.complete and repr(v) not in seen:
                    res.add(
                        "lost-append",
                        f"T{r.id} read {k!r} after T{w.id}'s append of {v!r} was acknowledged, "
                        "and it was not there",
                        writer=_describe(w, w.id),
                        reader=_describe(r, r.id),
                        key=k,
                    )


def _finish(
    g: DepGraph, res: CheckResult, txns: list[Txn], by_id: dict[int, Txn], realtime: bool
) -> None:
    if realtime:
        members = {t.id for t in txns if t.type == "ok"} | g.nodes
        realtime_edges(g, txns, members)
    find_cycles(g, res, by_id, realtime=realtime)
    res.stats.update(
        transactions=len(txns),
        ok=sum(t.type == "ok" for t in txns),
        fail=sum(t.type == "fail" for t in txns),
        info=sum(t.type == "info" for t in txns),
        graph_nodes=len(g.nodes),
        edges=g.edge_count(),
    )


# -- rw-register ---------------------------------------------------------------------------------

VERSION_ORDERS = ("wfr", "commit-ts")


def check_rw_register(
    ops: Iterable[Op], *, version_order: str = "wfr", realtime: bool = True
) -> CheckResult:
    """Elle's rw-register check. Each ``txn`` value is a list of ``["w", k, v]`` (v unique per
    key across the history, never null) and ``["r", k, v-or-null]``; keys start absent.
    `version_order` is ``wfr`` or ``commit-ts`` (see the module docstring)."""
    if version_order not in VERSION_ORDERS:
        raise ValueError(f"version_order must be one of {VERSION_ORDERS}, got {version_order!r}")
    txns = [t for t in transactions(ops) if t.f == "txn"]
    model = "strict-serializable" if realtime else "serializable"
    res = CheckResult(f"elle rw-register ({model}, version order from {version_order})")
    res.stats["version_order"] = version_order
    by_id = {t.id: t for t in txns}
    writer: dict[tuple[Key, Any], Txn] = {}
    writes_of: dict[tuple[int, Key], list[Any]] = defaultdict(list)
    for t in txns:
        for f, k, v in _mops(t):
            if f == "w":
                if (k, v) in writer:
                    res.add("duplicate-writes", f"{v!r} written to {k!r} twice", key=k, value=v)
                writer[(k, v)] = t
                writes_of[(t.id, k)].append(v)
    oks = [t for t in txns if t.type == "ok"]
    ext_reads: list[tuple[Txn, Key, Any]] = []
    succ: dict[Key, dict[Any, set[Any]]] = defaultdict(lambda: defaultdict(set))
    """key -> version -> versions known to follow it directly (None: the initial absence)."""
    for t in oks:
        known: dict[Key, Any] = {}
        first_read: dict[Key, Any] = {}
        for f, k, v in _mops(t):
            if f == "w":
                if k not in known and k not in first_read:
                    first_read[k] = _UNREAD
                known[k] = v
            elif f == "r":
                if k in known and known[k] != v:
                    res.add(
                        "internal",
                        f"T{t.id} read {k!r} = {v!r} after its own operations left it {known[k]!r}",
                        txn=_describe(t, t.id),
                    )
                if k not in known and k not in first_read:
                    first_read[k] = v
                    ext_reads.append((t, k, v))
                known[k] = v
        if version_order == "wfr":
            for k, a in first_read.items():
                if a is not _UNREAD and writes_of.get((t.id, k)):
                    succ[k][a].add(writes_of[(t.id, k)][-1])
    for t, k, v in ext_reads:
        if v is None:
            continue
        w = writer.get((k, v))
        if _check_source(res, t, k, v, w, f"read {k!r} = {v!r}", "written"):
            continue
        if w is not None and w.id != t.id and writes_of[(w.id, k)][-1] != v:
            res.add(
                "G1b",
                f"T{t.id} read {k!r} = {v!r}, which T{w.id} later overwrote",
                reader=_describe(t, t.id),
                writer=_describe(w, w.id),
                key=k,
            )
    # Every committed write of k follows the initial absence.
    all_writes: dict[Key, set[Any]] = defaultdict(set)
    for (tid, k), vs in writes_of.items():
        if by_id[tid].type != "fail":
            all_writes[k].add(vs[-1])
    if version_order == "commit-ts":
        by_key: dict[Key, list[tuple[int, Any]]] = defaultdict(list)
        for t in oks:
            if t.commit_ts is None:
                continue
            for f, k, v in _mops(t):
                if f == "w" and writes_of[(t.id, k)][-1] == v:
                    by_key[k].append((t.commit_ts, v))
        for k, vs in by_key.items():
            vs.sort(key=lambda x: x[0])
            for (_, a), (_, b) in itertools.pairwise(vs):
                succ[k][a].add(b)
    res.stats["version_order_edges"] = sum(len(s) for m in succ.values() for s in m.values())

    g = DepGraph()
    for k, m in succ.items():
        for a, bs in m.items():
            for b in bs:
                wa, wb = writer.get((k, a)), writer.get((k, b))
                if wa is not None and wb is not None and "fail" not in (wa.type, wb.type):
                    g.add(wa.id, wb.id, WW, k)
    for t, k, v in ext_reads:
        if v is not None:
            w = writer.get((k, v))
            if w is not None and w.type != "fail":
                g.add(w.id, t.id, WR, k)
        nexts = all_writes[k] if v is None else succ[k].get(v, set())
        for b in nexts:
            wb = writer.get((k, b))
            if wb is not None and wb.type != "fail":
                g.add(t.id, wb.id, RW, k)
    _finish(g, res, txns, by_id, realtime)
    return res


class _Unread:
    def __repr__(self) -> str:
        return "<unread>"


_UNREAD: Any = _Unread()
