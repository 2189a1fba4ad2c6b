"""The SQLite lease store on a real file: its SQL, process races, busy locks."""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from leaderrun.clock import boottime
from leaderrun.errors import (
    EXIT_UNAVAILABLE,
    ConfigError,
    DatabaseUnavailableError,
    LeaderrunError,
    SchemaMissingError,
)
from leaderrun.lease import Lease, LockId, name_key, parse_lock_id
from leaderrun.stores.base import Claim
from leaderrun.stores.host import VOLATILE_FS_TYPES
from leaderrun.stores.sqlite import SqliteLeaseStore, SqliteSession

CONTENDER = str(Path(__file__).parent.parent / "helpers" / "sqlite_contender.py")
LEASE_S = 30.0
CONTENDERS = 20
RACE_ROUNDS = 5
WAIT_S = 60.0
"""The bound on waiting for threads and processes; generous for a busy host."""


def claim(n: int) -> Claim:
    """The claim of contender ``n``, each with its own holder identity."""
    return Claim(holder=f"host{n}:{n}:nonce", host=f"host{n}", pid=n, command="true")


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """The path of a database file that does not exist yet."""
    return tmp_path / "leases.db"


@pytest.fixture
def store(db: Path) -> SqliteLeaseStore:
    """A store on this test's own file."""
    return SqliteLeaseStore(db)


@pytest.fixture
def session(store: SqliteLeaseStore) -> Iterator[SqliteSession]:
    """A session on the store, closed after the test."""
    session = store.connect()
    yield session
    session.close()


@pytest.fixture
def lock() -> LockId:
    """A named lock."""
    return parse_lock_id("nightly-backup")


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


def expire(db: Path, lock: LockId) -> None:
    """Move the lock's expiry into the past, as waiting out the lease would."""
    with admin(db) as conn:
        conn.execute(
            "UPDATE leader_lease SET expires_boot_s = expires_boot_s - 1e6"
            " WHERE lock_key = ?",
            (lock.key,),
        )


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
    assert row(db, lock) == (claim(1).holder, 1, "nightly-backup")


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
def test_twenty_processes_on_an_expired_lease_exactly_one_wins(store, db, lock):
    """An expired lease, twenty processes: one wins with the next token, each round."""
    session = store.connect()
    session.acquire(lock, claim(0), LEASE_S)
    session.close()
    for n in range(RACE_ROUNDS):
        expire(db, lock)
        assert race(db, "nightly-backup") == Counter({n + 2: 1, None: CONTENDERS - 1})


def thread_round(store: SqliteLeaseStore, lock: LockId) -> list[object]:
    """CONTENDERS threads, a session each, acquire at once; their outcomes."""
    sessions = [store.connect() for _ in range(CONTENDERS)]
    gun = threading.Barrier(CONTENDERS)
    results: list[object] = [None] * CONTENDERS

    def contend(n: int) -> None:
        gun.wait()
        try:
            results[n] = sessions[n].acquire(lock, claim(n), LEASE_S).lease
        except LeaderrunError as exc:
            results[n] = exc

    threads = [threading.Thread(target=contend, args=(n,)) for n in range(CONTENDERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    for session in sessions:
        session.close()
    return results


def test_twenty_threads_racing_exactly_one_wins(store, db, lock):
    """Threads with a session each race the same way, and tokens strictly increase."""
    tokens: list[int] = []
    for _ in range(RACE_ROUNDS):
        results = thread_round(store, lock)
        winners = [r for r in results if isinstance(r, Lease)]
        assert len(winners) == 1, results
        assert results.count(None) == CONTENDERS - 1, results
        tokens.append(winners[0].token)
        expire(db, lock)
    assert tokens == list(range(1, RACE_ROUNDS + 1))


def test_a_held_lock_describes_its_holder(session, store, lock):
    """A contender that loses learns who holds it and when the lease ends."""
    session.acquire(lock, claim(1), LEASE_S)
    other = store.connect()
    try:
        result = other.acquire(lock, claim(2), LEASE_S)
    finally:
        other.close()
    assert result.lease is None
    assert (result.holder, result.holder_host, result.holder_pid) == (
        claim(1).holder,
        "host1",
        1,
    )
    assert result.expires_in_s is not None
    assert LEASE_S - 5 < result.expires_in_s <= LEASE_S


def test_a_renewal_after_a_takeover_changes_nothing(session, db, lock):
    """A stale token renews and releases nothing, even when the holder is the same."""
    lease = session.acquire(lock, claim(1), LEASE_S).lease
    assert lease is not None
    expire(db, lock)
    again = session.acquire(lock, claim(1), LEASE_S).lease
    assert again == Lease(lock, claim(1).holder, 2)
    assert session.renew(lease, LEASE_S) is False
    assert session.release(lease) is False
    assert row(db, lock) == (claim(1).holder, 2, "nightly-backup")
    assert session.renew(again, LEASE_S) is True
    assert session.release(again) is True
    assert session.release(again) is False


def test_a_renewal_after_expiry_does_not_revive_the_lease(session, store, db, lock):
    """As in PostgreSQL: past expiry, the holder's renewal matches nothing, and a
    contender takes the lock at once."""
    lease = session.acquire(lock, claim(1), LEASE_S).lease
    assert lease is not None
    expire(db, lock)
    assert session.renew(lease, LEASE_S) is False
    with admin(db) as conn:
        (expires_boot_s,) = conn.execute(
            "SELECT expires_boot_s FROM leader_lease WHERE lock_key = ?", (lock.key,)
        ).fetchone()
    assert expires_boot_s < boottime()
    other = store.connect()
    try:
        assert other.acquire(lock, claim(2), LEASE_S).lease == Lease(
            lock, claim(2).holder, 2
        )
    finally:
        other.close()


def test_release_keeps_the_row_and_the_token_keeps_growing(session, db, lock):
    """Release frees the lock but keeps the row; each holder gets the next token."""
    for n in range(1, 4):
        lease = session.acquire(lock, claim(n), LEASE_S).lease
        assert lease is not None
        assert lease.token == n
        assert session.release(lease) is True
    assert row(db, lock) == (None, 3, "nightly-backup")


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


def test_a_lease_ends_when_the_host_clock_passes_it(session, store, lock):
    """A short lease is free to others once it has run out, not before."""
    session.acquire(lock, claim(1), 0.5)
    other = store.connect()
    try:
        assert other.acquire(lock, claim(2), LEASE_S).lease is None
        time.sleep(0.6)
        assert other.acquire(lock, claim(2), LEASE_S).lease == Lease(
            lock, claim(2).holder, 2
        )
    finally:
        other.close()


def test_a_key_used_by_another_lock_name_is_refused(session, db):
    """A name whose 64-bit key another name already uses is refused, never taken."""
    mine = parse_lock_id("jobs")
    impostor = LockId(name_key("jobs"), "not-jobs")
    lease = session.acquire(mine, claim(1), LEASE_S).lease
    assert lease is not None
    session.release(lease)
    with pytest.raises(ConfigError, match="same 64-bit key as the lock 'jobs'"):
        session.acquire(impostor, claim(2), LEASE_S)
    assert row(db, mine) == (None, 1, "jobs")


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


@pytest.mark.timing
def test_a_held_write_lock_fails_a_renewal_within_the_busy_wait(db, lock):
    """Another process holding the write lock: renew fails after busy_s, not later.

    This is how busy handling stays out of the deadline's way: a renewal never
    waits for SQLite longer than its attempt budget.
    """
    store = SqliteLeaseStore(db, busy_s=0.5)
    session = store.connect()
    try:
        lease = session.acquire(lock, claim(1), LEASE_S).lease
        assert lease is not None
        blocker = admin(db)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            start = time.monotonic()
            with pytest.raises(DatabaseUnavailableError) as excinfo:
                session.renew(lease, LEASE_S)
            waited_s = time.monotonic() - start
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert 0.4 <= waited_s < 3.0
        assert excinfo.value.exit_code == EXIT_UNAVAILABLE
        assert "held its write lock for more than 0.5s" in excinfo.value.message
        assert session.renew(lease, LEASE_S) is True  # the same session recovers
    finally:
        session.close()


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
