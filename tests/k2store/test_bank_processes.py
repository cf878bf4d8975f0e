"""The bank workload on real node processes, with two nodes killed by SIGKILL and restarted,
under each of the three protocols.

Twelve accounts, four homed in each region, hold a known total. Clients in every region transfer
money between random accounts (cross-region transfers included) while read-only transactions in
every region read all accounts at one timestamp. Twice during the run a node is killed with
SIGKILL and restarted from its data directory. Every transfer also writes a ledger entry
`<region>/ledger/<id>` in the same transaction, and reads it first, so a retry after a commit whose
outcome was unknown does not move the money twice. A transfer reads the two balances for update
and sends its writes with the commit (`put_many(..., commit=True)`), as a bank client would; so
the one-phase commit and its unknown outcomes are exercised across the kills too.

Checked afterwards:
- every read-only snapshot saw the same total, and no negative balance;
- every acknowledged transfer's ledger entry exists (and no declined or certainly aborted one
  does); a transfer whose commit raised something other than TxnAborted (CommitOutcomeUnknown
  from the writes that carried it included) is indeterminate;
- the final balances equal the initial ones plus the ledger entries that exist;
- every TxnAborted seen names a rule;
- no node process is left behind.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from k2store import launcher
from k2store.client import AsyncClient, AsyncTransaction, RetryPolicy
from k2store.cluster import (
    DEFAULT_REGIONS,
    ClusterConfig,
    ClusterSettings,
    TxnSettings,
    local_cluster,
)
from k2store.errors import CommitOutcomeUnknown, K2Error, TxnAborted
from truetime import SystemClock

pytestmark = pytest.mark.slow

T = TypeVar("T")

ACCOUNTS = [f"{r}/acct/{i}" for r in DEFAULT_REGIONS for i in range(4)]
INITIAL = 100
TOTAL = INITIAL * len(ACCOUNTS)
VICTIMS = ("eu-west-1", "us-east-1")
"""Nodes killed in turn: each leads its region's shards, serves its oracle and coordinates."""

# Short timeouts so a killed coordinator's transactions expire (and their intents are resolved)
# within the test's time budget rather than after the 5 s default.
SETTINGS = replace(
    ClusterSettings(request_timeout_s=3.0),
    txn=TxnSettings(heartbeat_s=0.2, expiry_s=1.5, push_after_s=0.05, client_timeout_s=10.0),
)
RETRY = RetryPolicy(max_attempts=8, initial_backoff_s=0.01, max_backoff_s=0.25)
_CLOCK = SystemClock()


def _now_s() -> float:
    return _CLOCK.monotonic_ns() / 1e9


@pytest.fixture(params=["k2-mvto", "d2pl-ttc", "mvto-hlc"])
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ClusterConfig]:
    settings = replace(SETTINGS, txn=replace(SETTINGS.txn, protocol=request.param))
    cfg = local_cluster(
        DEFAULT_REGIONS, launcher.free_ports(len(DEFAULT_REGIONS)), root=tmp_path, settings=settings
    ).write(tmp_path / launcher.CLUSTER_FILE)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for n in cfg.nodes:
            procs[n.name] = launcher.start_node(cfg, n)
        launcher.wait_healthy(cfg, procs, 30, progress=False)
        yield cfg
    finally:
        launcher.down(cfg)
        for p in procs.values():  # any that never took its data-dir lock
            if p.poll() is None:
                p.kill()
            p.wait()
        assert launcher.running_nodes(cfg) == {}


# -- watching each attempt's commit -------------------------------------------------------------


class _WatchedTxn(AsyncTransaction):
    watcher: WatchingClient

    async def commit(self) -> int:
        try:
            ts = await super().commit()
        except TxnAborted as e:
            self.watcher.rules.append(e.rule)
            self.watcher.commit_outcomes.append("aborted")
            raise
        except BaseException as e:
            # The record may or may not have been committed: the outcome is unknown to us.
            self.watcher.errors[type(e).__name__] += 1
            self.watcher.commit_outcomes.append("unknown")
            raise
        self.watcher.commit_outcomes.append("committed")
        return ts


class WatchingClient(AsyncClient):
    """An AsyncClient that notes how each attempt's commit ended; `client.run` still retries."""

    transaction_type = _WatchedTxn

    def __init__(
        self, cluster: ClusterConfig, region: str, rules: list[str], errors: Counter[str]
    ) -> None:
        super().__init__(cluster, retry=RETRY, region=region)
        self.rules = rules
        self.errors = errors
        self.commit_outcomes: list[str] = []

    async def begin(self, **kw: Any) -> AsyncTransaction:
        tx = await super().begin(**kw)
        assert isinstance(tx, _WatchedTxn)
        tx.watcher = self
        return tx

    async def run_watched(
        self, fn: Callable[[AsyncTransaction], Awaitable[Any]], *, read_only: bool = False
    ) -> tuple[Any, list[str]]:
        """client.run(fn); returns fn's result and the commit outcome of every attempt. When it
        raises, `commit_outcomes` still holds the outcomes of the attempts that reached commit."""
        self.commit_outcomes = []

        async def body(tx: AsyncTransaction) -> Any:
            try:
                return await fn(tx)
            except TxnAborted as e:
                self.rules.append(e.rule)
                raise

        result = await self.run(body, read_only=read_only, max_attempts=12)
        return result, list(self.commit_outcomes)

    async def run_until_done(
        self, fn: Callable[[AsyncTransaction], Awaitable[T]], *, read_only: bool = False
    ) -> T:
        """For the setup and the final read, which must happen: run_watched, and again on any
        K2Error (up to 10 times). A stale timestamp batch at the node surfaces as a
        non-retryable internal error (BatchExpired) that client.run does not retry."""
        for i in range(10):
            try:
                result, _ = await self.run_watched(fn, read_only=read_only)
                return result  # type: ignore[no-any-return]
            except K2Error:
                if i == 9:
                    raise
                await asyncio.sleep(0.05)
        raise AssertionError("unreachable")


# -- the workload -------------------------------------------------------------------------------


@dataclass
class Transfer:
    id: str
    src: str
    dst: str
    amount: int
    outcome: str = "pending"
    """moved | already-applied | declined | failed | indeterminate"""
    error: str = ""

    @property
    def ledger_key(self) -> str:
        return f"{self.id.split(':')[0]}/ledger/{self.id.split(':')[1]}"

    @property
    def entry(self) -> bytes:
        return f"{self.src} {self.dst} {self.amount}".encode()


@dataclass
class Run:
    transfers: list[Transfer] = field(default_factory=list)
    snapshots: list[list[int]] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    stop: bool = False

    def count(self, outcome: str) -> int:
        return sum(t.outcome == outcome for t in self.transfers)

    @property
    def acked(self) -> int:
        return sum(t.outcome in ("moved", "already-applied") for t in self.transfers)


async def transfer_loop(
    cfg: ClusterConfig, region: str, worker: int, run: Run, max_transfers: int
) -> None:
    rng = random.Random(worker)
    client = WatchingClient(cfg, region, run.rules, run.errors)
    try:
        for seq in range(max_transfers):
            if run.stop:
                return
            src, dst = rng.sample(ACCOUNTS, 2)
            t = Transfer(f"{region}:w{worker}-{seq}", src, dst, rng.randint(1, 30))
            run.transfers.append(t)

            async def move(tx: AsyncTransaction, t: Transfer = t) -> str:
                # The balances are read for update, as a bank would: the audits' reads then
                # queue behind the transfer instead of aborting it by rule read-mark.
                a, b, done = await tx.get_many(
                    [t.src, t.dst, t.ledger_key], for_update=[True, True, False]
                )
                if done is not None:
                    return "already-applied"  # an earlier attempt committed after all
                assert a is not None and b is not None
                if int(a) < t.amount:
                    return "declined"
                await tx.put_many(
                    {
                        t.src: str(int(a) - t.amount).encode(),
                        t.dst: str(int(b) + t.amount).encode(),
                        t.ledger_key: t.entry,
                    },
                    commit=True,  # the commit in the writes' round trip
                )
                return "moved"

            try:
                t.outcome, _ = await client.run_watched(move)
            except K2Error as e:
                run.errors[type(e).__name__] += 1
                # The commit went with the writes: a lost reply there is CommitOutcomeUnknown.
                unknown = isinstance(e, CommitOutcomeUnknown) or "unknown" in client.commit_outcomes
                t.outcome = "indeterminate" if unknown else "failed"
                t.error = str(e)[:200]
    finally:
        await client.close()


async def audit_loop(cfg: ClusterConfig, region: str, run: Run) -> None:
    client = WatchingClient(cfg, region, run.rules, run.errors)

    async def read_all(tx: AsyncTransaction) -> list[bytes | None]:
        return await tx.get_many(list(ACCOUNTS))

    try:
        while not run.stop:
            try:
                values, _ = await client.run_watched(read_all, read_only=True)
            except K2Error as e:
                run.errors[type(e).__name__] += 1
                continue
            run.snapshots.append([int(v) if v is not None else -(10**9) for v in values])
    finally:
        await client.close()


async def wait_until(what: str, done: Callable[[], bool], timeout_s: float) -> None:
    """Poll `done` with short sleeps; fail naming `what` after timeout_s."""
    deadline = _now_s() + timeout_s
    while not done():
        assert _now_s() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        await asyncio.sleep(0.05)


async def kill_and_restart(cfg: ClusterConfig, victim: str, run: Run) -> None:
    pid = launcher.running_nodes(cfg)[victim]
    errors_before = sum(run.errors.values())
    os.kill(pid, signal.SIGKILL)

    def gone() -> bool:
        launcher._reap()
        return not launcher._alive(pid)

    await wait_until(f"{victim} (pid {pid}) to die", gone, 5)
    # Let the cluster feel it: some request fails, or a moment passes.
    deadline = _now_s() + 1.5
    await wait_until(
        "the cluster to notice",
        lambda: sum(run.errors.values()) >= errors_before + 3 or _now_s() > deadline,
        5,
    )
    proc = launcher.start_node(cfg, cfg.node(victim))
    await asyncio.to_thread(launcher.wait_healthy, cfg, {victim: proc}, 20, False)


async def bank(cfg: ClusterConfig) -> Run:
    run = Run()
    setup = WatchingClient(cfg, DEFAULT_REGIONS[0], run.rules, run.errors)

    async def fund(tx: AsyncTransaction) -> None:
        await tx.put_many({a: str(INITIAL).encode() for a in ACCOUNTS})

    await setup.run_until_done(fund)

    tasks = [
        asyncio.ensure_future(transfer_loop(cfg, region, 10 * i + w, run, max_transfers=1000))
        for i, region in enumerate(DEFAULT_REGIONS)
        for w in range(2)
    ]
    tasks += [asyncio.ensure_future(audit_loop(cfg, region, run)) for region in DEFAULT_REGIONS]
    try:
        await wait_until("the first transfers", lambda: run.acked >= 15, 15)
        for victim in VICTIMS:
            await kill_and_restart(cfg, victim, run)
            target = run.acked + 10
            await wait_until(
                f"transfers to resume after {victim} restarted",
                lambda: run.acked >= target,
                15,
            )
    finally:
        run.stop = True
        # A transfer in flight may still be retrying (lock waits of up to client_timeout_s,
        # then backoff) on a loaded machine: give the loops time to finish it.
        done, pending = await asyncio.wait(tasks, timeout=45)
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for t in done:
        t.result()  # a bug in the loops themselves surfaces here
    assert not pending, f"{len(pending)} workload tasks did not stop within 45 s"

    # The final state, at one timestamp: balances and every ledger entry.
    async def final(tx: AsyncTransaction) -> tuple[list[bytes | None], list[tuple[bytes, bytes]]]:
        balances = await tx.get_many(list(ACCOUNTS))
        ledger: list[tuple[bytes, bytes]] = []
        for r in DEFAULT_REGIONS:
            ledger += await tx.scan(f"{r}/ledger/", f"{r}/ledger0", limit=100_000)
        return balances, ledger

    balances, ledger = await setup.run_until_done(final, read_only=True)
    await setup.close()
    check(run, [int(v) if v is not None else -(10**9) for v in balances], dict(ledger))
    return run


def check(run: Run, balances: list[int], ledger: dict[bytes, bytes]) -> None:
    assert len(run.snapshots) >= 10, f"only {len(run.snapshots)} read-only snapshots"
    bad = [s for s in run.snapshots if sum(s) != TOTAL or min(s) < 0]
    assert not bad, (
        f"{len(bad)} of {len(run.snapshots)} snapshots broke the total {TOTAL}: {bad[:3]}"
    )
    assert sum(balances) == TOTAL, f"final balances {balances} sum to {sum(balances)}, not {TOTAL}"

    by_key = {t.ledger_key.encode(): t for t in run.transfers}
    strays = [k for k in ledger if k not in by_key]
    assert not strays, f"ledger entries no transfer wrote: {strays[:5]}"
    for t in run.transfers:
        key = t.ledger_key.encode()
        if t.outcome in ("moved", "already-applied"):
            assert ledger.get(key) == t.entry, f"acknowledged transfer {t} missing from the ledger"
        elif t.outcome in ("declined", "failed"):
            assert key not in ledger, f"transfer {t} was not acknowledged but took effect"
        else:
            assert t.outcome == "indeterminate", t

    expected = dict.fromkeys(ACCOUNTS, INITIAL)
    for entry in ledger.values():
        src, dst, amount = entry.decode().split()
        expected[src] -= int(amount)
        expected[dst] += int(amount)
    assert balances == [expected[a] for a in ACCOUNTS], (
        "final balances differ from the initial ones plus the ledger"
    )

    assert run.rules, "no transaction aborted: the workload did not contend"
    unnamed = [r for r in run.rules if r == "unknown"]
    assert not unnamed, f"{len(unnamed)} of {len(run.rules)} aborts name no rule"


@pytest.mark.timeout(60)
def test_bank_total_holds_and_acked_transfers_survive_kill_9(cluster: ClusterConfig) -> None:
    started = _now_s()
    run = asyncio.run(bank(cluster))
    # What happened, for the log of a failing or slow run.
    print(
        f"\n{len(run.transfers)} transfers: moved {run.count('moved')}, "
        f"already-applied {run.count('already-applied')}, declined {run.count('declined')}, "
        f"failed {run.count('failed')}, indeterminate {run.count('indeterminate')}; "
        f"{len(run.snapshots)} snapshots; aborts by rule {dict(Counter(run.rules))}; "
        f"errors {dict(run.errors)}; {_now_s() - started:.1f} s"
    )
    assert run.acked >= 35
