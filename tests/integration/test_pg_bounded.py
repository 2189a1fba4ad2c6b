"""Every statement has a bound: one stuck behind a lock or a frozen server is
given up, cancelled on the server, and reported as stuck (``bounded-statements``).

Each test holds up a real statement on the real server: an admin's open
transaction holding the lease row (``SELECT ... FOR UPDATE``) or the whole
table (``LOCK TABLE``), or a backend stopped with SIGSTOP. A statement that
never returns cannot hang the suite: each call runs on a thread of its own
(``Attempt``), and the blocking transaction ends when the test does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.rows import TupleRow

from leaderrun.errors import DatabaseUnavailableError, StatementTimeoutError
from leaderrun.lease import Lease
from leaderrun.runs import RunEnd, RunOutcome
from leaderrun.stores.base import RUN_TABLE, TABLE
from leaderrun.stores.postgres import PostgresLeaseStore, PostgresSession
from tests.helpers.attempts import Attempt
from tests.stores import (
    BOUND_S,
    CANCELLED_WITHIN_S,
    LEASE_S,
    MARGIN_S,
    claim,
    expire_row,
    lease_row,
    nobody_left_waiting,
    open_transaction,
    row_locked,
)

pytestmark = [pytest.mark.pg, pytest.mark.slow]

Admin = Callable[[], psycopg.Connection[TupleRow]]

HOLDER = claim(1)
CONTENDER = claim(2)


@pytest.fixture
def app() -> str:
    """An application_name that tells this test's leaderrun backends apart."""
    return f"lr_bound_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def schema(store_schema: str) -> str:
    """The schema of the stores under test, with both tables."""
    return store_schema


@pytest.fixture
def store(pg_dsn: str, schema: str, app: str) -> PostgresLeaseStore:
    """A store whose statements are bounded by BOUND_S."""
    dsn = make_conninfo(pg_dsn, application_name=app)
    return PostgresLeaseStore(dsn, schema, attempt_budget_s=BOUND_S)


@pytest.fixture
def sessions(store: PostgresLeaseStore) -> Iterator[Callable[[], PostgresSession]]:
    """Opens sessions on ``store``; closes them all after the test."""
    opened: list[PostgresSession] = []

    def open_() -> PostgresSession:
        session = store.connect()
        opened.append(session)
        return session

    yield open_
    # A call still running on a session must not see its connection closed
    # from under it (psycopg would crash): such sessions are left open.
    if Attempt.all_ended(CANCELLED_WITHIN_S):
        for session in opened:
            session.close()


def tables_locked(admin: Admin, schema: str) -> Any:
    """An open transaction holding both tables in ACCESS EXCLUSIVE mode."""
    return open_transaction(
        admin,
        sql.SQL("LOCK TABLE {}, {} IN ACCESS EXCLUSIVE MODE").format(
            sql.Identifier(schema, TABLE), sql.Identifier(schema, RUN_TABLE)
        ),
    )


def assert_timed_out(error: BaseException, statement: str, lock: str) -> None:
    """A StatementTimeoutError that names the statement, lock, bound and cause."""
    assert isinstance(error, StatementTimeoutError), repr(error)
    message = error.message
    assert "\n" not in message
    assert statement in message
    assert lock in message
    assert f"{BOUND_S:g}s" in message
    assert "open transaction" in message
    assert "frozen" in message


def assert_session_dead(session: PostgresSession, lease: Lease) -> None:
    """A session whose statement was abandoned refuses every later statement."""
    with pytest.raises(DatabaseUnavailableError):
        session.renew(lease, LEASE_S)


# --- the lease statements -------------------------------------------------------------


def test_an_acquire_behind_a_locked_row_times_out_and_is_cancelled(
    sessions, pg_admin, schema, lock
):
    """An expired lease whose row another transaction holds: the acquire gives up
    after its bound, its backend stops waiting, and it grants nothing later."""
    taken = sessions().acquire(lock, HOLDER, LEASE_S).lease
    assert taken is not None
    expire_row(pg_admin, schema, lock)
    before = lease_row(pg_admin, schema, lock)
    contender = sessions()
    with row_locked(pg_admin, schema, lock) as blocker:
        attempt = Attempt(lambda: contender.acquire(lock, CONTENDER, LEASE_S))
        error = attempt.error_within(BOUND_S + MARGIN_S)
        assert_timed_out(error, "acquire", repr(str(lock)))
        assert attempt.took_s >= BOUND_S * 0.9, "it gave up before its bound"
        nobody_left_waiting(pg_admin, blocker)
    # The blocker has committed: an acquire still queued would win the lock now.
    assert lease_row(pg_admin, schema, lock) == before
    assert_session_dead(contender, taken)


@pytest.mark.parametrize("statement", ["renewal", "release"])
def test_a_renewal_or_release_behind_a_locked_row_times_out_and_is_cancelled(
    sessions, pg_admin, schema, lock, statement
):
    """The holder's own statements are bounded the same way, and change nothing."""
    session = sessions()
    lease = session.acquire(lock, HOLDER, LEASE_S).lease
    assert lease is not None
    before = lease_row(pg_admin, schema, lock)
    calls = {
        "renewal": lambda: session.renew(lease, 600.0),
        "release": lambda: session.release(lease, RunEnd(RunOutcome.ok, 0)),
    }
    with row_locked(pg_admin, schema, lock) as blocker:
        error = Attempt(calls[statement]).error_within(BOUND_S + MARGIN_S)
        assert_timed_out(error, statement, repr(str(lock)))
        nobody_left_waiting(pg_admin, blocker)
    assert lease_row(pg_admin, schema, lock) == before
    assert_session_dead(session, lease)


def test_a_frozen_backend_is_bounded(sessions, pg_cluster, pg_admin, app, lock):
    """A backend stopped with SIGSTOP: the renewal on it gives up after its bound."""
    if not pg_cluster.local:
        pytest.skip("stopping a backend needs the throwaway local cluster")
    session = sessions()
    lease = session.acquire(lock, HOLDER, LEASE_S).lease
    assert lease is not None
    with pg_admin() as conn:
        pids = [
            pid
            for (pid,) in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                (app,),
            )
        ]
    assert len(pids) == 1
    try:
        os.kill(pids[0], signal.SIGSTOP)
        error = Attempt(lambda: session.renew(lease, LEASE_S)).error_within(
            BOUND_S + MARGIN_S
        )
        assert_timed_out(error, "renewal", repr(str(lock)))
    finally:
        os.kill(pids[0], signal.SIGCONT)
    assert_session_dead(session, lease)


def server_pids(cluster: Any) -> list[int]:
    """The local server's postmaster and all its children."""
    postmaster = int((Path(cluster.datadir) / "postmaster.pid").read_text().split()[0])
    children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text()
    return [postmaster, *(int(p) for p in children.split())]


def test_an_acquire_given_up_that_commits_later_is_given_back(
    store, sessions, pg_cluster, pg_admin, schema, lock
):
    """With the whole server frozen no cancel gets through: the given-up acquire
    runs at the thaw. The next acquire of the same claim gives that unused token
    back and takes the next, instead of keeping everyone out until it expires."""
    if not pg_cluster.local:
        pytest.skip("freezing the server needs the throwaway local cluster")
    session = sessions()
    pids = server_pids(pg_cluster)
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        error = Attempt(lambda: session.acquire(lock, CONTENDER, LEASE_S)).error_within(
            BOUND_S + MARGIN_S
        )
        assert isinstance(error, StatementTimeoutError), repr(error)
        # Frozen until the cancel request has given up too: it never arrives.
        deadline_s = time.monotonic() + BOUND_S + MARGIN_S
        while any(t.name == "leaderrun-cancel" for t in threading.enumerate()):
            assert time.monotonic() < deadline_s, "the cancel request never gave up"
            time.sleep(0.05)
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    deadline_s = time.monotonic() + CANCELLED_WITHIN_S
    while True:  # the thawed backend runs the acquire it had received
        with pg_admin() as conn:
            orphan = conn.execute(
                sql.SQL("SELECT holder, token FROM {} WHERE lock_key = %s").format(
                    sql.Identifier(schema, TABLE)
                ),
                (lock.key,),
            ).fetchone()
        if orphan is not None:
            break
        assert time.monotonic() < deadline_s, "the given-up acquire never ran"
        time.sleep(0.05)
    assert orphan == (CONTENDER.holder, 1)
    lease = sessions().acquire(lock, CONTENDER, LEASE_S).lease
    assert lease is not None
    assert lease.token == 2
    assert lease_row(pg_admin, schema, lock)[:2] == (CONTENDER.holder, 2)


class Interrupted(Exception):
    """What the test's signal handler raises in the waiting (main) thread."""


def test_a_signal_while_waiting_returns_at_once_and_cancels_on_the_server(
    pg_dsn, schema, sessions, pg_admin, lock
):
    """A handler raising in the main thread, as SignalInbox.cancelling() does, ends
    the wait within a second, long before the bound; the statement is cancelled."""
    patient = PostgresLeaseStore(pg_dsn, schema, attempt_budget_s=60.0)
    taken = sessions().acquire(lock, HOLDER, LEASE_S).lease
    assert taken is not None
    expire_row(pg_admin, schema, lock)
    before = lease_row(pg_admin, schema, lock)
    contender = patient.connect()

    def interrupted(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGUSR1, interrupted)
    sender = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR1))
    try:
        with row_locked(pg_admin, schema, lock) as blocker:
            # Should the wait not end, the blocker is terminated: the test fails
            # instead of hanging.
            rescue = threading.Timer(15.0, terminate, (pg_admin, blocker))
            rescue.start()
            began_s = time.monotonic()
            sender.start()
            try:
                with pytest.raises(Interrupted):
                    contender.acquire(lock, CONTENDER, LEASE_S)
                took_s = time.monotonic() - began_s
            finally:
                rescue.cancel()
            assert took_s < 0.3 + 1.0
            nobody_left_waiting(pg_admin, blocker)
    finally:
        sender.cancel()
        signal.signal(signal.SIGUSR1, previous)
        contender.close()
    assert lease_row(pg_admin, schema, lock) == before


def terminate(admin: Admin, pid: int) -> None:
    with admin() as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


# --- the operators' statements --------------------------------------------------------


def test_an_operator_release_behind_a_locked_row_times_out_and_is_cancelled(
    store, sessions, pg_admin, schema, lock
):
    """release --force on a row another transaction holds: bounded, revokes nothing."""
    taken = sessions().acquire(lock, HOLDER, LEASE_S).lease
    assert taken is not None
    before = lease_row(pg_admin, schema, lock)
    with row_locked(pg_admin, schema, lock) as blocker:
        error = Attempt(lambda: store.release(lock, force=True)).error_within(
            BOUND_S + MARGIN_S
        )
        assert_timed_out(error, "release", repr(str(lock)))
        nobody_left_waiting(pg_admin, blocker)
    assert lease_row(pg_admin, schema, lock) == before


@pytest.mark.parametrize("query", ["status", "history"])
def test_status_and_history_behind_a_locked_table_time_out_and_are_cancelled(
    store, sessions, pg_admin, schema, lock, query
):
    """Reads wait only for a table lock (a migration's, a LOCK TABLE): bounded too."""
    taken = sessions().acquire(lock, HOLDER, LEASE_S, history_keep=5).lease
    assert taken is not None
    calls = {
        "status": lambda: store.snapshot(lock),
        "history": lambda: store.history(lock, 10),
    }
    with tables_locked(pg_admin, schema) as blocker:
        error = Attempt(calls[query]).error_within(BOUND_S + MARGIN_S)
        assert_timed_out(error, query, repr(str(lock)))
        nobody_left_waiting(pg_admin, blocker)
