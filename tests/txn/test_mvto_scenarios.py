"""Scenario tests for the K2-MVTO rules (txn/mvto.py) and the shard leader's single-key rules
(k2store/shard.py), in the style of etcd raft's datadriven `testdata/*.txt`.

Every `testdata/*.txt` file is a script of blocks. Each block is a command, a `----` line, the
output the command must produce (zero or more non-blank lines), then a blank line:

    # comment lines (and blank lines) between blocks are kept as they are
    begin t1 ts=100
    ----
    ok

    write t1 k1 v1        # an inline comment after a command is allowed too
    ----
    ok

REWRITING THE EXPECTED OUTPUT: run with the environment variable `K2_REWRITE=1`

    K2_REWRITE=1 pytest tests/txn -q && git diff tests/txn/testdata

and every file is rewritten with what the code answers now (comments and commands untouched).
Read the diff before keeping it. Files listed in `XFAIL` (known bugs, whose expected output was
written by hand to say what the code SHOULD answer) are never rewritten. One file can be run or
rewritten by hand: `python tests/txn/test_mvto_scenarios.py FILE... [--rewrite]`.

The store is a `MemoryEngine` driven through `MvtoRules` exactly as the participant drives it:
a `WriteDone` mutation is applied at once, `Wait` and `Abort` change nothing, and re-evaluating
after a wait is just issuing the command again. Timestamps are small integers; in messages, the
`format_ts` text is shown back as `@<int>` and transaction ids as the transaction's name.

Commands (KEY and VALUE are text; `\\x00` escapes work; `{x*20}` is twenty x's; a RANGE is
`start..end`, `start..` for no end, `..end` for the empty start):

    reset [wait-for-lower=false] [max-marks=N]   fresh store, rules and shard; forget transactions
    begin TXN ts=N [record=KEY]       a transaction; its record key defaults to its first write
    read TXN KEY                      MvtoRules.read at the transaction's ts
    read KEY ts=N                     a read outside any transaction (txn None)
    scan TXN RANGE [limit=N]          MvtoRules.scan (limit defaults to 100)
    scan RANGE ts=N [limit=N]         a scan outside any transaction
    write TXN KEY VALUE               MvtoRules.write; a WriteDone's intent is applied
    delete TXN KEY                    a write of None (a provisional delete)
    resolve TXN commit[=N] | abort [keys=K1,K2]
                                      MvtoRules.resolve over the keys TXN wrote (or keys=);
                                      commit defaults to the transaction's ts
    put-version KEY [VALUE] ts=N      a committed version straight into the store (no VALUE:
                                      a tombstone), for setting up history
    versions KEY...                   committed versions, newest first
    intents [RANGE]                   every intent, in key order
    read-mark KEY...                  the read mark of each key
    read-marks                        the floor and the range marks
    gc horizon=N                      VersionedStore.gc
    shard RANGE [hashed] [max-key=N] [max-value=N]
                                      a ShardLeader (shard 7) over the same store
    shard-get KEY ts=N                ShardLeader.read
    shard-put KEY VALUE ts=N          ShardLeader.write
    shard-delete KEY ts=N             ShardLeader.write of None
    shard-scan RANGE ts=N [limit=N]   ShardLeader.scan
    shard-counters                    reads, writes, aborts

Outputs: a version is `VALUE@TS` (`<tombstone>@TS` for a delete), `none` when there is no
version; a scan lists `KEY: VERSION` rows, then `more=BOOL marked-end=KEY` (where its range mark
ends; `resume=KEY` for shard-scan); `wait on TXN (intent at @TS on KEY)`; `abort RULE: MESSAGE`;
`error TYPE: MESSAGE` for an exception the rules raise on purpose (K2 errors also say whether
they are retryable).
"""

from __future__ import annotations

import calendar
import hashlib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from k2store.cluster import ShardConfig
from k2store.errors import K2Error
from k2store.memengine import MemoryEngine
from k2store.shard import Limits, ShardLeader
from tests.datadriven import ScenarioError, Script, mismatches, parse_script, render_script
from txn.mvto import Abort, MvtoRules, ReadDone, ScanDone, Wait, WriteDone
from txn.readmarks import DEFAULT_MAX_READ_MARKS, ReadMarks
from txn.records import TxnRef
from txn.storage import PutVersion, StorageError, Version

TESTDATA = Path(__file__).parent / "testdata"
REWRITE_ENV = "K2_REWRITE"

XFAIL: dict[str, str] = {}


# -- rendering values ------------------------------------------------------------------------

_PLAIN = re.compile(rb"[!-~]+")
_FORMAT_TS = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)\.(\d{9})Z#\d+\.\d+")


def show_bytes(b: bytes) -> str:
    """Printable ASCII as is; anything else (and the empty string) as a Python bytes literal."""
    if _PLAIN.fullmatch(b) and b"'" not in b and b"\\" not in b:
        return b.decode()
    return repr(b)[1:]


def show_version(v: Version | None) -> str:
    if v is None:
        return "none"
    value = "<tombstone>" if v.value is None else show_bytes(v.value)
    return f"{value}@{v.ts}"


def _ts_back(m: re.Match[str]) -> str:
    y, mo, d, h, mi, s, nanos = (int(g) for g in m.groups())
    seconds = calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0))
    return f"@{seconds * 1_000_000_000 + nanos}"


# -- the world a scenario drives -------------------------------------------------------------


@dataclass
class Txn:
    name: str
    txn_id: bytes
    ts: int
    record_key: bytes | None
    written: list[bytes] = field(default_factory=list)

    def ref(self) -> TxnRef:
        return TxnRef(self.txn_id, self.ts, self.record_key or b"")

    def writer_ref(self, key: bytes) -> TxnRef:
        if self.record_key is None:
            self.record_key = key  # the first written key is the home row
        return self.ref()


def txn_id_for(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()[:16]


Args = tuple[list[str], dict[str, str]]


class World:
    def __init__(self) -> None:
        self.reset({})

    def reset(self, opts: dict[str, str]) -> None:
        wait = opts.pop("wait-for-lower", "true")
        if wait not in ("true", "false"):
            raise ScenarioError(f"wait-for-lower must be true or false, got {wait!r}")
        marks = ReadMarks(max_entries=int(opts.pop("max-marks", DEFAULT_MAX_READ_MARKS)))
        self.store = MemoryEngine(read_marks=marks)
        self.rules = MvtoRules(self.store, wait_for_lower=wait == "true")
        self.txns: dict[str, Txn] = {}
        self.leader: ShardLeader | None = None

    # -- helpers ----------------------------------------------------------------------------

    def txn(self, name: str) -> Txn:
        if name not in self.txns:
            raise ScenarioError(f"unknown transaction {name!r} (begin it first)")
        return self.txns[name]

    def clean(self, message: str) -> str:
        """Messages with timestamps as `@N` and transaction ids as names."""
        message = _FORMAT_TS.sub(_ts_back, message)
        for t in self.txns.values():
            message = message.replace(t.txn_id.hex(), t.name)
            message = message.replace(t.txn_id.hex()[:12], t.name)
        return message

    def name_of(self, txn_id: bytes) -> str:
        for t in self.txns.values():
            if t.txn_id == txn_id:
                return t.name
        return txn_id.hex()[:12]

    def outcome(self, out: ReadDone | ScanDone | Wait | Abort) -> list[str]:
        if isinstance(out, ReadDone):
            return [show_version(out.version)]
        if isinstance(out, Wait):
            who = self.name_of(out.intent.txn_id)
            return [f"wait on {who} (intent at @{out.intent.ts} on {show_bytes(out.key)})"]
        if isinstance(out, Abort):
            return [f"abort {out.rule}: {self.clean(out.message)}"]
        lines = [f"{show_bytes(k)}: {show_version(v)}" for k, v in out.rows] or ["(no rows)"]
        end = "(unbounded)" if out.marked_end is None else show_bytes(out.marked_end)
        lines.append(f"more={str(out.more).lower()} marked-end={end}")
        return lines

    # -- dispatch ---------------------------------------------------------------------------

    def run(self, command: str) -> list[str]:
        words, opts = parse_args(command)
        if not words:
            raise ScenarioError("empty command")
        name, pos = words[0], words[1:]
        handler = getattr(self, "cmd_" + name.replace("-", "_"), None)
        if handler is None:
            raise ScenarioError(f"unknown command {name!r}")
        try:
            lines: list[str] = handler(pos, opts)
        except K2Error as e:
            lines = [f"error {type(e).__name__} retryable={e.retryable}: {self.clean(str(e))}"]
        except StorageError as e:
            lines = [f"error {type(e).__name__}: {self.clean(str(e))}"]
        if opts:
            raise ScenarioError(f"unknown options {sorted(opts)} for {name!r}")
        return lines

    # -- MVTO -------------------------------------------------------------------------------

    def cmd_reset(self, pos: list[str], opts: dict[str, str]) -> list[str]:
        no_positionals(pos)
        self.reset(opts)
        return ["ok"]

    def cmd_begin(self, pos: list[str], opts: dict[str, str]) -> list[str]:
        (name,) = want(pos, 1)
        if name in self.txns:
            raise ScenarioError(f"transaction {name!r} already begun")
        record = opts.pop("record", None)
        self.txns[name] = Txn(
            name, txn_id_for(name), int_opt(opts, "ts"), None if record is None else key(record)
        )
        return ["ok"]

    def cmd_read(self, pos: list[str], opts: dict[str, str]) -> list[str]:
        if len(pos) == 2:
            t = self.txn(pos[0])
            return self.outcome(self.rules.read(t.ref(), key(pos[1]), t.ts))
        (k,) = want(pos, 1)
        return self.outcome(self.rules.read(None, key(k), int_opt(opts, "ts")))

    def cmd_scan(self, pos: list[str], opts: dict[str, str]) -> list[str]:
        limit = int(opts.pop("limit", "100"))
        if len(pos) == 2:
            t = self.txn(pos[0])
            start, end = key_range(pos[1])
            return self.outcome(self.rules.scan(t.ref(), start, end, t.ts, limit))
        (r,) = want(pos, 1)
        start, end = key_range(r)
        return self.outcome(self.rules.scan(None, start, end, int_opt(opts, "ts"), limit))

    def _write(self, t: Txn, k: bytes, value: bytes | None) -> list[str]:
        out = self.rules.write(t.writer_ref(k), k, value)
        if isinstance(out, WriteDone):
            self.store.apply([out.mutation], sync=True)
            if k not in t.written:
                t.written.append(k)
            return ["ok"]
        return self.outcome(out)

    def cmd_write(self, pos: list[str], opts: dict[str, str]) -> list[str]:
        name, k, v = want(pos, 3)
        return self._write(self.txn(name), key(k), key(v))

    def cmd_delete(self, pos: list[str], opts: dict[str, str]) -> list[str]:
        name, k = want(pos, 2)
        return self._write(self.txn(name), key(k), None)

    def cmd_resolve(self, pos: list[str], opts: dict[str, str]) -> list[str]:
        (name,) = want(pos, 1)
        t = self.txn(name)
        commit = opts.pop("commit", None)
        abort = opts.pop("abort", None)
        if (commit is None) == (abort is None) or abort:
            raise ScenarioError("resolve needs exactly one of commit[=N] or abort")
        commit_ts = None if commit is None else int(commit) if commit else t.ts
        keys = [key(k) for k in opts.pop("keys").split(",")] if "keys" in opts else t.written
        return [f"resolved {self.rules.resolve(t.txn_id, commit_ts, list(keys))}"]

    # -- the store --------------------------------------------------------------------------

    def cmd_put_version(self, pos: list[str], opts: dict[str, str]) -> list[str]:
        if len(pos) not in (1, 2):
            raise ScenarioError("put-version KEY [VALUE] ts=N")
        value = key(pos[1]) if len(pos) == 2 else None
        self.store.apply([PutVersion(key(pos[0]), int_opt(opts, "ts"), value)], sync=True)
        return ["ok"]

    def cmd_versions(self, pos: list[str], opts: dict[str, str]) -> list[str]:
        lines = []
        for k in pos:
            shown = " ".join(show_version(v) for v in self.store.versions(key(k))) or "(none)"
            lines.append(f"{k}: {shown}")
        return lines

    def cmd_intents(self, pos: list[str], opts: dict[str, str]) -> list[str]:
        start, end = key_range(pos[0]) if pos else (b"", None)
        lines = []
        for k, i in self.store.scan_intents(start, end):
            value = "<tombstone>" if i.value is None else show_bytes(i.value)
            lines.append(
                f"{show_bytes(k)}: {self.name_of(i.txn_id)}@{i.ts} {value} "
                f"record={show_bytes(i.record_key)}"
            )
        return lines or ["(none)"]

    def cmd_read_mark(self, pos: list[str], opts: dict[str, str]) -> list[str]:
        return [f"{k}: {self.store.read_marks.get(key(k))}" for k in pos]

    def cmd_read_marks(self, pos: list[str], opts: dict[str, str]) -> list[str]:
        no_positionals(pos)
        marks = self.store.read_marks
        lines = [f"floor: {marks.floor}"]
        for start, end, mark in marks.ranges():
            shown = "(unbounded)" if end is None else show_bytes(end)
            lines.append(f"[{show_bytes(start)}, {shown}): {mark}")
        return lines

    def cmd_gc(self, pos: list[str], opts: dict[str, str]) -> list[str]:
        no_positionals(pos)
        stats = self.store.gc(int_opt(opts, "horizon"))
        return [
            f"removed={stats.versions_removed} keys-scanned={stats.keys_scanned} "
            f"horizon={self.store.horizon}"
        ]

    # -- the shard leader -------------------------------------------------------------------

    def cmd_shard(self, pos: list[str], opts: dict[str, str]) -> list[str]:
        (r,) = want(pos, 1)
        start, end = key_range(r)
        hashed = opts.pop("hashed", None) is not None
        default = Limits()
        limits = Limits(
            max_key_bytes=int(opts.pop("max-key", default.max_key_bytes)),
            max_value_bytes=int(opts.pop("max-value", default.max_value_bytes)),
        )
        config = ShardConfig(7, start, end, "us-east", "n1")
        self.leader = ShardLeader(config, self.store, limits, hashed=hashed)
        return ["ok"]

    def shard(self) -> ShardLeader:
        if self.leader is None:
            raise ScenarioError("no shard leader (use the shard command first)")
        return self.leader

    def cmd_shard_get(self, pos: list[str], opts: dict[str, str]) -> list[str]:
        (k,) = want(pos, 1)
        return [show_version(self.shard().read(key(k), int_opt(opts, "ts")))]

    def cmd_shard_put(self, pos: list[str], opts: dict[str, str]) -> list[str]:
        k, v = want(pos, 2)
        self.shard().write(key(k), key(v), int_opt(opts, "ts"))
        return ["ok"]

    def cmd_shard_delete(self, pos: list[str], opts: dict[str, str]) -> list[str]:
        (k,) = want(pos, 1)
        self.shard().write(key(k), None, int_opt(opts, "ts"))
        return ["ok"]

    def cmd_shard_scan(self, pos: list[str], opts: dict[str, str]) -> list[str]:
        (r,) = want(pos, 1)
        start, end = key_range(r)
        limit = int(opts.pop("limit", "100"))
        page = self.shard().scan(start, end, int_opt(opts, "ts"), limit)
        lines = [f"{show_bytes(k)}: {show_version(v)}" for k, v in page.items] or ["(no rows)"]
        lines.append(f"more={str(page.more).lower()} resume={show_bytes(page.resume_key)}")
        return lines

    def cmd_shard_counters(self, pos: list[str], opts: dict[str, str]) -> list[str]:
        no_positionals(pos)
        c = self.shard().counters
        return [f"reads={c.reads} writes={c.writes} aborts={c.aborts}"]


# -- arguments -------------------------------------------------------------------------------

_OPTION = re.compile(r"([a-z][a-z-]*)(?:=(.*))?")
_REPEAT = re.compile(r"\{(.)\*(\d+)\}")
_FLAGS = {"abort", "commit", "hashed"}


def parse_args(command: str) -> Args:
    """Words and `name=value` options; `#` starts an inline comment. A bare word that names a
    flag (`abort`, `commit`, `hashed`) is an option with an empty value."""
    words: list[str] = []
    opts: dict[str, str] = {}
    for i, token in enumerate(command.split(" #", 1)[0].split()):
        token = _REPEAT.sub(lambda m: m.group(1) * int(m.group(2)), token)
        m = _OPTION.fullmatch(token)
        if i > 0 and m and (m.group(2) is not None or token in _FLAGS):
            if m.group(1) in opts:
                raise ScenarioError(f"option {m.group(1)!r} given twice")
            opts[m.group(1)] = m.group(2) or ""
        else:
            words.append(token)
    return words, opts


def key(text: str) -> bytes:
    if "\\" in text:
        return text.encode().decode("unicode_escape").encode("latin-1")
    return text.encode()


def key_range(text: str) -> tuple[bytes, bytes | None]:
    if ".." not in text:
        raise ScenarioError(f"expected a range START..END, got {text!r}")
    start, end = text.split("..", 1)
    return key(start), (key(end) if end else None)


def int_opt(opts: dict[str, str], name: str) -> int:
    if name not in opts:
        raise ScenarioError(f"missing option {name}=N")
    return int(opts.pop(name))


def want(pos: list[str], n: int) -> list[str]:
    if len(pos) != n:
        raise ScenarioError(f"expected {n} arguments, got {pos}")
    return pos


def no_positionals(pos: list[str]) -> None:
    if pos:
        raise ScenarioError(f"unexpected arguments {pos}")


# -- running a file --------------------------------------------------------------------------


def run_script(text: str, where: str = "<script>") -> tuple[Script, list[list[str]]]:
    """Parse and run a script; returns it with the actual output of every block."""
    script = parse_script(text)
    world = World()
    outputs = []
    for block in script.blocks:
        try:
            lines = world.run(block.command)
        except ScenarioError as e:
            raise ScenarioError(f"{where}:{block.line_no}: {block.command}: {e}") from None
        assert all(line.strip() for line in lines), "outputs must not hold blank lines"
        outputs.append(lines)
    return script, outputs


def check_file(path: Path, *, rewrite: bool) -> None:
    text = path.read_text()
    script, outputs = run_script(text, path.name)
    if rewrite:
        new = render_script(script, outputs)
        if new != text:
            path.write_text(new)
        return
    bad = mismatches(script, outputs, path.name)
    if bad:
        raise AssertionError(
            f"{len(bad)} of {len(script.blocks)} commands differ "
            f"(set {REWRITE_ENV}=1 to rewrite the expected output):\n" + "\n".join(bad)
        )


# -- pytest ----------------------------------------------------------------------------------


def _cases() -> list[object]:
    cases: list[object] = []
    for path in sorted(TESTDATA.glob("*.txt")):
        marks = []
        if path.name in XFAIL:
            marks.append(pytest.mark.xfail(strict=True, reason=XFAIL[path.name]))
        cases.append(pytest.param(path, id=path.stem, marks=marks))
    return cases


@pytest.mark.parametrize("path", _cases())
def test_scenario(path: Path) -> None:
    rewrite = os.environ.get(REWRITE_ENV) == "1" and path.name not in XFAIL
    check_file(path, rewrite=rewrite)


def test_xfail_entries_name_existing_files() -> None:
    missing = sorted(set(XFAIL) - {p.name for p in TESTDATA.glob("*.txt")})
    assert not missing, f"XFAIL names files that do not exist: {missing}"


def test_a_wrong_expectation_is_reported() -> None:
    text = "begin t1 ts=100\n----\nok\n\nread t1 k1\n----\nv1@100\n"
    script, outputs = run_script(text)
    bad = mismatches(script, outputs, "x.txt")
    assert len(bad) == 1
    assert bad[0].startswith("x.txt:5: read t1 k1\n")
    assert "    none\n" in bad[0]


def test_rewrite_keeps_comments_and_commands() -> None:
    text = "# head\nbegin t1 ts=100 # inline\n----\nstale\n\n# tail\n"
    script, outputs = run_script(text)
    expected = "# head\nbegin t1 ts=100 # inline\n----\nok\n\n# tail\n"
    assert render_script(script, outputs) == expected


def test_malformed_scripts_are_refused() -> None:
    for text in ("read t1 k1\nnot-dashes\n", "frobnicate\n----\n", "read t9 k1\n----\n"):
        with pytest.raises(ScenarioError):
            run_script(text)


def main(argv: list[str]) -> int:
    rewrite = "--rewrite" in argv
    failed = 0
    for name in (a for a in argv if a != "--rewrite"):
        try:
            check_file(Path(name), rewrite=rewrite)
        except AssertionError as e:
            failed += 1
            print(f"{name}: FAILED\n{e}")
        else:
            print(f"{name}: {'rewritten' if rewrite else 'ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


def test_doomed_write_names_the_abort_a_write_would_meet() -> None:
    """`doomed_write` (a read for update's early failure) says exactly what `write` would."""
    store = MemoryEngine(read_marks=ReadMarks())
    rules = MvtoRules(store)
    t10, t20, t30 = (TxnRef(bytes([i]) * 16, ts, b"rec") for i, ts in ((1, 10), (2, 20), (3, 30)))
    assert rules.doomed_write(t10, b"k") is None  # nothing read or written yet
    assert isinstance(rules.read(t20, b"k", 20), ReadDone)
    doomed = rules.doomed_write(t10, b"k")
    assert doomed is not None and doomed.rule == "read-mark"
    assert isinstance(rules.write(t10, b"k", b"v"), Abort)
    assert rules.doomed_write(t20, b"k") is None  # its own read's mark
    store.apply([PutVersion(b"k", 25, b"v")])
    doomed = rules.doomed_write(t20, b"k")
    assert doomed is not None and doomed.rule == "newer-version"
    assert rules.doomed_write(t30, b"k") is None
