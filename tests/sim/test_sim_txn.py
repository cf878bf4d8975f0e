"""Transactions in the simulator: the production coordinator, participants and client over
wide-area latency, for every protocol. A bank: transfers from all regions, audits by read-only
transactions; the total never changes, and the same seed replays the same run."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest

from k2store.client import AsyncTransaction, RetryPolicy
from k2store.cluster import DEFAULT_REGIONS, ClusterSettings, TxnSettings, local_cluster
from k2store.errors import TxnAborted
from k2store.sim import SimCluster, run_simulation

ACCOUNTS = [f"{r}/acct/{i}" for r in DEFAULT_REGIONS for i in range(3)]
START = 100


def bank(protocol: str, seed: int) -> tuple[list[int], int, int, dict[str, int]]:
    settings = replace(ClusterSettings(), txn=TxnSettings(protocol=protocol))
    cfg = local_cluster(
        DEFAULT_REGIONS, [1, 2, 3], root=Path("/nonexistent-sim"), settings=settings
    )
    totals: list[int] = []
    committed = 0
    rules: dict[str, int] = {}

    async def main() -> tuple[list[int], int, int, dict[str, int]]:
        nonlocal committed
        cluster = SimCluster(cfg, seed=seed)
        retry = RetryPolicy(max_attempts=50, initial_backoff_s=0.005, max_backoff_s=0.2)
        clients = [cluster.txn_client(r, retry=retry) for r in DEFAULT_REGIONS]

        async def setup(tx: AsyncTransaction) -> None:
            await tx.put_many({a: str(START).encode() for a in ACCOUNTS})

        await clients[0].run(setup)
        rng = random.Random(seed)

        async def transfers(c: int) -> None:
            nonlocal committed
            for _ in range(8):
                a, b = rng.sample(ACCOUNTS, 2)
                amount = rng.randint(1, 30)

                async def move(
                    tx: AsyncTransaction, a: str = a, b: str = b, amount: int = amount
                ) -> None:
                    va, vb = await tx.get_many([a, b])
                    assert va is not None and vb is not None
                    if int(va) >= amount:
                        await tx.put_many(
                            {a: str(int(va) - amount).encode(), b: str(int(vb) + amount).encode()}
                        )

                try:
                    await clients[c].run(move, keys=[a, b])
                    committed += 1
                except TxnAborted as e:
                    rules[e.rule] = rules.get(e.rule, 0) + 1

        async def audits() -> None:
            for _ in range(6):

                async def read_all(tx: AsyncTransaction) -> int:
                    vals = await tx.get_many(list(ACCOUNTS))
                    return sum(int(v or b"0") for v in vals)

                totals.append(await clients[1].run(read_all, read_only=True))

        finished = await cluster.run([lambda c=c: transfers(c) for c in range(3)] + [audits], 120.0)
        assert finished, "workload did not finish in 120 virtual seconds"

        async def final(tx: AsyncTransaction) -> list[bytes | None]:
            return await tx.get_many(list(ACCOUNTS))

        vals = await clients[2].run(final, read_only=True)
        totals.append(sum(int(v or b"0") for v in vals))
        for c in clients:
            await c.close()
        return totals, committed, int(cluster.now_s * 1000), rules

    return run_simulation(main, seed=seed)


@pytest.mark.parametrize("protocol", ["k2-mvto", "d2pl-ttc", "mvto-hlc"])
def test_bank_total_is_invariant_and_the_run_replays(protocol: str) -> None:
    totals, committed, virtual_ms, rules = bank(protocol, seed=7)
    assert totals and all(t == START * len(ACCOUNTS) for t in totals), totals
    assert committed >= 20, (committed, rules)
    assert bank(protocol, seed=7) == (totals, committed, virtual_ms, rules)
