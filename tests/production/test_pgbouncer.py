"""leaderrun through a real PgBouncer: transaction pooling, and the other two modes.

Transaction pooling hands each transaction to whichever server connection is
free, so anything a session keeps (advisory locks, SET, prepared statements)
goes missing or shows up under another client. leaderrun keeps none (rule
``no-session-state``): every lease statement is one autocommit transaction,
unprepared.
"""

from __future__ import annotations

import time
import uuid

import pytest

from leaderrun.errors import StatementTimeoutError
from leaderrun.lease import parse_lock_id
from leaderrun.stores.postgres import PostgresLeaseStore
from tests.acceptance.conftest import FAST, Leaderrun, child, read_rest, readline
from tests.helpers.attempts import Attempt
from tests.production.operations import status_release_history
from tests.stores import BOUND_S, MARGIN_S, claim, lease_row, row_locked
from tests.stores import expire_row as expire
from tests.stores import nobody_left_waiting as assert_nobody_left_waiting

HOLDER, CONTENDER = claim(1), claim(2)

pytestmark = [pytest.mark.production, pytest.mark.pg, pytest.mark.slow]

# Twelve renewals and more: psycopg would prepare a statement run five times
# (its prepare_threshold), which PgBouncer 1.18 in transaction mode would break.
RENEWALS_S = "5"


def transactions(bouncer) -> int:
    """Transactions PgBouncer has passed to the server for database postgres."""
    rows = bouncer.show("STATS")
    return sum(int(row[1]) for row in rows if row[0] == "postgres")


@pytest.mark.parametrize("pool_mode", ["transaction", "statement", "session"])
def test_concurrent_jobs_renew_through_every_pool_mode(pgbouncers, pool_mode):
    """Three jobs on three locks share two server connections and keep renewing.

    Had psycopg prepared the renewal (it does after five runs unless told not
    to), two clients would PREPARE the same statement name on one server
    connection, or EXECUTE it on one that never saw it, and renewals would fail.
    """
    bouncer = pgbouncers(pool_mode)
    runners = [
        Leaderrun(bouncer.dsn(), f"pool-{uuid.uuid4().hex[:12]}") for _ in range(3)
    ]
    try:
        before = transactions(bouncer)
        procs = [
            runner.start(
                *FAST, "--renew-interval", "0.3s", "-vv", "--", "sleep", RENEWALS_S
            )
            for runner in runners
        ]
        renewals = 0
        for proc in procs:
            assert proc.wait(timeout=60) == 0
            assert proc.stderr is not None
            stderr = read_rest(proc.stderr)
            assert "renewal failed" not in stderr
            assert stderr.count("renewed ") >= 8, stderr
            renewals += stderr.count("renewed ")
        # The statements really went through this PgBouncer.
        assert transactions(bouncer) - before >= renewals
    finally:
        for runner in runners:
            runner.kill_all()


def test_three_contenders_through_pgbouncer_exactly_one_runs(through_bouncer):
    """Racing acquires pooled onto three server connections: one winner."""
    procs = [
        through_bouncer.start("--", "sh", "-c", "echo ran; sleep 2") for _ in range(4)
    ]
    results = [(p.wait(timeout=60), read_rest(p.stdout)) for p in procs]
    assert sorted(code for code, _ in results) == [0, 75, 75, 75]
    assert [out for _, out in results].count("ran\n") == 1


def test_status_release_and_history_through_pgbouncer(through_bouncer):
    """The operators' commands work through transaction pooling too."""
    status_release_history(through_bouncer, "public")


def test_waiter_through_pgbouncer_runs_after_the_holder(through_bouncer):
    """--wait polls through the pooler and takes over with a larger token."""
    holder = through_bouncer.start(*FAST, "--", *child("--exit-after", "2"))
    assert readline(holder.stdout).startswith("ready")
    waiter = through_bouncer.start(
        *FAST, "--wait", "--", "sh", "-c", "echo token $LEADERRUN_FENCING_TOKEN"
    )
    assert holder.wait(timeout=30) == 0
    assert waiter.wait(timeout=30) == 0
    assert read_rest(waiter.stdout) == "token 2\n"


def test_lease_taken_behind_pgbouncer_stops_the_child_with_122(
    through_bouncer, pg_admin
):
    """A takeover is seen through the pooler: the renewal matches no row, exit 122."""
    proc = through_bouncer.start(*FAST, "--", *child())
    assert readline(proc.stdout).startswith("ready")
    with pg_admin() as conn:
        conn.execute(
            "UPDATE leader_lease SET holder = 'thief', token = token + 1"
            " WHERE lock_name = %s",
            (through_bouncer.lock,),
        )
    began = time.monotonic()
    assert proc.wait(timeout=30) == 122
    assert time.monotonic() - began < 15
    assert "taken over" in proc.stderr.read()


def test_server_connection_closed_under_pgbouncer_is_survived(
    through_bouncer, pg_admin
):
    """Server connections killed behind the pooler: reconnect, keep leading."""
    proc = through_bouncer.start(
        *FAST, "-v", "--", "sh", "-c", "echo started; sleep 5; echo done"
    )
    assert readline(proc.stdout) == "started\n"
    for _ in range(3):
        with pg_admin() as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE usename = 'postgres' AND pid <> pg_backend_pid()"
                " AND application_name <> 'leaderrun-tests-admin'"
                " AND backend_type = 'client backend'"
            )
        time.sleep(1)
    assert proc.wait(timeout=30) == 0
    assert readline(proc.stdout) == "done\n"


def test_an_acquire_stuck_behind_a_row_lock_is_cancelled_through_pgbouncer(
    bouncer, pg_dsn, pg_admin, lock_name
):
    """Transaction pooling: no SET, no startup options, yet the stuck acquire gives
    up after its bound and the cancel reaches the server behind the pooler."""
    PostgresLeaseStore(pg_dsn).init()
    store = PostgresLeaseStore(bouncer.dsn(), attempt_budget_s=BOUND_S)
    lock = parse_lock_id(lock_name)
    holder = store.connect()
    contender = store.connect()
    try:
        assert holder.acquire(lock, HOLDER, 30.0).lease is not None
        expire(pg_admin, "public", lock)
        before = lease_row(pg_admin, "public", lock)
        with row_locked(pg_admin, "public", lock) as blocker:
            attempt = Attempt(lambda: contender.acquire(lock, CONTENDER, 30.0))
            error = attempt.error_within(BOUND_S + MARGIN_S)
            assert isinstance(error, StatementTimeoutError), repr(error)
            assert_nobody_left_waiting(pg_admin, blocker)
        assert lease_row(pg_admin, "public", lock) == before
    finally:
        holder.close()
        contender.close()
