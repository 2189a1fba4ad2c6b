"""The cron guards' SQL against the real server: windows, min-hold, run history."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql
from psycopg.rows import TupleRow

from leaderrun.lease import Lease, LockId, parse_lock_id
from leaderrun.runs import OncePer, RunEnd, RunOutcome, window_start_s
from leaderrun.stores.base import RUN_TABLE, TABLE, AcquireResult, Claim
from leaderrun.stores.postgres import PostgresLeaseStore
from leaderrun.stores.postgres_sql import window_sql

pytestmark = pytest.mark.pg

Admin = Callable[[], psycopg.Connection[TupleRow]]

LEASE_S = 30.0
HOUR = OncePer(3600.0)
HOUR_RETRY = OncePer(3600.0, retry_failed=True)


def claim(n: int) -> Claim:
    return Claim(holder=f"host{n}:{n}:nonce", host=f"host{n}", pid=n, command="job")


def acquired(result: AcquireResult) -> Lease:
    assert result.lease is not None, result
    return result.lease


@pytest.fixture(scope="module")
def schema(pg_dsn: str, pg_admin: Admin) -> Iterator[str]:
    name = f"lr_runs_{uuid.uuid4().hex[:10]}"
    with pg_admin() as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    PostgresLeaseStore(pg_dsn, name).init()
    yield name
    with pg_admin() as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def store(pg_dsn: str, schema: str) -> PostgresLeaseStore:
    return PostgresLeaseStore(pg_dsn, schema)


@pytest.fixture
def session(store: PostgresLeaseStore):
    opened = store.connect()
    yield opened
    opened.close()


@pytest.fixture
def lock(lock_name: str) -> LockId:
    return parse_lock_id(lock_name)


def admin_sql(
    admin: Admin, schema: str, query: str, *args: object
) -> list[tuple[Any, ...]]:
    """Run ``query`` with {lease} and {runs} naming this schema's tables."""
    statement = sql.SQL(query).format(
        lease=sql.Identifier(schema, TABLE), runs=sql.Identifier(schema, RUN_TABLE)
    )
    with admin() as conn:
        cursor = conn.execute(statement, args)
        return cursor.fetchall() if cursor.description else []


def expire(admin: Admin, schema: str, lock: LockId) -> None:
    """End the lease a second ago in the server's time, as a dead holder's would."""
    admin_sql(
        admin,
        schema,
        "UPDATE {lease} SET expires_at = now() - interval '1 second'"
        " WHERE lock_key = %s",
        lock.key,
    )


# --- windows ----------------------------------------------------------------------

EPOCH_2000_S = 946684800.0
EPOCH_2100_S = 4102444800.0


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    at_us=st.integers(int(EPOCH_2000_S * 1e6), int(EPOCH_2100_S * 1e6)),
    period_s=st.sampled_from([1.0, 60.0, 300.0, 3600.0, 86400.0, 7 * 86400.0, 0.25]),
    offset_fraction=st.floats(0, 0.999),
)
def test_the_sql_window_is_the_python_window(
    pg_admin, at_us, period_s, offset_fraction
):
    """The server's window arithmetic agrees with runs.window_start_s exactly."""
    at = datetime.fromtimestamp(at_us / 1e6, UTC)
    offset_s = round(period_s * offset_fraction)  # whole seconds, as flags give
    if offset_s >= period_s:
        offset_s = 0
    query = sql.SQL("SELECT {}").format(window_sql(sql.Placeholder("at")))
    with pg_admin() as conn:
        row = conn.execute(
            query, {"at": at, "period_s": period_s, "offset_s": float(offset_s)}
        ).fetchone()
    assert row is not None
    expected = window_start_s(at.timestamp(), period_s, offset_s)
    assert row[0].timestamp() == pytest.approx(expected, abs=1e-6)
    assert row[0] <= at


def test_window_is_null_without_once_per(pg_admin):
    query = sql.SQL("SELECT {}").format(window_sql(sql.SQL("now()")))
    with pg_admin() as conn:
        row = conn.execute(query, {"period_s": None, "offset_s": 0.0}).fetchone()
    assert row == (None,)


# --- --once-per -------------------------------------------------------------------


def test_a_window_that_ran_refuses_a_second_start(session, lock):
    """After an ok run, a later node in the same window is refused: window_done."""
    first = session.acquire(lock, claim(1), LEASE_S, once_per=HOUR)
    lease = acquired(first)
    assert first.window_start is not None
    assert first.window_start.timestamp() % 3600 == 0
    assert session.release(lease, RunEnd(RunOutcome.ok, 0, in_window=True))
    again = session.acquire(lock, claim(2), LEASE_S, once_per=HOUR)
    assert again.lease is None
    assert again.window_done
    assert again.window_start == first.window_start
    assert again.holder_host == "host1"
    # --retry-failed changes nothing after a run that went well.
    assert session.acquire(lock, claim(3), LEASE_S, once_per=HOUR_RETRY).window_done


def test_without_once_per_the_window_does_not_matter(session, lock):
    """A plain run of the same lock is not refused, and keeps the window's state."""
    lease = acquired(session.acquire(lock, claim(1), LEASE_S, once_per=HOUR))
    session.release(lease, RunEnd(RunOutcome.ok, 0, in_window=True))
    plain = acquired(session.acquire(lock, claim(2), LEASE_S))
    session.release(plain, RunEnd(RunOutcome.failed, 1))
    assert session.acquire(lock, claim(3), LEASE_S, once_per=HOUR).window_done
    assert session.acquire(lock, claim(3), LEASE_S, once_per=HOUR_RETRY).window_done


def test_a_failed_window_reruns_only_with_retry_failed(session, lock):
    lease = acquired(session.acquire(lock, claim(1), LEASE_S, once_per=HOUR))
    session.release(lease, RunEnd(RunOutcome.failed, 2, in_window=True))
    assert session.acquire(lock, claim(2), LEASE_S, once_per=HOUR).window_done
    retried = session.acquire(lock, claim(3), LEASE_S, once_per=HOUR_RETRY)
    assert acquired(retried).token == lease.token + 1


def test_a_lost_window_reruns_only_with_retry_failed(session, lock, pg_admin, schema):
    """A holder that died (no release) leaves window_ok unset: the run was lost."""
    lease = acquired(session.acquire(lock, claim(1), LEASE_S, once_per=HOUR))
    expire(pg_admin, schema, lock)
    assert session.acquire(lock, claim(2), LEASE_S, once_per=HOUR).window_done
    retried = session.acquire(lock, claim(3), LEASE_S, once_per=HOUR_RETRY)
    assert acquired(retried).token == lease.token + 1


def test_a_running_window_is_done_for_others(session, lock):
    """While the window's run holds the lease, a node without retry gives up."""
    acquired(session.acquire(lock, claim(1), LEASE_S, once_per=HOUR))
    busy = session.acquire(lock, claim(2), LEASE_S, once_per=HOUR)
    assert (busy.lease, busy.window_done) == (None, True)
    # With --retry-failed it waits: the run may yet fail.
    waiting = session.acquire(lock, claim(2), LEASE_S, once_per=HOUR_RETRY)
    assert (waiting.lease, waiting.window_done) == (None, False)


def test_a_new_window_runs_again(session, lock):
    """With a 1 s window, the next window's start is accepted."""
    per_second = OncePer(1.0)
    first = acquired(session.acquire(lock, claim(1), LEASE_S, once_per=per_second))
    session.release(first, RunEnd(RunOutcome.ok, 0, in_window=True))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        result = session.acquire(lock, claim(2), LEASE_S, once_per=per_second)
        if result.lease is not None:
            break
        assert result.window_done
        time.sleep(0.05)
    else:
        pytest.fail("the next one-second window never accepted a start")


# --- --min-hold -------------------------------------------------------------------


def test_min_hold_keeps_the_lease_taken_after_release(session, lock):
    lease = acquired(session.acquire(lock, claim(1), LEASE_S))
    assert session.release(lease, RunEnd(RunOutcome.ok, 0, min_hold_s=1.5))
    held = session.acquire(lock, claim(2), LEASE_S)
    assert held.lease is None
    assert held.holder == claim(1).holder
    assert held.expires_in_s is not None
    assert 0.5 < held.expires_in_s <= 1.5
    time.sleep(held.expires_in_s + 0.05)
    assert acquired(session.acquire(lock, claim(2), LEASE_S)).token == lease.token + 1


def test_min_hold_shorter_than_the_run_frees_at_once(session, lock):
    lease = acquired(session.acquire(lock, claim(1), LEASE_S))
    time.sleep(0.2)
    assert session.release(lease, RunEnd(RunOutcome.ok, 0, min_hold_s=0.1))
    assert acquired(session.acquire(lock, claim(2), LEASE_S)).token == lease.token + 1


# --- history ----------------------------------------------------------------------


def runs_of(admin: Admin, schema: str, lock: LockId) -> list[tuple[Any, ...]]:
    return admin_sql(
        admin,
        schema,
        "SELECT token, holder, outcome, exit_status, finished_at IS NOT NULL"
        " FROM {runs} WHERE lock_key = %s ORDER BY token",
        lock.key,
    )


def test_each_start_is_recorded_and_closed(session, lock, pg_admin, schema):
    lease = acquired(session.acquire(lock, claim(1), LEASE_S, history_keep=10))
    assert runs_of(pg_admin, schema, lock) == [(1, claim(1).holder, None, None, False)]
    session.release(lease, RunEnd(RunOutcome.failed, 3))
    assert runs_of(pg_admin, schema, lock) == [(1, claim(1).holder, "failed", 3, True)]


def test_no_history_without_history_keep(session, lock, pg_admin, schema):
    """The library's plain acquire records nothing."""
    lease = acquired(session.acquire(lock, claim(1), LEASE_S))
    session.release(lease, RunEnd(RunOutcome.ok, 0))
    assert runs_of(pg_admin, schema, lock) == []


def test_a_dead_holders_run_is_closed_as_lost_at_its_last_renewal(
    session, lock, pg_admin, schema
):
    first = acquired(session.acquire(lock, claim(1), LEASE_S, history_keep=10))
    time.sleep(0.3)
    assert session.renew(first, LEASE_S)
    [(renewed_at,)] = admin_sql(
        pg_admin, schema, "SELECT renewed_at FROM {lease} WHERE lock_key = %s", lock.key
    )
    expire(pg_admin, schema, lock)
    second = acquired(session.acquire(lock, claim(2), LEASE_S, history_keep=10))
    rows = admin_sql(
        pg_admin,
        schema,
        "SELECT token, outcome, finished_at FROM {runs} WHERE lock_key = %s"
        " ORDER BY token",
        lock.key,
    )
    assert rows == [(1, "lost", renewed_at), (2, None, None)]
    # The dead holder's late report, if it ever comes, knows better than a guess.
    session.release(first, RunEnd(RunOutcome.lost, 122))
    assert runs_of(pg_admin, schema, lock)[0][2:4] == ("lost", 122)
    [(finished_at,)] = admin_sql(
        pg_admin,
        schema,
        "SELECT finished_at FROM {runs} WHERE lock_key = %s AND token = 1",
        lock.key,
    )
    assert finished_at == renewed_at  # not the late report's own time
    session.release(second, RunEnd(RunOutcome.ok, 0))
    assert runs_of(pg_admin, schema, lock)[1][2:] == ("ok", 0, True)


def test_history_is_pruned_to_keep_in_the_acquire(session, lock, pg_admin, schema):
    for n in range(7):
        lease = acquired(session.acquire(lock, claim(n), LEASE_S, history_keep=3))
        assert len(runs_of(pg_admin, schema, lock)) == min(n + 1, 3)
        session.release(lease, RunEnd(RunOutcome.ok, 0))
    assert [row[0] for row in runs_of(pg_admin, schema, lock)] == [5, 6, 7]


def test_history_and_last_runs_read_back(store, session, lock, pg_admin, schema):
    other = parse_lock_id(f"{lock.name}-other")
    ok = acquired(session.acquire(lock, claim(1), LEASE_S, history_keep=10))
    session.release(ok, RunEnd(RunOutcome.ok, 0))
    acquired(session.acquire(lock, claim(2), LEASE_S, history_keep=10))  # running
    dead = acquired(session.acquire(other, claim(3), LEASE_S, history_keep=10))
    expire(pg_admin, schema, other)  # died, nobody took over yet
    runs = store.history(lock, 10)
    assert [(r.token, r.outcome, r.host) for r in runs] == [
        (2, "running", "host2"),
        (1, "ok", "host1"),
    ]
    assert runs[1].exit_status == 0
    assert runs[1].duration_s >= 0
    assert runs[1].finished_at is not None
    assert store.history(lock, 1)[0].token == 2
    last = {r.lock: (r.token, r.outcome) for r in store.last_runs()}
    assert last[str(lock)] == (2, "running")
    assert last[str(other)] == (dead.token, "lost")
    assert {r.lock for r in store.history(None, 1000)} >= {str(lock), str(other)}


def test_history_of_a_database_without_runs_is_empty(pg_dsn, pg_admin):
    name = f"lr_empty_{uuid.uuid4().hex[:10]}"
    with pg_admin() as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    try:
        assert PostgresLeaseStore(pg_dsn, name).history(None, 10) == []
        assert PostgresLeaseStore(pg_dsn, name).last_runs() == []
    finally:
        with pg_admin() as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


def test_racing_nodes_start_a_window_once(store, lock):
    """Ten nodes acquiring and releasing in a loop, at once: one start per window."""
    starts: list[int] = []
    barrier = threading.Barrier(10)

    def node(n: int) -> None:
        session = store.connect()
        try:
            barrier.wait(timeout=30)
            stop_at = time.monotonic() + 1.5
            while time.monotonic() < stop_at:
                result = session.acquire(
                    lock, claim(n), LEASE_S, once_per=HOUR, history_keep=50
                )
                if result.lease is not None:
                    starts.append(n)
                    session.release(
                        result.lease, RunEnd(RunOutcome.ok, 0, in_window=True)
                    )
        finally:
            session.close()

    threads = [threading.Thread(target=node, args=(n,)) for n in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    assert len(starts) == 1
    [run] = store.history(lock, 10)
    assert run.outcome == "ok"
