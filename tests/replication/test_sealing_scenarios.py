"""Scenario tests for the replication cores: the shard log (`LoggedStore`), sealing (`Sealer`)
and the replica (`ReplicaApplier`), in the datadriven format of tests/datadriven.py.

Rewrite the expected output with `K2_REWRITE=1 pytest tests/replication` (read the diff).

Timestamps are small integers; a `step now=N [err=E]` gives the sealer the interval
`[N-E, N+E]`. Commands:

    policy KIND [epoch=N] [grace=N] [lifetime=N] [lag=N]   a fresh leader store, sealer, replica
    intent KEY ts=N                   a transaction (named by its key) lays an intent at ts
    resolve KEY commit|abort          that transaction's intent resolves (commit at its ts)
    write KEY ts=N                    a committed version straight through the leader's store
    check KEY ts=N [txn=KEY]          may a write at ts go in (the participant's rule sealed)?
    step now=N [err=N]                Sealer.step; applies closed_ts and logs the seal
    log [from=N]                      the leader's log: one line per entry
    truncate before=N                 drop a log prefix
    replica-pull [max=N]              the replica applies what the log holds past its position
    replica-snapshot                  copy the leader's versions, resume at its log position
    replica KEY ts=N                  the replica's version of KEY at ts
    replica-state                     its next LSN and seal
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from k2store.memengine import MemoryEngine
from replication.epochs import Sealer, SealPolicy
from replication.log import KIND_SEAL, LoggedStore, SealedWrite
from replication.replica import ReplicaApplier, ReplicaGap
from tests.datadriven import ScenarioError, Script, mismatches, parse_script, render_script
from truetime import TTInterval
from txn.storage import Intent, PutIntent, PutVersion, ResolveIntent

TESTDATA = Path(__file__).parent / "testdata"
REWRITE_ENV = "K2_REWRITE"


def _args(command: str) -> tuple[list[str], dict[str, str]]:
    words, opts = [], {}
    for token in command.split(" #", 1)[0].split():
        if "=" in token:
            k, v = token.split("=", 1)
            opts[k] = v
        else:
            words.append(token)
    return words, opts


class World:
    def __init__(self) -> None:
        self.policy("vcr", {})

    def policy(self, kind: str, opts: dict[str, str]) -> None:
        self.leader = LoggedStore(MemoryEngine(), lambda: 0)
        self.sealer = Sealer(
            SealPolicy(
                kind=kind,
                epoch_ns=int(opts.get("epoch", 100)),
                grace_ns=int(opts.get("grace", 0)),
                max_txn_lifetime_ns=int(opts.get("lifetime", 1000)),
                target_lag_ns=int(opts.get("lag", 3000)),
            )
        )
        self.replica = ReplicaApplier(MemoryEngine())
        self.intents: dict[str, int] = {}
        self.in_flight: dict[str, int] = {}

    def run(self, command: str) -> list[str]:
        words, opts = _args(command)
        if not words:
            raise ScenarioError("empty command")
        name, pos = words[0], words[1:]
        try:
            return self._run(name, pos, opts)
        except (SealedWrite, ReplicaGap) as e:
            return [f"error {type(e).__name__}: {e}"]

    def _run(self, name: str, pos: list[str], opts: dict[str, str]) -> list[str]:
        L = self.leader
        if name == "policy":
            self.policy(pos[0], opts)
            return ["ok"]
        if name == "intent":
            key, ts = pos[0], int(opts["ts"])
            L.apply([PutIntent(key.encode(), Intent(key.encode(), ts, b"v" + key.encode(), b""))])
            self.intents[key] = ts
            return ["ok"]
        if name == "resolve":
            key = pos[0]
            ts = self.intents.pop(key)
            commit = ts if pos[1] == "commit" else None
            L.apply([ResolveIntent(key.encode(), key.encode(), commit)])
            return ["ok"]
        if name == "write":
            L.apply([PutVersion(pos[0].encode(), int(opts["ts"]), b"w")])
            return ["ok"]
        if name == "check":
            ts = int(opts["ts"])
            ok = L.check_open(ts)
            return ["open" if ok else f"sealed (closed at {L.closed_ts})"]
        if name == "step":
            now, err = int(opts["now"]), int(opts.get("err", 0))
            oldest = L.oldest_intent_ts()
            step = self.sealer.step(TTInterval(now - err, now + err), oldest)
            L.closed_ts = max(L.closed_ts, step.closed)
            if step.seal is not None:
                L.append_seal(step.seal)
            seal = "none" if step.seal is None else str(step.seal)
            return [
                f"closed={step.closed} seal={seal} waiting={str(step.waiting_on_intent).lower()}"
            ]
        if name == "log":
            out = []
            for e in L.read_log(int(opts.get("from", 1)), 1000):
                if e.kind == KIND_SEAL:
                    out.append(f"{e.lsn} seal {e.seal_ts}")
                else:
                    vs = " ".join(f"{k.decode()}@{ts}" for k, ts, _ in e.versions)
                    out.append(f"{e.lsn} writes {vs}")
            return out or ["(empty)"]
        if name == "truncate":
            return [f"dropped {L.truncate(int(opts['before']))} first={L.first_lsn}"]
        if name == "replica-pull":
            if self.replica.next_lsn < L.first_lsn:
                return [f"snapshot needed (log starts at {L.first_lsn})"]
            entries = L.read_log(self.replica.next_lsn, int(opts.get("max", 1000)))
            fresh = self.replica.apply(entries)
            return [
                f"applied {len(fresh)} next={self.replica.next_lsn} sealed={self.replica.sealed_ts}"
            ]
        if name == "replica-snapshot":
            self.replica.begin_snapshot(L.next_lsn)
            sealed = L.sealed_ts
            start = b""
            while True:
                rows = L.scan_versions(start, None, 2)
                self.replica.apply_snapshot_page(rows)
                if len(rows) < 2:
                    break
                start = rows[-1][0] + b"\x00"
            self.replica.finish_snapshot(sealed)
            return [f"next={self.replica.next_lsn} sealed={self.replica.sealed_ts}"]
        if name == "replica":
            v = self.replica.store.get(pos[0].encode(), int(opts["ts"]))
            return ["none" if v is None else f"{(v.value or b'<tombstone>').decode()}@{v.ts}"]
        if name == "replica-state":
            return [f"next={self.replica.next_lsn} sealed={self.replica.sealed_ts}"]
        raise ScenarioError(f"unknown command {name!r}")


def run_script(text: str, where: str) -> tuple[Script, list[list[str]]]:
    script = parse_script(text)
    world = World()
    outputs = []
    for block in script.blocks:
        try:
            outputs.append(world.run(block.command))
        except (ScenarioError, KeyError, IndexError, ValueError) as e:
            raise ScenarioError(f"{where}:{block.line_no}: {block.command}: {e!r}") from None
    return script, outputs


@pytest.mark.parametrize("path", sorted(TESTDATA.glob("*.txt")), ids=lambda p: p.stem)
def test_scenario(path: Path) -> None:
    text = path.read_text()
    script, outputs = run_script(text, path.name)
    if os.environ.get(REWRITE_ENV) == "1":
        new = render_script(script, outputs)
        if new != text:
            path.write_text(new)
        return
    bad = mismatches(script, outputs, path.name)
    assert not bad, f"{len(bad)} commands differ (set {REWRITE_ENV}=1 to rewrite):\n" + "\n".join(
        bad
    )


def test_a_wrong_expectation_is_reported() -> None:
    script, outputs = run_script("step now=250\n----\nclosed=0 seal=none waiting=false\n", "x")
    assert mismatches(script, outputs, "x")
