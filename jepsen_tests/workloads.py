"""Workloads: what the clients of a Jepsen run do, how it is recorded, and how it is checked.

Each workload generates operations for worker tasks (clients spread over every region), runs
each as a K2 transaction through `AsyncClient`, and records it in a `History`:

- ``append`` (Elle list-append): transactions of 1-4 micro-operations on a small pool of keys
  homed in all three regions; an append reads the key's list (stored as ``"1,5,9"``) and writes
  it back one unique value longer. Keys retire after `max_writes_per_key` appends so lists stay
  short. Checked by `elle.check_list_append` (strict serializability).
- ``register`` (rw-register): reads and blind writes of unique values. Checked by Elle with
  both version-order sources and, per key, by the Wing-Gong-Lowe linearizability search.
- ``bank``: transfers between twelve accounts (four homed per region) with a ledger row per
  transfer, and read-only snapshots of every balance. Checked by `bank.check_bank`.
- ``replica``: writers create write-once keys in groups spanning the regions; readers in every
  region read whole groups through `ReplicaSnapshot` (visible, bounded-staleness and fresh
  modes). Checked by `replica.check_replica_reads`.

Outcomes (Jepsen's rules): ``ok`` when the commit was acknowledged; ``fail`` when the
transaction certainly did not commit (aborted by a rule after all retries, or an error before
the commit was sent); ``info`` when the commit was sent and its answer lost
(`CommitOutcomeUnknown`, a timeout, cancellation at the end of the run). A worker whose operation
ended ``info`` continues as a new process. Aborted attempts are retried inside one operation
(new timestamp, same unique values): only the committed attempt's reads are recorded.

Every loop is bounded: by the run's stop flag, by `max_ops` per worker, and each operation by
`op_timeout_s`.
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from jepsen_tests.anomalies import CheckResult
from jepsen_tests.bank import check_bank
from jepsen_tests.elle import check_list_append, check_rw_register
from jepsen_tests.history import History, Op
from jepsen_tests.linearizable import check_linearizable
from jepsen_tests.replica import check_replica_reads
from k2store.client import AsyncClient, AsyncTransaction, ReplicaSnapshot
from k2store.errors import CommitOutcomeUnknown, K2Error, TxnAborted
from truetime import SystemClock

__all__ = [
    "WORKLOADS",
    "AppendWorkload",
    "BankWorkload",
    "Outcome",
    "RegisterWorkload",
    "ReplicaWorkload",
    "Worker",
    "Workload",
    "run_txn",
]

_CLOCK = SystemClock()
FINAL_ATTEMPTS = 3
FINAL_TIMEOUT_S = 15.0


@dataclass
class Outcome:
    type: str
    value: Any = None
    ts: int | None = None
    commit_ts: int | None = None
    error: str | None = None


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:300]}"


async def run_txn(
    client: AsyncClient,
    body: Callable[[AsyncTransaction], Awaitable[Any]],
    *,
    read_only: bool = False,
    keys: Sequence[str] = (),
    max_attempts: int = 6,
) -> Outcome:
    """Run body in a transaction, retrying retryable aborts; classify the result (see the
    module docstring). Cancellation after the commit was sent is recorded as info."""
    backoff = 0.01
    last = "no attempt"
    for attempt in range(max_attempts):
        final = attempt == max_attempts - 1
        try:
            # Begun inline: with the body's first operation, as client.run begins.
            tx = await client.begin(read_only=read_only, keys=keys, inline=True)
        except K2Error as e:
            last = _err(e)
            if e.retryable and not final:
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 0.3)
                continue
            return Outcome("fail", error=last)
        try:
            value = await body(tx)
        except CommitOutcomeUnknown as e:
            # The body's last operations carried the commit (commit=True) and the reply was
            # lost: it may have committed.
            return Outcome("info", error=_err(e), ts=tx.ts)
        except K2Error as e:
            await tx.abort()
            last = _err(e)
            if e.retryable and not final:
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 0.3)
                continue
            return Outcome("fail", error=last)
        except BaseException:
            await asyncio.shield(tx.abort())
            raise
        try:
            commit_ts = await tx.commit()
        except TxnAborted as e:
            last = _err(e)
            if not final:
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 0.3)
                continue
            return Outcome("fail", error=last)
        except K2Error as e:
            return Outcome("info", error=_err(e), ts=tx.ts)
        return Outcome("ok", value, ts=tx.ts, commit_ts=commit_ts)
    return Outcome("fail", error=last)


@dataclass
class Worker:
    """One client task: a process id (renewed after an info), its region and client."""

    slot: int
    """The worker's fixed index (its process id changes after an info)."""
    process: int
    region: str
    client: AsyncClient
    history: History
    stride: int
    rng: random.Random
    latencies: list[tuple[int, float, str]] = field(default_factory=list)
    """(completion time ns, latency ms, type) per operation, for the report's plot."""

    async def perform(
        self,
        f: str,
        value: Any,
        op: Callable[[], Awaitable[Outcome]],
        timeout_s: float,
    ) -> Outcome:
        inv = self.history.invoke(self.process, f, value)
        try:
            out = await asyncio.wait_for(op(), timeout_s)
        except TimeoutError:
            out = Outcome("info", error=f"timed out after {timeout_s} s")
        except asyncio.CancelledError:
            self._complete(inv, Outcome("info", error="cancelled at the end of the run"))
            raise
        except K2Error as e:
            out = Outcome("info", error=_err(e))
        self._complete(inv, out)
        return out

    def _complete(self, inv: Op, out: Outcome) -> None:
        done = self.history.complete(
            inv, out.type, out.value, ts=out.ts, commit_ts=out.commit_ts, error=out.error
        )
        self.latencies.append((done.time, (done.time - inv.time) / 1e6, out.type))
        if out.type == "info":
            self.process += self.stride


class Workload:
    """Base: `setup` once, `step` repeatedly per worker, `final` after the faults healed,
    `check` over the history."""

    name = ""
    op_timeout_s = 20.0

    def __init__(self, regions: Sequence[str], rng: random.Random) -> None:
        self.regions = list(regions)
        self.rng = rng

    async def setup(self, client: AsyncClient) -> None:
        return None

    async def step(self, w: Worker) -> None:
        raise NotImplementedError

    async def final(self, workers: Sequence[Worker]) -> list[str]:
        """Read everything after the heal; returns what could not be read (each a sentence)."""
        return []

    def check(self, ops: Sequence[Op]) -> list[CheckResult]:
        raise NotImplementedError


class KeyPool:
    """Active keys homed round-robin over the regions; a key retires after max_writes."""

    def __init__(self, regions: Sequence[str], prefix: str, active: int, max_writes: int) -> None:
        self.regions = list(regions)
        self.prefix = prefix
        self.max_writes = max_writes
        self.next_id = 0
        self.active: list[str] = []
        self.writes: dict[str, int] = {}
        self.all: list[str] = []
        for _ in range(active):
            self.active.append(self._new())

    def _new(self) -> str:
        i = self.next_id
        self.next_id += 1
        k = f"{self.regions[i % len(self.regions)]}/{self.prefix}/{i}"
        self.writes[k] = 0
        self.all.append(k)
        return k

    def pick(self, rng: random.Random) -> str:
        return rng.choice(self.active)

    def wrote(self, k: str) -> None:
        self.writes[k] += 1
        if self.writes[k] >= self.max_writes and k in self.active:
            self.active[self.active.index(k)] = self._new()


# -- list-append ---------------------------------------------------------------------------------


def _decode_list(b: bytes | None) -> list[int]:
    return [int(x) for x in b.decode().split(",")] if b else []


class AppendWorkload(Workload):
    name = "append"

    def __init__(
        self,
        regions: Sequence[str],
        rng: random.Random,
        *,
        active_keys: int = 6,
        max_writes_per_key: int = 24,
    ) -> None:
        super().__init__(regions, rng)
        self.keys = KeyPool(regions, "la", active_keys, max_writes_per_key)
        self.counter = 0

    def generate(self, rng: random.Random) -> list[list[Any]]:
        mops: list[list[Any]] = []
        for _ in range(rng.randint(1, 4)):
            k = self.keys.pick(rng)
            if rng.random() < 0.5:
                self.counter += 1
                mops.append(["append", k, self.counter])
                self.keys.wrote(k)
            else:
                mops.append(["r", k, None])
        return mops

    async def step(self, w: Worker) -> None:
        mops = self.generate(w.rng)
        await w.perform("txn", mops, lambda: self.execute(w.client, mops), self.op_timeout_s)

    async def execute(self, client: AsyncClient, mops: list[list[Any]]) -> Outcome:
        keys = list(dict.fromkeys(m[1] for m in mops))
        read_only = all(m[0] == "r" for m in mops)

        # Half the transactions (those of an even number of operations) read the keys they
        # append to for update, so both the plain and the for-update read paths are checked.
        appended = {m[1] for m in mops if m[0] == "append"}
        for_update = [k in appended and len(mops) % 2 == 0 for k in keys]

        async def body(tx: AsyncTransaction) -> list[list[Any]]:
            first = await tx.get_many(list(keys), for_update=for_update)
            cur = dict(zip(keys, map(_decode_list, first), strict=True))
            touched: set[str] = set()
            out: list[list[Any]] = []
            for f, k, v in mops:
                if f == "r":
                    got = _decode_list(await tx.get(k)) if k in touched else list(cur[k])
                    out.append(["r", k, got])
                else:
                    cur[k] = [*cur[k], v]
                    await tx.put(k, ",".join(map(str, cur[k])).encode())
                    touched.add(k)
                    out.append(["append", k, v])
            return out

        return await run_txn(client, body, read_only=read_only, keys=() if read_only else keys)

    async def final(self, workers: Sequence[Worker]) -> list[str]:
        return await _final_reads(workers, self.keys.all, self.execute)

    def check(self, ops: Sequence[Op]) -> list[CheckResult]:
        return [check_list_append(ops, realtime=True)]


async def _final_reads(
    workers: Sequence[Worker],
    keys: Sequence[str],
    execute: Callable[[AsyncClient, list[list[Any]]], Awaitable[Outcome]],
) -> list[str]:
    """After the heal, one reader per region reads every key (in chunks), up to FINAL_ATTEMPTS
    times each; returns the chunks that never succeeded."""
    failed: list[str] = []
    by_region: dict[str, Worker] = {}
    for w in workers:
        by_region.setdefault(w.region, w)
    for w in by_region.values():
        for i in range(0, len(keys), 16):
            mops = [["r", k, None] for k in keys[i : i + 16]]
            for _ in range(FINAL_ATTEMPTS):
                out = await w.perform(
                    "txn", mops, functools.partial(execute, w.client, mops), FINAL_TIMEOUT_S
                )
                if out.type == "ok":
                    break
            else:
                failed.append(f"{w.region}: final read of {len(mops)} keys failed: {out.error}")
    return failed


# -- rw-register ---------------------------------------------------------------------------------


class RegisterWorkload(Workload):
    name = "register"

    def __init__(
        self,
        regions: Sequence[str],
        rng: random.Random,
        *,
        active_keys: int = 6,
        max_writes_per_key: int = 12,
    ) -> None:
        super().__init__(regions, rng)
        self.keys = KeyPool(regions, "rw", active_keys, max_writes_per_key)
        self.counter = 0

    def generate(self, rng: random.Random) -> list[list[Any]]:
        mops: list[list[Any]] = []
        for _ in range(rng.randint(1, 3)):
            k = self.keys.pick(rng)
            if rng.random() < 0.5:
                if rng.random() < 0.5:
                    mops.append(["r", k, None])  # read-then-write: a version-order fact (wfr)
                self.counter += 1
                mops.append(["w", k, self.counter])
                self.keys.wrote(k)
            else:
                mops.append(["r", k, None])
        return mops

    async def step(self, w: Worker) -> None:
        mops = self.generate(w.rng)
        await w.perform("txn", mops, lambda: self.execute(w.client, mops), self.op_timeout_s)

    async def execute(self, client: AsyncClient, mops: list[list[Any]]) -> Outcome:
        keys = list(dict.fromkeys(m[1] for m in mops))
        read_only = all(m[0] == "r" for m in mops)

        async def body(tx: AsyncTransaction) -> list[list[Any]]:
            out: list[list[Any]] = []
            for f, k, v in mops:
                if f == "r":
                    got = await tx.get(k)
                    out.append(["r", k, int(got) if got is not None else None])
                else:
                    await tx.put(k, str(v).encode())
                    out.append(["w", k, v])
            return out

        return await run_txn(client, body, read_only=read_only, keys=() if read_only else keys)

    async def final(self, workers: Sequence[Worker]) -> list[str]:
        return await _final_reads(workers, self.keys.all, self.execute)

    def check(self, ops: Sequence[Op]) -> list[CheckResult]:
        return [
            check_rw_register(ops, version_order="wfr"),
            check_rw_register(ops, version_order="commit-ts"),
            check_linearizable(ops),
        ]


# -- bank ----------------------------------------------------------------------------------------


class BankWorkload(Workload):
    name = "bank"
    INITIAL = 100

    def __init__(self, regions: Sequence[str], rng: random.Random, *, per_region: int = 4) -> None:
        super().__init__(regions, rng)
        self.accounts = [f"{r}/acct/{i}" for r in regions for i in range(per_region)]
        self.initial = dict.fromkeys(self.accounts, self.INITIAL)
        self.seq = 0

    def ledger_key(self, tid: str) -> str:
        region, n = tid.split(":")
        return f"{region}/ledger/{n}"

    async def setup(self, client: AsyncClient) -> None:
        async def fund(tx: AsyncTransaction) -> None:
            await tx.put_many({a: str(self.INITIAL).encode() for a in self.accounts})

        for _ in range(10):
            # Named keys: a future timestamp. Stamped on arrival, the writes to the far regions'
            # accounts reach their leaders a wide-area trip after the timestamp, often after its
            # epoch was sealed there, and every attempt could abort by rule sealed (it did, in CI).
            out = await run_txn(client, fund, keys=self.accounts)
            if out.type == "ok":
                return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"could not fund the bank accounts: {out.error}")

    async def step(self, w: Worker) -> None:
        if w.rng.random() < 0.3:
            await w.perform("read", None, lambda: self.read(w.client), self.op_timeout_s)
            return
        self.seq += 1
        src, dst = w.rng.sample(self.accounts, 2)
        t = {"id": f"{w.region}:{self.seq}", "from": src, "to": dst, "amount": w.rng.randint(1, 30)}
        await w.perform("transfer", t, lambda: self.transfer(w.client, t), self.op_timeout_s)

    async def read(self, client: AsyncClient) -> Outcome:
        async def body(tx: AsyncTransaction) -> dict[str, int | None]:
            vals = await tx.get_many(list(self.accounts))
            return {
                a: int(v) if v is not None else None
                for a, v in zip(self.accounts, vals, strict=False)
            }

        return await run_txn(client, body, read_only=True)

    async def transfer(self, client: AsyncClient, t: dict[str, Any]) -> Outcome:
        ledger = self.ledger_key(t["id"])

        async def body(tx: AsyncTransaction) -> dict[str, Any]:
            a, b, done = await tx.get_many(
                [t["from"], t["to"], ledger], for_update=[True, True, False]
            )
            if done is not None:
                return {**t, "result": "already-applied"}
            if a is None or b is None:
                return {**t, "result": "missing-account"}
            if int(a) < t["amount"]:
                return {**t, "result": "declined"}
            await tx.put_many(
                {
                    t["from"]: str(int(a) - t["amount"]).encode(),
                    t["to"]: str(int(b) + t["amount"]).encode(),
                    ledger: f"{t['from']} {t['to']} {t['amount']}".encode(),
                },
                commit=True,  # the commit in the writes' round trip (one-phase for the client)
            )
            return {**t, "result": "moved"}

        return await run_txn(client, body, keys=[t["from"], t["to"], ledger])

    async def final(self, workers: Sequence[Worker]) -> list[str]:
        w = workers[0]

        async def body(tx: AsyncTransaction) -> dict[str, Any]:
            vals = await tx.get_many(list(self.accounts))
            ledger: dict[str, list[Any]] = {}
            for r in self.regions:
                for k, v in await tx.scan(f"{r}/ledger/", f"{r}/ledger0", limit=1_000_000):
                    src, dst, amount = v.decode().split()
                    ledger[f"{r}:{k.decode().rsplit('/', 1)[1]}"] = [src, dst, int(amount)]
            balances = {
                a: int(v) if v is not None else None
                for a, v in zip(self.accounts, vals, strict=False)
            }
            return {"balances": balances, "ledger": ledger}

        for _ in range(FINAL_ATTEMPTS):
            out = await w.perform(
                "final", None, lambda: run_txn(w.client, body, read_only=True), FINAL_TIMEOUT_S
            )
            if out.type == "ok":
                return []
        return [f"{w.region}: final read of the balances and ledger failed: {out.error}"]

    def check(self, ops: Sequence[Op]) -> list[CheckResult]:
        return [check_bank(ops, initial=self.initial)]


# -- replica reads -------------------------------------------------------------------------------


class ReplicaWorkload(Workload):
    """Write-once keys in groups of two per region; half the workers write, half read."""

    name = "replica"
    BOUND_MS = 2000.0

    def __init__(self, regions: Sequence[str], rng: random.Random, *, per_region: int = 2) -> None:
        super().__init__(regions, rng)
        self.per_region = per_region
        self.group = 0
        self.next_in_group: list[str] = []
        self.groups: list[list[str]] = []
        self._open_group()

    def _open_group(self) -> None:
        g = [f"{r}/lf/{self.group}/{i}" for r in self.regions for i in range(self.per_region)]
        self.groups.append(g)
        self.next_in_group = list(g)
        self.rng.shuffle(self.next_in_group)
        self.group += 1

    async def step(self, w: Worker) -> None:
        if w.slot % 2 == 0:
            if not self.next_in_group:
                self._open_group()
            k = self.next_in_group.pop()
            value = {"key": k, "value": f"p{w.process}-{k}"}
            await w.perform(
                "insert", value, lambda: self.insert(w.client, value), self.op_timeout_s
            )
            return
        keys = self.rng.choice(self.groups[-2:])
        mode = w.rng.choice(["visible", "visible", "bounded", "fresh"])
        await self.replica_read(w, keys, mode, self.op_timeout_s)

    async def insert(self, client: AsyncClient, value: dict[str, str]) -> Outcome:
        async def body(tx: AsyncTransaction) -> dict[str, str]:
            await tx.put(value["key"], value["value"].encode())
            return value

        return await run_txn(client, body, keys=[value["key"]])

    async def replica_read(
        self,
        w: Worker,
        keys: list[str],
        mode: str,
        timeout_s: float,
        groups: list[list[str]] | None = None,
    ) -> Outcome:
        bound = self.BOUND_MS if mode == "bounded" else None
        value: dict[str, Any] = {
            "keys": keys,
            "region": w.region,
            "mode": mode,
            "bound_ms": bound,
            "wall_ns": _CLOCK.now_ns(),
        }
        if groups is not None:
            value["groups"] = groups

        async def read() -> Outcome:
            snap: ReplicaSnapshot = w.client.replica_snapshot(
                fresh=mode == "fresh", max_staleness=None if bound is None else bound / 1000
            )
            try:
                vals = await snap.get_many(keys)
            except K2Error as e:
                return Outcome("fail", error=_err(e))  # a read changes nothing: never info
            reads = {
                k: v.decode() if v is not None else None for k, v in zip(keys, vals, strict=False)
            }
            return Outcome("ok", {**value, "reads": reads}, ts=snap.ts)

        return await w.perform("replica-read", value, read, timeout_s)

    async def final(self, workers: Sequence[Worker]) -> list[str]:
        by_region: dict[str, Worker] = {}
        for w in workers:
            by_region.setdefault(w.region, w)
        every = [k for g in self.groups for k in g]
        failed: list[str] = []
        for w in by_region.values():
            for _ in range(FINAL_ATTEMPTS):
                out = await self.replica_read(
                    w, every, "fresh", FINAL_TIMEOUT_S, groups=self.groups
                )
                if out.type == "ok":
                    break
            else:
                failed.append(f"{w.region}: fresh replica read failed: {out.error}")
        return failed

    def check(self, ops: Sequence[Op]) -> list[CheckResult]:
        return [check_replica_reads(ops)]


WORKLOADS: dict[str, type[Workload]] = {
    "append": AppendWorkload,
    "register": RegisterWorkload,
    "bank": BankWorkload,
    "replica": ReplicaWorkload,
}
