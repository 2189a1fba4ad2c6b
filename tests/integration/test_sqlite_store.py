"""What only the SQLite store has: a file, its WAL and write lock, processes
racing on it, the boot clock, the file systems it may live on.

What every store decides alike is in ``tests/contract``.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from leaderrun.clock import boottime
from leaderrun.errors import (
    ConfigError,
    DatabaseUnavailableError,
    LeaderrunError,
    SchemaMissingError,
)
from leaderrun.lease import Lease, LockId
from leaderrun.stores.host import VOLATILE_FS_TYPES
from leaderrun.stores.sqlite import SqliteLeaseStore, SqliteSession
from tests.stores import LEASE_S, SqliteBackend, claim

CONTENDER = str(Path(__file__).parent.parent / "helpers" / "sqlite_contender.py")
CONTENDERS = 20
RACE_ROUNDS = 5
WAIT_S = 60.0
"""The bound on waiting for threads and processes; generous for a busy host."""


@pytest.fixture
def db(sqlite_backend: SqliteBackend) -> Path:
    """The path of a database file that does not exist yet."""
    return sqlite_backend.path


@pytest.fixture
def store(sqlite_backend: SqliteBackend) -> SqliteLeaseStore:
    """A store on this test's own file."""
    return sqlite_backend.sqlite


@pytest.fixture
def session(store: SqliteLeaseStore) -> Iterator[SqliteSession]:
    """A session on the store, closed after the test."""
    session = store.connect()
    yield session
    session.close()


def admin(db: Path) -> sqlite3.Connection:
    """An autocommit connection for the test to read and tamper with the table."""
    return sqlite3.connect(db, isolation_level=None, timeout=WAIT_S)


def row(db: Path, lock: LockId) -> tuple[object, ...]:
    """(holder, token, lock_name) of the lock's row."""
    with admin(db) as conn:
        found = conn.execute(
            "SELECT holder, token, lock_name FROM leader_lease WHERE lock_key = ?",
            (lock.key,),
        ).fetchone()
    assert found is not None
    return tuple(found)


def test_first_use_creates_the_file_the_table_and_wal_mode(store, db, lock):
    """The first acquire makes the file, in WAL mode, and takes token 1."""
    assert not db.exists()
    session = store.connect()
    try:
        result = session.acquire(lock, claim(1), LEASE_S)
        assert result.lease == Lease(lock, claim(1).holder, 1)
        # synchronous is per connection: FULL (2) on leaderrun's own.
        assert session._conn.execute("PRAGMA synchronous").fetchone() == (2,)
    finally:
        session.close()
    with admin(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert row(db, lock) == (claim(1).holder, 1, lock.name)


def test_init_is_idempotent(store, db):
    """init creates the table once and is safe to repeat."""
    store.init()
    store.init()
    with admin(db) as conn:
        tables = conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'"
        ).fetchall()
    assert sorted(tables) == [("leader_lease",), ("leader_run",)]


def race(db: Path, lock: str, lease_s: float = LEASE_S) -> Counter[object]:
    """Start CONTENDERS processes, fire the gun once all are ready, count outcomes."""
    procs = [
        subprocess.Popen(
            [sys.executable, CONTENDER, str(db), lock, str(n), str(lease_s)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(CONTENDERS)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        return Counter(
            json.loads(proc.communicate(timeout=WAIT_S)[0]) for proc in procs
        )
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.slow
def test_twenty_processes_racing_on_a_new_file_exactly_one_wins(tmp_path):
    """Twenty processes on a file that does not exist: one holds, none fails.

    They also race to create the file, switch it to WAL and create the table.
    """
    for n in range(RACE_ROUNDS):
        outcomes = race(tmp_path / f"round{n}.db", "race")
        assert outcomes == Counter({1: 1, None: CONTENDERS - 1})


@pytest.mark.slow
def test_twenty_processes_on_an_expired_lease_exactly_one_wins(
    sqlite_backend, db, lock
):
    """An expired lease, twenty processes: one wins with the next token, each round."""
    sqlite_backend.take(lock, 0)
    for n in range(RACE_ROUNDS):
        sqlite_backend.expire(lock)
        assert race(db, str(lock)) == Counter({n + 2: 1, None: CONTENDERS - 1})


def test_expiry_and_renewal_use_the_boot_clock(session, db, lock):
    """The expiry is this boot's CLOCK_BOOTTIME plus the lease, tagged with the
    boot id; the wall clock is recorded beside it for display only."""
    before_boot_s, before_unix_s = boottime(), time.time()
    lease = session.acquire(lock, claim(1), 7.0).lease
    assert lease is not None
    renew_boot_s = boottime()
    assert session.renew(lease, 11.0)
    after_boot_s, after_unix_s = boottime(), time.time()
    with admin(db) as conn:
        row = conn.execute(
            "SELECT boot_id, acquired_boot_s, expires_boot_s, acquired_unix_s,"
            " renewed_unix_s FROM leader_lease"
        ).fetchone()
    boot_id, acquired_boot_s, expires_boot_s, acquired_unix_s, renewed_unix_s = row
    assert boot_id == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert before_boot_s <= acquired_boot_s <= renew_boot_s
    assert renew_boot_s + 11.0 <= expires_boot_s <= after_boot_s + 11.0
    assert before_unix_s <= acquired_unix_s <= renewed_unix_s <= after_unix_s


def test_every_statement_leaves_the_connection_idle(session, lock):
    """After acquire, renew and release no transaction is open (no lock is kept)."""
    lease = session.acquire(lock, claim(1), LEASE_S).lease
    assert lease is not None
    assert not session._conn.in_transaction
    session.renew(lease, LEASE_S)
    assert not session._conn.in_transaction
    session.release(lease)
    assert not session._conn.in_transaction


def test_a_connection_left_in_a_transaction_is_caught(session, lock):
    """A statement that leaves its connection inside a transaction raises, loudly."""
    lease = session.acquire(lock, claim(1), LEASE_S).lease
    assert lease is not None
    session._conn.execute("BEGIN")
    with pytest.raises(LeaderrunError, match="left in a transaction"):
        session.renew(lease, LEASE_S)
    session._conn.execute("ROLLBACK")


def test_readers_do_not_block_a_renewal(session, db, lock):
    """WAL: a long read transaction elsewhere (a status query) does not stop writes."""
    lease = session.acquire(lock, claim(1), LEASE_S).lease
    assert lease is not None
    reader = admin(db)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT * FROM leader_lease").fetchall()
        assert session.renew(lease, LEASE_S) is True
    finally:
        reader.execute("ROLLBACK")
        reader.close()


def test_a_missing_table_without_create_says_to_run_init(db, lock):
    """create=False: no file, or a file without the table, is SchemaMissingError
    (69) naming `leaderrun init`; neither file nor table is created."""
    store = SqliteLeaseStore(db, create=False)
    with pytest.raises(SchemaMissingError, match="run `leaderrun init --dsn"):
        store.connect()
    assert not db.exists()
    sqlite3.connect(db).close()  # an empty file
    session = store.connect()
    try:
        with pytest.raises(SchemaMissingError, match="run `leaderrun init --dsn"):
            session.acquire(lock, claim(1), LEASE_S)
        assert not session.table_exists()
    finally:
        session.close()


def test_a_file_that_is_not_a_database_is_unavailable(db, lock):
    """Garbage in the file: 69, naming the file; nothing crashes."""
    db.write_bytes(b"not a database at all, just text " * 100)
    with pytest.raises(DatabaseUnavailableError, match="is it a leaderrun SQLite"):
        SqliteLeaseStore(db).connect()


def test_the_library_elects_one_leader_on_a_sqlite_file(db):
    """LeaderElector(dsn="sqlite:///...") works like the command line: one leader."""
    from leaderrun.elector import LeaderElector

    dsn = f"sqlite://{db}"
    a = LeaderElector("library", dsn=dsn, lease_s=4.0).start()
    b = LeaderElector("library", dsn=dsn, lease_s=4.0).start()
    try:
        deadline = time.monotonic() + WAIT_S
        while not (a.is_leader() or b.is_leader()):
            assert time.monotonic() < deadline, "nobody was elected"
            time.sleep(0.05)
        leader, follower = (a, b) if a.is_leader() else (b, a)
        time.sleep(1.0)  # more than one renewal
        assert leader.is_leader()
        assert not follower.is_leader()
        assert leader.token == 1
    finally:
        a.stop()
        b.stop()


def test_the_library_refuses_no_database_like_the_command_line():
    """No dsn, no LEADERRUN_DSN, DATABASE_URL or PG*: a ConfigError naming both."""
    from leaderrun.elector import LeaderElector

    with pytest.raises(ConfigError, match="sqlite:///"):
        LeaderElector("library", env={})


@pytest.fixture
def on_tmpfs() -> Iterator[Path]:
    """A directory on a real tmpfs (/dev/shm), removed afterwards."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm on this host")
    directory = Path(tempfile.mkdtemp(prefix="leaderrun-test-", dir=shm))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_a_new_file_on_tmpfs_warns_that_tokens_restart_after_reboot(
    on_tmpfs, lock, caplog
):
    """Creating the tables on tmpfs logs one warning (tokens start again at 1
    after a reboot); later uses of the file stay quiet."""
    store = SqliteLeaseStore(on_tmpfs / "leases.db")
    assert store.fs_type == "tmpfs"
    with caplog.at_level(logging.WARNING, logger="leaderrun"):
        store.connect().close()
        first = [r.getMessage() for r in caplog.records]
        caplog.clear()
        store.connect().close()
        later = [r.getMessage() for r in caplog.records]
    assert len(first) == 1
    assert f"sqlite://{on_tmpfs}/leases.db is on tmpfs" in first[0]
    assert "fencing tokens then start again at 1" in first[0]
    assert later == []


def test_a_new_file_on_a_disk_does_not_warn(store, caplog):
    """On a disk, first use is silent at warning level."""
    if store.fs_type in VOLATILE_FS_TYPES:
        pytest.skip(f"the test's directory is on {store.fs_type}, not a disk")
    with caplog.at_level(logging.WARNING, logger="leaderrun"):
        store.connect().close()
    assert caplog.records == []
