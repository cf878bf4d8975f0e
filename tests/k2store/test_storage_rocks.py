"""RocksEngine's process-level contract: the directory lock, durability and recovery.

Other processes are real child processes (`sys.executable -c ...`), because RocksDB's LOCK is
an OS file lock and a crash is a process dying; neither can be faked inside one process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from k2store import rocksengine
from k2store.memengine import MemoryEngine
from k2store.rocksengine import RocksEngine
from txn.storage import (
    DataDirLocked,
    Intent,
    PutIntent,
    PutMeta,
    PutVersion,
    StorageError,
    Version,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_child(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `script` in a fresh interpreter that can import the repository's packages."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=60,
        check=False,
    )


TRY_OPEN = """
    import sys
    from k2store.rocksengine import RocksEngine
    from txn.storage import DataDirLocked
    try:
        RocksEngine(sys.argv[1]).close()
    except DataDirLocked as exc:
        print("LOCKED", exc.path, exc, sep="|")
    else:
        print("OPENED")
"""


def test_second_process_gets_data_dir_locked(tmp_path: Path) -> None:
    path = tmp_path / "db"
    holder = RocksEngine(path)
    try:
        child = run_child(TRY_OPEN, str(path))
        assert child.returncode == 0, child.stderr
        verdict, locked_path, message = child.stdout.strip().split("|", 2)
        assert verdict == "LOCKED"
        assert locked_path == str(path)
        assert "another process" in message and str(path) in message
    finally:
        holder.close()
    # Closing released the lock: the other process can open it now.
    child = run_child(TRY_OPEN, str(path))
    assert child.stdout.strip() == "OPENED", child.stderr


def test_second_engine_in_the_same_process_gets_data_dir_locked(tmp_path: Path) -> None:
    with RocksEngine(tmp_path / "db"), pytest.raises(DataDirLocked):
        RocksEngine(tmp_path / "db")


def test_reopen_after_drop_without_close(tmp_path: Path) -> None:
    store = RocksEngine(tmp_path / "db")
    store.apply([PutVersion(b"k", 3, b"v")], sync=False)
    del store  # no close(): the destructor must release the lock
    with RocksEngine(tmp_path / "db", create=False) as reopened:
        assert reopened.get(b"k", 3) == Version(3, b"v")


def test_reads_that_fail_do_not_keep_the_database_open(tmp_path: Path) -> None:
    store = RocksEngine(tmp_path / "db")
    store.apply([PutVersion(b"k", 3, b"v")])
    store.gc(10)
    with pytest.raises(StorageError):
        store.scan(b"", None, 1)
    store.close()
    RocksEngine(tmp_path / "db").close()


def test_horizon_and_everything_else_survive_reopen(tmp_path: Path) -> None:
    with RocksEngine(tmp_path / "db") as store:
        store.apply(
            [
                PutVersion(b"k", 1, b"v1"),
                PutVersion(b"k", 2, b"v2"),
                PutIntent(b"i", Intent(b"t", 4, None, b"k")),
                PutMeta(b"apply-index", b"\x09"),
            ]
        )
        store.gc(3)
    with RocksEngine(tmp_path / "db", create=False) as store:
        assert store.horizon == 3
        assert store.versions(b"k") == [Version(2, b"v2")]
        assert store.get_intent(b"i") == Intent(b"t", 4, None, b"k")
        assert store.get_meta(b"apply-index") == b"\x09"


CRASH_AFTER_WRITES = """
    import os, signal, sys
    from k2store.rocksengine import RocksEngine
    from txn.storage import Intent, PutIntent, PutMeta, PutVersion
    store = RocksEngine(sys.argv[1])
    for i in range(50):
        store.apply(
            [
                PutVersion(b"key%03d" % i, 100 + i, b"value%d" % i),
                PutIntent(b"pending%03d" % i, Intent(b"txn%d" % i, 100 + i, b"p", b"rec")),
                PutMeta(b"apply-index", b"%d" % i),
            ],
            sync=True,
        )
        print("acked", i, flush=True)  # acknowledged: must survive what follows
    store.gc(120)
    print("gc", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # die without close(), flush or destructor
"""


def test_synced_batches_survive_a_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "db"
    child = run_child(CRASH_AFTER_WRITES, str(path))
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert child.stdout.split().count("acked") == 50
    with RocksEngine(path, create=False) as store:
        assert store.horizon == 120
        for i in range(50):
            assert store.get(b"key%03d" % i, 200) == Version(100 + i, b"value%d" % i)
            assert store.get_intent(b"pending%03d" % i) == Intent(
                b"txn%d" % i, 100 + i, b"p", b"rec"
            )
        assert store.get_meta(b"apply-index") == b"49"
        assert len(store.scan(b"key", b"kez", 200)) == 50


def test_open_without_create_needs_an_existing_database(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot open") as info:
        RocksEngine(tmp_path / "missing", create=False)
    assert not isinstance(info.value, DataDirLocked)


def test_foreign_storage_format_is_refused(tmp_path: Path) -> None:
    store = RocksEngine(tmp_path / "db")
    # Plant a format marker from a hypothetical future layout (through the private handle:
    # nothing outside rocksengine may import rocksdict).
    store._db.put(b"sformat", b"99")
    store.close()
    for _ in range(2):  # the second try would be DataDirLocked if the first kept the lock
        with pytest.raises(StorageError, match="storage format") as info:
            RocksEngine(tmp_path / "db")
        assert not isinstance(info.value, DataDirLocked)


def test_gc_in_several_batches_matches_the_memory_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small GC batches, so that the horizon-first, then-more-batches path runs.
    monkeypatch.setattr(rocksengine, "_GC_BATCH", 3)
    batch = [
        PutVersion(b"k%d" % (i % 7), ts, None if (i + ts) % 5 == 0 else b"v%d" % ts)
        for i in range(7)
        for ts in range(1, 12)
    ]
    memory = MemoryEngine()
    with RocksEngine(tmp_path / "db") as store:
        for engine in (memory, store):
            engine.apply(batch)
        assert store.gc(9) == memory.gc(9)
        for i in range(7):
            assert store.versions(b"k%d" % i) == memory.versions(b"k%d" % i)
    with RocksEngine(tmp_path / "db") as store:
        assert store.horizon == 9
        assert store.scan(b"", None, 9) == memory.scan(b"", None, 9)
