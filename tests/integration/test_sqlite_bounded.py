"""Every SQLite call is bounded and cancellable, and a given-up session is dead.

A statement waiting for another process's write lock does not return to Python
inside SQLite's busy handler, so the store has none: it retries on a worker
thread (``leaderrun.bounded.call_bounded``) while the caller waits on an event,
which a signal handler in the caller can cut short.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from leaderrun.errors import (
    EXIT_UNAVAILABLE,
    CancelledBySignalError,
    DatabaseUnavailableError,
    StatementTimeoutError,
)
from leaderrun.lease import Lease
from leaderrun.stores.sqlite import STATEMENT_ALLOWANCE_S, SqliteLeaseStore
from tests.helpers.sqlite_clocks import StuckClock
from tests.helpers.waiting import wait_until
from tests.stores import LEASE_S, claim

WAIT_S = 30.0
"""The bound on anything the test itself waits for."""


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "leases.db"
    SqliteLeaseStore(path).init()
    return path


@pytest.fixture
def write_lock_held(db: Path) -> Iterator[sqlite3.Connection]:
    """Another connection inside BEGIN IMMEDIATE: every writer must wait."""
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    yield blocker
    if blocker.in_transaction:
        blocker.execute("ROLLBACK")
    blocker.close()


def statement_threads() -> list[threading.Thread]:
    """The store's worker threads alive now."""
    return [t for t in threading.enumerate() if t.name == "leaderrun-sqlite"]


@pytest.mark.timing
def test_a_statement_blocked_by_a_write_transaction_times_out_within_its_bound(
    db, lock, write_lock_held
):
    """With the write lock held elsewhere, an acquire gives up after busy_s,
    well within its bound, naming the file, the lock and how long (exit 69)."""
    session = SqliteLeaseStore(db, busy_s=0.5).connect()
    try:
        start_s = time.monotonic()
        with pytest.raises(StatementTimeoutError) as excinfo:
            session.acquire(lock, claim(1), LEASE_S)
        waited_s = time.monotonic() - start_s
        assert 0.5 <= waited_s < 0.5 + STATEMENT_ALLOWANCE_S
        assert excinfo.value.exit_code == EXIT_UNAVAILABLE
        assert excinfo.value.message == (
            f"acquiring {str(lock)!r} in {db}: another process held its write"
            " lock for more than 0.5s"
        )
        write_lock_held.execute("ROLLBACK")
        # Waiting out the lock is not giving up: the session is still good.
        assert session.acquire(lock, claim(1), LEASE_S).lease is not None
    finally:
        session.close()


@pytest.mark.timing
def test_a_signal_to_the_waiting_thread_gives_the_statement_up_at_once(
    db, lock, write_lock_held
):
    """A signal handler raising in the waiting (main) thread ends the wait long
    before busy_s; the statement is given up, its session is dead, its worker
    ends, and nothing was taken."""
    store = SqliteLeaseStore(db, busy_s=WAIT_S)
    session = store.connect()

    def cancel(signum, frame):
        raise CancelledBySignalError(signum)

    def send_once_waiting() -> None:
        wait_until(statement_threads, "the statement's worker")
        os.kill(os.getpid(), signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, cancel)
    sender = threading.Thread(target=send_once_waiting)
    try:
        sender.start()
        start_s = time.monotonic()
        with pytest.raises(CancelledBySignalError):
            session.acquire(lock, claim(1), LEASE_S)
        cancelled_after_s = time.monotonic() - start_s
    finally:
        sender.join(WAIT_S)
        signal.signal(signal.SIGUSR1, previous)
    assert cancelled_after_s < 2.0  # not the 30 s the lock wait may take
    wait_until(lambda: not statement_threads(), "the given-up worker's end")
    with pytest.raises(DatabaseUnavailableError, match="given up"):
        session.acquire(lock, claim(1), LEASE_S)
    session.close()
    write_lock_held.execute("ROLLBACK")
    fresh = store.connect()
    try:
        assert fresh.acquire(lock, claim(2), LEASE_S).lease == Lease(
            lock, claim(2).holder, 1
        )
    finally:
        fresh.close()


@pytest.mark.timing
def test_a_call_stuck_past_its_bound_is_given_up_and_rolled_back(db, lock):
    """A write stuck mid-transaction (a disk that stopped answering) is given up
    at its bound; once it comes back it is interrupted and rolled back, the
    connection is closed, and the file's write lock is free again."""
    clock = StuckClock()
    store = SqliteLeaseStore(db, busy_s=0.1, clock=clock)
    session = store.connect()
    start_s = time.monotonic()
    with pytest.raises(StatementTimeoutError) as excinfo:
        session.acquire(lock, claim(1), LEASE_S)
    waited_s = time.monotonic() - start_s
    assert store.bound_s <= waited_s < store.bound_s + 1.0
    assert excinfo.value.message == (
        f"acquiring {str(lock)!r} in {db} did not finish within"
        f" {store.bound_s:.3g}s and was given up; is the disk or its file system stuck?"
    )
    with pytest.raises(DatabaseUnavailableError, match="given up"):
        session.renew(Lease(lock, claim(1).holder, 1), LEASE_S)
    clock.release.set()
    wait_until(lambda: not statement_threads(), "the stuck worker's end")
    session.close()
    other = sqlite3.connect(db, isolation_level=None, timeout=WAIT_S)
    try:
        other.execute("BEGIN IMMEDIATE")  # the lock was let go
        assert other.execute("SELECT count(*) FROM leader_lease").fetchone() == (0,)
        other.execute("ROLLBACK")
    finally:
        other.close()
